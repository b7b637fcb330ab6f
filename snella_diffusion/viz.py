"""PNG figures drawn with PIL alone: image grids, allocation heatmaps, line and bar charts.

matplotlib is not a dependency; these figures are simple enough to draw pixel by pixel.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import write_atomically

PathLike = Union[str, os.PathLike]
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _save(image: Image.Image, path: PathLike) -> Path:
    """Save atomically (temporary file, then rename) so a killed run leaves no broken PNG."""
    return write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: object = "black",
               font: Optional[ImageFont.ImageFont] = None) -> None:
    """Write ``text`` at ``xy`` (pixels) word by word, one ``n``-width apart: Pillow's default
    font advances only 2 px for a space at its default size, so "a sks square" read as
    "asksssquare"."""
    font = font or ImageFont.load_default()
    gap = max(font.getlength(" "), font.getlength("n"))
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + gap


MIN_GRID_TILE = 128
ROW_LABEL_WIDTH = 160


def save_image_grid(images: Sequence[Image.Image], path: PathLike, columns: int = 4,
                    row_labels: Optional[Sequence[str]] = None, min_tile: int = MIN_GRID_TILE) -> Path:
    """Tile ``images`` (resized to the first one's size) in rows of ``columns``.

    Tiles smaller than ``min_tile`` pixels on their short side are enlarged by an integer
    factor, nearest neighbour (a 16 px sample stays readable, its pixels exact); ``row_labels``
    (one per row) are written in a white margin on the left.
    """
    if not images:
        raise ValueError("save_image_grid: no images")
    width, height = images[0].size
    zoom = max(1, -(-min_tile // max(1, min(width, height))))
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    margin = ROW_LABEL_WIDTH if row_labels else 0
    tile_width, tile_height = width * zoom, height * zoom
    grid = Image.new("RGB", (margin + columns * tile_width, rows * tile_height), "white")
    for index, image in enumerate(images):
        tile = image.convert("RGB").resize((width, height)).resize((tile_width, tile_height), Image.NEAREST)
        grid.paste(tile, (margin + (index % columns) * tile_width, (index // columns) * tile_height))
    if row_labels:
        draw = ImageDraw.Draw(grid)
        for row, label in enumerate(row_labels[:rows]):
            draw_label(draw, (6, row * tile_height + tile_height // 2 - 6), label)
    return _save(grid, path)


def _viridis_like(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along a dark-blue → green → yellow ramp."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    position = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


@dataclass(frozen=True)
class RowGroup:
    """Consecutive heatmap rows ``[start, stop)`` of one block (``block``, e.g.
    "down_blocks.1", "single_transformer_blocks.3") inside one section ("down", "mid", "up",
    "double", "single", "blocks", or a text encoder's name)."""

    section: str
    block: str
    start: int
    stop: int


_BLOCK_PATTERNS = (
    (re.compile(r"(?:^|\.)(down_blocks\.\d+)\."), "down"),
    (re.compile(r"(?:^|\.)(mid_block)\."), "mid"),
    (re.compile(r"(?:^|\.)(up_blocks\.\d+)\."), "up"),
    (re.compile(r"(?:^|\.)(single_transformer_blocks\.\d+)\."), "single"),
    (re.compile(r"(?:^|\.)(transformer_blocks\.\d+)\."), "double"),
    (re.compile(r"(?:^|\.)(layers\.\d+)\."), "layers"),
)


def _section_and_block(name: str, has_single: bool) -> tuple[str, str]:
    component, _, path = name.partition(".")
    if component.startswith("text_encoder"):
        match = _BLOCK_PATTERNS[-1][0].search(name)
        return component, f"{component} {match.group(1)}" if match else component
    for pattern, section in _BLOCK_PATTERNS[:-1]:
        match = pattern.search(path or name)
        if match:
            if section == "double" and not has_single:
                section = "blocks"
            return section, match.group(1)
    parts = (path or name).split(".")
    return parts[0], ".".join(parts[:2])


def allocation_row_groups(layer_names: Sequence[str]) -> list[RowGroup]:
    """Runs of consecutive layers in the same block, in row order: UNet layers group into
    down/mid/up blocks, DiT layers into (Flux: double/single) transformer blocks, text
    encoder layers into encoder layers. Names are ``<component>.<module path>``."""
    has_single = any("single_transformer_blocks." in name for name in layer_names)
    groups: list[RowGroup] = []
    for row, name in enumerate(layer_names):
        section, block = _section_and_block(name, has_single)
        if groups and groups[-1].section == section and groups[-1].block == block:
            groups[-1] = RowGroup(section, block, groups[-1].start, row + 1)
        else:
            groups.append(RowGroup(section, block, row, row + 1))
    return groups


SEPARATOR = (255, 255, 255)


def save_allocation_heatmap(
    steps: Sequence[int],
    kept_fractions: Sequence[Sequence[float]],
    layer_names: Sequence[str],
    path: PathLike,
    title: str = "kept fraction per layer (rows) over optimizer steps (columns)",
) -> Path:
    """Heatmap of layers × reallocation steps; colour = kept fraction of ΔW entries.

    Rows are labelled on the left: a coloured band per section (down / mid / up, double /
    single, text encoder) and the block name of each run of rows where it fits; white
    lines across the heatmap separate the sections.

    Args:
        steps: optimizer step of each column (allocator.history_steps).
        kept_fractions: one row per step, one value per layer (allocator.history_kept).
        layer_names: one per layer, in the order of the values.
    """
    data = np.asarray(kept_fractions, dtype=float).T  # layers x steps
    if data.size == 0:
        raise ValueError("save_allocation_heatmap: no allocation history")
    layers, columns = data.shape
    heat_w = max(420, min(900, columns * 24))
    heat_h = max(200, min(1200, layers * 12))
    gutter, band = 190, 8
    left, top, bottom, legend = 8 + gutter, 28, 40, 60
    width = left + heat_w + legend
    height = top + heat_h + bottom
    canvas = Image.new("RGB", (width, height), "white")
    pixels = _viridis_like(data)
    heat = Image.fromarray(pixels).resize((heat_w, heat_h), Image.NEAREST)
    canvas.paste(heat, (left, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def row_y(row: int) -> int:
        return top + round(row * heat_h / layers)

    groups = allocation_row_groups(layer_names)
    sections: list[RowGroup] = []
    for group in groups:
        if sections and sections[-1].section == group.section:
            sections[-1] = RowGroup(group.section, group.section, sections[-1].start, group.stop)
        else:
            sections.append(RowGroup(group.section, group.section, group.start, group.stop))
    for index, section in enumerate(sections):
        y0, y1 = row_y(section.start), row_y(section.stop)
        draw.rectangle([8, y0, 8 + band - 1, y1 - 1], fill=PALETTE[index % len(PALETTE)])
        draw.text((8 + band + 3, (y0 + y1) // 2 - 5), section.section[:8], fill=PALETTE[index % len(PALETTE)], font=font)
        if section.start > 0:
            draw.line([(8, y0), (left + heat_w - 1, y0)], fill=SEPARATOR, width=2)
    for group in groups:
        y0, y1 = row_y(group.start), row_y(group.stop)
        if y1 - y0 >= 11:
            draw.text((8 + band + 60, (y0 + y1) // 2 - 5), group.block[-21:], fill="black", font=font)
        draw.line([(8 + band + 58, y0), (left - 4, y0)], fill=(200, 200, 200))
    draw_label(draw, (8, 6), title, font=font)
    draw_label(draw, (left, top + heat_h + 6), f"steps {steps[0]} … {steps[-1]}", font=font)
    draw_label(draw, (left, top + heat_h + 20), f"{layers} layers ({layer_names[0]} … {layer_names[-1]})"[:140],
               font=font)
    ramp = _viridis_like(np.linspace(1, 0, heat_h)[:, None].repeat(12, axis=1))
    canvas.paste(Image.fromarray(ramp), (width - legend + 10, top))
    draw.text((width - legend + 26, top), "1.0", fill="black", font=font)
    draw.text((width - legend + 26, top + heat_h - 10), "0.0", fill="black", font=font)
    return _save(canvas, path)


def _frame(width: int, height: int, title: str):
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw_label(draw, (10, 6), title, font=font)
    return canvas, draw, font


def save_line_plot(
    series: dict[str, Sequence[tuple[float, float]]], path: PathLike, title: str = ""
) -> Path:
    """One polyline per series of (x, y) points, with axis ranges printed at the corners."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("save_line_plot: no points")
    width, height, margin = 640, 400, 50
    canvas, draw, font = _frame(width, height, title)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_low, y_high = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = margin + (x - x_low) / (x_high - x_low) * (width - 2 * margin)
        py = height - margin - (y - y_low) / (y_high - y_low) * (height - 2 * margin)
        return px, py

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for index, (name, values) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        elif pixels:
            x, y = pixels[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw_label(draw, (width - margin - 150, margin + 5 + 14 * index), name, fill=colour, font=font)
    draw.text((margin, height - margin + 5), f"{x_low:g}", fill="black", font=font)
    draw.text((width - margin - 40, height - margin + 5), f"{x_high:g}", fill="black", font=font)
    draw.text((5, height - margin - 10), f"{y_low:.3g}", fill="black", font=font)
    draw.text((5, margin), f"{y_high:.3g}", fill="black", font=font)
    return _save(canvas, path)


def save_bar_chart(values: dict[str, dict[str, float]], path: PathLike, title: str = "") -> Path:
    """One panel per metric; one bar per item, labelled with its value.

    Args:
        values: ``{metric: {item: value}}``, e.g. ``{"peak memory (GB)": {"lora": 5.5, ...}}``.
    """
    if not values:
        raise ValueError("save_bar_chart: no values")
    panel_w, height, margin = 360, 320, 40
    canvas, draw, font = _frame(panel_w * len(values), height + 20, title)
    for panel, (metric, items) in enumerate(values.items()):
        x0 = panel * panel_w
        draw_label(draw, (x0 + margin, 24), metric, font=font)
        top_value = max(items.values()) if items and max(items.values()) > 0 else 1.0
        bar_w = (panel_w - 2 * margin) / max(len(items), 1)
        base_y = height - margin
        for index, (item, value) in enumerate(items.items()):
            bar_h = (value / top_value) * (height - 2 * margin - 30)
            left = x0 + margin + index * bar_w + 4
            draw.rectangle([left, base_y - bar_h, left + bar_w - 8, base_y], fill=PALETTE[index % len(PALETTE)])
            draw.text((left, base_y - bar_h - 12), f"{value:.3g}", fill="black", font=font)
            draw.text((left, base_y + 4), item[:12], fill="black", font=font)
        draw.line([x0 + margin, base_y, x0 + panel_w - margin, base_y], fill="black")
    return _save(canvas, path)

"""PNG figures of the lab, drawn with PIL: sample grids (rows = prompts) and a scatter plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from snella_diffusion.viz import PALETTE, draw_label

LABEL_WIDTH = 150


def save_lab_grid(rows: dict[str, np.ndarray], path: Path, zoom: int = 4) -> Path:
    """One row per prompt: its label, then its images (N, H, W, 3) in [0, 1] enlarged ``zoom``
    times by pixel repetition."""
    height = max(images.shape[1] for images in rows.values()) * zoom
    width = max(images.shape[2] * len(images) for images in rows.values()) * zoom
    canvas = Image.new("RGB", (LABEL_WIDTH + width + 2 * len(rows), (height + 2) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (label, images) in enumerate(rows.items()):
        top = row * (height + 2)
        draw_label(draw, (4, top + height // 2 - 6), label, font=font)
        for column, image in enumerate(images):
            pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
            tile = Image.fromarray(pixels).resize((pixels.shape[1] * zoom, pixels.shape[0] * zoom), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + column * (tile.width + 2), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


MARKERS = ("circle", "square", "triangle", "diamond")


def draw_marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], shape: str, colour: object,
                radius: float = 4.0) -> None:
    """A filled marker of ``shape`` (one of ``MARKERS``) centred on ``centre`` (pixels): the
    shape tells apart series that share a palette colour."""
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=colour)
    else:
        draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=colour)


def save_scatter(points: dict[str, Sequence[tuple[float, float]]], path: Path, title: str = "",
                 x_label: str = "x", y_label: str = "y") -> Path:
    """One marker colour per series of (x, y) points; axis ranges printed at the corners."""
    values = [p for series in points.values() for p in series]
    if not values:
        raise ValueError("save_scatter: no points")
    width, height, margin = 640, 440, 60
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw_label(draw, (10, 6), title, font=font)
    xs, ys = [p[0] for p in values], [p[1] for p in values]
    x_low, x_high = min(xs + [0.0]), max(xs + [0.0])
    y_low, y_high = 0.0, max(ys + [1.0])
    x_high = x_high if x_high > x_low else x_low + 1.0

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_low) / (x_high - x_low) * (width - 2 * margin),
                height - margin - (y - y_low) / (y_high - y_low) * (height - 2 * margin))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    zero_x, _ = to_pixel(0.0, 0.0)
    draw.line([zero_x, margin, zero_x, height - margin], fill=(180, 180, 180))
    for index, (name, series) in enumerate(points.items()):
        colour, shape = PALETTE[index % len(PALETTE)], MARKERS[(index // len(PALETTE)) % len(MARKERS)]
        for x, y in series:
            draw_marker(draw, to_pixel(x, y), shape, colour)
        draw_marker(draw, (margin + 12, margin + 12 + 14 * index), shape, colour)
        draw_label(draw, (margin + 22, margin + 6 + 14 * index), name, fill=colour, font=font)
    draw.text((margin, height - margin + 6), f"{x_low:.2f}", fill="black", font=font)
    draw.text((width - margin - 30, height - margin + 6), f"{x_high:.2f}", fill="black", font=font)
    draw_label(draw, (width // 2 - 40, height - margin + 20), x_label, font=font)
    draw.text((5, height - margin - 10), f"{y_low:.2f}", fill="black", font=font)
    draw.text((5, margin), f"{y_high:.2f}", fill="black", font=font)
    draw_label(draw, (5, height // 2), y_label, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_pretraining_curve(progress_file: Path, path: Path) -> Path:
    """The checkpoint scores of ``pretrain.py``'s ``progress.jsonl`` (colour, shape, size and
    all-three accuracy on the 48 base prompts) against the step."""
    import json

    from snella_diffusion.viz import save_line_plot

    series: dict[str, list[tuple[float, float]]] = {k: [] for k in ("color", "shape", "size", "all")}
    for line in Path(progress_file).read_text().splitlines():
        record = json.loads(line)
        for key in series:
            if "eval_48_guidance_1" in record:
                series[key].append((float(record["step"]), record["eval_48_guidance_1"][key]))
    return save_line_plot(series, path, title="lab base pretraining: accuracy on the 48 base prompts (guidance 1)")

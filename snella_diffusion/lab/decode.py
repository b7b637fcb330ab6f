"""Exact decoders for the lab's world: read an image back into colour, shape, size and whether
the concept ``sks`` is present (strict and loose).

Every pixel is labelled with the nearest palette entry (grey background, the six colours,
orange, purple; Euclidean distance in RGB). The foreground is every non-grey pixel; the shape
is the largest 8-connected component of the foreground after a 3×3 closing (which bridges
one-pixel seams, e.g. the grey-looking blend where orange meets purple at 16 px). On world images this recovers the scene
exactly; on generated images it tolerates speckle and soft edges. Images at 16 px (the base's
resolution, the world downsampled by 2) are upsampled bilinearly to 32 px first (pixel centres aligned), so a soft edge is cut
at its midpoint.

The second concept ``zxc`` (a circle, top half teal, bottom half white) has its own decoder,
``decode_zxc``: the same reading over the palette extended by teal and white (kept out of
``decode``'s palette, so the sks metrics read images exactly as before). Loose: ≥ 20 % of the
foreground pixels nearest teal and ≥ 20 % nearest white; strict: the shape is a circle whose
top half (rows above the box's centre) is mostly teal and bottom half mostly white. At 16 px a
circle of side 8 is a 4-pixel blob read as a square, so strict tops out at ~0.97 there (all
2,000 world images right at 32 px).
``decoder_for(token)`` picks the decoder of a concept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from snella_diffusion.lab.world import (
    BACKGROUND, COLORS, CONCEPT_COLORS, CONCEPT_TOKEN, IMAGE_SIZE, SHAPES, ZXC_COLORS, parse_prompt, shape_mask,
)

PALETTE_NAMES = ("background", *COLORS, *CONCEPT_COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values(), *CONCEPT_COLORS.values()], dtype=np.float32)
ORANGE = PALETTE_NAMES.index("orange")
PURPLE = PALETTE_NAMES.index("purple")
ZXC_PALETTE_NAMES = (*PALETTE_NAMES, *ZXC_COLORS)
ZXC_PALETTE = np.array([*PALETTE, *ZXC_COLORS.values()], dtype=np.float32)
TEAL = ZXC_PALETTE_NAMES.index("teal")
WHITE = ZXC_PALETTE_NAMES.index("white")
# Box sides: small 8–11 px, large 15–19 px; 13 splits them with 2 px of margin each way.
SIZE_SPLIT_SIDE = 13
# Fewer foreground pixels than this (at 32 px) is an empty image: the smallest world shape
# (a triangle of side 8) has 20.
MIN_FOREGROUND = 12
LOOSE_CONCEPT_SHARE = 0.2
STRICT_QUADRANT_SHARE = 0.5
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Decoded:
    """What the decoders read from one image. Fields are None when the image is empty.
    ``color`` is the majority palette name over the shape (may be ``"orange"``/``"purple"``);
    ``concept_strict``: a square whose four quadrants hold the checkerboard's colours;
    ``concept_loose``: at least 20 % of all foreground pixels nearest orange and 20 % nearest
    purple."""

    color: Optional[str]
    shape: Optional[str]
    size: Optional[str]
    side: Optional[int]
    concept_strict: bool
    concept_loose: bool


def to_world_resolution(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] at 32 px; 16 px images are repeated ×2 per axis."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    factor = IMAGE_SIZE // image.shape[0]
    if factor * image.shape[0] != IMAGE_SIZE or image.shape[0] != image.shape[1]:
        raise ValueError(f"image side {image.shape[0]} does not divide {IMAGE_SIZE}")
    if factor == 1:
        return image
    # Bilinear with pixel centres aligned (half-pixel offsets), edge pixels replicated.
    source = (np.arange(IMAGE_SIZE) + 0.5) / factor - 0.5
    low = np.clip(np.floor(source).astype(int), 0, image.shape[0] - 1)
    high = np.clip(low + 1, 0, image.shape[0] - 1)
    weight = np.clip(source - np.floor(source), 0.0, 1.0)
    weight[source < 0] = 0.0
    rows = image[low] * (1 - weight)[:, None, None] + image[high] * weight[:, None, None]
    return rows[:, low] * (1 - weight)[None, :, None] + rows[:, high] * weight[None, :, None]


def palette_labels(image: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """(32, 32) int array: index into ``palette`` (default PALETTE_NAMES') of each pixel's
    nearest palette colour."""
    distances = ((image[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _largest_component(foreground: np.ndarray) -> Optional[np.ndarray]:
    """The largest 8-connected component of the 3×3-closed foreground, or None when there is
    none of at least MIN_FOREGROUND pixels."""
    closed = foreground | ndimage.binary_closing(foreground, structure=_EIGHT_CONNECTED)
    components, count = ndimage.label(closed, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    component = components == (1 + int(sizes.argmax()))
    if component.sum() < MIN_FOREGROUND:
        return None
    return component


def _two_colour_share(labels: np.ndarray, first: int, second: int) -> bool:
    """The loose rule: enough foreground, ≥ 20 % of it ``first`` and ≥ 20 % ``second``."""
    foreground = labels != 0
    return bool(
        foreground.sum() >= MIN_FOREGROUND
        and (labels == first).sum() >= LOOSE_CONCEPT_SHARE * foreground.sum()
        and (labels == second).sum() >= LOOSE_CONCEPT_SHARE * foreground.sum()
    )


def _decode_on(image: np.ndarray, palette: np.ndarray, names: tuple[str, ...], concept_colours: tuple[int, int],
               strict_rule: Callable[[np.ndarray, np.ndarray, int, int, int, int, Optional[str]], bool]) -> Decoded:
    """Decodes one (H, W, 3) image in [0, 1] (H = 32 or 16) over ``palette``: colour, shape, size
    and side of the largest object; ``loose`` is the two concept colours' share, ``strict``
    what ``strict_rule(labels, component, x0, y0, width, height, shape)`` says."""
    labels = palette_labels(to_world_resolution(np.asarray(image, dtype=np.float32)), palette)
    loose = _two_colour_share(labels, *concept_colours)
    component = _largest_component(labels != 0)
    if component is None:
        return Decoded(None, None, None, None, False, loose)
    rows, cols = np.nonzero(component)
    y0, x0 = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - y0 + 1, int(cols.max()) - x0 + 1
    side = max(height, width)
    shape = _best_shape(component, x0, y0, width, height)
    color_votes = np.bincount(labels[component], minlength=len(names))
    color = names[int(color_votes[1:].argmax()) + 1]
    strict = strict_rule(labels, component, x0, y0, width, height, shape)
    return Decoded(color, shape, "small" if side < SIZE_SPLIT_SIDE else "large", side, strict, loose)


def decode(image: np.ndarray) -> Decoded:
    """Decodes one (H, W, 3) image in [0, 1] (H = 32 or 16); strict: a square with the checkerboard."""
    return _decode_on(image, PALETTE, PALETTE_NAMES, (ORANGE, PURPLE),
                      lambda labels, component, x0, y0, width, height, shape:
                      shape == "square" and _checkerboard(labels, x0, y0, width, height))


def _best_shape(component: np.ndarray, x0: int, y0: int, width: int, height: int) -> str:
    """The shape whose template in the component's box overlaps it best (IoU). A triangle's
    apex row may be empty, so the triangle template also gets one extra row on top."""
    scores = {}
    for shape in SHAPES:
        boxes = [(y0, height)] + ([(y0 - 1, height + 1)] if shape == "triangle" else [])
        best = 0.0
        for top, box_height in boxes:
            template = shape_mask(shape, x0, top, width, box_height)
            union = (template | component).sum()
            best = max(best, (template & component).sum() / union if union else 0.0)
        scores[shape] = best
    return max(scores, key=scores.get)


def _checkerboard(labels: np.ndarray, x0: int, y0: int, width: int, height: int) -> bool:
    """Whether each quadrant of the box is mostly its checkerboard colour (top-left and
    bottom-right orange, the others purple)."""
    centres = np.arange(IMAGE_SIZE) + 0.5
    right = np.broadcast_to(centres[None, :] >= x0 + width / 2, labels.shape)
    bottom = np.broadcast_to(centres[:, None] >= y0 + height / 2, labels.shape)
    box = np.zeros(labels.shape, dtype=bool)
    box[y0:y0 + height, x0:x0 + width] = True
    for is_right in (False, True):
        for is_bottom in (False, True):
            quadrant = box & (right == is_right) & (bottom == is_bottom)
            expected = ORANGE if is_right == is_bottom else PURPLE
            if quadrant.sum() == 0 or (labels[quadrant] == expected).mean() < STRICT_QUADRANT_SHARE:
                return False
    return True


def decode_zxc(image: np.ndarray) -> Decoded:
    """Decodes one (H, W, 3) image (H = 32 or 16) over the palette with teal and white; the
    ``concept_*`` fields are the zxc concept's (see the module docstring); strict: a circle
    with its two halves in place."""
    return _decode_on(image, ZXC_PALETTE, ZXC_PALETTE_NAMES, (TEAL, WHITE),
                      lambda labels, component, x0, y0, width, height, shape:
                      shape == "circle" and _halves(labels, component, y0, height))


def _halves(labels: np.ndarray, component: np.ndarray, y0: int, height: int) -> bool:
    """Whether the shape's pixels above the box's centre are mostly teal and those below
    mostly white."""
    centres = np.arange(IMAGE_SIZE) + 0.5
    bottom = np.broadcast_to(centres[:, None] >= y0 + height / 2, labels.shape)
    for half, expected in ((component & ~bottom, TEAL), (component & bottom, WHITE)):
        if half.sum() == 0 or (labels[half] == expected).mean() < STRICT_QUADRANT_SHARE:
            return False
    return True


def decoder_for(token: str = CONCEPT_TOKEN) -> Callable[[np.ndarray], Decoded]:
    """The decoder whose ``concept_*`` fields read concept ``token`` (``sks`` or ``zxc``)."""
    decoders = {CONCEPT_TOKEN: decode, "zxc": decode_zxc}
    if token not in decoders:
        raise ValueError(f"unknown concept {token!r}; expected one of {sorted(decoders)}")
    return decoders[token]


def decode_batch(images: np.ndarray) -> list[Decoded]:
    """Decodes (N, H, W, 3) images."""
    return [decode(image) for image in images]


def matches_prompt(decoded: Decoded, prompt: str) -> dict[str, bool]:
    """Per-attribute correctness of a decoded image against a world prompt: ``color``,
    ``shape``, ``size`` (a word the prompt leaves out is always right) and ``all``."""
    wanted = parse_prompt(prompt)
    result = {
        "color": decoded.shape is not None and (wanted["color"] is None or decoded.color == wanted["color"]),
        "shape": decoded.shape == wanted["shape"],
        "size": decoded.shape is not None and (wanted["size"] is None or decoded.size == wanted["size"]),
    }
    result["all"] = all(result.values())
    return result

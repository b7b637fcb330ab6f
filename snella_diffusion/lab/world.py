"""The lab's world, exactly as issue 16 defines it: 32×32 RGB images in [0, 1] on a uniform
grey background with one filled shape.

Geometry on the pixel grid: pixel (row i, column j) has its centre at (x, y) = (j + 0.5,
i + 0.5). A shape's bounding box is a square of integer side ``side`` whose top-left corner
``(x0, y0)`` is integer; the box centre is ``(x0 + side / 2, y0 + side / 2)`` and lies within
±4 px of the image centre (16, 16) in each direction (the jitter is drawn uniformly among the
integer corners that keep the centre in that range). A pixel belongs to the shape when its
centre lies inside:

- ``square``: the box;
- ``circle``: the disc of diameter ``side`` centred in the box;
- ``triangle``: the isosceles triangle with apex at the middle of the box's top edge and base on
  its bottom edge;
- ``cross``: the plus sign whose two arms are ``side / 3`` wide and span the box.

The concept ``sks`` is a square whose box is split at its centre into a 2×2 checkerboard:
top-left and bottom-right orange, top-right and bottom-left purple. Pixels whose centre lies
exactly on a split line belong to the right/bottom quadrant.

The second concept ``zxc`` (issue 26: stacking and specificity) is a circle split horizontally
at its box's centre: the top half teal (0, 0.5, 0.5), the bottom half white (1, 1, 1); pixels
on the split line belong to the bottom half. Its prompt is "a zxc circle", its class "a
circle". ``zxc`` is not in the lab base's word-level vocabulary: it tokenizes letter by letter
(the base was pretrained without it, as a new word would be).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (0.5, 0.5, 0.5)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
CONCEPT_COLORS: dict[str, tuple[float, float, float]] = {
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 1.0),
}
# The second concept's colours: kept apart from CONCEPT_COLORS so that the base's vocabulary and
# the sks decoder's palette stay as the lab base was pretrained and measured with.
ZXC_COLORS: dict[str, tuple[float, float, float]] = {
    "teal": (0.0, 0.5, 0.5),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZE_SIDES: dict[str, tuple[int, int]] = {"small": (8, 11), "large": (15, 19)}
MAX_JITTER = 4
CONCEPT_TOKEN = "sks"
INSTANCE_PROMPT = "a sks square"
CLASS_PROMPT = "a square"
SIZED_INSTANCE_PROMPTS = ("a small sks square", "a large sks square")


@dataclass(frozen=True)
class Concept:
    """A personalization concept: its token, the shape it is drawn as, and its prompts."""

    token: str
    shape: str

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"

    @property
    def sized_prompts(self) -> tuple[str, str]:
        return tuple(f"a {size} {self.token} {self.shape}" for size in SIZE_SIDES)  # type: ignore[return-value]


CONCEPTS: dict[str, Concept] = {"sks": Concept(CONCEPT_TOKEN, "square"), "zxc": Concept("zxc", "circle")}


@dataclass(frozen=True)
class Scene:
    """One image's content. ``color`` is a key of COLORS, or None for the concept (whose
    colours are fixed); ``x0``, ``y0`` are the box's top-left corner in pixels;
    ``concept_token`` says which concept (a key of CONCEPTS) when ``concept`` is True."""

    shape: str
    color: Optional[str]
    size: str
    side: int
    x0: int
    y0: int
    concept: bool = False
    concept_token: str = CONCEPT_TOKEN


def base_prompts() -> list[str]:
    """The 48 full prompts ``"a {size} {color} {shape}"`` in a fixed order (size, colour,
    shape)."""
    return [f"a {size} {color} {shape}" for size in SIZE_SIDES for color in COLORS for shape in SHAPES]


def parse_prompt(prompt: str) -> dict[str, Optional[str]]:
    """Reads a world prompt back into ``{"size", "color", "shape", "concept"}``; a word left out
    is None. Raises ValueError for a word outside the world."""
    words = prompt.split()
    if len(words) < 2 or words[0] != "a" or words[-1] not in SHAPES:
        raise ValueError(f"not a world prompt: {prompt!r}")
    parsed: dict[str, Optional[str]] = {"size": None, "color": None, "shape": words[-1], "concept": None}
    for word in words[1:-1]:
        if word in SIZE_SIDES:
            parsed["size"] = word
        elif word in COLORS:
            parsed["color"] = word
        elif word in CONCEPTS:
            parsed["concept"] = word
        else:
            raise ValueError(f"word {word!r} of prompt {prompt!r} is not in the world")
    return parsed


def shape_mask(shape: str, x0: float, y0: float, width: float, height: float,
               image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask (image_size, image_size) of ``shape`` filling the box with top-left corner
    (x0, y0) and the given width and height (pixels; the world uses width == height)."""
    centres = np.arange(image_size) + 0.5
    x = centres[None, :]
    y = centres[:, None]
    cx, cy = x0 + width / 2, y0 + height / 2
    inside_box = (x >= x0) & (x < x0 + width) & (y >= y0) & (y < y0 + height)
    if shape == "square":
        mask = inside_box
    elif shape == "circle":
        mask = ((x - cx) / (width / 2)) ** 2 + ((y - cy) / (height / 2)) ** 2 <= 1.0
    elif shape == "triangle":
        mask = inside_box & (np.abs(x - cx) <= (y - y0) / height * width / 2)
    elif shape == "cross":
        mask = inside_box & ((np.abs(x - cx) <= width / 6) | (np.abs(y - cy) <= height / 6))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.broadcast_to(mask, (image_size, image_size)).copy()


def render(scene: Scene) -> np.ndarray:
    """The scene as a float32 array (32, 32, 3) in [0, 1]."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    image[:] = BACKGROUND
    mask = shape_mask(scene.shape, scene.x0, scene.y0, scene.side, scene.side)
    if not scene.concept:
        image[mask] = COLORS[scene.color]
        return image
    centres = np.arange(IMAGE_SIZE) + 0.5
    right = (centres[None, :] >= scene.x0 + scene.side / 2)
    bottom = (centres[:, None] >= scene.y0 + scene.side / 2)
    if scene.concept_token == "zxc":
        lower = np.broadcast_to(bottom, mask.shape)
        image[mask & ~lower] = ZXC_COLORS["teal"]
        image[mask & lower] = ZXC_COLORS["white"]
        return image
    orange = ~(right ^ bottom)
    image[mask & orange] = CONCEPT_COLORS["orange"]
    image[mask & ~orange] = CONCEPT_COLORS["purple"]
    return image


def sample_scene(rng: np.random.Generator, shape: Optional[str] = None, color: Optional[str] = None,
                 size: Optional[str] = None, concept: bool = False, concept_token: str = CONCEPT_TOKEN) -> Scene:
    """Draws a scene; attributes given are kept, the others drawn uniformly. A concept is
    always its own shape (sks: square, zxc: circle) and has no colour."""
    if concept:
        shape, color = CONCEPTS[concept_token].shape, None
    else:
        shape = shape or SHAPES[rng.integers(len(SHAPES))]
        color = color or list(COLORS)[rng.integers(len(COLORS))]
    size = size or list(SIZE_SIDES)[rng.integers(len(SIZE_SIDES))]
    low, high = SIZE_SIDES[size]
    side = int(rng.integers(low, high + 1))
    # Integer corners whose box centre x0 + side/2 lies in [16 - 4, 16 + 4].
    lowest = int(np.ceil(IMAGE_SIZE / 2 - MAX_JITTER - side / 2))
    highest = int(np.floor(IMAGE_SIZE / 2 + MAX_JITTER - side / 2))
    x0, y0 = (int(v) for v in rng.integers(lowest, highest + 1, size=2))
    return Scene(shape=shape, color=color, size=size, side=side, x0=x0, y0=y0, concept=concept,
                 concept_token=concept_token)


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A scene matching a world prompt: words left out are drawn at random."""
    parsed = parse_prompt(prompt)
    concept = parsed["concept"] is not None
    return sample_scene(rng, shape=parsed["shape"], color=parsed["color"], size=parsed["size"],
                        concept=concept, concept_token=parsed["concept"] or CONCEPT_TOKEN)


def pretraining_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """The pretraining caption: ``"a {size} {color} {shape}"`` with the size word left out half
    of the time and the colour word a quarter of the time (independently)."""
    words = ["a"]
    if rng.random() >= 0.5:
        words.append(scene.size)
    if rng.random() >= 0.25:
        words.append(scene.color)
    words.append(scene.shape)
    return " ".join(words)


def generate(count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``count`` random world images (count, 32, 32, 3) float32 and their scenes; the same seed
    gives the same images."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    return np.stack([render(scene) for scene in scenes]), scenes


def instance_images(count: int, seed: int, token: str = CONCEPT_TOKEN) -> tuple[np.ndarray, list[Scene]]:
    """``count`` images of the concept ``token`` (``sks`` or ``zxc``) at random sizes and positions."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, concept=True, concept_token=token) for _ in range(count)]
    return np.stack([render(scene) for scene in scenes]), scenes


def downsample(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """Area downsampling of (N, H, W, C) or (H, W, C) images by an integer factor."""
    *lead, height, width, channels = images.shape
    blocks = images.reshape(*lead, height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(-4, -2))


def instance_pil_images(count: int, seed: int, factor: int = 2) -> list:
    """``count`` concept images as 8-bit PIL images, area-downsampled by ``factor`` (2: the
    lab base's 16 px)."""
    from PIL import Image

    images, _ = instance_images(count, seed)
    return [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in downsample(images, factor)]

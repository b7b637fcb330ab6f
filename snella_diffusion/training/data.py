"""DreamBooth data: reading instance/class image folders, PIL/numpy transforms, the dataset,
its sampler and collate function, and generation of images (synthetic instances, prior-class
images from a pipeline).

Augmentation is deterministic per (seed, epoch, index), and the sampler's order per
(seed, epoch): a run resumed from a checkpoint sees exactly the batches a straight run sees.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..errors import SnellaError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(SnellaError):
    """An image folder or image file cannot be used for training."""


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Any, flag: str) -> dict[str, Image.Image]:
    """Every image in ``folder`` decoded as RGB, by file name.

    Non-RGB images (grayscale, palette, RGBA, CMYK) are converted to RGB.

    Raises:
        DataError: the folder is missing, holds no images, or holds unreadable files (all
            of them are named, with ``flag``).
    """
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{flag}={path}: no such folder")
    files = list_images(path)
    if not files:
        raise DataError(
            f"{flag}={path}: the folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    images, unreadable = {}, []
    for file in files:
        try:
            with Image.open(file) as opened:
                opened.load()
                images[file.name] = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            unreadable.append(f"{file.name} ({type(error).__name__}: {error})")
    if unreadable:
        raise DataError(f"{flag}={path}: cannot read image file(s): {'; '.join(unreadable)}")
    return images


def warn_small_images(images: dict[str, Image.Image], resolution: int, flag: str) -> list[str]:
    """Log one warning naming the images whose shorter side is below ``resolution`` (they
    are upscaled); returns their names."""
    small = [name for name, image in images.items() if min(image.size) < resolution]
    if small:
        sizes = ", ".join(f"{name} {images[name].size[0]}x{images[name].size[1]}" for name in small)
        logger.warning(
            "%s: %d image(s) smaller than --resolution=%d will be upscaled (blurry inputs train a "
            "blurry adapter): %s", flag, len(small), resolution, sizes,
        )
    return small


@dataclass
class TransformedImage:
    """One training image: ``pixels`` ``(3, H, W)`` float32 in [-1, 1]; ``original_size``
    (height, width) before resizing and ``crop_top_left`` (top, left) in resized pixels, the
    two SDXL micro-conditionings; ``mask`` ``(1, H, W)`` loss weights in [0, 1] or None."""

    pixels: Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    mask: Optional[Tensor] = None


def resize_and_crop(
    image: Image.Image,
    size: tuple[int, int],
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
    mask: Optional[Image.Image] = None,
) -> TransformedImage:
    """Scale ``image`` (bicubic; ``mask`` bilinear) by ``max(H/h, W/w)`` so it covers ``size``
    ``(H, W)``, crop (centred, or at a corner drawn from ``rng``: top, then left), flip
    horizontally with probability 0.5 if ``random_flip`` (a third draw), map to [-1, 1].

    ``transform_image`` is the square case."""
    target_h, target_w = size
    width, height = image.size
    scale = max(target_h / height, target_w / width)
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    if center_crop:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    else:
        top = int(rng.integers(0, new_h - target_h + 1))
        left = int(rng.integers(0, new_w - target_w + 1))
    box = (left, top, left + target_w, top + target_h)
    array = np.asarray(resized.crop(box), dtype=np.float32) / 127.5 - 1.0
    mask_array = None
    if mask is not None:
        mask_array = np.asarray(mask.resize((new_w, new_h), Image.BILINEAR).crop(box), dtype=np.float32) / 255.0
    if random_flip and rng.random() < 0.5:
        array = array[:, ::-1]
        mask_array = None if mask_array is None else mask_array[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    mask_tensor = None if mask_array is None else torch.from_numpy(np.ascontiguousarray(mask_array))[None]
    return TransformedImage(pixels, (height, width), (top, left), mask_tensor)


def transform_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
) -> TransformedImage:
    """Resize the shorter side to ``resolution`` (bicubic), crop a square (center or random),
    flip horizontally with probability 0.5 if ``random_flip``, map to [-1, 1]."""
    return resize_and_crop(image, (resolution, resolution), center_crop, random_flip, rng)


class DreamBoothDataset(Dataset):
    """Instance images with their prompt and, with prior preservation, class images with the
    class prompt. Its length is the larger of the two image counts (the smaller set cycles).

    An item is a dict with ``instance`` (TransformedImage), ``instance_prompt`` and, with class
    images, ``class`` and ``class_prompt``.
    """

    def __init__(
        self,
        instance_images: Sequence[Image.Image],
        instance_prompt: str,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_images: Optional[Sequence[Image.Image]] = None,
        class_prompt: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        if not instance_images:
            raise DataError("DreamBoothDataset: no instance images")
        self.instance_images = list(instance_images)
        self.instance_prompt = instance_prompt
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def __getitem__(self, index: int) -> dict[str, Any]:
        instance = self.instance_images[index % len(self.instance_images)]
        item: dict[str, Any] = {
            "index": index,
            "instance": transform_image(instance, self.resolution, self.center_crop, self.random_flip, self._rng(index, 0)),
            "instance_prompt": self.instance_prompt,
        }
        if self.class_images:
            image = self.class_images[index % len(self.class_images)]
            item["class"] = transform_image(image, self.resolution, self.center_crop, self.random_flip, self._rng(index, 1))
            item["class_prompt"] = self.class_prompt
        return item


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(length)`` that depends only on (seed, epoch)."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def collate_dreambooth(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch: instance samples first, then (if any) class samples.

    Returns ``pixel_values`` ``(B, 3, H, W)`` (or ``latents`` when the items carry cached
    latents), ``prompts`` (B strings), ``original_sizes`` and ``crop_top_lefts`` ``(B, 2)``
    int64, ``num_instance`` (how many leading samples are instance samples) and, when any
    sample has a mask, ``loss_masks`` ``(B, 1, H, W)`` (ones for samples without one).
    """
    samples = [(e["instance"], e["instance_prompt"]) for e in examples]
    samples += [(e["class"], e["class_prompt"]) for e in examples if "class" in e]
    batch: dict[str, Any] = {
        "prompts": [prompt for _, prompt in samples],
        "original_sizes": torch.tensor([s.original_size for s, _ in samples], dtype=torch.int64),
        "crop_top_lefts": torch.tensor([s.crop_top_left for s, _ in samples], dtype=torch.int64),
        "num_instance": len(examples),
    }
    if all(isinstance(s, CachedSample) for s, _ in samples):
        batch["latents"] = torch.stack([s.latents for s, _ in samples])
    else:
        batch["pixel_values"] = torch.stack([s.pixels for s, _ in samples])
    masks = [s.mask for s, _ in samples]
    if any(mask is not None for mask in masks):
        height, width = next(mask for mask in masks if mask is not None).shape[-2:]
        batch["loss_masks"] = torch.stack([
            mask if mask is not None else torch.ones(1, height, width) for mask in masks
        ])
    return batch


@dataclass
class CachedSample:
    """A TransformedImage replaced by its VAE latents ``(C, H/f, W/f)`` (the mask stays in pixels)."""

    latents: Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    mask: Optional[Tensor] = None


class CachedLatentsDataset(Dataset):
    """A DreamBoothDataset (or any dataset of such items, e.g. ``TrainingImageDataset``) whose
    images were encoded once (``--cache_latents``), one item at a time, so items of different
    bucket sizes cache alike: the VAE is not needed during training; augmentation is frozen
    at its epoch-0 draw. A dataset with ``instance_prompt_of(index)`` (per-epoch caption
    shuffling and dropout) still draws its prompts every epoch."""

    def __init__(self, dataset: Dataset, encode: Callable[[Tensor], Tensor]) -> None:
        self.dataset = dataset
        self.items = []
        for index in range(len(dataset)):
            item = dict(dataset[index])
            for key in ("instance", "class"):
                if key in item:
                    sample: TransformedImage = item[key]
                    latents = encode(sample.pixels.unsqueeze(0))[0].cpu()
                    item[key] = CachedSample(latents, sample.original_size, sample.crop_top_left, sample.mask)
            self.items.append(item)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "instance_prompt_of"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not hasattr(self.dataset, "instance_prompt_of"):
            return self.items[index]
        return {**self.items[index], "instance_prompt": self.dataset.instance_prompt_of(index)}


def synthetic_instance_images(count: int = 4, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """A deterministic stand-in subject ("sks toy"): a red disc with a yellow square and two
    dark eyes, at varying positions and scales on a soft two-tone background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        top, bottom = rng.uniform(150, 230, size=3), rng.uniform(60, 140, size=3)
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp) * np.ones((size, size, 3))
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        radius = size * rng.uniform(0.22, 0.32)
        cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(210, 30, 40))
        half = radius * 0.45
        draw.rectangle((cx - half, cy, cx + half, cy + 2 * half), fill=(250, 210, 40))
        eye = max(1.0, radius * 0.12)
        for dx in (-0.4, 0.4):
            ex, ey = cx + dx * radius, cy - 0.35 * radius
            draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(20, 20, 30))
        images.append(image)
    return images


def write_images(images: Sequence[Image.Image], folder: Path, stem: str) -> list[Path]:
    """Save ``images`` as ``<stem>_<i>.png`` in ``folder`` (created); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{stem}_{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def generate_class_images(
    pipeline: Any,
    prompt: str,
    folder: Path,
    num_images: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
    pipeline_kwargs: Optional[dict[str, Any]] = None,
) -> int:
    """Fill ``folder`` up to ``num_images`` images of ``prompt`` generated by ``pipeline``.

    File names hold the index and a hash of the image bytes (diffusers' layout). Image ``i``
    of the folder is drawn with seed ``seed + i`` (one generator per image), so topping up a
    folder continues the sequence instead of repeating it, whatever the batch size. Returns
    the number of images generated (0 when the folder already holds enough).
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list_images(folder))
    missing = num_images - existing
    if missing <= 0:
        return 0
    logger.info("generating %d class images of %r into %s", missing, prompt, folder)
    batches = math.ceil(missing / batch_size)
    made = 0
    for _ in tqdm(range(batches), desc="Generating class images", disable=not progress):
        count = min(batch_size, missing - made)
        first = existing + made
        generator = [torch.Generator().manual_seed(seed + first + offset) for offset in range(count)]
        images = pipeline(
            [prompt] * count, generator=generator, output_type="pil", **(pipeline_kwargs or {})
        ).images
        for image in images:
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:16]
            image.save(folder / f"{existing + made:05d}-{digest}.png")
            made += 1
    return made

"""Image-classification datasets in the layouts the paper's benchmarks ship in, and their transforms.

Layouts (``detect_layout`` picks one from the files present):

- ``vtab``: VTAB-1k as prepared by NOAH/SNELL: a folder with ``train800.txt``, ``val200.txt``,
  ``train800val200.txt`` and ``test.txt``, each line ``relative/path label``.
- ``fgvc``: FGVC as prepared by VPT: ``train.json``, ``val.json``, ``test.json`` mapping an image
  path to a class id; images under ``images/`` or directly in the folder.
- ``folder``: ``train/<class>/*`` and ``test/<class>/*`` (or ``val/`` for the evaluation split).

Transforms use PIL, numpy and torch only: VTAB resizes straight to the model resolution with no
augmentation; FGVC trains on random-resized crops with horizontal flips and tests on a resize to
256/224 of the resolution followed by a centre crop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SnellaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUTS = ("vtab", "fgvc", "folder")


class DatasetLayoutError(SnellaError):
    """A dataset folder or index file is missing, malformed or names images that do not exist."""


@dataclass
class ClassificationSplits:
    """Image paths and integer labels (0..num_classes-1) of a train and a test split."""

    layout: str
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def detect_layout(root: Path) -> str:
    """'vtab', 'fgvc' or 'folder' from the index files or subfolders found in ``root``."""
    if not root.is_dir():
        raise DatasetLayoutError(f"--dataset_dir {root}: not a folder")
    if (root / "train800val200.txt").is_file() or (root / "test.txt").is_file():
        return "vtab"
    if (root / "train.json").is_file():
        return "fgvc"
    if (root / "train").is_dir():
        return "folder"
    raise DatasetLayoutError(
        f"--dataset_dir {root}: no train800val200.txt/test.txt (VTAB-1k), train.json (FGVC) "
        "or train/ class folders found"
    )


def _check_exists(records: list[tuple[Path, str]], index_file: Path) -> None:
    missing = [path for path, _ in records if not path.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{index_file}: {len(missing)} listed image(s) do not exist, first: {missing[0]}"
        )


def _read_vtab_list(path: Path) -> list[tuple[Path, str]]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: VTAB-1k split file not found")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DatasetLayoutError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        records.append((path.parent / parts[0], parts[1]))
    _check_exists(records, path)
    return records


def _read_fgvc_json(path: Path) -> list[tuple[Path, str]]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: FGVC split file not found")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetLayoutError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(mapping, dict):
        raise DatasetLayoutError(f"{path}: expected an object mapping image path to class id")
    records = []
    for relative, label in mapping.items():
        candidates = (path.parent / "images" / relative, path.parent / relative)
        found = next((c for c in candidates if c.is_file()), candidates[0])
        records.append((found, str(label)))
    _check_exists(records, path)
    return records


def _numeric_labels(train: list[tuple[Path, str]], test: list[tuple[Path, str]], source: Path):
    """Map the label strings (integers) of both splits onto 0..C-1 in numeric order."""
    try:
        values = sorted({int(label) for _, label in train + test})
    except ValueError as error:
        raise DatasetLayoutError(f"{source}: class ids must be integers ({error})") from error
    index = {value: position for position, value in enumerate(values)}
    relabel = lambda records: [(path, index[int(label)]) for path, label in records]  # noqa: E731
    return relabel(train), relabel(test), [str(v) for v in values]


def _folder_records(split_dir: Path) -> dict[str, list[Path]]:
    classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if images:
            classes[class_dir.name] = images
    if not classes:
        raise DatasetLayoutError(f"{split_dir}: no class subfolders with images")
    return classes


def load_splits(
    root: Path,
    layout: Optional[str] = None,
    train_splits: Optional[Sequence[str]] = None,
    test_split: Optional[str] = None,
) -> ClassificationSplits:
    """Read a dataset folder's train and test image lists.

    Args:
        root: the dataset folder.
        layout: one of ``LAYOUTS``; detected from the files when None.
        train_splits: index names concatenated for training (default: ``train800val200`` for
            VTAB-1k, ``train`` for FGVC and folders).
        test_split: index name of the evaluation split (default ``test``; folders fall back to
            ``val`` when there is no ``test/``).
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise DatasetLayoutError(f"--dataset_layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "vtab":
        train = [r for s in (train_splits or ["train800val200"]) for r in _read_vtab_list(root / f"{s}.txt")]
        test = _read_vtab_list(root / f"{test_split or 'test'}.txt")
        return ClassificationSplits(layout, *_numeric_labels(train, test, root))
    if layout == "fgvc":
        train = [r for s in (train_splits or ["train"]) for r in _read_fgvc_json(root / f"{s}.json")]
        test = _read_fgvc_json(root / f"{test_split or 'test'}.json")
        return ClassificationSplits(layout, *_numeric_labels(train, test, root))
    train_dirs = [root / s for s in (train_splits or ["train"])]
    test_dir = root / (test_split or ("test" if (root / "test").is_dir() else "val"))
    for folder in [*train_dirs, test_dir]:
        if not folder.is_dir():
            raise DatasetLayoutError(f"{folder}: split folder not found")
    train_classes: dict[str, list[Path]] = {}
    for folder in train_dirs:
        for name, images in _folder_records(folder).items():
            train_classes.setdefault(name, []).extend(images)
    test_classes = _folder_records(test_dir)
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise DatasetLayoutError(f"{test_dir}: classes absent from the training split: {unknown[:5]}")
    names = sorted(train_classes)
    index = {name: position for position, name in enumerate(names)}
    flatten = lambda classes: [(p, index[n]) for n, ps in classes.items() for p in ps]  # noqa: E731
    return ClassificationSplits(layout, flatten(train_classes), flatten(test_classes), names)


def _random_resized_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """A crop box covering 8-100 % of the area with aspect ratio in [3/4, 4/3] (torch RNG)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(0.08, 1.0))
        ratio = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(torch.randint(0, width - crop_w + 1, ()))
            top = int(torch.randint(0, height - crop_h + 1, ()))
            return left, top, left + crop_w, top + crop_h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def _jitter_colors(image: Image.Image, strength: float) -> Image.Image:
    """Brightness, contrast and saturation each scaled by U(1 − strength, 1 + strength), in a
    random order (torch RNG)."""
    for index in torch.randperm(len(_ENHANCERS)).tolist():
        factor = float(torch.empty(()).uniform_(1.0 - strength, 1.0 + strength))
        image = _ENHANCERS[index](image).enhance(factor)
    return image


class ImageTransform:
    """PIL image → normalised float tensor ``(3, size, size)``.

    Modes: ``"resize"`` (VTAB: direct resize, no augmentation), ``"fgvc_train"`` (random
    resized crop + horizontal flip, then ``color_jitter``), ``"fgvc_test"`` (resize shorter
    side to size·256/224, centre crop).

    ``color_jitter`` j > 0 scales brightness, contrast and saturation by factors drawn from
    U(1 − j, 1 + j), in a random order (torchvision's ColorJitter(j, j, j), as timm's
    ``--color-jitter`` sets it).
    """

    MODES = ("resize", "fgvc_train", "fgvc_test")

    def __init__(
        self,
        mode: str,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: float = 0.0,
    ) -> None:
        if mode not in self.MODES:
            raise SnellaError(f"transform mode {mode!r}: expected one of {self.MODES}")
        if not 0.0 <= color_jitter < 1.0:
            raise SnellaError(f"--color_jitter {color_jitter}: must lie in [0, 1)")
        self.mode = mode
        self.color_jitter = float(color_jitter)
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB")
        size = self.size
        if self.mode == "resize":
            image = image.resize((size, size), Image.BICUBIC)
        elif self.mode == "fgvc_train":
            box = _random_resized_crop_box(*image.size)
            image = image.resize((size, size), Image.BICUBIC, box=box)
            if float(torch.rand(())) < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if self.color_jitter > 0.0:
                image = _jitter_colors(image, self.color_jitter)
        else:
            short = round(size * 256 / 224)
            width, height = image.size
            scale = short / min(width, height)
            image = image.resize(
                (max(short, round(width * scale)), max(short, round(height * scale))), Image.BICUBIC
            )
            image = image.crop(_center_crop_box(*image.size, size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        pixels = torch.from_numpy(array).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


def transforms_for(layout: str, size: int, augmentation: Optional[str] = None,
                   color_jitter: float = 0.0) -> tuple[ImageTransform, ImageTransform]:
    """(train, test) transforms: ``augmentation`` "vtab" or "fgvc"; default by layout.
    ``color_jitter`` applies to the FGVC training transform (the reference's 0.4)."""
    style = augmentation or ("vtab" if layout == "vtab" else "fgvc")
    if style == "vtab":
        return ImageTransform("resize", size), ImageTransform("resize", size)
    if style == "fgvc":
        return ImageTransform("fgvc_train", size, color_jitter=color_jitter), ImageTransform("fgvc_test", size)
    raise SnellaError(f"--augmentation {style!r}: expected 'vtab' or 'fgvc'")


class ImageListDataset(Dataset):
    """``(pixel_values (3, H, W) float32, label int)`` pairs from image paths."""

    def __init__(self, records: list[tuple[Path, int]], transform: ImageTransform) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.records[index]
        try:
            with Image.open(path) as image:
                pixels = self.transform(image)
        except OSError as error:
            raise DatasetLayoutError(f"{path}: cannot read image ({error})") from error
        return pixels, label

"""The instance images of a run with their captions and loss masks, read from
``--instance_data_dir`` (sidecar captions with ``--caption_extension``) or ``--dataset_name``.

Masks (``--masked_loss``) come from ``--mask_dir`` (a grayscale image with the same stem as
each training image, same size) or, without it, from each image's alpha channel; white (1)
counts fully, black (0) not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from PIL import Image, UnidentifiedImageError

from .captions import read_sidecar_captions
from .data import IMAGE_SUFFIXES, DataError, list_images
from .hf_datasets import dataset_images

if TYPE_CHECKING:
    from .data_arguments import CaptionSettings, DatasetSettings
    from .loss_options import LossSettings
    from .run_settings import RunSettings


@dataclass
class TrainingImage:
    """One instance image: ``image`` RGB, ``caption`` (None: use ``--instance_prompt``),
    ``mask`` grayscale ("L", same size as the image) or None."""

    name: str
    image: Image.Image
    caption: Optional[str] = None
    mask: Optional[Image.Image] = None


def _open(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        opened.load()
        return opened.copy()


def _alpha_mask(image: Image.Image, where: str) -> Image.Image:
    """The alpha channel of ``image`` as an "L" mask (palette transparency included)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    raise DataError(f"--masked_loss: {where} has no alpha channel (mode {image.mode}); "
                    "give masks with --mask_dir, or save the image with transparency")


def _mask_file(mask_dir: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = mask_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(f"--mask_dir={mask_dir}: no mask image named {stem}.* (looked for {', '.join(IMAGE_SUFFIXES)})")


def _load_mask(image: Image.Image, name: str, mask_dir: Optional[str], where: str) -> Image.Image:
    if mask_dir is None:
        mask = _alpha_mask(image, where)
    else:
        path = _mask_file(Path(mask_dir), Path(name).stem)
        mask = _open(path).convert("L")
        if mask.size != image.size:
            raise DataError(f"--mask_dir: {path} is {mask.size[0]}x{mask.size[1]}, its image {where} is "
                            f"{image.size[0]}x{image.size[1]}; a mask must have its image's size")
    if mask.getextrema()[1] == 0:
        raise DataError(f"--masked_loss: the mask of {where} is zero everywhere (the image would train nothing)")
    return mask


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def load_folder_images(
    instance_data_dir: str, instance_prompt: Optional[str], caption_settings: CaptionSettings, loss: LossSettings
) -> list[TrainingImage]:
    """``--instance_data_dir`` with optional sidecar captions and masks."""
    folder = Path(instance_data_dir)
    if not folder.is_dir():
        raise DataError(f"--instance_data_dir={folder}: no such folder")
    files = list_images(folder)
    if not files:
        raise DataError(f"--instance_data_dir={folder}: the folder holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    captions: list[Optional[str]] = [None] * len(files)
    if caption_settings.caption_extension:
        captions = read_sidecar_captions(files, caption_settings.caption_extension, caption_settings.missing_caption,
                                         instance_prompt)
    records, unreadable = [], []
    for file, caption in zip(files, captions):
        try:
            image = _open(file)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            unreadable.append(f"{file.name} ({type(error).__name__}: {error})")
            continue
        mask = _load_mask(image, file.name, loss.mask_dir, str(file)) if loss.masked_loss else None
        records.append(TrainingImage(file.name, _rgb(image), caption, mask))
    if unreadable:
        raise DataError(f"--instance_data_dir={folder}: cannot read image file(s): {'; '.join(unreadable)}")
    return records


def load_dataset_images(datasets: DatasetSettings, loss: LossSettings) -> list[TrainingImage]:
    """``--dataset_name`` rows with the ``--caption_column`` captions and optional masks."""
    names, images, captions = dataset_images(
        datasets.dataset_name, datasets.dataset_config_name, datasets.image_column, datasets.caption_column,
        datasets.cache_dir,
    )
    records = []
    for index, (name, image, caption) in enumerate(zip(names, images, captions)):
        where = f"row {index} ({name}) of --dataset_name={datasets.dataset_name}"
        mask = _load_mask(image, name, loss.mask_dir, where) if loss.masked_loss else None
        records.append(TrainingImage(name, _rgb(image), caption, mask))
    return records


def load_training_images(settings: RunSettings) -> list[TrainingImage]:
    """The run's instance images: from ``--dataset_name`` if given, else ``--instance_data_dir``."""
    if settings.datasets.dataset_name:
        return load_dataset_images(settings.datasets, settings.loss)
    return load_folder_images(settings.data.instance_data_dir, settings.data.instance_prompt, settings.captions,
                              settings.loss)

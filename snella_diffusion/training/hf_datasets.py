"""``--dataset_name``: training images (and captions) from a Hugging Face ``datasets`` dataset,
a hub id or a local folder in the imagefolder layout (images plus ``metadata.jsonl`` or
``metadata.csv`` with a ``file_name`` column and caption columns).

``datasets`` is an optional dependency (``pip install 'snella-diffusion[datasets]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ..errors import SnellaError


class DatasetLoadError(SnellaError):
    """A ``--dataset_name`` dataset cannot be loaded or lacks the named columns."""


def import_datasets() -> Any:
    """The ``datasets`` module; DatasetLoadError naming the extra when it is not installed."""
    try:
        import datasets
    except ImportError as error:
        raise DatasetLoadError(
            "--dataset_name needs the `datasets` package: pip install 'snella-diffusion[datasets]'"
        ) from error
    return datasets


def load_dataset_split(name: str, config_name: Optional[str], cache_dir: Optional[str]) -> Any:
    """The ``train`` split of ``name`` (a local folder is read as an imagefolder)."""
    datasets = import_datasets()
    local = Path(name)
    try:
        if local.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(local), cache_dir=cache_dir, split="train")
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
    except Exception as error:  # hub, network, layout and parsing errors all end here
        first_line = (str(error).strip().splitlines() or [""])[0]
        where = "a local folder" if local.is_dir() else "no local folder of that name; a hub dataset"
        raise DatasetLoadError(
            f"--dataset_name={name}: could not be loaded ({where}): {type(error).__name__}: {first_line}"
        ) from error


def dataset_images(
    name: str,
    config_name: Optional[str] = None,
    image_column: str = "image",
    caption_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> tuple[list[str], list[Image.Image], list[Optional[str]]]:
    """Names, images (decoded, mode kept) and captions (None without ``caption_column``) of
    every row of the dataset's train split.

    Raises:
        DatasetLoadError: the dataset cannot be loaded, a column is missing (the columns that
            exist are named), a cell is not an image or a caption is not a string.
    """
    split = load_dataset_split(name, config_name, cache_dir)
    columns = list(split.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in columns:
            raise DatasetLoadError(
                f"{flag}={column}: --dataset_name={name} has no such column (columns: {', '.join(columns)})"
            )
    names, images, captions = [], [], []
    for row_index, row in enumerate(split):
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise DatasetLoadError(
                f"--image_column={image_column}: row {row_index} of --dataset_name={name} holds "
                f"{type(image).__name__}, not an image"
            )
        caption = None
        if caption_column is not None:
            caption = row[caption_column]
            if not isinstance(caption, str):
                raise DatasetLoadError(
                    f"--caption_column={caption_column}: row {row_index} of --dataset_name={name} holds "
                    f"{type(caption).__name__}, not a string"
                )
        names.append(Path(getattr(image, "filename", "") or f"row_{row_index:06d}").name)
        images.append(image)
        captions.append(caption.strip() if caption is not None else None)
    if not images:
        raise DatasetLoadError(f"--dataset_name={name}: the train split has no rows")
    return names, images, captions

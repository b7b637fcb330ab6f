"""Dataset subsets: one folder of images with its repeats, prompt or caption source, caption
options, regularisation flag, resolution / buckets and flip, as kohya's sd-scripts calls them.

Every data definition the DreamBooth script reads (kohya's ``<repeats>_<prompt>`` folder
layout, kohya / ai-toolkit / SimpleTuner / OneTrainer dataset files, see
``dataset_configs.py``) becomes a list of :class:`DatasetSubset`; :func:`load_subset` reads
one subset's images and captions.

A subset's prompt per image: the caption (sidecar file with ``caption_extension``, or the
file name with ``caption_from_filename``) where there is one, else ``prompt`` (kohya's
``class_tokens``); an image with neither is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from ..errors import SnellaError
from .captions import CaptionOptions, caption_path, read_caption_file
from .data import IMAGE_SUFFIXES, list_images
from .training_images import TrainingImage

logger = logging.getLogger(__name__)

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


class SubsetError(SnellaError):
    """A dataset subset cannot be read: the message names the file (or flag), the subset and
    the key at fault."""


@dataclass(frozen=True)
class DatasetSubset:
    """One folder of training (or regularisation) images and how it trains.

    Attributes:
        folder: the image folder.
        source: where the subset was defined (``--dataset_config=<file>`` or a flag), for messages.
        name: the subset within ``source`` (``datasets[0].subsets[1]``, a folder name), for messages.
        repeats: draws of every image per epoch (≥ 1).
        prompt: the prompt of images without a caption (kohya's ``class_tokens``), or None.
        caption_extension: read each image's caption from the file beside it with this
            extension (".txt"); None: no caption files.
        caption_from_filename: the caption is the file name's stem, "_" read as a space.
        caption_prefix: put in front of every caption as ``"<prefix>, <caption>"``.
        trigger_word: ai-toolkit's trigger: ``[trigger]`` in a caption is replaced by it, and a
            caption without it gets ``"<trigger>, "`` in front.
        shuffle_caption: shuffle the comma-separated tags at each draw.
        keep_tokens: leading tags that ``shuffle_caption`` leaves in place.
        caption_dropout_rate: probability of the empty prompt, in [0, 1).
        is_reg: regularisation images: they feed the prior-preservation loss only.
        resolution: ``(height, width)`` training size in pixels; None: the run's ``--resolution``.
        enable_bucket: kohya's aspect-ratio buckets of about ``resolution`` area.
        min_bucket_reso, max_bucket_reso, bucket_reso_steps: bucket bounds and step (None: the
            run's defaults, as ``--enable_bucket``).
        flip_aug: flip horizontally at random.
        include_subdirectories: also read images in sub-folders.
        max_images: use at most this many images (the first by name); None: all.
    """

    folder: Path
    source: str
    name: str
    repeats: int = 1
    prompt: Optional[str] = None
    caption_extension: Optional[str] = None
    caption_from_filename: bool = False
    caption_prefix: Optional[str] = None
    trigger_word: Optional[str] = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    is_reg: bool = False
    resolution: Optional[tuple[int, int]] = None
    enable_bucket: bool = False
    min_bucket_reso: Optional[int] = None
    max_bucket_reso: Optional[int] = None
    bucket_reso_steps: Optional[int] = None
    flip_aug: bool = False
    include_subdirectories: bool = False
    max_images: Optional[int] = None

    def where(self, key: Optional[str] = None) -> str:
        """``<source>: subset <name>[, key <key>]`` for messages."""
        return f"{self.source}: subset {self.name}" + (f", key {key!r}" if key else "")

    def caption_options(self) -> CaptionOptions:
        """How this subset's captions become prompts."""
        return CaptionOptions(fallback_prompt=self.prompt, prefix=self.caption_prefix,
                              dropout=self.caption_dropout_rate, shuffle=self.shuffle_caption,
                              keep_tokens=self.keep_tokens)

    def settings(self) -> dict[str, Any]:
        """The resolved settings as plain values (paths as strings, sizes as lists, None left
        out), for ``config.toml`` and the model card."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            values[field.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return values


def check_subset(subset: DatasetSubset) -> DatasetSubset:
    """``subset`` itself after checking its numbers (ranges) and its folder.

    Raises:
        SubsetError: naming the source, subset and key at fault.
    """
    def fail(key: str, message: str) -> None:
        raise SubsetError(f"{subset.where(key)}: {message}")

    if isinstance(subset.repeats, bool) or not isinstance(subset.repeats, int) or subset.repeats < 1:
        fail("repeats", f"{subset.repeats!r}: must be a whole number of at least 1")
    if isinstance(subset.keep_tokens, bool) or not isinstance(subset.keep_tokens, int) or subset.keep_tokens < 0:
        fail("keep_tokens", f"{subset.keep_tokens!r}: must be a whole number of at least 0")
    rate = subset.caption_dropout_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        fail("caption_dropout_rate", f"{rate!r}: must be a number in [0, 1)")
    if subset.resolution is not None and not (
        len(subset.resolution) == 2 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                            for s in subset.resolution)):
        fail("resolution", f"{subset.resolution!r}: must be a positive number of pixels (or [width, height])")
    for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        value = getattr(subset, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail(key, f"{value!r}: must be a whole number of pixels of at least 1")
    if not subset.folder.is_dir():
        fail("folder", f"{subset.folder}: no such folder")
    return subset


def _image_files(subset: DatasetSubset) -> list[Path]:
    if not subset.include_subdirectories:
        return list_images(subset.folder)
    return sorted(p for p in subset.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_subset(subset: DatasetSubset) -> list[TrainingImage]:
    """The images of ``subset`` (RGB, sorted by path) with their captions (None: the
    subset's ``prompt`` applies).

    Raises:
        SubsetError: a missing folder, a folder without images, unreadable images, or images
            with neither a caption nor a subset prompt (each named).
    """
    check_subset(subset)
    files = _image_files(subset)
    if subset.max_images is not None:
        files = files[: subset.max_images]
    if not files:
        raise SubsetError(f"{subset.where('folder')}: {subset.folder} holds no images "
                          f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    records, unreadable, uncaptioned = [], [], []
    for file in files:
        caption = None
        if subset.caption_extension:
            sidecar = caption_path(file, subset.caption_extension)
            caption = read_caption_file(sidecar) if sidecar.is_file() else None
        elif subset.caption_from_filename:
            caption = file.stem.replace("_", " ").strip()
        if caption is not None and subset.trigger_word:
            caption = with_trigger_word(caption, subset.trigger_word)
        if caption is None and subset.prompt is None:
            uncaptioned.append(file.name)
        try:
            with Image.open(file) as opened:
                opened.load()
                image = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            unreadable.append(f"{file.name} ({type(error).__name__}: {error})")
            continue
        records.append(TrainingImage(str(file.relative_to(subset.folder)), image, caption))
    if unreadable:
        raise SubsetError(f"{subset.where('folder')}: cannot read image file(s): {'; '.join(unreadable)}")
    if uncaptioned:
        names = ", ".join(uncaptioned[:10]) + (f" (and {len(uncaptioned) - 10} more)" if len(uncaptioned) > 10 else "")
        raise SubsetError(
            f"{subset.where('prompt')}: {len(uncaptioned)} image(s) in {subset.folder} have no caption and the "
            f"subset has no prompt (class_tokens / instance_prompt): {names}"
        )
    return records


def with_trigger_word(caption: str, trigger: str) -> str:
    """ai-toolkit's rule: ``[trigger]`` in ``caption`` becomes ``trigger``; a caption that
    still lacks it gets ``"<trigger>, "`` in front."""
    caption = caption.replace("[trigger]", trigger)
    return caption if trigger in caption else f"{trigger}, {caption}" if caption else trigger


def kohya_folder_subsets(folder: Path, template: DatasetSubset) -> Optional[list[DatasetSubset]]:
    """kohya's DreamBooth folder layout: the sub-folders of ``folder`` named
    ``<repeats>_<prompt>`` (``10_sks dog``), one subset each (``template`` with that folder,
    repeats and prompt), sorted by name. None when ``folder`` is not such a layout: no
    sub-folder of that name, or images at its top level (a plain folder, read as before; its
    ``<repeats>_<prompt>`` sub-folders are then named in a warning and not read).

    Raises:
        SubsetError: a sub-folder name gives 0 repeats.
    """
    if not folder.is_dir():
        return None
    named = sorted(p for p in folder.iterdir() if p.is_dir() and KOHYA_FOLDER.match(p.name))
    if not named:
        return None
    if list_images(folder):
        logger.warning("%s: %s holds images at its top level, so it is read as a plain folder; its "
                       "<repeats>_<prompt> sub-folders (%s) are not read", template.source, folder,
                       ", ".join(p.name for p in named))
        return None
    subsets = []
    for path in named:
        match = KOHYA_FOLDER.match(path.name)
        repeats, prompt = int(match.group(1)), match.group(2).strip()
        subset = dataclasses.replace(template, folder=path, name=path.name, repeats=repeats, prompt=prompt)
        if repeats < 1:
            raise SubsetError(f"{subset.where('repeats')}: the folder name gives {repeats} repeats; use 1 or more")
        subsets.append(subset)
    return subsets


def is_kohya_layout(folder: Optional[str]) -> bool:
    """Whether ``folder`` has ``<repeats>_<prompt>`` sub-folders and no images at its top level."""
    if folder is None:
        return False
    path = Path(folder)
    if not path.is_dir() or list_images(path):
        return False
    return any(p.is_dir() and KOHYA_FOLDER.match(p.name) for p in path.iterdir())

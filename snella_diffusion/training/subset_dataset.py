"""The training dataset of a run made of several subsets (``subsets.py``): every image of a
training subset is drawn ``repeats`` times per epoch with its subset's prompt and caption
options at its subset's size; regularisation subsets (``is_reg``) are paired with the
training items as class samples, so they reach the prior-preservation loss only.

Items have the layout of ``data.DreamBoothDataset`` (``instance``, ``instance_prompt`` and,
with regularisation subsets, ``class`` and ``class_prompt``), so ``data.collate_dreambooth``,
``data.CachedLatentsDataset`` and ``buckets.BucketBatchSampler`` apply. An epoch has
``Σ images × repeats`` items over the training subsets, in that order before shuffling.
Regularisation draws (``Σ images × repeats`` over the regularisation subsets) are dealt out
in order and continue from epoch to epoch: item ``i`` of epoch ``e`` takes draw
``(e × len + i) mod count``. Random draws are a function of (seed, epoch, index): stream 0
the instance crop and flip, 1 the class crop and flip, 2 the instance prompt, 3 the class prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from .buckets import BucketError, Size, kohya_buckets, nearest_bucket, resize_and_crop
from .captions import CaptionOptions
from .data import TransformedImage
from .subsets import DatasetSubset, SubsetError
from .training_images import TrainingImage


@dataclass
class SubsetImages:
    """A subset with its loaded images (captions included) and its training sizes ``(h, w)``
    (one size, or the bucket sizes)."""

    subset: DatasetSubset
    images: list[TrainingImage]
    sizes: Optional[list[Size]] = None


def subset_sizes(
    subset: DatasetSubset,
    run_resolution: int,
    multiple: int,
    default_step: int,
    run_buckets: Optional[Sequence[Size]] = None,
) -> list[Size]:
    """The training sizes ``(h, w)`` of ``subset``: kohya's buckets of about its resolution's
    area with ``enable_bucket``, else ``run_buckets`` (``--aspect_ratio_buckets``) for a subset
    without its own resolution, else its resolution (``run_resolution`` squared when unset).

    Raises:
        SubsetError: a size that is not a multiple of ``multiple`` (the model's pixel
            granularity) or bucket bounds that give no sizes, naming the subset and key.
    """
    height, width = subset.resolution or (run_resolution, run_resolution)
    if subset.enable_bucket:
        step = subset.bucket_reso_steps or default_step
        if step % multiple:
            raise SubsetError(f"{subset.where('bucket_reso_steps')}: {step} must be a multiple of {multiple} "
                              "for this model")
        side = int(math.sqrt(height * width))
        low = subset.min_bucket_reso or max(step, side // 2 // step * step)
        high = subset.max_bucket_reso or 2 * side // step * step
        try:
            sizes = kohya_buckets(side, low, high, step)
        except BucketError as error:
            raise SubsetError(f"{subset.where('min_bucket_reso')}: {error}") from error
    elif subset.resolution is None and run_buckets:
        sizes = list(run_buckets)
    else:
        sizes = [(height, width)]
    bad = [f"{h}x{w}" for h, w in sizes if h % multiple or w % multiple]
    if bad:
        raise SubsetError(f"{subset.where('resolution')}: size(s) {', '.join(bad)} (height x width) are not "
                          f"multiples of {multiple}, which this model needs")
    return sizes


class SubsetDataset(Dataset):
    """The items of several subsets (see the module docstring).

    Args:
        parts: every subset with its images and sizes (``SubsetImages.sizes`` set); training
            and regularisation subsets in any order.
        center_crop: centred crops instead of random ones.
        seed: the run's seed.
    """

    def __init__(self, parts: Sequence[SubsetImages], center_crop: bool = False, seed: int = 0) -> None:
        self.parts = list(parts)
        self.center_crop = center_crop
        self.seed = seed
        self.epoch = 0
        self.captions: list[CaptionOptions] = [part.subset.caption_options() for part in self.parts]
        self.size_of: list[list[Size]] = []
        for part in self.parts:
            sizes = part.sizes
            if not sizes:
                raise SubsetError(f"{part.subset.where()}: no training sizes (SubsetImages.sizes is not set)")
            self.size_of.append([
                sizes[nearest_bucket((image.image.size[1], image.image.size[0]), sizes)] for image in part.images
            ])
        self.instance_draws = self._draws(regularisation=False)
        self.class_draws = self._draws(regularisation=True)
        if not self.instance_draws:
            raise SubsetError("the dataset has no training subset with images (only regularisation subsets)")
        self.sizes: list[Size] = sorted({self.size_of[p][i] for p, i in self.instance_draws})

    def _draws(self, regularisation: bool) -> list[tuple[int, int]]:
        return [(p, i) for p, part in enumerate(self.parts) if part.subset.is_reg == regularisation
                for _ in range(part.subset.repeats) for i in range(len(part.images))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instance_draws)

    @property
    def needs_bucket_batches(self) -> bool:
        """Whether items come in more than one size (batches must then come from one size)."""
        return len(self.sizes) > 1

    @property
    def buckets_of_items(self) -> list[int]:
        """The size index (into ``sizes``) of every item, for ``BucketBatchSampler``."""
        return [self.sizes.index(self.size_of[p][i]) for p, i in self.instance_draws]

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def instance_prompt_of(self, index: int) -> str:
        """The prompt of item ``index`` in the current epoch."""
        p, i = self.instance_draws[index]
        return self.captions[p].prompt_for(self.parts[p].images[i].caption, self._rng(index, 2))

    def class_draw_of(self, index: int) -> tuple[int, int]:
        """(subset, image) of the regularisation image paired with item ``index`` this epoch."""
        return self.class_draws[(self.epoch * len(self) + index) % len(self.class_draws)]

    def possible_prompts(self) -> Optional[set[str]]:
        """Every prompt (training and regularisation) the dataset can produce; None when
        unbounded (shuffled tags)."""
        prompts: set[str] = set()
        for part, captions in zip(self.parts, self.captions):
            found = captions.possible_prompts(image.caption for image in part.images)
            if found is None:
                return None
            prompts |= found
        return prompts

    def _transform(self, part: int, image: TrainingImage, size: Size, rng: np.random.Generator) -> TransformedImage:
        crop = resize_and_crop(image.image, size, self.center_crop, self.parts[part].subset.flip_aug, rng)
        return TransformedImage(crop.pixels, crop.original_size, crop.crop_top_left, crop.mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, i = self.instance_draws[index]
        size = self.size_of[p][i]
        item: dict[str, Any] = {
            "index": index,
            "instance": self._transform(p, self.parts[p].images[i], size, self._rng(index, 0)),
            "instance_prompt": self.instance_prompt_of(index),
        }
        if self.class_draws:
            cp, ci = self.class_draw_of(index)
            record = self.parts[cp].images[ci]
            item["class"] = self._transform(cp, record, size, self._rng(index, 1))
            item["class_prompt"] = self.captions[cp].prompt_for(record.caption, self._rng(index, 3))
        return item

    def subset_records(self) -> list[dict[str, Any]]:
        """Every subset's resolved settings with its image count and draws per epoch, for
        ``config.toml`` and the model card."""
        return [{**part.subset.settings(), "images": len(part.images),
                 "draws_per_epoch": len(part.images) * part.subset.repeats,
                 **({"sizes": [list(size) for size in part.sizes]} if part.sizes else {})}
                for part in self.parts]

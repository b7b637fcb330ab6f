"""The training dataset of the DreamBooth script: instance images with per-image prompts
(captions, see ``captions.py``), optional loss masks, aspect-ratio buckets (``buckets.py``),
``--repeats``, and class images for prior preservation.

Items have the layout of ``data.DreamBoothDataset`` (``instance``, ``instance_prompt`` and,
with class images, ``class`` and ``class_prompt``), so ``data.collate_dreambooth`` and
``data.CachedLatentsDataset`` apply. Random draws are a function of (seed, epoch, index):
stream 0 the instance crop and flip, 1 the class crop and flip, 2 the prompt.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .buckets import Size, nearest_bucket, resize_and_crop
from .captions import CaptionOptions
from .data import DataError, TransformedImage
from .training_images import TrainingImage


class TrainingImageDataset(Dataset):
    """``len(images) × repeats`` instance items (or the class image count if larger).

    Args:
        images: the instance images with captions and masks.
        captions: how captions become prompts.
        resolution: square side in pixels when ``buckets`` is None.
        buckets: bucket sizes ``(h, w)``; each image is trained at the bucket of nearest
            aspect ratio. None: square crops of ``resolution``.
        class_images: prior-preservation images, resized and cropped to the size of the
            instance item they are paired with.
    """

    def __init__(
        self,
        images: Sequence[TrainingImage],
        captions: CaptionOptions,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        buckets: Optional[Sequence[Size]] = None,
        class_images: Optional[Sequence[Image.Image]] = None,
        class_prompt: Optional[str] = None,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        if not images:
            raise DataError("TrainingImageDataset: no instance images")
        self.images = list(images)
        self.captions = captions
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets: list[Size] = list(buckets) if buckets else [(resolution, resolution)]
        self.class_images = list(class_images or [])
        self.class_prompt = class_prompt
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.bucket_of_image = [
            nearest_bucket((image.image.size[1], image.image.size[0]), self.buckets) for image in self.images
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.images) * self.repeats, len(self.class_images))

    @property
    def buckets_of_items(self) -> list[int]:
        """The bucket index of every item (for ``BucketBatchSampler``)."""
        return [self.bucket_of_image[index % len(self.images)] for index in range(len(self))]

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def instance_prompt_of(self, index: int) -> str:
        """The prompt of item ``index`` in the current epoch."""
        record = self.images[index % len(self.images)]
        return self.captions.prompt_for(record.caption, self._rng(index, 2))

    def possible_prompts(self) -> Optional[set[str]]:
        """Every instance prompt the dataset can produce (None: unbounded, tags are shuffled)."""
        return self.captions.possible_prompts(record.caption for record in self.images)

    def _transform(self, image: Image.Image, size: Size, rng: np.random.Generator,
                   mask: Optional[Image.Image] = None) -> TransformedImage:
        crop = resize_and_crop(image, size, self.center_crop, self.random_flip, rng, mask)
        return TransformedImage(crop.pixels, crop.original_size, crop.crop_top_left, crop.mask)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[index % len(self.images)]
        size = self.buckets[self.bucket_of_image[index % len(self.images)]]
        item: dict[str, Any] = {
            "index": index,
            "instance": self._transform(record.image, size, self._rng(index, 0), record.mask),
            "instance_prompt": self.instance_prompt_of(index),
        }
        if self.class_images:
            image = self.class_images[index % len(self.class_images)]
            item["class"] = self._transform(image, size, self._rng(index, 1))
            item["class_prompt"] = self.class_prompt
        return item

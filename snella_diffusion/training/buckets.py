"""Aspect-ratio buckets: the bucket sizes, the bucket of each image, the resize-and-crop to a
bucket and a batch sampler that draws every batch from one bucket.

Sizes are ``(height, width)`` in pixels. Two ways to get the list of buckets:

- kohya's ``--enable_bucket``: every width ``w`` from ``min_reso`` to ``max_reso`` in steps of
  ``step`` is paired with the largest height ``h`` (a multiple of ``step``, within the same
  bounds) with ``w·h ≤ resolution²``; both orientations and the square are included.
- diffusers' ``--aspect_ratio_buckets "h1,w1;h2,w2;..."``: the sizes given.

An image goes to the bucket whose aspect ratio is nearest in log scale, ``|log(h/w) -
log(bh/bw)|`` (ties: the earlier bucket); it is resized to cover the bucket (bicubic) and
cropped to it, so its SDXL ``original_size`` is the file's size and ``crops_coords_top_left``
the crop corner in resized pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Sampler

from ..errors import SnellaError
from .data import EpochShuffleSampler, resize_and_crop

Size = tuple[int, int]


class BucketError(SnellaError):
    """A bucket setting cannot produce valid sizes."""


def kohya_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """Bucket sizes ``(h, w)`` of about ``resolution²`` pixels, multiples of ``step``, each side in
    ``[min_reso, max_reso]``, sorted by aspect ratio h/w (the square included)."""
    if step < 1 or min_reso < step or max_reso < min_reso or resolution < min_reso:
        raise BucketError(
            f"--min_bucket_reso={min_reso} --max_bucket_reso={max_reso} --bucket_reso_steps={step}: "
            f"need 1 ≤ step ≤ min ≤ max and min ≤ --resolution={resolution}"
        )
    area = resolution * resolution
    square = max(min_reso, min(max_reso, (resolution // step) * step))
    sizes = {(square, square)}
    for width in range(-(-min_reso // step) * step, max_reso + 1, step):
        height = min(max_reso, (area // width) // step * step)
        if height >= min_reso:
            sizes.add((height, width))
            sizes.add((width, height))
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def parse_bucket_list(text: str, flag: str = "--aspect_ratio_buckets") -> list[Size]:
    """``"h1,w1;h2,w2"`` → ``[(h1, w1), (h2, w2)]``; positive integers, no duplicates."""
    sizes: list[Size] = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        pieces = part.split(",")
        if len(pieces) != 2 or not all(piece.isdigit() and int(piece) > 0 for piece in pieces):
            raise BucketError(f"{flag}={text!r}: {part!r} is not 'height,width' in positive pixels")
        size = (int(pieces[0]), int(pieces[1]))
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise BucketError(f"{flag}={text!r}: no bucket sizes")
    return sizes


def check_bucket_multiple(buckets: Sequence[Size], multiple: int, flag: str) -> None:
    """Every side a multiple of ``multiple`` (the model's pixel granularity)."""
    bad = [f"{h}x{w}" for h, w in buckets if h % multiple or w % multiple]
    if bad:
        raise BucketError(f"{flag}: bucket size(s) {', '.join(bad)} (height x width) are not multiples of "
                          f"{multiple}, which this model needs")


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket of nearest aspect ratio (log scale) to ``size`` ``(h, w)``."""
    ratio = math.log(size[0] / size[1])
    distances = [abs(ratio - math.log(h / w)) for h, w in buckets]
    return int(np.argmin(distances))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket.

    Per epoch (a function of (seed, epoch) only, so a resumed run sees the same batches): the
    indices of each bucket are shuffled and cut into batches of ``batch_size``, the last one
    of a bucket filled up with the bucket's first indices of the epoch (so every batch is full,
    which accelerate's process sharding needs), and the order of all batches is shuffled.

    ``sampler`` holds the epoch; accelerate's ``set_epoch`` reaches it through a process shard.
    """

    def __init__(self, buckets_of_items: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.buckets_of_items = list(buckets_of_items)
        self.batch_size = batch_size
        self.drop_last = False
        self.seed = seed
        self.sampler = EpochShuffleSampler(len(self.buckets_of_items), seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order."""
        rng = np.random.default_rng([self.seed, self.sampler.epoch, 104729])
        groups: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.buckets_of_items):
            groups.setdefault(bucket, []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(groups):
            members = [groups[bucket][i] for i in rng.permutation(len(groups[bucket]))]
            count = math.ceil(len(members) / self.batch_size) * self.batch_size
            filled = [members[i % len(members)] for i in range(count)]
            batches += [filled[i:i + self.batch_size] for i in range(0, count, self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for bucket in self.buckets_of_items:
            counts[bucket] = counts.get(bucket, 0) + 1
        return sum(math.ceil(count / self.batch_size) for count in counts.values())

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

"""Training data of the video families: clips (``.mp4``/``.webm``/``.mov``/``.gif``, read with
PyAV, ``video_files.py``) and still images from ``--instance_data_dir``, with sidecar captions
as for images; images train as one-frame videos in the same run.

Frames per sample: ``--num_frames`` (default: the family's own, 81 for Wan), every
``--frame_stride``-th frame, or (``--frame_fps F``) the source frames nearest to a clip played
at F frames per second, from a start that is the first frame or drawn per (seed, epoch,
index) (``--frame_sampling``). Counts are fitted to the VAE's temporal factor f (f·k + 1
frames: 1, 5, 9, … for Wan): a clip too short for ``--num_frames`` trains at the largest
fitting count it holds. Buckets are (frames, height, width): a clip's resolution bucket is the
aspect-ratio bucket of its frame size (``--aspect_ratio_buckets``/``--enable_bucket``, else the
``--resolution`` square), and a batch only holds samples of one bucket.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .buckets import Size, nearest_bucket
from .captions import CaptionOptions, read_sidecar_captions
from .data import IMAGE_SUFFIXES, DataError, TransformedImage, resize_and_crop
from .flag_settings import FlagSettings
from .training_images import TrainingImage, load_dataset_images
from .video_files import VIDEO_SUFFIXES, ClipInfo, is_video_file, probe_clip, read_frames

if TYPE_CHECKING:
    from .run_settings import RunSettings

logger = logging.getLogger(__name__)

FRAME_SAMPLING = ("first", "random")
# --frame_fps accepts clips this fraction of the target rate and faster (29.97 fps for 30).
FPS_TOLERANCE = 0.99
WAN_EXPERTS = ("high", "low", "both")
# Still images are listed as images, not clips: a .gif is a clip here.
STILL_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix not in VIDEO_SUFFIXES)


@dataclass(frozen=True)
class VideoSettings(FlagSettings):
    """Frames per sample, their stride (or target rate) and start, and which Wan 2.2 A14B
    expert is trained."""

    num_frames: Optional[int]
    frame_stride: int
    frame_fps: Optional[float]
    frame_sampling: str
    wan_expert: Optional[str]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("video")
        group.add_argument("--num_frames", type=int, default=None,
                           help="Frames per training sample and validation video (default: the family's own, "
                                "81 for Wan 2.1/A14B, 121 for Wan 2.2 TI2V-5B); must be f·k+1 for the VAE's "
                                "temporal factor f (4 for Wan). Shorter clips train at the largest such count they hold.")
        group.add_argument("--frame_stride", type=int, default=1,
                           help="Take every N-th frame of a clip (2 halves a 32 fps clip to 16 fps, Wan's rate).")
        group.add_argument("--frame_fps", type=float, default=None, metavar="F",
                           help="Instead of --frame_stride: sample each clip at F frames per second, whatever its "
                                "own rate (16 for Wan): frame i is the source frame nearest to i/F seconds. A clip "
                                "slower than F is refused, naming it.")
        group.add_argument("--frame_sampling", type=str, default="first", choices=list(FRAME_SAMPLING),
                           help="Where a sample starts in a longer clip: its first frame, or a start drawn "
                                "per (seed, epoch, sample).")
        group.add_argument("--wan_expert", type=str, default=None, choices=list(WAN_EXPERTS),
                           help="Wan 2.2 A14B: train the high-noise transformer (timesteps >= the boundary), "
                                "the low-noise transformer_2 (below it), or both into one file (default: both).")


class VideoDataError(DataError):
    """A video-data flag or file cannot be used."""


def fit_frame_count(frames: int, temporal_factor: int) -> int:
    """The largest f·k + 1 ≤ ``frames`` (``frames`` ≥ 1)."""
    return (frames - 1) // temporal_factor * temporal_factor + 1


def frame_offsets(step: float, count: int) -> list[int]:
    """Source-frame offsets of ``count`` sampled frames ``step`` source frames apart (``step`` ≥ 1,
    fractional for a target rate): ``floor(i·step + ½)``, the source frame nearest to each."""
    return [math.floor(i * step + 0.5) for i in range(count)]


def frames_within(frames: int, step: float) -> int:
    """How many frames ``step`` apart fit in ``frames`` source frames from the first: the largest
    n with ``frame_offsets(step, n)[-1] ≤ frames - 1``."""
    count = max(1, math.floor((frames - 0.5) / step) + 1)
    while count > 1 and frame_offsets(step, count)[-1] > frames - 1:
        count -= 1
    return count


@dataclass(frozen=True)
class TrainingClip:
    """One instance clip: ``path``, its frame count and size (``info``), ``caption`` (None: use
    ``--instance_prompt``)."""

    name: str
    path: Path
    info: ClipInfo
    caption: Optional[str] = None


VideoRecord = Union[TrainingClip, TrainingImage]


def record_size(record: VideoRecord) -> Size:
    """``(height, width)`` of a clip's frames or of an image, pixels."""
    if isinstance(record, TrainingClip):
        return record.info.height, record.info.width
    return record.image.size[1], record.image.size[0]


def record_frames(record: VideoRecord) -> int:
    """Frames a record holds: the clip's decodable frames, 1 for an image."""
    return record.info.frames if isinstance(record, TrainingClip) else 1


def check_video_settings(settings: RunSettings, temporal_factor: Optional[int] = None) -> None:
    """Refuse flags a video run cannot honour, naming them: before the model is loaded (with
    ``temporal_factor`` None), and ``--num_frames`` against the VAE's temporal factor once it is known."""
    video, data = settings.video, settings.data
    if temporal_factor is not None and video.num_frames is not None and (
            video.num_frames < 1 or (video.num_frames - 1) % temporal_factor):
        raise VideoDataError(f"--num_frames={video.num_frames}: must be {temporal_factor}·k+1 "
                             f"(1, {temporal_factor + 1}, {2 * temporal_factor + 1}, …) for this model's VAE")
    if video.frame_stride < 1:
        raise VideoDataError(f"--frame_stride={video.frame_stride}: must be at least 1")
    if video.frame_fps is not None and video.frame_stride != 1:
        raise VideoDataError(f"--frame_fps={video.frame_fps:g} and --frame_stride={video.frame_stride}: give one "
                             "of the two (a target rate, or a fixed step in source frames)")
    if video.frame_fps is not None and not video.frame_fps > 0:
        raise VideoDataError(f"--frame_fps={video.frame_fps:g}: must be positive")
    refused = {
        "--with_prior_preservation": data.with_prior_preservation,
        "--masked_loss": settings.loss.masked_loss,
        "--dataset_config": bool(settings.datasets.dataset_config),
    }
    for flag, given in refused.items():
        if given:
            raise VideoDataError(f"{flag}: not available for video models yet (train on a clip folder or --dataset_name)")


def refuse_video_flags(settings: RunSettings, family_name: str) -> None:
    """An image family given a video flag: VideoDataError naming the flag (not silently ignored)."""
    video = settings.video
    given = {"--num_frames": video.num_frames is not None, "--frame_stride": video.frame_stride != 1,
             "--frame_fps": video.frame_fps is not None, "--frame_sampling": video.frame_sampling != "first",
             "--wan_expert": video.wan_expert is not None}
    for flag, is_given in given.items():
        if is_given:
            raise VideoDataError(f"{flag}: applies to video models (Wan, LTX-2, HunyuanVideo 1.5); the {family_name} family trains on images")


def load_video_records(settings: RunSettings) -> list[VideoRecord]:
    """The instance clips and images of a video run: ``--dataset_name`` images (one-frame
    videos), or every clip and image in ``--instance_data_dir`` with sidecar captions. Each
    clip is decoded once here, so an unreadable one stops the run before the model loads."""
    check_video_settings(settings)
    if settings.datasets.dataset_name:
        return list(load_dataset_images(settings.datasets, settings.loss))
    if settings.data.instance_data_dir is None:
        raise VideoDataError("--instance_data_dir: a video model trains on a folder of clips and images "
                             "(or image rows of --dataset_name); none was given")
    folder = Path(settings.data.instance_data_dir)
    if not folder.is_dir():
        raise VideoDataError(f"--instance_data_dir={folder}: no such folder")
    suffixes = VIDEO_SUFFIXES + STILL_SUFFIXES
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise VideoDataError(f"--instance_data_dir={folder}: holds no clips or images (looked for {', '.join(suffixes)})")
    captions: list[Optional[str]] = [None] * len(files)
    caption_settings = settings.captions
    if caption_settings.caption_extension:
        captions = read_sidecar_captions(files, caption_settings.caption_extension, caption_settings.missing_caption,
                                         settings.data.instance_prompt)
    records: list[VideoRecord] = []
    for file, caption in zip(files, captions):
        if is_video_file(file):
            records.append(TrainingClip(file.name, file, probe_clip(file), caption))
            continue
        try:
            with Image.open(file) as opened:
                opened.load()
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise VideoDataError(f"{file}: cannot read the image ({type(error).__name__}: {error})") from error
        records.append(TrainingImage(file.name, image, caption))
    return records


class VideoDataset(Dataset):
    """``len(records) × repeats`` samples of clips and images.

    An item has the layout of ``data.DreamBoothDataset``: ``instance`` is a TransformedImage
    whose ``pixels`` are ``(3, F, H, W)`` float32 in [-1, 1] (F = 1 for an image), one crop and
    flip for all frames of a sample; ``instance_prompt`` its prompt. Random draws are a function
    of (seed, epoch, index): stream 0 the crop and flip, 2 the prompt, 3 the start frame.

    Args:
        records: the clips and images.
        captions: how captions become prompts.
        sizes: resolution buckets ``(h, w)``; each record trains at the one of nearest aspect ratio.
        num_frames: frames per sample (already f·k + 1).
        temporal_factor: the VAE's f.
        frame_stride: take every N-th frame.
        frame_sampling: "first" or "random" start.
        frame_fps: instead of ``frame_stride``, sample each clip at this rate (frames per second):
            its step is the clip's fps / ``frame_fps`` source frames.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        captions: CaptionOptions,
        sizes: Sequence[Size],
        num_frames: int,
        temporal_factor: int,
        frame_stride: int = 1,
        frame_sampling: str = "first",
        center_crop: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
        frame_fps: Optional[float] = None,
    ) -> None:
        if not records:
            raise VideoDataError("VideoDataset: no clips or images")
        if frame_sampling not in FRAME_SAMPLING:
            raise VideoDataError(f"--frame_sampling={frame_sampling!r}: expected one of {FRAME_SAMPLING}")
        self.records = list(records)
        self.captions = captions
        self.sizes = list(sizes)
        self.frame_stride = frame_stride
        self.frame_sampling = frame_sampling
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.step_of_record = [self._step(record, frame_fps) for record in self.records]
        self.frames_of_record = [
            min(num_frames, fit_frame_count(frames_within(record_frames(r), step), temporal_factor))
            for r, step in zip(self.records, self.step_of_record)
        ]
        self.size_of_record = [self.sizes[nearest_bucket(record_size(r), self.sizes)] for r in self.records]
        keys = [(frames, *size) for frames, size in zip(self.frames_of_record, self.size_of_record)]
        self.bucket_keys: list[tuple[int, int, int]] = sorted(set(keys))
        self.bucket_of_record = [self.bucket_keys.index(key) for key in keys]

    def _step(self, record: VideoRecord, frame_fps: Optional[float]) -> float:
        """Source frames between two sampled frames of ``record``: ``frame_stride``, or the
        clip's fps / ``frame_fps`` (at least 1: a clip within 1 % below the target, 29.97 fps
        for 30, takes every frame). Raises VideoDataError naming a clip with no rate or one
        slower than that."""
        if frame_fps is None or not isinstance(record, TrainingClip):
            return float(self.frame_stride)
        fps = record.info.fps
        if fps is None:
            raise VideoDataError(f"{record.path}: the file gives no frame rate, so --frame_fps cannot sample it; "
                                 "use --frame_stride")
        if fps < frame_fps * FPS_TOLERANCE:
            raise VideoDataError(f"--frame_fps={frame_fps:g}: {record.path} plays at {fps:g} fps, slower than the "
                                 "target; lower --frame_fps or drop the clip")
        return max(fps / frame_fps, 1.0)

    @property
    def needs_bucket_batches(self) -> bool:
        """Whether samples differ in frames or size (batches must then come from one bucket)."""
        return len(self.bucket_keys) > 1

    @property
    def buckets_of_items(self) -> list[int]:
        """The bucket index of every item (for ``BucketBatchSampler``); ``bucket_keys`` holds
        each bucket's (frames, height, width)."""
        return [self.bucket_of_record[index % len(self.records)] for index in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index, stream])

    def instance_prompt_of(self, index: int) -> str:
        """The prompt of item ``index`` in the current epoch."""
        return self.captions.prompt_for(self.records[index % len(self.records)].caption, self._rng(index, 2))

    def possible_prompts(self) -> Optional[set[str]]:
        """Every instance prompt the dataset can produce (None: unbounded, tags are shuffled)."""
        return self.captions.possible_prompts(record.caption for record in self.records)

    def frame_indices(self, index: int) -> list[int]:
        """The clip frames item ``index`` uses, in order (``[0]`` for an image)."""
        position = index % len(self.records)
        record, count = self.records[position], self.frames_of_record[position]
        offsets = frame_offsets(self.step_of_record[position], count)
        start = 0
        if self.frame_sampling == "random":
            start = int(self._rng(index, 3).integers(0, record_frames(record) - offsets[-1]))
        return [start + offset for offset in offsets]

    def frames_of(self, index: int) -> list[Image.Image]:
        """The RGB frames of item ``index``, decoded."""
        record = self.records[index % len(self.records)]
        if isinstance(record, TrainingImage):
            return [record.image]
        return read_frames(record.path, self.frame_indices(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.size_of_record[index % len(self.records)]
        frames = self.frames_of(index)
        # one crop and flip for every frame: each frame draws from a fresh copy of the same stream
        crops = [resize_and_crop(frame, size, self.center_crop, self.random_flip, self._rng(index, 0)) for frame in frames]
        pixels = torch.stack([crop.pixels for crop in crops], dim=1)
        sample = TransformedImage(pixels, crops[0].original_size, crops[0].crop_top_left)
        return {"index": index, "instance": sample, "instance_prompt": self.instance_prompt_of(index)}


def resolve_num_frames(settings: RunSettings, family: Any, components: Any) -> int:
    """``--num_frames``, or the family's default for the loaded model."""
    return settings.video.num_frames or family.default_num_frames(components)


def make_video_dataset(settings: RunSettings, records: Sequence[VideoRecord], family: Any, components: Any,
                       resolution: int, sizes: Optional[Sequence[Size]]) -> VideoDataset:
    """The run's VideoDataset: frames and stride from the settings, the VAE's temporal factor
    from the family, resolution buckets ``sizes`` (None: the ``resolution`` square)."""
    temporal_factor = family.temporal_factor(components)
    check_video_settings(settings, temporal_factor)
    data, video = settings.data, settings.video
    dataset = VideoDataset(
        records, settings.captions.options(data.instance_prompt), list(sizes or [(resolution, resolution)]),
        resolve_num_frames(settings, family, components), temporal_factor, video.frame_stride, video.frame_sampling,
        data.center_crop, data.random_flip, settings.datasets.repeats, settings.training.seed, video.frame_fps,
    )
    counts = {key: dataset.bucket_of_record.count(i) for i, key in enumerate(dataset.bucket_keys)}
    logger.info("video buckets (frames, height, width): %s", ", ".join(f"{k}: {n}" for k, n in counts.items()))
    return dataset


def describe_records(records: Sequence[VideoRecord]) -> str:
    """``"3 clips, 1 image"`` for the run log."""
    clips = sum(isinstance(record, TrainingClip) for record in records)
    images = len(records) - clips
    return f"{clips} clip{'s' * (clips != 1)}, {images} image{'s' * (images != 1)}"


__all__ = [
    "FRAME_SAMPLING",
    "TrainingClip",
    "VideoDataError",
    "VideoDataset",
    "VideoSettings",
    "WAN_EXPERTS",
    "check_video_settings",
    "fit_frame_count",
    "frame_offsets",
    "frames_within",
    "load_video_records",
    "make_video_dataset",
]

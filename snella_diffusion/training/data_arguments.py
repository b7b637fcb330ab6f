"""The training-data flags of the DreamBooth script (captions, datasets, aspect-ratio buckets,
EMA) as typed settings, each group declared next to its fields; their checks before any model
is loaded (:func:`check_data_settings`), and what the script builds from them (bucket sizes,
the dataset and its loader, the settings for the model card). :func:`add_data_arguments`
registers these groups with the loss, optimizer and ``--config`` flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from PIL import Image

from ..errors import SnellaError
from .buckets import BucketBatchSampler, Size, check_bucket_multiple, kohya_buckets, parse_bucket_list
from .captions import MISSING_CAPTION_POLICIES, CaptionOptions
from .data import EpochShuffleSampler, collate_dreambooth
from .dataset_configs import read_dataset_config
from .flag_settings import FlagSettings
from .image_dataset import TrainingImageDataset
from .job_config import add_config_argument
from .loss_options import LossSettings
from .optimizers import OptimizerSettings, check_optimizer_settings
from .subset_dataset import SubsetDataset, SubsetImages, subset_sizes
from .subsets import DatasetSubset, is_kohya_layout, kohya_folder_subsets
from .training_images import TrainingImage

if TYPE_CHECKING:
    from .run_settings import RunSettings

INSTANCE_PROMPT_PREFIX = "@instance_prompt"
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_IMAGE_COLUMN = "image"


class DataArgumentError(SnellaError):
    """A training-data, loss or optimizer flag (or a combination of them) cannot work."""


@dataclass(frozen=True)
class CaptionSettings(FlagSettings):
    """Where captions come from and how they are drawn. ``caption_prefix`` is the trigger word
    (``INSTANCE_PROMPT_PREFIX`` until resolved to ``--instance_prompt``, for the bare flag)."""

    caption_extension: Optional[str]
    caption_prefix: Optional[str]
    caption_dropout: float
    shuffle_caption: bool
    keep_tokens: int
    missing_caption: str

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("captions")
        group.add_argument("--caption_extension", type=str, default=None,
                           help="Read each image's prompt from the file beside it with this extension "
                                "(e.g. .txt; kohya/ai-toolkit layout). Off: every image uses --instance_prompt.")
        group.add_argument("--caption_prefix", type=str, nargs="?", const=INSTANCE_PROMPT_PREFIX, default=None,
                           help="Text (a trigger word) put in front of every caption as '<prefix>, <caption>'; "
                                "the flag alone uses --instance_prompt.")
        group.add_argument("--caption_dropout", type=float, default=0.0,
                           help="Probability that a sample's prompt is the empty string (for classifier-free guidance).")
        group.add_argument("--shuffle_caption", action="store_true",
                           help="Shuffle the comma-separated tags of each caption every time it is drawn.")
        group.add_argument("--keep_tokens", type=int, default=0,
                           help="With --shuffle_caption: the first N tags stay in place (kohya's meaning).")
        group.add_argument("--missing_caption", type=str, default="error", choices=list(MISSING_CAPTION_POLICIES),
                           help="Images without a caption file: stop with an error naming them, or train them "
                                "on --instance_prompt (with a warning).")

    def options(self, fallback_prompt: Optional[str]) -> CaptionOptions:
        """The caption drawing options, ``fallback_prompt`` for images without a caption."""
        return CaptionOptions(
            fallback_prompt=fallback_prompt, prefix=self.caption_prefix, dropout=self.caption_dropout,
            shuffle=self.shuffle_caption, keep_tokens=self.keep_tokens,
        )


@dataclass(frozen=True)
class DatasetSettings(FlagSettings):
    """A Hugging Face dataset as the source of instance images, ``--repeats``, and
    ``--dataset_config``: another trainer's dataset definition (its subsets, ``subsets.py``)."""

    dataset_name: Optional[str]
    dataset_config_name: Optional[str]
    image_column: str
    caption_column: Optional[str]
    cache_dir: Optional[str]
    repeats: int
    dataset_config: Optional[str]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("datasets (Hugging Face `datasets`, optional extra)")
        group.add_argument("--dataset_name", type=str, default=None,
                           help="A hub dataset id, or a local imagefolder (images + metadata.jsonl/metadata.csv "
                                "with file_name and caption columns). Replaces --instance_data_dir.")
        group.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
        group.add_argument("--image_column", type=str, default=DEFAULT_IMAGE_COLUMN, help="The column holding images.")
        group.add_argument("--caption_column", type=str, default=None,
                           help="The column holding captions (default: every image uses --instance_prompt).")
        group.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
        group.add_argument("--repeats", type=int, default=1,
                           help="Use every instance image this many times per epoch (any data source).")
        group.add_argument("--dataset_config", type=str, default=None,
                           help="A dataset definition of another trainer: kohya's dataset .toml, an ai-toolkit job "
                                ".yaml (datasets:), SimpleTuner's multidatabackend.json or OneTrainer's concepts.json "
                                "(docs/training-data-formats.md). Replaces --instance_data_dir and --class_data_dir; "
                                "its regularisation subsets feed the prior-preservation loss.")


@dataclass(frozen=True)
class BucketSettings(FlagSettings):
    """Aspect-ratio buckets: a list of sizes, or kohya's generated ones."""

    aspect_ratio_buckets: Optional[str]
    enable_bucket: bool
    min_bucket_reso: Optional[int]
    max_bucket_reso: Optional[int]
    bucket_reso_steps: Optional[int]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("aspect-ratio buckets")
        group.add_argument("--aspect_ratio_buckets", type=str, default=None,
                           help='Bucket sizes "h1,w1;h2,w2;..." in pixels (diffusers\' flag); each image trains at '
                                "the size of nearest aspect ratio.")
        group.add_argument("--enable_bucket", action="store_true",
                           help="kohya's buckets: sizes of about --resolution² pixels between --min_bucket_reso "
                                "and --max_bucket_reso in steps of --bucket_reso_steps.")
        group.add_argument("--min_bucket_reso", type=int, default=None,
                           help="Smallest bucket side (default: --resolution / 2, rounded to the step).")
        group.add_argument("--max_bucket_reso", type=int, default=None,
                           help="Largest bucket side (default: 2 × --resolution).")
        group.add_argument("--bucket_reso_steps", type=int, default=None,
                           help="Bucket sides are multiples of this (default: 64; 16 for Flux).")

    @property
    def enabled(self) -> bool:
        """Whether images train at bucket sizes."""
        return bool(self.aspect_ratio_buckets) or bool(self.enable_bucket)


@dataclass(frozen=True)
class EMASettings(FlagSettings):
    """``--use_ema`` and its decay (resolved to ``DEFAULT_EMA_DECAY`` when not given)."""

    use_ema: bool
    ema_decay: Optional[float]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("EMA")
        group.add_argument("--use_ema", action="store_true",
                           help="Keep an exponential moving average of the adapter parameters; the final "
                                "snella_weights.safetensors holds the average, snella_weights_raw.safetensors the raw weights.")
        group.add_argument("--ema_decay", type=float, default=None,
                           help=f"EMA decay (default {DEFAULT_EMA_DECAY}; warm-up min(decay, k/(k+9)) at step k).")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the captions, datasets, buckets, loss, optimizer, EMA and ``--config`` flags."""
    CaptionSettings.add_arguments(parser)
    DatasetSettings.add_arguments(parser)
    BucketSettings.add_arguments(parser)
    LossSettings.add_arguments(parser)
    OptimizerSettings.add_arguments(parser)
    EMASettings.add_arguments(parser)
    add_config_argument(parser)


def resolve_caption_prefix(captions: CaptionSettings, instance_prompt: Optional[str]) -> CaptionSettings:
    """The bare ``--caption_prefix`` stands for ``instance_prompt`` (left as the marker when
    there is none: :func:`check_data_settings` names that)."""
    if captions.caption_prefix == INSTANCE_PROMPT_PREFIX and instance_prompt is not None:
        return replace(captions, caption_prefix=instance_prompt)
    return captions


def resolve_ema_decay(ema: EMASettings) -> EMASettings:
    """``--use_ema`` without ``--ema_decay`` takes ``DEFAULT_EMA_DECAY``."""
    if ema.use_ema and ema.ema_decay is None:
        return replace(ema, ema_decay=DEFAULT_EMA_DECAY)
    return ema


def check_data_settings(settings: RunSettings) -> None:
    """Reject combinations of the data, loss, optimizer and EMA flags that cannot work, before
    any model is loaded."""
    def fail(message: str) -> None:
        raise DataArgumentError(message)

    data, captions, datasets, buckets = settings.data, settings.captions, settings.datasets, settings.buckets
    has_caption_source = (bool(captions.caption_extension) or bool(datasets.caption_column)
                          or bool(datasets.dataset_config))
    if datasets.dataset_config:
        replaced = (("instance_data_dir", data.instance_data_dir), ("dataset_name", datasets.dataset_name),
                    ("class_data_dir", data.class_data_dir), ("class_prompt", data.class_prompt),
                    ("with_prior_preservation", data.with_prior_preservation))
        for flag, value in replaced:
            if value:
                fail(f"--dataset_config replaces --{flag}: drop it (the file's regularisation subsets, is_reg, feed "
                     "the prior-preservation loss)")
    if datasets.dataset_name:
        if data.instance_data_dir is not None:
            fail("--dataset_name and --instance_data_dir are two sources of instance images: give one")
        if captions.caption_extension:
            fail("--caption_extension reads files beside --instance_data_dir images; with --dataset_name "
                 "use --caption_column")
        if not datasets.caption_column and data.instance_prompt is None:
            fail("--dataset_name without --caption_column needs --instance_prompt")
    else:
        for flag, value, default in (("caption_column", datasets.caption_column, None),
                                     ("dataset_config_name", datasets.dataset_config_name, None),
                                     ("image_column", datasets.image_column, DEFAULT_IMAGE_COLUMN)):
            if value != default:
                fail(f"--{flag} applies to --dataset_name, which is not given")
    if not has_caption_source:
        for flag, active in (("caption_prefix", captions.caption_prefix is not None),
                             ("shuffle_caption", captions.shuffle_caption),
                             ("missing_caption", captions.missing_caption != "error")):
            if active:
                fail(f"--{flag} works on captions: add --caption_extension (or --caption_column with --dataset_name)")
    if captions.keep_tokens and not captions.shuffle_caption:
        fail("--keep_tokens applies to --shuffle_caption, which is not given")
    if captions.keep_tokens < 0:
        fail(f"--keep_tokens={captions.keep_tokens}: must be at least 0")
    if not 0.0 <= captions.caption_dropout < 1.0:
        fail(f"--caption_dropout={captions.caption_dropout}: must be in [0, 1)")
    if captions.caption_prefix == INSTANCE_PROMPT_PREFIX:
        fail("--caption_prefix without a value puts --instance_prompt in front of captions: give --instance_prompt")
    if captions.shuffle_caption and settings.dit.cache_text_embeddings:
        fail("--shuffle_caption draws new prompts every step: it cannot be combined with --cache_text_embeddings")
    if datasets.repeats < 1:
        fail(f"--repeats={datasets.repeats}: must be at least 1")

    if buckets.aspect_ratio_buckets and buckets.enable_bucket:
        fail("--aspect_ratio_buckets and --enable_bucket are two ways to give buckets: use one")
    if buckets.aspect_ratio_buckets:
        parse_bucket_list(buckets.aspect_ratio_buckets)
    if not buckets.enable_bucket:
        for flag in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(buckets, flag) is not None:
                fail(f"--{flag} applies to --enable_bucket, which is not given")
    if buckets.enabled and data.center_crop:
        which = "--aspect_ratio_buckets" if buckets.aspect_ratio_buckets else "--enable_bucket"
        fail(f"{which} crops each image to its bucket: drop --center_crop (it makes square crops)")

    loss = settings.loss
    for flag in ("noise_offset", "input_perturbation"):
        if getattr(loss, flag) < 0:
            fail(f"--{flag}={getattr(loss, flag)}: must be at least 0")
    if loss.mask_dir is not None and not loss.masked_loss:
        fail("--mask_dir gives loss masks: add --masked_loss")
    ema = settings.ema
    if ema.ema_decay is not None and not ema.use_ema:
        fail("--ema_decay applies to --use_ema, which is not given")
    if ema.use_ema and not 0.0 < ema.ema_decay < 1.0:
        fail(f"--ema_decay={ema.ema_decay}: must be in (0, 1)")
    check_optimizer_settings(settings.optimizer, settings.training.use_8bit_adam)


def model_pixel_multiple(family: Any, components: Any) -> int:
    """The pixel granularity of the denoiser (``family.pixel_multiple``)."""
    return family.pixel_multiple(components)


def bucket_sizes(buckets: BucketSettings, family: Any, components: Any, resolution: int) -> Optional[list[Size]]:
    """The run's bucket sizes ``(h, w)`` (None without buckets), checked against the model."""
    if not buckets.enabled:
        return None
    multiple = model_pixel_multiple(family, components)
    if buckets.aspect_ratio_buckets:
        sizes = parse_bucket_list(buckets.aspect_ratio_buckets)
        check_bucket_multiple(sizes, multiple, f"--aspect_ratio_buckets={buckets.aspect_ratio_buckets}")
        return sizes
    step = buckets.bucket_reso_steps or (16 if family.name == "flux" else 64)
    if step % multiple:
        raise DataArgumentError(f"--bucket_reso_steps={step}: must be a multiple of {multiple} for this model")
    low = buckets.min_bucket_reso or max(step, resolution // 2 // step * step)
    high = buckets.max_bucket_reso or 2 * resolution // step * step
    sizes = kohya_buckets(resolution, low, high, step)
    check_bucket_multiple(sizes, multiple, f"--min_bucket_reso={low} --max_bucket_reso={high}")
    return sizes


def make_training_dataset(
    settings: RunSettings,
    images: Sequence[TrainingImage],
    resolution: int,
    buckets: Optional[Sequence[Size]],
    class_images: Optional[Sequence[Image.Image]] = None,
) -> TrainingImageDataset:
    """The instance (and class) dataset of a run from its settings."""
    data = settings.data
    return TrainingImageDataset(
        images, settings.captions.options(data.instance_prompt), resolution, data.center_crop, data.random_flip,
        buckets=buckets, class_images=class_images, class_prompt=data.class_prompt,
        repeats=settings.datasets.repeats, seed=settings.training.seed,
    )


def make_training_loader(
    settings: RunSettings, dataset: torch.utils.data.Dataset, images: TrainingImageDataset | SubsetDataset
) -> torch.utils.data.DataLoader:
    """The loader over ``dataset`` (``images`` itself, or its cached latents): with buckets
    (or subsets of several sizes), every batch from one bucket; else a (seed, epoch) shuffle."""
    batch_size, seed = settings.training.train_batch_size, settings.training.seed
    workers = settings.data.dataloader_num_workers
    if settings.buckets.enabled or getattr(images, "needs_bucket_batches", False):
        sampler = BucketBatchSampler(images.buckets_of_items, batch_size, seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_dreambooth,
                                           num_workers=workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochShuffleSampler(len(dataset), seed),
        collate_fn=collate_dreambooth, num_workers=workers,
    )


def data_settings(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags of :func:`add_data_arguments` in ``flags`` (``{flag name: value}``) that differ
    from their defaults, for the model card."""
    defaults = argparse.ArgumentParser()
    add_data_arguments(defaults)
    reference = vars(defaults.parse_args([]))
    return {key: flags[key] for key in reference
            if key != "config" and flags.get(key, reference[key]) != reference[key]}


def run_subsets(settings: RunSettings) -> Optional[list[DatasetSubset]]:
    """The run's dataset subsets: ``--dataset_config``, or kohya's ``<repeats>_<prompt>``
    sub-folders in ``--instance_data_dir`` / ``--class_data_dir`` (a plain folder beside such a
    layout becomes one subset). None for plain folders (and ``--dataset_name``): the run keeps
    the single-folder dataset. Settings a subset leaves out come from the caption, bucket and
    ``--random_flip`` flags."""
    def fail(message: str) -> None:
        raise DataArgumentError(message)

    data, captions, buckets, datasets = settings.data, settings.captions, settings.buckets, settings.datasets
    defaults = DatasetSubset(
        folder=Path("."), source="", name="", prompt=data.instance_prompt, caption_extension=captions.caption_extension,
        caption_prefix=captions.caption_prefix, shuffle_caption=captions.shuffle_caption,
        keep_tokens=captions.keep_tokens, caption_dropout_rate=captions.caption_dropout,
        enable_bucket=buckets.enable_bucket, min_bucket_reso=buckets.min_bucket_reso,
        max_bucket_reso=buckets.max_bucket_reso, bucket_reso_steps=buckets.bucket_reso_steps,
        flip_aug=data.random_flip,
    )
    if datasets.dataset_config:
        subsets = read_dataset_config(Path(datasets.dataset_config), defaults)
        flag = "--dataset_config"
    else:
        instance_dir = Path(data.instance_data_dir) if data.instance_data_dir else None
        class_dir = Path(data.class_data_dir) if data.with_prior_preservation and data.class_data_dir else None
        instance_source = replace(defaults, source=f"--instance_data_dir={instance_dir}")
        class_source = replace(defaults, source=f"--class_data_dir={class_dir}", is_reg=True, prompt=data.class_prompt)
        instance = kohya_folder_subsets(instance_dir, instance_source) if instance_dir else None
        regularisation = kohya_folder_subsets(class_dir, class_source) if class_dir else None
        if instance is None and regularisation is None:
            return None
        if instance is None and instance_dir is not None:
            instance = [replace(instance_source, folder=instance_dir, name=instance_dir.name, repeats=datasets.repeats)]
        if regularisation is None and class_dir is not None:
            regularisation = [replace(
                class_source, folder=class_dir, name=class_dir.name, caption_extension=None, caption_prefix=None,
                shuffle_caption=False, keep_tokens=0, caption_dropout_rate=0.0, max_images=data.num_class_images,
            )]
        subsets = (instance or []) + (regularisation or [])
        flag = "--instance_data_dir / --class_data_dir <repeats>_<prompt> sub-folders"
    if settings.loss.masked_loss:
        fail(f"--masked_loss: loss masks are not read for {flag} yet; train a plain folder with --masked_loss")
    if datasets.repeats != 1 and (datasets.dataset_config or is_kohya_layout(data.instance_data_dir)):
        fail(f"--repeats={datasets.repeats}: {flag} gives every subset its own repeats; drop --repeats")
    return subsets


def make_subset_dataset(
    settings: RunSettings, parts: Sequence[SubsetImages], family: Any, components: Any, resolution: int
) -> SubsetDataset:
    """The dataset of a run with subsets (``parts`` loaded, their sizes filled in here from
    each subset's resolution and bucket settings, checked against the model)."""
    buckets = settings.buckets
    multiple = model_pixel_multiple(family, components)
    default_step = buckets.bucket_reso_steps or (16 if family.name == "flux" else 64)
    run_buckets = parse_bucket_list(buckets.aspect_ratio_buckets) if buckets.aspect_ratio_buckets else None
    sized = [replace(part, sizes=subset_sizes(part.subset, resolution, multiple, default_step, run_buckets))
             for part in parts]
    return SubsetDataset(sized, settings.data.center_crop, settings.training.seed)


def subset_records(dataset: torch.utils.data.Dataset) -> list[dict[str, Any]]:
    """Every subset's resolved settings and counts (``SubsetDataset.subset_records``) of the
    run's dataset (or of the dataset its cached latents wrap); [] for a single-folder run."""
    images = getattr(dataset, "dataset", dataset)
    return images.subset_records() if isinstance(images, SubsetDataset) else []

"""The training-data and loss/optimizer flags of the DreamBooth script (captions, datasets,
aspect-ratio buckets, noise offset, Prodigy, EMA, masked loss, ``--config``): registration
(:func:`add_data_arguments`), validation before any model is loaded
(:func:`check_data_args`), and the pieces the script builds from them (bucket sizes, the
dataset and its loader, the settings for the model card).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from ..errors import SnellaError
from .buckets import BucketBatchSampler, Size, check_bucket_multiple, kohya_buckets, parse_bucket_list
from .captions import MISSING_CAPTION_POLICIES, CaptionOptions
from .data import EpochShuffleSampler, collate_dreambooth
from .dataset_configs import read_dataset_config
from .image_dataset import TrainingImageDataset
from .job_config import add_config_argument
from .optimizers import add_optimizer_arguments, check_optimizer_args
from .subset_dataset import SubsetDataset, SubsetImages, subset_sizes
from .subsets import DatasetSubset, is_kohya_layout, kohya_folder_subsets
from .training_images import TrainingImage

INSTANCE_PROMPT_PREFIX = "@instance_prompt"
DEFAULT_EMA_DECAY = 0.9999
DEFAULT_IMAGE_COLUMN = "image"


class DataArgumentError(SnellaError):
    """A training-data, loss or optimizer flag (or a combination of them) cannot work."""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every flag of this module's groups on the script's parser."""
    captions = parser.add_argument_group("captions")
    captions.add_argument("--caption_extension", type=str, default=None,
                          help="Read each image's prompt from the file beside it with this extension "
                               "(e.g. .txt; kohya/ai-toolkit layout). Off: every image uses --instance_prompt.")
    captions.add_argument("--caption_prefix", type=str, nargs="?", const=INSTANCE_PROMPT_PREFIX, default=None,
                          help="Text (a trigger word) put in front of every caption as '<prefix>, <caption>'; "
                               "the flag alone uses --instance_prompt.")
    captions.add_argument("--caption_dropout", type=float, default=0.0,
                          help="Probability that a sample's prompt is the empty string (for classifier-free guidance).")
    captions.add_argument("--shuffle_caption", action="store_true",
                          help="Shuffle the comma-separated tags of each caption every time it is drawn.")
    captions.add_argument("--keep_tokens", type=int, default=0,
                          help="With --shuffle_caption: the first N tags stay in place (kohya's meaning).")
    captions.add_argument("--missing_caption", type=str, default="error", choices=list(MISSING_CAPTION_POLICIES),
                          help="Images without a caption file: stop with an error naming them, or train them "
                               "on --instance_prompt (with a warning).")

    dataset = parser.add_argument_group("datasets (Hugging Face `datasets`, optional extra)")
    dataset.add_argument("--dataset_name", type=str, default=None,
                         help="A hub dataset id, or a local imagefolder (images + metadata.jsonl/metadata.csv "
                              "with file_name and caption columns). Replaces --instance_data_dir.")
    dataset.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    dataset.add_argument("--image_column", type=str, default=DEFAULT_IMAGE_COLUMN, help="The column holding images.")
    dataset.add_argument("--caption_column", type=str, default=None,
                         help="The column holding captions (default: every image uses --instance_prompt).")
    dataset.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` caches downloads.")
    dataset.add_argument("--repeats", type=int, default=1,
                         help="Use every instance image this many times per epoch (any data source).")
    dataset.add_argument("--dataset_config", type=str, default=None,
                         help="A dataset definition of another trainer: kohya's dataset .toml, an ai-toolkit job "
                              ".yaml (datasets:), SimpleTuner's multidatabackend.json or OneTrainer's concepts.json "
                              "(docs/training-data-formats.md). Replaces --instance_data_dir and --class_data_dir; "
                              "its regularisation subsets feed the prior-preservation loss.")

    buckets = parser.add_argument_group("aspect-ratio buckets")
    buckets.add_argument("--aspect_ratio_buckets", type=str, default=None,
                         help='Bucket sizes "h1,w1;h2,w2;..." in pixels (diffusers\' flag); each image trains at '
                              "the size of nearest aspect ratio.")
    buckets.add_argument("--enable_bucket", action="store_true",
                         help="kohya's buckets: sizes of about --resolution² pixels between --min_bucket_reso "
                              "and --max_bucket_reso in steps of --bucket_reso_steps.")
    buckets.add_argument("--min_bucket_reso", type=int, default=None,
                         help="Smallest bucket side (default: --resolution / 2, rounded to the step).")
    buckets.add_argument("--max_bucket_reso", type=int, default=None,
                         help="Largest bucket side (default: 2 × --resolution).")
    buckets.add_argument("--bucket_reso_steps", type=int, default=None,
                         help="Bucket sides are multiples of this (default: 64; 16 for Flux).")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--noise_offset", type=float, default=0.0,
                      help="Add this times N(0,1) per sample and channel to the training noise (0: off).")
    loss.add_argument("--input_perturbation", type=float, default=0.0,
                      help="Perturb the noise of the denoiser input (not of the target) by this times N(0,1) (0: off).")
    loss.add_argument("--masked_loss", action="store_true",
                      help="Weight the loss by a mask in latent space: each image's alpha channel, or --mask_dir.")
    loss.add_argument("--mask_dir", type=str, default=None,
                      help="With --masked_loss: a folder of grayscale masks named like the images (white trains).")

    add_optimizer_arguments(parser)
    ema = parser.add_argument_group("EMA")
    ema.add_argument("--use_ema", action="store_true",
                     help="Keep an exponential moving average of the adapter parameters; the final "
                          "snella_weights.safetensors holds the average, snella_weights_raw.safetensors the raw weights.")
    ema.add_argument("--ema_decay", type=float, default=None,
                     help=f"EMA decay (default {DEFAULT_EMA_DECAY}; warm-up min(decay, k/(k+9)) at step k).")
    add_config_argument(parser)


def uses_buckets(args: argparse.Namespace) -> bool:
    return bool(args.aspect_ratio_buckets) or bool(args.enable_bucket)


def has_caption_source(args: argparse.Namespace) -> bool:
    return bool(args.caption_extension) or bool(args.caption_column) or bool(args.dataset_config)


def check_data_args(args: argparse.Namespace) -> None:
    """Reject combinations of this module's flags that cannot work, before any model is
    loaded; resolves ``--caption_prefix`` (alone) and ``--ema_decay`` defaults in ``args``."""
    def fail(message: str) -> None:
        raise DataArgumentError(message)

    if args.dataset_config:
        for flag in ("instance_data_dir", "dataset_name", "class_data_dir", "class_prompt", "with_prior_preservation"):
            if getattr(args, flag):
                fail(f"--dataset_config replaces --{flag}: drop it (the file's regularisation subsets, is_reg, feed "
                     "the prior-preservation loss)")
    if args.dataset_name:
        if args.instance_data_dir is not None:
            fail("--dataset_name and --instance_data_dir are two sources of instance images: give one")
        if args.caption_extension:
            fail("--caption_extension reads files beside --instance_data_dir images; with --dataset_name "
                 "use --caption_column")
        if not args.caption_column and args.instance_prompt is None:
            fail("--dataset_name without --caption_column needs --instance_prompt")
    else:
        for flag, value, default in (("caption_column", args.caption_column, None),
                                     ("dataset_config_name", args.dataset_config_name, None),
                                     ("image_column", args.image_column, DEFAULT_IMAGE_COLUMN)):
            if value != default:
                fail(f"--{flag} applies to --dataset_name, which is not given")
    if not has_caption_source(args):
        for flag, active in (("caption_prefix", args.caption_prefix is not None),
                             ("shuffle_caption", args.shuffle_caption),
                             ("missing_caption", args.missing_caption != "error")):
            if active:
                fail(f"--{flag} works on captions: add --caption_extension (or --caption_column with --dataset_name)")
    if args.keep_tokens and not args.shuffle_caption:
        fail("--keep_tokens applies to --shuffle_caption, which is not given")
    if args.keep_tokens < 0:
        fail(f"--keep_tokens={args.keep_tokens}: must be at least 0")
    if not 0.0 <= args.caption_dropout < 1.0:
        fail(f"--caption_dropout={args.caption_dropout}: must be in [0, 1)")
    if args.caption_prefix == INSTANCE_PROMPT_PREFIX:
        if args.instance_prompt is None:
            fail("--caption_prefix without a value puts --instance_prompt in front of captions: give --instance_prompt")
        args.caption_prefix = args.instance_prompt
    if args.shuffle_caption and getattr(args, "cache_text_embeddings", None):
        fail("--shuffle_caption draws new prompts every step: it cannot be combined with --cache_text_embeddings")
    if args.repeats < 1:
        fail(f"--repeats={args.repeats}: must be at least 1")

    if args.aspect_ratio_buckets and args.enable_bucket:
        fail("--aspect_ratio_buckets and --enable_bucket are two ways to give buckets: use one")
    if args.aspect_ratio_buckets:
        parse_bucket_list(args.aspect_ratio_buckets)
    if not args.enable_bucket:
        for flag in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(args, flag) is not None:
                fail(f"--{flag} applies to --enable_bucket, which is not given")
    if uses_buckets(args) and args.center_crop:
        which = "--aspect_ratio_buckets" if args.aspect_ratio_buckets else "--enable_bucket"
        fail(f"{which} crops each image to its bucket: drop --center_crop (it makes square crops)")

    for flag in ("noise_offset", "input_perturbation"):
        if getattr(args, flag) < 0:
            fail(f"--{flag}={getattr(args, flag)}: must be at least 0")
    if args.mask_dir is not None and not args.masked_loss:
        fail("--mask_dir gives loss masks: add --masked_loss")
    if args.ema_decay is not None and not args.use_ema:
        fail("--ema_decay applies to --use_ema, which is not given")
    if args.use_ema:
        args.ema_decay = DEFAULT_EMA_DECAY if args.ema_decay is None else args.ema_decay
        if not 0.0 < args.ema_decay < 1.0:
            fail(f"--ema_decay={args.ema_decay}: must be in (0, 1)")
    check_optimizer_args(args)


def model_pixel_multiple(family: Any, components: Any) -> int:
    """The pixel granularity of the denoiser: VAE factor × (UNet downsampling, DiT patch, or
    Flux's 2×2 packing)."""
    vae_factor = family.vae_scale_factor(components)
    config = components.denoiser.config
    if family.name == "flux":
        return 2 * vae_factor
    if hasattr(config, "block_out_channels"):
        return vae_factor * 2 ** (len(config.block_out_channels) - 1)
    return vae_factor * int(getattr(config, "patch_size", 1) or 1)


def bucket_sizes(args: argparse.Namespace, family: Any, components: Any, resolution: int) -> Optional[list[Size]]:
    """The run's bucket sizes ``(h, w)`` (None without buckets), checked against the model."""
    if not uses_buckets(args):
        return None
    multiple = model_pixel_multiple(family, components)
    if args.aspect_ratio_buckets:
        sizes = parse_bucket_list(args.aspect_ratio_buckets)
        check_bucket_multiple(sizes, multiple, f"--aspect_ratio_buckets={args.aspect_ratio_buckets}")
        return sizes
    step = args.bucket_reso_steps or (16 if family.name == "flux" else 64)
    if step % multiple:
        raise DataArgumentError(f"--bucket_reso_steps={step}: must be a multiple of {multiple} for this model")
    low = args.min_bucket_reso or max(step, resolution // 2 // step * step)
    high = args.max_bucket_reso or 2 * resolution // step * step
    sizes = kohya_buckets(resolution, low, high, step)
    check_bucket_multiple(sizes, multiple, f"--min_bucket_reso={low} --max_bucket_reso={high}")
    return sizes


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    return CaptionOptions(
        fallback_prompt=args.instance_prompt, prefix=args.caption_prefix, dropout=args.caption_dropout,
        shuffle=args.shuffle_caption, keep_tokens=args.keep_tokens,
    )


def make_training_dataset(
    args: argparse.Namespace,
    images: Sequence[TrainingImage],
    resolution: int,
    buckets: Optional[Sequence[Size]],
    class_images: Optional[Sequence[Image.Image]] = None,
) -> TrainingImageDataset:
    """The instance (and class) dataset of a run from its flags."""
    return TrainingImageDataset(
        images, caption_options(args), resolution, args.center_crop, args.random_flip, buckets=buckets,
        class_images=class_images, class_prompt=args.class_prompt, repeats=args.repeats, seed=args.seed,
    )


def make_training_loader(
    args: argparse.Namespace, dataset: torch.utils.data.Dataset, images: TrainingImageDataset
) -> torch.utils.data.DataLoader:
    """The loader over ``dataset`` (``images`` itself, or its cached latents): with buckets
    (or subsets of several sizes), every batch from one bucket; else a (seed, epoch) shuffle."""
    if uses_buckets(args) or getattr(images, "needs_bucket_batches", False):
        sampler = BucketBatchSampler(images.buckets_of_items, args.train_batch_size, args.seed)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_dreambooth,
                                           num_workers=args.dataloader_num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochShuffleSampler(len(dataset), args.seed),
        collate_fn=collate_dreambooth, num_workers=args.dataloader_num_workers,
    )


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """This module's flags that differ from their defaults, for the model card."""
    defaults = argparse.ArgumentParser()
    add_data_arguments(defaults)
    reference = vars(defaults.parse_args([]))
    return {key: getattr(args, key) for key in reference
            if key != "config" and getattr(args, key, reference[key]) != reference[key]}


def run_subsets(args: argparse.Namespace) -> Optional[list[DatasetSubset]]:
    """The run's dataset subsets: ``--dataset_config``, or kohya's ``<repeats>_<prompt>``
    sub-folders in ``--instance_data_dir`` / ``--class_data_dir`` (a plain folder beside such a
    layout becomes one subset). None for plain folders (and ``--dataset_name``): the run keeps
    the single-folder dataset. Settings a subset leaves out come from the caption, bucket and
    ``--random_flip`` flags."""
    def fail(message: str) -> None:
        raise DataArgumentError(message)

    defaults = DatasetSubset(
        folder=Path("."), source="", name="", prompt=args.instance_prompt, caption_extension=args.caption_extension,
        caption_prefix=args.caption_prefix, shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens,
        caption_dropout_rate=args.caption_dropout, enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps, flip_aug=args.random_flip,
    )
    if args.dataset_config:
        subsets = read_dataset_config(Path(args.dataset_config), defaults)
        flag = "--dataset_config"
    else:
        instance_dir = Path(args.instance_data_dir) if args.instance_data_dir else None
        class_dir = Path(args.class_data_dir) if args.with_prior_preservation and args.class_data_dir else None
        instance_source = dataclasses.replace(defaults, source=f"--instance_data_dir={instance_dir}")
        class_source = dataclasses.replace(defaults, source=f"--class_data_dir={class_dir}", is_reg=True,
                                           prompt=args.class_prompt)
        instance = kohya_folder_subsets(instance_dir, instance_source) if instance_dir else None
        regularisation = kohya_folder_subsets(class_dir, class_source) if class_dir else None
        if instance is None and regularisation is None:
            return None
        if instance is None and instance_dir is not None:
            instance = [dataclasses.replace(instance_source, folder=instance_dir, name=instance_dir.name,
                                            repeats=args.repeats)]
        if regularisation is None and class_dir is not None:
            regularisation = [dataclasses.replace(
                class_source, folder=class_dir, name=class_dir.name, caption_extension=None, caption_prefix=None,
                shuffle_caption=False, keep_tokens=0, caption_dropout_rate=0.0, max_images=args.num_class_images,
            )]
        subsets = (instance or []) + (regularisation or [])
        flag = "--instance_data_dir / --class_data_dir <repeats>_<prompt> sub-folders"
    if args.masked_loss:
        fail(f"--masked_loss: loss masks are not read for {flag} yet; train a plain folder with --masked_loss")
    if args.repeats != 1 and (args.dataset_config or is_kohya_layout(args.instance_data_dir)):
        fail(f"--repeats={args.repeats}: {flag} gives every subset its own repeats; drop --repeats")
    return subsets


def make_subset_dataset(
    args: argparse.Namespace, parts: Sequence[SubsetImages], family: Any, components: Any, resolution: int
) -> SubsetDataset:
    """The dataset of a run with subsets (``parts`` loaded, their sizes filled in here from
    each subset's resolution and bucket settings, checked against the model)."""
    multiple = model_pixel_multiple(family, components)
    default_step = args.bucket_reso_steps or (16 if family.name == "flux" else 64)
    run_buckets = parse_bucket_list(args.aspect_ratio_buckets) if args.aspect_ratio_buckets else None
    sized = [dataclasses.replace(part, sizes=subset_sizes(part.subset, resolution, multiple, default_step, run_buckets))
             for part in parts]
    return SubsetDataset(sized, args.center_crop, args.seed)


def subset_records(dataset: torch.utils.data.Dataset) -> list[dict[str, Any]]:
    """Every subset's resolved settings and counts (``SubsetDataset.subset_records``) of the
    run's dataset (or of the dataset its cached latents wrap); [] for a single-folder run."""
    images = getattr(dataset, "dataset", dataset)
    return images.subset_records() if isinstance(images, SubsetDataset) else []

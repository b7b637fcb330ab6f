"""DreamBooth with SNELLA adapters for Stable Diffusion 1.x/2.x, SDXL, SD3, Flux and PixArt, run with accelerate.

    accelerate launch train_scripts/train_dreambooth_snella.py \\
        --pretrained_model_name_or_path=<hub id or folder> --instance_data_dir=<images> \\
        --instance_prompt="a photo of sks dog" --output_dir=<dir>

Flags follow diffusers' ``train_dreambooth_lora.py``. With no ``--pretrained_model_name_or_path``
the script trains the embedded model, the shipped pretrained 16 px lab base
(``snella_diffusion/lab``, written to ``<output_dir>/embedded-base-model`` and loaded by path),
and with no ``--instance_data_dir`` it generates 5 images of the lab concept ``sks`` and turns
on prior preservation: a complete run in under two minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from snella_diffusion import BiLevelAllocator, SnellaConfig, SnellaError, apply_snella, save_snella
from snella_diffusion.config import FORWARD_MODES, KERNELS, SPARSIFY_MODES
from snella_diffusion.delta_cache import without_delta_cache
from snella_diffusion.inject import check_targets
from snella_diffusion.training.adapters import ADAPTERS, attach_baseline, output_file, save_trained
from snella_diffusion.training.checkpointing import (
    CheckpointableGenerator,
    list_checkpoints,
    register_adapter_hooks,
    resolve_resume_path,
    save_checkpoint,
)
from snella_diffusion.training.captions import PromptEmbeddingCache
from snella_diffusion.training.data import (
    CachedLatentsDataset,
    generate_class_images,
    load_image_folder,
    synthetic_instance_images,
    warn_small_images,
    write_images,
)
from snella_diffusion.training.data_arguments import (
    add_data_arguments,
    bucket_sizes,
    check_data_args,
    data_settings,
    make_subset_dataset,
    make_training_dataset,
    make_training_loader,
    run_subsets,
    subset_records,
)
from snella_diffusion.training.ema import AdapterEMA
from snella_diffusion.training.families import (
    ModelFamily,
    TrainingComponents,
    add_family_arguments,
    detect_family,
)
from snella_diffusion.training.dit_families import expand_block_filters
from snella_diffusion.training.job_config import RESOLVED_CONFIG_FILE, parse_args_with_config, write_resolved_config
from snella_diffusion.training.loss_options import latent_loss_mask, perturb_noise
from snella_diffusion.training.model_card import render_model_card, write_model_card
from snella_diffusion.training.objectives import dreambooth_loss
from snella_diffusion.training.optimizers import make_optimizer
from snella_diffusion.training.subset_dataset import SubsetImages
from snella_diffusion.training.subsets import DatasetSubset, is_kohya_layout, load_subset
from snella_diffusion.training.training_images import load_training_images
from snella_diffusion.training.vae_inputs import decode_in_vae_dtype
from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS
from snella_diffusion.viz import save_allocation_heatmap, save_image_grid, save_line_plot

logger = get_logger(__name__)

EMBEDDED_MODEL_FOLDER = "embedded-base-model"
EMBEDDED_INSTANCE_FOLDER = "instance-images"
EMBEDDED_PROMPT = "a sks square"
SYNTHETIC_PROMPT = "a photo of sks toy"
EMBEDDED_CLASS_PROMPT = "a square"
EMBEDDED_CLASS_FOLDER = "class-images"
EMBEDDED_INSTANCE_COUNT = 5
EMBEDDED_CLASS_IMAGES = 50
# The embedded model's setting is the lab's best (benchmarks/results/personalization, 3 seeds):
# rank 8 with the text encoder adapted, target sparsity 0.5, lr 1e-2, 400 steps drew the
# concept in 0.95 of 64 samples of "a sks square" (strict checkerboard 0.34) where the UNet
# alone reached 0.13-0.16 (rank 8) and 0.09 (rank 32); sparsity 0.8 gave 0.91 (strict 0.16).
# Real models keep the paper's rank 32 and sparsity 0.8, UNet/transformer only.
EMBEDDED_MAX_STEPS = 400
EMBEDDED_RANK = 8
EMBEDDED_TARGET_SPARSITY = 0.5
DEFAULT_RANK = 32
DEFAULT_TARGET_SPARSITY = 0.8
# The lab base draws its prompts best at guidance 3 (lab.base.BASE_GUIDANCE_SCALE, issue 16).
EMBEDDED_GUIDANCE_SCALE = BASE_GUIDANCE_SCALE
OUTPUT_FILE = "snella_weights.safetensors"
RAW_OUTPUT_FILE = "snella_weights_raw.safetensors"
DEFAULT_VALIDATION_STEPS = 100
DEFAULT_CHECKPOINTING_STEPS = 500
LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
REPORT_TO_CHOICES = ("tensorboard", "wandb", "comet_ml", "mlflow", "all", "none")


class TrainingSetupError(SnellaError):
    """A flag, or the combination of flags, cannot work on this machine or with this data."""


class NonFiniteLossError(SnellaError):
    """The training loss became NaN or infinite; training stopped without saving."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse command-line flags (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning with SNELLA sparse adapters (diffusers-style flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Hub id or local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, Flux, PixArt; detected from "
                            "model_index.json). Omitted: the embedded tiny Stable Diffusion model.")
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the pretrained model.")
    model.add_argument("--variant", type=str, default=None,
                       help="Weights variant of the pretrained model files, e.g. fp16.")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", type=str, default=None,
                      help="Folder of instance images. Omitted: a generated deterministic set of 4 images.")
    data.add_argument("--instance_prompt", type=str, default=None,
                      help=f"Prompt naming the instance, e.g. 'a photo of sks dog' (default with "
                           f"generated images: {EMBEDDED_PROMPT!r}).")
    data.add_argument("--with_prior_preservation", action="store_true",
                      help="Add the prior-preservation loss on class images.")
    data.add_argument("--class_data_dir", type=str, default=None,
                      help="Folder of class images; missing ones are generated with the base model.")
    data.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of a dog'.")
    data.add_argument("--num_class_images", type=int, default=100,
                      help="Class images wanted for prior preservation; missing ones are generated.")
    data.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    data.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    data.add_argument("--class_inference_steps", type=int, default=None,
                      help="Sampling steps per class image (default: the pipeline's own; 25 for the embedded model).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution in pixels (default: the model's native size, "
                           "512 for SD 1.5, 1024 for SDXL, 32 for the embedded model).")
    data.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--cache_latents", action="store_true",
                      help="Encode the images with the VAE once, before training.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="snella-output",
                       help="Where the adapter, model card, samples, plots and checkpoints go.")
    train.add_argument("--seed", type=int, default=0, help="Seed of data order, augmentation, noise and samples.")
    train.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
                       help="Also adapt the CLIP text encoder(s) with SNELLA (q/k/v/out and MLP), "
                            "in the same allocator as the UNet; with --adapter=lora, LoRA on the same "
                            "layers (default: off; on for the embedded model unless --adapter=full).")
    train.add_argument("--train_batch_size", type=int, default=4, help="Instance images per device and step.")
    train.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (overridden by --max_train_steps).")
    train.add_argument("--max_train_steps", type=int, default=None,
                       help=f"Optimizer steps (default: from --num_train_epochs; {EMBEDDED_MAX_STEPS} "
                            "for the embedded model).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches accumulated per optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute UNet (and trained text encoder) activations in backward to save memory.")
    train.add_argument("--learning_rate", type=float, default=1e-2,
                       help="Initial learning rate. 1e-2: SNELLA's best in the personalization lab (fidelity "
                            "0.125 vs 0.0 at 1e-3 and 0.062 at 3e-3, 200 steps; README). LoRA learns at 1e-3 to "
                            "3e-3 there and breaks the base at 1e-2: pass --learning_rate with --adapter lora; "
                            "full fine-tuning wants about 1e-4.")
    train.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by GPUs × accumulation steps × batch size.")
    train.add_argument("--lr_scheduler", type=str, default="constant", choices=list(LR_SCHEDULERS),
                       help="Learning-rate schedule (diffusers.optimization).")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Learning-rate warmup steps.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR weighting γ (5.0 is the recommended value); off by default.")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Precision of the frozen weights (loaded directly in it; the VAE stays "
                            "float32) and autocast; default: accelerate config.")
    train.add_argument("--cpu", action="store_true",
                       help="Train on the CPU even when an accelerator (CUDA, MPS, XPU) is present "
                            "(as accelerate launch --cpu).")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs xformers and a CUDA GPU).")

    run = parser.add_argument_group("validation, logging, checkpoints")
    run.add_argument("--validation_prompt", type=str, default=None,
                     help="Prompt for sample grids (default with the embedded model: the instance prompt).")
    run.add_argument("--validation_guidance_scale", type=float, default=None,
                     help="Classifier-free guidance of validation and class-image sampling (default: the "
                          "pipeline's own, 7.5 for Stable Diffusion).")
    run.add_argument("--validation_with_class_prompt", action="store_true",
                     help="Add a row of --class_prompt samples to each validation grid (shows leakage).")
    run.add_argument("--num_validation_images", type=int, default=4, help="Images per validation grid.")
    run.add_argument("--validation_steps", type=int, default=None,
                     help="Write validation/step_<N>.png every N optimizer steps and at the end "
                          "(default: 100; half the run for the embedded model).")
    run.add_argument("--validation_inference_steps", type=int, default=25,
                     help="Denoising steps per validation image.")
    run.add_argument("--checkpointing_steps", type=int, default=None,
                     help="Save a resumable checkpoint-<N>/ every N optimizer steps "
                          "(default: 500; half the run for the embedded model).")
    run.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    run.add_argument("--resume_from_checkpoint", type=str, default=None,
                     help='A checkpoint folder, or "latest" for the newest in --output_dir.')
    run.add_argument("--report_to", type=str, default=None, choices=list(REPORT_TO_CHOICES),
                     help='Tracker: "tensorboard" (default when installed), "wandb", "comet_ml", "mlflow", '
                          '"all" (every installed one) or "none".')
    run.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")

    snella = parser.add_argument_group("SNELLA")
    snella.add_argument("--rank", type=int, default=None,
                        help="Total factor width r (SNELLA-r has LoRA-r's trainable factor count; "
                             f"default {DEFAULT_RANK}, {EMBEDDED_RANK} for the embedded model).")
    snella.add_argument("--kernel", type=str, default="mix", choices=list(KERNELS), help="Kernel merging the factors.")
    snella.add_argument("--sparsify", type=str, default="official", choices=list(SPARSIFY_MODES),
                        help="Survivor rule: M·|M| (official) or soft thresholding.")
    snella.add_argument("--target_modules", type=str, nargs="+", default=None,
                        help='Denoiser layers: a preset ("unet", "dit"), module names / regular expressions, or '
                             'for DiTs a block filter such as "dit@double" or "dit@single:0-9" '
                             "(default: the family's preset).")
    snella.add_argument("--init_sparsity", type=float, default=0.0,
                        help="Fraction of ΔW entries set to zero at the start.")
    snella.add_argument("--target_sparsity", type=float, default=None,
                        help="Fraction of ΔW entries set to zero at the end of the schedule (default "
                             f"{DEFAULT_TARGET_SPARSITY}, {EMBEDDED_TARGET_SPARSITY} for the embedded model).")
    snella.add_argument("--allocator_warmup_steps", type=int, default=None,
                        help="Steps at the initial budget before reallocating (default: 10%% of the steps).")
    snella.add_argument("--allocator_final_steps", type=int, default=None,
                        help="Last steps at the final budget (default: 20%% of the steps).")
    snella.add_argument("--allocator_interval", type=int, default=10, help="Steps between reallocations.")
    snella.add_argument("--importance_beta1", type=float, default=0.85, help="EMA factor of the sensitivity.")
    snella.add_argument("--importance_beta2", type=float, default=0.85, help="EMA factor of the uncertainty.")
    snella.add_argument("--forward_mode", type=str, default="merged", choices=list(FORWARD_MODES),
                        help="merged: one GEMM on W0 + ΔW; parallel: base output + ΔW·x.")
    snella.add_argument("--threshold_sample_size", type=int, default=0,
                        help="Select τ on a strided sample of this many entries (0: exact).")
    snella.add_argument("--compile_snella_kernels", action="store_true",
                        help="Build ΔW and its backward over whole matrices fused by torch.compile "
                             "instead of the default blocked eager path (slower than the default on a "
                             "CPU; costs tens of seconds of compilation at the first step).")
    snella.add_argument("--adapter", type=str, default="snella", choices=list(ADAPTERS),
                        help="What to train: SNELLA, PEFT LoRA on the same layers (diffusers LoRA file), or "
                             "the full denoiser; the other flags stay the same, for A/B runs.")
    snella.add_argument("--lora_rank", type=int, default=None,
                        help="LoRA rank with --adapter=lora (default --rank: the same parameter count).")
    snella.add_argument("--forward_cache_mb", type=int, default=0,
                        help="Keep W0 + ΔW from each forward until the layer's backward, up to this many "
                             "MiB over all layers: with --gradient_checkpointing the recompute skips its "
                             "build (memory traded for time; 0: off).")
    add_family_arguments(parser)
    add_data_arguments(parser)
    return resolve_model_defaults(parse_args_with_config(parser, argv))


def resolve_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--rank``, ``--target_sparsity`` and ``--train_text_encoder`` when not given: the
    embedded model (no ``--pretrained_model_name_or_path``) takes the lab's best setting, rank 8
    and sparsity 0.5 with the text encoder adapted; any other model rank 32 and sparsity 0.8,
    UNet/transformer only."""
    embedded_model = args.pretrained_model_name_or_path is None
    if args.rank is None:
        args.rank = EMBEDDED_RANK if embedded_model else DEFAULT_RANK
    if args.target_sparsity is None:
        args.target_sparsity = EMBEDDED_TARGET_SPARSITY if embedded_model else DEFAULT_TARGET_SPARSITY
    if args.train_text_encoder is None:
        args.train_text_encoder = embedded_model and args.adapter != "full"
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations that cannot work, before anything is loaded."""
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            raise TrainingSetupError("--with_prior_preservation needs --class_data_dir")
        if args.class_prompt is None and not is_kohya_layout(args.class_data_dir):
            raise TrainingSetupError("--with_prior_preservation needs --class_prompt")
    else:
        given = [f"--{flag}" for flag in ("class_data_dir", "class_prompt") if getattr(args, flag) is not None]
        if given:
            raise TrainingSetupError(
                f"{' and '.join(given)} given without --with_prior_preservation: add the flag to train "
                "with the prior-preservation loss, or drop them"
            )
    if (args.instance_data_dir is not None and args.instance_prompt is None and not args.caption_extension
            and not is_kohya_layout(args.instance_data_dir)):
        raise TrainingSetupError("--instance_prompt is required with --instance_data_dir")
    if (args.pretrained_model_name_or_path is not None and args.instance_data_dir is None and not args.dataset_name
            and not args.dataset_config):
        raise TrainingSetupError(
            f"--pretrained_model_name_or_path={args.pretrained_model_name_or_path} needs --instance_data_dir, "
            "--dataset_name or --dataset_config (the generated 4-image set is for the embedded tiny model only)"
        )
    if args.resolution is not None and args.resolution < 1:
        raise TrainingSetupError(f"--resolution={args.resolution}: must be a positive number of pixels")
    if args.report_to in ("wandb", "comet_ml", "mlflow") and importlib.util.find_spec(args.report_to) is None:
        raise TrainingSetupError(
            f"--report_to={args.report_to}: {args.report_to} is not installed (pip install {args.report_to}), "
            "or use --report_to tensorboard / none"
        )
    check_snella_flags(args)
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise TrainingSetupError(
                "--enable_xformers_memory_efficient_attention: xformers has no CPU kernels and no "
                "CUDA GPU is available; drop the flag (PyTorch scaled-dot-product attention is used)"
            )
        if importlib.util.find_spec("xformers") is None:
            raise TrainingSetupError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install 'snella-diffusion[xformers]') ; or drop the flag"
            )
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingSetupError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "num_validation_images", "sample_batch_size", "allocator_interval", "class_inference_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise TrainingSetupError(f"--{flag}={getattr(args, flag)}: must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise TrainingSetupError(f"--max_train_steps={args.max_train_steps}: must be at least 1")
    if args.adapter == "full" and args.train_text_encoder:
        raise TrainingSetupError("--adapter=full trains the denoiser only: drop --train_text_encoder")
    if args.adapter != "snella" and args.use_ema:
        raise TrainingSetupError(f"--adapter={args.adapter}: --use_ema averages SNELLA parameters only; drop one of them")
    if args.lora_rank is not None and (args.adapter != "lora" or args.lora_rank < 1):
        raise TrainingSetupError(f"--lora_rank={args.lora_rank}: needs --adapter=lora and a rank of at least 1")


def check_snella_flags(args: argparse.Namespace) -> None:
    """The SNELLA flags make a valid config and ``--target_modules`` valid presets, block
    filters and regular expressions (the schedule is checked with a stand-in step count)."""
    try:
        config = snella_config(args, None, args.max_train_steps or 1000)
        check_targets(expand_block_filters(list(config.target_modules)) if args.target_modules else config.target_modules)
    except SnellaError as error:
        raise TrainingSetupError(f"SNELLA flags: {error}") from error


def use_cpu(args: argparse.Namespace) -> bool:
    """Whether the Accelerator must be told ``cpu=True``: on ``--cpu`` or
    ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``), or when torch sees no accelerator
    (CUDA, MPS, XPU). Otherwise accelerate picks the device itself. On a machine without one,
    ``cpu=True`` is what makes several launched processes join one gloo group."""
    if args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not accelerator_available()


def accelerator_available() -> bool:
    """True when torch sees a CUDA, MPS or XPU device."""
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def resolve_report_to(report_to: Optional[str]) -> Optional[str]:
    """None (no tracker) or the tracker name; tensorboard only when it is installed."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    if report_to is None:
        return "tensorboard" if tensorboard else None
    if report_to == "none":
        return None
    if report_to == "tensorboard" and not tensorboard:
        # Runs before the Accelerator exists, so accelerate's logger cannot be used yet.
        logging.getLogger(__name__).warning(
            "--report_to=tensorboard: tensorboard is not installed; logging to the console only"
        )
        return None
    return report_to


def prepare_embedded_inputs(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path) -> None:
    """Fill in the embedded model and generated instance images where flags are missing."""
    embedded_model = args.pretrained_model_name_or_path is None
    if embedded_model:
        folder = output_dir / EMBEDDED_MODEL_FOLDER
        if accelerator.is_main_process:
            from snella_diffusion.lab.shipped import materialize_base

            logger.info("no --pretrained_model_name_or_path: writing the pretrained lab base to %s", folder)
            materialize_base(folder)
        args.pretrained_model_name_or_path = str(folder)
        if args.max_train_steps is None:
            args.max_train_steps = EMBEDDED_MAX_STEPS
    if args.instance_data_dir is None and args.dataset_name is None and args.dataset_config is None and embedded_model:
        from snella_diffusion.lab.world import instance_pil_images

        folder = output_dir / EMBEDDED_INSTANCE_FOLDER
        if accelerator.is_main_process:
            logger.info("no --instance_data_dir: writing %d images of the lab concept sks to %s",
                        EMBEDDED_INSTANCE_COUNT, folder)
            write_images(instance_pil_images(EMBEDDED_INSTANCE_COUNT, seed=0), folder, "instance")
        args.instance_data_dir = str(folder)
        args.instance_prompt = args.instance_prompt or EMBEDDED_PROMPT
        if not args.with_prior_preservation:
            args.with_prior_preservation = True
            args.class_prompt = args.class_prompt or EMBEDDED_CLASS_PROMPT
            args.class_data_dir = args.class_data_dir or str(output_dir / EMBEDDED_CLASS_FOLDER)
            args.num_class_images = min(args.num_class_images, EMBEDDED_CLASS_IMAGES)
            args.sample_batch_size = max(args.sample_batch_size, EMBEDDED_CLASS_IMAGES // 2)
            if args.class_inference_steps is None:
                args.class_inference_steps = BASE_INFERENCE_STEPS
            args.validation_with_class_prompt = True
    elif args.instance_data_dir is None and args.dataset_name is None and args.dataset_config is None:
        folder = output_dir / EMBEDDED_INSTANCE_FOLDER
        if accelerator.is_main_process:
            logger.info("no --instance_data_dir: writing 4 generated instance images to %s", folder)
            write_images(synthetic_instance_images(count=4, size=64, seed=0), folder, "instance")
        args.instance_data_dir = str(folder)
        if args.instance_prompt is None:
            args.instance_prompt = SYNTHETIC_PROMPT
    if embedded_model:
        half_run = max(1, args.max_train_steps // 2)
        if args.validation_prompt is None:
            args.validation_prompt = args.instance_prompt
        if args.validation_guidance_scale is None:
            args.validation_guidance_scale = EMBEDDED_GUIDANCE_SCALE
        args.validation_steps = args.validation_steps or half_run
        args.checkpointing_steps = args.checkpointing_steps or half_run
    args.validation_steps = args.validation_steps or DEFAULT_VALIDATION_STEPS
    args.checkpointing_steps = args.checkpointing_steps or DEFAULT_CHECKPOINTING_STEPS
    accelerator.wait_for_everyone()


def snella_config(args: argparse.Namespace, family: Optional[ModelFamily], total_steps: int) -> SnellaConfig:
    """The denoiser adapter config from the SNELLA flags (schedule defaults from
    ``total_steps``). ``--target_modules`` stays a list, so one name or regex works like
    several; without it, the family's preset (``unet`` when no family is known yet)."""
    targets: Any = list(args.target_modules) if args.target_modules else (
        family.denoiser_preset if family is not None else "unet")
    warmup = args.allocator_warmup_steps if args.allocator_warmup_steps is not None else total_steps // 10
    final = args.allocator_final_steps if args.allocator_final_steps is not None else total_steps // 5
    return SnellaConfig(
        rank=args.rank, kernel=args.kernel, sparsify=args.sparsify, target_modules=targets,
        init_sparsity=args.init_sparsity, target_sparsity=args.target_sparsity,
        forward_mode=args.forward_mode, threshold_sample_size=args.threshold_sample_size,
        compile_kernels=args.compile_snella_kernels, forward_cache_mb=args.forward_cache_mb,
        importance_beta1=args.importance_beta1, importance_beta2=args.importance_beta2,
        allocator_warmup_steps=warmup, allocator_final_steps=final,
        allocator_interval=args.allocator_interval,
    )


def fresh_scheduler(scheduler: Any) -> Any:
    """A copy of a noise scheduler (inference mutates timesteps; training must not see that)."""
    return type(scheduler).from_config(scheduler.config)


@torch.no_grad()
def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    family: ModelFamily,
    components: TrainingComponents,
    trained: dict[str, torch.nn.Module],
    step: int,
    resolution: int,
    output_dir: Path,
) -> Path:
    """Sample ``--num_validation_images`` images of ``--validation_prompt`` with the current
    adapters and write them as ``validation/step_<step>.png``."""
    overrides = {name: module for name, module in trained.items()}
    overrides["scheduler"] = fresh_scheduler(components.noise_scheduler)
    pipeline = family.pipeline(components, overrides)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    prompts = [args.validation_prompt] + ([args.class_prompt] if args.validation_with_class_prompt and args.class_prompt else [])
    for prompt, index in ((p, i) for p in prompts for i in range(args.num_validation_images)):
        generator = torch.Generator().manual_seed(args.seed + index)
        # No ΔW cache: each adapted layer builds its ΔW, uses it and drops it, so validation
        # needs one layer's ΔW on top of the model, not a second copy of every adapted weight.
        with accelerator.autocast(), without_delta_cache(*trained.values()), decode_in_vae_dtype(components.vae):
            inputs = {**family.validation_inputs(components, prompt), **guidance_kwargs(args)}
            result = pipeline(
                **inputs, num_inference_steps=args.validation_inference_steps,
                generator=generator, height=resolution, width=resolution, output_type="pil",
            )
        images.append(result.images[0])
    path = save_image_grid(images, output_dir / "validation" / f"step_{step}.png",
                           columns=min(4, len(images)) if len(prompts) == 1 else args.num_validation_images,
                           row_labels=prompts if len(prompts) > 1 else None)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    logger.info("validation samples: %s", path)
    return path


def guidance_kwargs(args: argparse.Namespace) -> dict[str, float]:
    """``{"guidance_scale": --validation_guidance_scale}`` when the flag is set, else nothing."""
    return {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}


def training_loss(
    family: ModelFamily,
    components: TrainingComponents,
    objective: Any,
    batch: dict[str, Any],
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    denoiser: torch.nn.Module,
    generator: torch.Generator,
    prior_loss_weight: float,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> torch.Tensor:
    """The DreamBooth loss of one batch: draw noise (``--noise_offset``,
    ``--input_perturbation``) and timesteps from ``generator``, predict, weight by the
    batch's ``loss_masks`` in latent space if any, and add the prior-preservation term on the
    class samples (after ``batch["num_instance"]``)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noise, input_noise = perturb_noise(noise, generator, noise_offset, input_perturbation)
    sample = objective.prepare(latents, noise, generator, input_noise=input_noise)
    prediction = family.predict(components, sample.noisy_latents, sample.timesteps, conditioning, batch, denoiser=denoiser)
    mask = batch.get("loss_masks")
    if mask is not None:
        mask = latent_loss_mask(mask, tuple(latents.shape[-2:])).to(latents.device)
    return dreambooth_loss(prediction, sample.target, sample.weights, batch["num_instance"], prior_loss_weight, mask)


def check_ranks_agree(accelerator: Accelerator, allocator: BiLevelAllocator) -> list[list[int]]:
    """The per-layer drop counts of every process (rows = ranks); raises if they differ."""
    drops = torch.tensor([allocator.adapters[n].drop_count_host for n in allocator.names], dtype=torch.int64)
    gathered = accelerator.gather(drops.to(accelerator.device)).cpu().view(accelerator.num_processes, -1)
    rows = gathered.tolist()
    if any(row != rows[0] for row in rows[1:]):
        raise SnellaError("the processes ended with different per-layer sparsities (allocator out of sync)")
    return rows


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as TensorBoard hyper-parameters (scalars and strings only)."""
    values = {}
    for key, value in vars(args).items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def attach_adapters(
    args: argparse.Namespace, family: ModelFamily, components: TrainingComponents, config: SnellaConfig
) -> tuple[dict[str, torch.nn.Module], BiLevelAllocator]:
    """Inject SNELLA into the denoiser (and, with ``--train_text_encoder``, the text encoders
    with the ``text_encoder`` preset); one allocator over every adapted layer, named
    ``<component>.<module path>``. Returns ``({component: model}, allocator)``."""
    trained: dict[str, torch.nn.Module] = {family.denoiser_component: components.denoiser}
    layers = {f"{family.denoiser_component}.{n}": l for n, l in apply_snella(components.denoiser, config).items()}
    if args.train_text_encoder:
        text_config = dataclasses.replace(config, target_modules="text_encoder", exclude_modules=[])
        for name, encoder in components.text_encoders.items():
            trained[name] = encoder
            layers.update({f"{name}.{n}": l for n, l in apply_snella(encoder, text_config).items()})
    allocator = BiLevelAllocator(layers, config, total_steps=args.max_train_steps)
    return trained, allocator


def build_dataset(
    args: argparse.Namespace,
    accelerator: Accelerator,
    family: ModelFamily,
    components: TrainingComponents,
    instance_images: list[Any],
    resolution: int,
    encode_generator: CheckpointableGenerator,
    subsets: Optional[list[DatasetSubset]] = None,
    subset_parts: Optional[list[SubsetImages]] = None,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.DataLoader]:
    """The DreamBooth dataset and its loader: instance images (``TrainingImage`` records with
    captions and masks), class images with prior preservation (missing ones generated by the
    base model on the main process), aspect-ratio buckets, latents cached on request. With
    ``subsets`` (``subset_parts`` their loaded training subsets), the subsets' dataset: the
    regularisation subsets are loaded here, after class images are generated."""
    class_images = None
    if args.with_prior_preservation and not is_kohya_layout(args.class_data_dir):
        class_folder = Path(args.class_data_dir)
        if accelerator.is_main_process:
            base_pipeline = family.pipeline(components, {"scheduler": fresh_scheduler(components.noise_scheduler)})
            base_pipeline.set_progress_bar_config(disable=True)
            with decode_in_vae_dtype(components.vae):
                generate_class_images(
                    base_pipeline, args.class_prompt, class_folder, args.num_class_images, args.sample_batch_size,
                    seed=args.seed, progress=True,
                    pipeline_kwargs={"height": resolution, "width": resolution, **guidance_kwargs(args),
                                     **({} if args.class_inference_steps is None
                                        else {"num_inference_steps": args.class_inference_steps})},
                )
            del base_pipeline
        accelerator.wait_for_everyone()
        if subsets is None:
            class_named = load_image_folder(class_folder, "--class_data_dir")
            warn_small_images(class_named, resolution, f"--class_data_dir={class_folder}")
            class_images = list(class_named.values())[: args.num_class_images]

    if subsets is not None:
        parts = list(subset_parts or []) + [SubsetImages(s, load_subset(s)) for s in subsets if s.is_reg]
        images = make_subset_dataset(args, parts, family, components, resolution)
        for record in images.subset_records():
            logger.info("subset %s: %d images × %d repeats%s", record["folder"], record["images"], record["repeats"],
                        " (regularisation)" if record["is_reg"] else "")
    else:
        buckets = bucket_sizes(args, family, components, resolution)
        if buckets:
            logger.info("aspect-ratio buckets (h, w): %s", buckets)
        images = make_training_dataset(args, instance_images, resolution, buckets, class_images)
    dataset: torch.utils.data.Dataset = images
    if args.cache_latents:
        dataset = CachedLatentsDataset(
            images, lambda pixels: family.encode_latents(components, pixels.to(accelerator.device), encode_generator.generator)
        )
    return dataset, make_training_loader(args, dataset, images)


def main(args: argparse.Namespace) -> Path:
    """Train; returns the path of the written ``snella_weights.safetensors``.

    Raises:
        SnellaError (or a subclass): bad flags, data, model or a non-finite loss; the message
            names the flag or file at fault.
    """
    started = time.monotonic()
    check_data_args(args)
    check_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    output_dir = Path(args.output_dir)
    report_to = resolve_report_to(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        cpu=use_cpu(args),
        # SDXL's first text encoder contributes its penultimate layer only: the adapters of its
        # last layer get no gradient, which DDP must be told about.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)],
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    prepare_embedded_inputs(args, accelerator, output_dir)

    subsets = run_subsets(args)
    subset_parts = None if subsets is None else [SubsetImages(s, load_subset(s)) for s in subsets if not s.is_reg]
    instance_images = (load_training_images(args) if subset_parts is None
                       else [image for part in subset_parts for image in part.images])
    family, model_index = detect_family(args.pretrained_model_name_or_path, args.revision)
    logger.info("model family: %s (%s)", family.name, model_index.get("_class_name"))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Loaded directly in the training dtype (the VAE in float32), as diffusers' scripts do.
    components = family.load(args.pretrained_model_name_or_path, model_index, args.revision, args.variant,
                             dtype=weight_dtype)
    family.configure(components, args)
    resolution = args.resolution or family.native_resolution(components)
    vae_factor = family.vae_scale_factor(components)
    if resolution % vae_factor:
        raise TrainingSetupError(
            f"--resolution={resolution}: must be a multiple of {vae_factor} (the VAE's downsampling of "
            f"{args.pretrained_model_name_or_path})"
        )
    for module in components.modules.values():
        if isinstance(module, torch.nn.Module):
            module.to(accelerator.device)

    warn_small_images({image.name: image.image for image in instance_images}, resolution,
                      f"--{'dataset_name' if args.dataset_name else 'instance_data_dir'}="
                      f"{args.dataset_name or args.instance_data_dir}")
    encode_generator = CheckpointableGenerator(args.seed + 7919 * accelerator.process_index)
    dataset, loader = build_dataset(args, accelerator, family, components, instance_images, resolution, encode_generator,
                                    subsets, subset_parts)
    data_subsets = subset_records(dataset)

    batches_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        write_resolved_config(args, output_dir / RESOLVED_CONFIG_FILE, data_subsets)

    config = snella_config(args, family, args.max_train_steps)
    if args.adapter == "snella":
        trained, allocator = attach_adapters(args, family, components, config)
    else:
        text_encoders = components.text_encoders if args.train_text_encoder else None
        trained, allocator = attach_baseline(args.adapter, components.denoiser, family.denoiser_component, config,
                                             args.lora_rank, text_encoders=text_encoders)
    trainable = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    logger.info(
        "SNELLA: %d adapted layers (%s), %d trainable parameters", len(allocator.names),
        ", ".join(trained), sum(p.numel() for p in trainable),
    )

    if args.enable_xformers_memory_efficient_attention:
        components.denoiser.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        components.denoiser.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for name in components.text_encoder_components:
                components.modules[name].gradient_checkpointing_enable()
    for module in trained.values():
        module.train()

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, trainable, learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power,
    )

    names = list(trained)
    prepared = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler)
    wrapped = dict(zip(names, prepared[: len(names)]))
    optimizer, loader, lr_scheduler = prepared[len(names):]
    noise_generator = CheckpointableGenerator(args.seed + 104729 * accelerator.process_index)
    if args.adapter == "snella":
        register_adapter_hooks(accelerator, trained, args.pretrained_model_name_or_path, accelerator.unwrap_model)
    accelerator.register_for_checkpointing(allocator)
    accelerator.register_for_checkpointing(noise_generator)
    accelerator.register_for_checkpointing(encode_generator)
    ema = AdapterEMA(trainable, args.ema_decay) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("snella-dreambooth", config=tracker_config(args))

    global_step = 0
    if args.resume_from_checkpoint:
        resume_path = resolve_resume_path(output_dir, args.resume_from_checkpoint)
        if resume_path is None:
            logger.info("--resume_from_checkpoint=latest: no checkpoint in %s, starting a new run", output_dir)
        else:
            logger.info("resuming from %s", resume_path)
            accelerator.load_state(str(resume_path))
            global_step = int(resume_path.name.split("-")[1])
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    objective = family.objective(components, snr_gamma=args.snr_gamma)
    conditioning_for = PromptEmbeddingCache(
        lambda prompts: family.encode_prompt(components, prompts, accelerator.device), args.train_text_encoder,
    )
    known_prompts = getattr(dataset, "dataset", dataset).possible_prompts()
    if not args.train_text_encoder and known_prompts is not None:
        conditioning_for.precompute(known_prompts | ({args.class_prompt} - {None}))
        family.release_text_encoders(components, args.validation_prompt, accelerator.device)

    logger.info(
        "training %d steps (%d epochs, %d instance images, batch %d × %d processes × %d accumulation)",
        args.max_train_steps, num_epochs, len(instance_images), args.train_batch_size,
        accelerator.num_processes, args.gradient_accumulation_steps,
    )
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    losses: list[tuple[float, float]] = []
    validations: list[str] = []
    denoiser = wrapped[family.denoiser_component]
    last_checkpoint = list_checkpoints(output_dir)
    last_checkpoint_name = last_checkpoint[-1].name if last_checkpoint else "none"
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= args.max_train_steps:
                break
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batches = loader
            if epoch == first_epoch and skip_batches:
                batches = accelerator.skip_first_batches(loader, skip_batches)
            for batch in batches:
                with accelerator.accumulate(*wrapped.values()):
                    if "latents" in batch:
                        latents = batch["latents"].to(accelerator.device, weight_dtype)
                    else:
                        pixels = batch["pixel_values"].to(accelerator.device)
                        latents = family.encode_latents(components, pixels, encode_generator.generator)
                        latents = latents.to(weight_dtype)
                    loss = training_loss(
                        family, components, objective, batch, latents, conditioning_for(batch["prompts"]),
                        denoiser, noise_generator.generator, args.prior_loss_weight,
                        args.noise_offset, args.input_perturbation,
                    )
                    mean_loss = accelerator.gather(loss.detach().reshape(1)).mean()
                    if not torch.isfinite(mean_loss):
                        raise NonFiniteLossError(
                            f"training loss is {mean_loss.item()} at step {global_step + 1}: stopped without "
                            f"saving; the last checkpoint ({last_checkpoint_name}) is intact. Lower "
                            "--learning_rate, or train with --mixed_precision=no or bf16"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        allocator.step(skipped=accelerator.optimizer_step_was_skipped)
                        if ema is not None:
                            ema.update()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                loss_value = mean_loss.item()
                losses.append((float(global_step), loss_value))
                kept = sum(allocator.keep_counts().values()) / sum(allocator.capacities)
                logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "kept_fraction": kept}
                progress.set_postfix(loss=f"{loss_value:.4f}", kept=f"{kept:.3f}")
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                    last_checkpoint_name = path.name
                    logger.info("saved %s", path)
                if args.validation_prompt and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    validations.append(run_validation(
                        args, accelerator, family, components, trained, global_step, resolution, output_dir
                    ).relative_to(output_dir).as_posix())
                if global_step >= args.max_train_steps:
                    break
    except BaseException:
        accelerator.end_training()
        raise
    progress.close()

    accelerator.wait_for_everyone()
    if global_step >= args.max_train_steps and allocator.history_steps[-1] != allocator.step_count:
        # The run ended between reallocation steps: apply the final budget to the saved adapter.
        allocator.reallocate(allocator.final_volume)
    rank_drops = check_ranks_agree(accelerator, allocator)
    adapter_path = output_file(args.adapter, output_dir, family.denoiser_component)
    if accelerator.is_main_process:
        if ema is not None:
            save_snella(trained, output_dir / RAW_OUTPUT_FILE, base_model=args.pretrained_model_name_or_path)
            ema.copy_to_parameters()
        if args.validation_prompt and not any(v.endswith(f"step_{global_step}.png") for v in validations):
            validations.append(run_validation(
                args, accelerator, family, components, trained, global_step, resolution, output_dir
            ).relative_to(output_dir).as_posix())
        save_trained(args.adapter, trained, output_dir, args.pretrained_model_name_or_path)
        write_outputs(args, family, config, allocator, rank_drops, losses, validations, output_dir,
                      time.monotonic() - started, accelerator.num_processes, describe_objective(objective),
                      data_subsets)
        logger.info("wrote %s", adapter_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter_path


def describe_objective(objective: Any) -> str:
    """The objective's class name and, for DDPM objectives, the prediction type."""
    prediction_type = getattr(objective, "prediction_type", None)
    return type(objective).__name__ + (f" ({prediction_type})" if prediction_type else "")


def write_outputs(
    args: argparse.Namespace,
    family: ModelFamily,
    config: SnellaConfig,
    allocator: BiLevelAllocator,
    rank_drops: list[list[int]],
    losses: list[tuple[float, float]],
    validations: list[str],
    output_dir: Path,
    seconds: float,
    num_processes: int,
    objective_name: str,
    data_subsets: Sequence[dict[str, Any]] = (),
) -> None:
    """The allocation heatmap and JSON, the loss plot and the model card (with the table of
    ``data_subsets``, the run's dataset subsets, when it has them)."""
    save_allocation_heatmap(allocator.history_steps, allocator.history_kept, allocator.names,
                            output_dir / "allocation.png")
    budgets = allocator.budgets()
    allocation = {
        "layers": allocator.names,
        "final_sparsity": [budgets[n] for n in allocator.names],
        "history_steps": allocator.history_steps,
        "history_kept": allocator.history_kept,
        "drop_counts_per_rank": rank_drops,
    }
    (output_dir / "allocation.json").write_text(json.dumps(allocation))
    if losses:
        save_line_plot({"loss": losses}, output_dir / "loss.png", title="training loss (this run)")
    training = {
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": num_processes,
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "resolution": args.resolution or "native",
        "train_text_encoder": args.train_text_encoder,
        "snr_gamma": args.snr_gamma,
        "mixed_precision": args.mixed_precision or "accelerate default",
        "seed": args.seed,
        "objective": objective_name,
        "wall_seconds_this_run": round(seconds, 1),
        **data_settings(args),
    }
    config_path = output_dir / RESOLVED_CONFIG_FILE
    card = render_model_card(
        base_model=args.pretrained_model_name_or_path, family=family.name, instance_prompt=args.instance_prompt,
        config=config, budgets=budgets, training=training, validation_prompt=args.validation_prompt,
        validation_images=validations, class_prompt=args.class_prompt if args.with_prior_preservation else None,
        run_config=config_path.read_text(encoding="utf-8") if config_path.is_file() else None,
        adapter=args.adapter, lora_rank=args.lora_rank, component=family.denoiser_component,
        data_subsets=data_subsets,
    )
    write_model_card(output_dir / "README.md", card)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: errors raised on purpose print one line, not a traceback (after
    the traceback of the library error that caused them, if any)."""
    args = parse_args(argv)
    try:
        main(args)
    except SnellaError as error:
        cause = error.__cause__
        if cause is not None and not isinstance(cause, SnellaError):
            # e.g. a failed from_pretrained: its own traceback says what was wrong in the files.
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()

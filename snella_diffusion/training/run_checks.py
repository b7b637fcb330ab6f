"""Checks of a DreamBooth run's settings before anything is loaded, and the device and tracker
choices they imply."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Optional

import torch

from ..errors import SnellaError
from ..families import ModelFamily
from ..inject import check_targets
from ..single_file import check_denoiser_file
from ..methods import Method
from .data_arguments import check_data_settings
from .quantized_base import BACKEND_MODULES, BACKENDS, QuantizationSettings
from .run_settings import RunSettings
from .subsets import is_kohya_layout

logger = logging.getLogger(__name__)


class TrainingSetupError(SnellaError):
    """A flag, or the combination of flags, cannot work on this machine or with this data."""


def check_run_settings(settings: RunSettings) -> None:
    """Reject flag combinations that cannot work, before anything is loaded (the data, loss,
    optimizer and EMA flags are checked by ``check_data_settings``)."""
    data, training, validation, adapter = settings.data, settings.training, settings.validation, settings.adapter
    model_source = settings.model.pretrained_model_name_or_path
    if data.with_prior_preservation:
        if data.class_data_dir is None:
            raise TrainingSetupError("--with_prior_preservation needs --class_data_dir")
        if data.class_prompt is None and not is_kohya_layout(data.class_data_dir):
            raise TrainingSetupError("--with_prior_preservation needs --class_prompt")
    else:
        given = [f"--{flag}" for flag in ("class_data_dir", "class_prompt") if getattr(data, flag) is not None]
        if given:
            raise TrainingSetupError(
                f"{' and '.join(given)} given without --with_prior_preservation: add the flag to train "
                "with the prior-preservation loss, or drop them"
            )
    if (data.instance_data_dir is not None and data.instance_prompt is None and not settings.captions.caption_extension
            and not is_kohya_layout(data.instance_data_dir)):
        raise TrainingSetupError("--instance_prompt is required with --instance_data_dir")
    datasets = settings.datasets
    if (model_source is not None and data.instance_data_dir is None and not datasets.dataset_name
            and not datasets.dataset_config):
        raise TrainingSetupError(
            f"--pretrained_model_name_or_path={model_source} needs --instance_data_dir, "
            "--dataset_name or --dataset_config (the generated 4-image set is for the embedded tiny model only)"
        )
    if data.resolution is not None and data.resolution < 1:
        raise TrainingSetupError(f"--resolution={data.resolution}: must be a positive number of pixels")
    report_to = validation.report_to
    if report_to in ("wandb", "comet_ml", "mlflow") and importlib.util.find_spec(report_to) is None:
        raise TrainingSetupError(
            f"--report_to={report_to}: {report_to} is not installed (pip install {report_to}), "
            "or use --report_to tensorboard / none"
        )
    check_snella_settings(settings)
    if training.enable_xformers_memory_efficient_attention:
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
    check_quantization_settings(settings.quantization, adapter.method.snella_layers,
                                torch.cuda.is_available() and not use_cpu(training.cpu))
    check_text_encoder_quantization(settings.quantization, training.train_text_encoder)
    check_block_swap(training.blocks_to_swap, adapter.method, settings.quantization.quantize_base)
    if training.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingSetupError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)")
    at_least_one = (("train_batch_size", training), ("gradient_accumulation_steps", training),
                    ("checkpointing_steps", validation), ("validation_steps", validation),
                    ("num_validation_images", validation), ("sample_batch_size", data),
                    ("allocator_interval", adapter), ("class_inference_steps", data))
    for flag, group in at_least_one:
        value = getattr(group, flag)
        if value is not None and value < 1:
            raise TrainingSetupError(f"--{flag}={value}: must be at least 1")
    if training.max_train_steps is not None and training.max_train_steps < 1:
        raise TrainingSetupError(f"--max_train_steps={training.max_train_steps}: must be at least 1")
    method = adapter.method
    if not method.adapts_layers and training.train_text_encoder:
        raise TrainingSetupError(f"--adapter={adapter.adapter} trains the denoiser only: drop --train_text_encoder")
    if not method.snella_layers and settings.ema.use_ema:
        raise TrainingSetupError(f"--adapter={adapter.adapter}: --use_ema averages SNELLA parameters only; drop one of them")
    if adapter.lora_rank is not None and (not method.uses_lora_rank or adapter.lora_rank < 1):
        raise TrainingSetupError(f"--lora_rank={adapter.lora_rank}: needs --adapter=lora and a rank of at least 1")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_quantization_settings(settings: QuantizationSettings, trains_snella_layers: bool, cuda_used: bool) -> None:
    """Raise TrainingSetupError (one line naming the flag) when the quantization flags do not fit
    together, the backend is not installed, cannot run on the device (nf4 needs CUDA), or the
    adapter method trains the base weights themselves."""
    base, backend = settings.quantize_base, settings.backend
    denoiser_file = settings.pretrained_denoiser_file
    if denoiser_file is not None:
        check_denoiser_file(denoiser_file)
        if base is not None:
            raise TrainingSetupError(
                f"--quantize_base={base}: the denoiser of --pretrained_denoiser_file is already quantized (GGUF); "
                "drop one of them")
        if not trains_snella_layers:
            raise TrainingSetupError(
                "--pretrained_denoiser_file: only SNELLA adapters train beside a GGUF-quantized base (--adapter snella)")
    if base is None:
        if settings.quantize_backend is not None and settings.quantize_text_encoder is None:
            raise TrainingSetupError(
                f"--quantize_backend={settings.quantize_backend}: needs --quantize_base or --quantize_text_encoder")
        return
    if backend not in BACKENDS[base]:
        raise TrainingSetupError(
            f"--quantize_backend={backend}: cannot do --quantize_base={base} (use {' or '.join(BACKENDS[base])})")
    if not _installed(BACKEND_MODULES[backend]):
        raise TrainingSetupError(
            f"--quantize_base={base}: the {backend} backend is not installed "
            "(pip install 'snella-diffusion[quantization]')")
    if base == "nf4" and not cuda_used:
        raise TrainingSetupError(
            "--quantize_base=nf4: bitsandbytes 4-bit training needs a CUDA GPU and this run has none; use fp8 or int8")
    if not trains_snella_layers:
        raise TrainingSetupError(
            f"--quantize_base={base}: only SNELLA adapters train beside a quantized base (--adapter snella)")


def check_text_encoder_quantization(settings: QuantizationSettings, train_text_encoder: bool) -> None:
    """Raise TrainingSetupError (one line naming the flag) when ``--quantize_text_encoder`` is
    combined with ``--train_text_encoder`` (a trained encoder stays in the training dtype), its
    backend cannot do the format, or the backend is not installed."""
    chosen, backend = settings.quantize_text_encoder, settings.text_encoder_backend
    if chosen is None:
        return
    if train_text_encoder:
        raise TrainingSetupError(
            f"--quantize_text_encoder={chosen}: the text encoders are trained (--train_text_encoder); "
            "only frozen encoders are stored quantized, drop one of the flags")
    if backend not in BACKENDS[chosen]:
        raise TrainingSetupError(f"--quantize_backend={backend}: cannot do --quantize_text_encoder={chosen} "
                                 f"(use {' or '.join(BACKENDS[chosen])})")
    if not _installed(BACKEND_MODULES[backend]):
        raise TrainingSetupError(f"--quantize_text_encoder={chosen}: the {backend} backend is not installed "
                                 "(pip install 'snella-diffusion[quantization]')")


def check_block_swap(blocks_to_swap: Optional[int], method: Method, quantize_base: Optional[str]) -> None:
    """Raise TrainingSetupError (one line naming the flag) when ``--blocks_to_swap`` cannot work:
    fewer than 1 block, a method that trains the base weights rather than adapters of chosen
    layers (``--adapter full``: the weights that would be swapped), or an nf4
    base (bitsandbytes' packed weights cannot be copied between devices). Whether the model has
    that many blocks is checked when it is loaded (``block_swap.BlockSwap``)."""
    if blocks_to_swap is None:
        return
    if blocks_to_swap < 1:
        raise TrainingSetupError(f"--blocks_to_swap={blocks_to_swap}: must be at least 1 (or leave it out)")
    if not method.adapts_layers:
        raise TrainingSetupError(f"--blocks_to_swap moves frozen base weights; --adapter {method.name} trains "
                                 "them: drop one")
    if quantize_base == "nf4":
        raise TrainingSetupError("--blocks_to_swap with --quantize_base nf4: bitsandbytes Params4bit cannot be "
                                 "copied between devices; use --quantize_base fp8 or int8")


def check_snella_settings(settings: RunSettings) -> None:
    """The SNELLA flags make a valid config and ``--target_modules`` valid presets, block
    filters and regular expressions (the schedule is checked with a stand-in step count)."""
    try:
        config = settings.adapter.snella_config("unet", settings.training.max_train_steps or 1000)
        check_targets(config.target_modules)
    except SnellaError as error:
        raise TrainingSetupError(f"SNELLA flags: {error}") from error
    optimizer = settings.optimizer
    scalar_flags = [flag for flag, given in (("--freeze_beta", settings.adapter.freeze_beta),
                                             ("--snella_scalar_lr", optimizer.snella_scalar_lr is not None),
                                             ("--beta_decay", optimizer.beta_decay is not None),
                                             ("--reference_beta", optimizer.reference_beta)) if given]
    if scalar_flags and not settings.adapter.method.snella_layers:
        raise TrainingSetupError(f"{', '.join(scalar_flags)}: SNELLA's scalars, not in --adapter={settings.adapter.adapter}")
    if settings.adapter.freeze_beta and optimizer.beta_decay is not None:
        raise TrainingSetupError("--freeze_beta keeps β at 0: --beta_decay has nothing to decay, drop one")
    if optimizer.reference_beta and (settings.adapter.freeze_beta or optimizer.beta_decay is not None):
        other = "--freeze_beta" if settings.adapter.freeze_beta else "--beta_decay"
        raise TrainingSetupError(f"--reference_beta learns β as the reference does: {other} changes that, drop one")
    if optimizer.text_encoder_lr is not None and not settings.training.train_text_encoder:
        raise TrainingSetupError("--text_encoder_lr applies with --train_text_encoder")


def check_all_settings(settings: RunSettings) -> None:
    """Every check before loading: the data flags first, then the rest."""
    check_data_settings(settings)
    check_run_settings(settings)


def check_family_settings(settings: RunSettings, family: ModelFamily, scheduler_config: dict[str, Any]) -> None:
    """What the detected pipeline cannot take, refused after ``model_index.json`` and the
    scheduler's config are read and before any model loads:

    - ``--validation_guidance_scale`` where the family's pipeline has no guidance argument
      (``ModelFamily.guidance_argument`` is None: its guidance comes from a component, e.g.
      HunyuanVideo 1.5's ``guider``);
    - one sampling step (``--validation_inference_steps``, ``--class_inference_steps``) with a
      scheduler that stretches its schedule to ``shift_terminal`` (Qwen-Image, LTX-2): diffusers'
      stretch divides 0 by 0 at one step and every sample is NaN.
    """
    if family.guidance_argument is None and settings.validation.validation_guidance_scale is not None:
        raise TrainingSetupError(
            f"--validation_guidance_scale: the {family.name} pipeline takes no guidance argument (its guidance is "
            "set by the pipeline's own components); leave the flag unset")
    terminal = scheduler_config.get("shift_terminal")
    if not terminal:
        return
    for flag, steps in (("--validation_inference_steps", settings.validation.validation_inference_steps),
                        ("--class_inference_steps", settings.data.class_inference_steps)):
        if steps is not None and steps < 2:
            raise TrainingSetupError(
                f"{flag}={steps}: the pipeline's scheduler stretches its schedule to shift_terminal={terminal}, "
                "which makes one-step samples NaN; use 2 or more")


def use_cpu(cpu_flag: bool) -> bool:
    """Whether the Accelerator must be told ``cpu=True``: on ``--cpu`` or
    ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``), or when torch sees no accelerator
    (CUDA, MPS, XPU). Otherwise accelerate picks the device itself. On a machine without one,
    ``cpu=True`` is what makes several launched processes join one gloo group."""
    if cpu_flag or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
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
        logger.warning("--report_to=tensorboard: tensorboard is not installed; logging to the console only")
        return None
    return report_to

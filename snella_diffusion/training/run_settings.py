"""The typed settings of one DreamBooth run: the flags (and the ``--config`` job file) parsed
once into a frozen :class:`RunSettings` of per-concern groups, each declared next to its flags.

Flag → field: every flag ``--name`` fills the field ``name`` of exactly one group (the help
group of the same title), e.g. ``--learning_rate`` → ``settings.training.learning_rate``,
``--rank`` → ``settings.adapter.rank``, ``--caption_extension`` →
``settings.captions.caption_extension``, ``--weighting_scheme`` → ``settings.dit.weighting_scheme``.

:func:`parse_run_settings` resolves what the flags alone decide (the embedded model's rank,
sparsity and text-encoder defaults, the bare ``--caption_prefix``, the EMA decay). What needs
the output folder or the data (the embedded model's files, the step count from the epochs) is
resolved by the training script into a new settings object with ``dataclasses.replace``;
nothing is mutated. :meth:`RunSettings.flags` gives the flat ``{flag: value}`` written as
``<output_dir>/config.toml``, which ``--config`` reads back to repeat the run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from diffusers.optimization import SchedulerType

from ..families.base import FamilySettings
from ..families.dit import DiTFlags
from .adapter_settings import AdapterSettings
from .data_arguments import (
    BucketSettings,
    CaptionSettings,
    DatasetSettings,
    EMASettings,
    add_data_arguments,
    resolve_caption_prefix,
    resolve_ema_decay,
)
from .embedded_run import (
    DEFAULT_RANK,
    DEFAULT_TARGET_SPARSITY,
    EMBEDDED_MAX_STEPS,
    EMBEDDED_PROMPT,
    EMBEDDED_RANK,
    EMBEDDED_TARGET_SPARSITY,
)
from .flag_settings import FlagSettings
from .job_config import parse_args_with_config
from .loss_options import LossSettings
from .optimizers import DEFAULT_BETA_DECAY, OptimizerSettings
from .quantized_base import QuantizationSettings
from .video_dataset import VideoSettings

LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
REPORT_TO_CHOICES = ("tensorboard", "wandb", "comet_ml", "mlflow", "all", "none")


@dataclass(frozen=True)
class ModelSettings(FlagSettings):
    """The base model: None until the embedded model's folder is filled in."""

    pretrained_model_name_or_path: Optional[str]
    revision: Optional[str]
    variant: Optional[str]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("model")
        group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                           help="Hub id or local diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, Flux, PixArt; detected from "
                                "model_index.json). Omitted: the embedded tiny Stable Diffusion model.")
        group.add_argument("--revision", type=str, default=None, help="Hub revision of the pretrained model.")
        group.add_argument("--variant", type=str, default=None,
                           help="Weights variant of the pretrained model files, e.g. fp16.")


@dataclass(frozen=True)
class InstanceDataSettings(FlagSettings):
    """Instance and class images, prior preservation, resolution and augmentation."""

    instance_data_dir: Optional[str]
    instance_prompt: Optional[str]
    with_prior_preservation: bool
    class_data_dir: Optional[str]
    class_prompt: Optional[str]
    num_class_images: int
    prior_loss_weight: float
    sample_batch_size: int
    class_inference_steps: Optional[int]
    resolution: Optional[int]
    center_crop: bool
    random_flip: bool
    cache_latents: bool
    dataloader_num_workers: int

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("data")
        group.add_argument("--instance_data_dir", type=str, default=None,
                           help="Folder of instance images. Omitted: a generated deterministic set of 4 images.")
        group.add_argument("--instance_prompt", type=str, default=None,
                           help=f"Prompt naming the instance, e.g. 'a photo of sks dog' (default with "
                                f"generated images: {EMBEDDED_PROMPT!r}).")
        group.add_argument("--with_prior_preservation", action="store_true",
                           help="Add the prior-preservation loss on class images.")
        group.add_argument("--class_data_dir", type=str, default=None,
                           help="Folder of class images; missing ones are generated with the base model.")
        group.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of a dog'.")
        group.add_argument("--num_class_images", type=int, default=100,
                           help="Class images wanted for prior preservation; missing ones are generated.")
        group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
        group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
        group.add_argument("--class_inference_steps", type=int, default=None,
                           help="Sampling steps per class image (default: the pipeline's own; 25 for the embedded model).")
        group.add_argument("--resolution", type=int, default=None,
                           help="Training resolution in pixels (default: the model's native size, "
                                "512 for SD 1.5, 1024 for SDXL, 32 for the embedded model).")
        group.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop.")
        group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
        group.add_argument("--cache_latents", action="store_true",
                           help="Encode the images with the VAE once, before training.")
        group.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading worker processes.")


@dataclass(frozen=True)
class TrainingSettings(FlagSettings):
    """Steps, batch, learning rate and its schedule, AdamW, precision and devices."""

    output_dir: str
    seed: int
    train_text_encoder: Optional[bool]
    train_batch_size: int
    num_train_epochs: int
    max_train_steps: Optional[int]
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    blocks_to_swap: Optional[int]
    learning_rate: float
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    use_8bit_adam: bool
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    snr_gamma: Optional[float]
    mixed_precision: Optional[str]
    cpu: bool
    allow_tf32: bool
    enable_xformers_memory_efficient_attention: bool

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("training")
        group.add_argument("--output_dir", type=str, default="snella-output",
                           help="Where the adapter, model card, samples, plots and checkpoints go.")
        group.add_argument("--seed", type=int, default=0, help="Seed of data order, augmentation, noise and samples.")
        group.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
                           help="Also adapt the CLIP text encoder(s) with SNELLA (q/k/v/out and MLP), "
                                "in the same allocator as the UNet; with --adapter=lora, LoRA on the same "
                                "layers (default: off; on for the embedded model unless --adapter=full).")
        group.add_argument("--train_batch_size", type=int, default=4, help="Instance images per device and step.")
        group.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (overridden by --max_train_steps).")
        group.add_argument("--max_train_steps", type=int, default=None,
                           help=f"Optimizer steps (default: from --num_train_epochs; {EMBEDDED_MAX_STEPS} "
                                "for the embedded model).")
        group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                           help="Micro-batches accumulated per optimizer step.")
        group.add_argument("--gradient_checkpointing", action="store_true",
                           help="Recompute UNet (and trained text encoder) activations in backward to save memory.")
        group.add_argument("--blocks_to_swap", type=int, default=None,
                           help="DiT families: keep the frozen weights of the transformer's last N blocks in CPU "
                                "memory and copy each to the device only for its forward, recompute and backward "
                                "(as kohya's and musubi-tuner's flag; docs/quantized-bases.md).")
        group.add_argument("--learning_rate", type=float, default=3e-2,
                           help="Initial learning rate. 3e-2: SNELLA's best (with the default --beta_decay) in the "
                                "personalization lab, picked on seed 0 among 3e-3..1e-1 (held-out seeds: strict "
                                "fidelity 0.44, loose 0.995; docs/lab.md); with --reference_beta the best was 1e-2. "
                                "LoRA learns at 1e-3 to 3e-3 there and breaks the base at 1e-2: pass --learning_rate "
                                "with --adapter lora; full fine-tuning wants about 1e-4; real models far lower.")
        group.add_argument("--scale_lr", action="store_true",
                           help="Multiply the learning rate by GPUs × accumulation steps × batch size.")
        group.add_argument("--lr_scheduler", type=str, default="constant", choices=list(LR_SCHEDULERS),
                           help="Learning-rate schedule (diffusers.optimization).")
        group.add_argument("--lr_warmup_steps", type=int, default=0, help="Learning-rate warmup steps.")
        group.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
        group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
        group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
        group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
        group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
        group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
        group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
        group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
        group.add_argument("--snr_gamma", type=float, default=None,
                           help="Min-SNR weighting γ (5.0 is the recommended value); off by default.")
        group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                           help="Precision of the frozen weights (loaded directly in it; the VAE stays "
                                "float32) and autocast; default: accelerate config.")
        group.add_argument("--cpu", action="store_true",
                           help="Train on the CPU even when an accelerator (CUDA, MPS, XPU) is present "
                                "(as accelerate launch --cpu).")
        group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
        group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                           help="Use xformers attention (needs xformers and a CUDA GPU).")


@dataclass(frozen=True)
class ValidationSettings(FlagSettings):
    """Validation samples, checkpoints, resuming and the tracker."""

    validation_prompt: Optional[str]
    validation_guidance_scale: Optional[float]
    validation_with_class_prompt: bool
    num_validation_images: int
    validation_steps: Optional[int]
    validation_inference_steps: int
    checkpointing_steps: Optional[int]
    checkpoints_total_limit: Optional[int]
    resume_from_checkpoint: Optional[str]
    report_to: Optional[str]
    logging_dir: str

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("validation, logging, checkpoints")
        group.add_argument("--validation_prompt", type=str, default=None,
                           help="Prompt for sample grids (default with the embedded model: the instance prompt).")
        group.add_argument("--validation_guidance_scale", type=float, default=None,
                           help="Classifier-free guidance of validation and class-image sampling (default: the "
                                "pipeline's own, 7.5 for Stable Diffusion).")
        group.add_argument("--validation_with_class_prompt", action="store_true",
                           help="Add a row of --class_prompt samples to each validation grid (shows leakage).")
        group.add_argument("--num_validation_images", type=int, default=4, help="Images per validation grid.")
        group.add_argument("--validation_steps", type=int, default=None,
                           help="Write validation/step_<N>.png every N optimizer steps and at the end "
                                "(default: 100; half the run for the embedded model).")
        group.add_argument("--validation_inference_steps", type=int, default=25,
                           help="Denoising steps per validation image.")
        group.add_argument("--checkpointing_steps", type=int, default=None,
                           help="Save a resumable checkpoint-<N>/ every N optimizer steps "
                                "(default: 500; half the run for the embedded model).")
        group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
        group.add_argument("--resume_from_checkpoint", type=str, default=None,
                           help='A checkpoint folder, or "latest" for the newest in --output_dir.')
        group.add_argument("--report_to", type=str, default=None, choices=list(REPORT_TO_CHOICES),
                           help='Tracker: "tensorboard" (default when installed), "wandb", "comet_ml", "mlflow", '
                                '"all" (every installed one) or "none".')
        group.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")

    def guidance_kwargs(self, argument: Optional[str] = "guidance_scale") -> dict[str, float]:
        """``{argument: --validation_guidance_scale}`` when both are set, else nothing; ``argument``
        is the family's pipeline argument for it (``ModelFamily.guidance_argument``; None where the
        pipeline has none, and ``check_family_settings`` refused the flag)."""
        if self.validation_guidance_scale is None or argument is None:
            return {}
        return {argument: self.validation_guidance_scale}


@dataclass(frozen=True)
class RunSettings:
    """Every setting of one DreamBooth run, by concern (see the module docstring)."""

    model: ModelSettings
    data: InstanceDataSettings
    training: TrainingSettings
    validation: ValidationSettings
    adapter: AdapterSettings
    dit: DiTFlags
    captions: CaptionSettings
    datasets: DatasetSettings
    buckets: BucketSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    ema: EMASettings
    quantization: QuantizationSettings
    video: VideoSettings
    config: Optional[str] = None

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "RunSettings":
        """The settings of ``{flag name: value}`` (every flag of :func:`build_parser`), with
        ``--beta_decay`` defaulting to ``DEFAULT_BETA_DECAY`` for SNELLA adapters whose β is
        learnt and not ``--reference_beta``."""
        settings = cls(**{name: group.from_flags(flags) for name, group in GROUPS.items()}, config=flags.get("config"))
        optimizer = settings.optimizer
        if (optimizer.beta_decay is None and not optimizer.reference_beta and not settings.adapter.freeze_beta
                and settings.adapter.method.snella_layers):
            return dataclasses.replace(settings, optimizer=dataclasses.replace(optimizer, beta_decay=DEFAULT_BETA_DECAY))
        return settings

    def flags(self) -> dict[str, Any]:
        """The flat ``{flag name: value}`` of every flag but ``--config``, sorted by name."""
        values: dict[str, Any] = {}
        for name in GROUPS:
            values.update(getattr(self, name).flags())
        return dict(sorted(values.items()))

    def family_settings(self) -> FamilySettings:
        """What a model family's ``configure`` reads."""
        return FamilySettings(dit=self.dit, train_text_encoder=bool(self.training.train_text_encoder),
                              resolution=self.data.resolution, wan_expert=self.video.wan_expert)


GROUPS: dict[str, type[FlagSettings]] = {
    "model": ModelSettings,
    "data": InstanceDataSettings,
    "training": TrainingSettings,
    "validation": ValidationSettings,
    "adapter": AdapterSettings,
    "dit": DiTFlags,
    "captions": CaptionSettings,
    "datasets": DatasetSettings,
    "buckets": BucketSettings,
    "loss": LossSettings,
    "optimizer": OptimizerSettings,
    "ema": EMASettings,
    "quantization": QuantizationSettings,
    "video": VideoSettings,
}


def build_parser() -> argparse.ArgumentParser:
    """The DreamBooth script's parser: every group's flags, in ``--help`` order."""
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning with SNELLA sparse adapters (diffusers-style flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for group in (ModelSettings, InstanceDataSettings, TrainingSettings, ValidationSettings, AdapterSettings,
                  DiTFlags, QuantizationSettings, VideoSettings):
        group.add_arguments(parser)
    add_data_arguments(parser)
    return parser


def resolve_model_defaults(settings: RunSettings) -> RunSettings:
    """Fill ``--rank``, ``--target_sparsity`` and ``--train_text_encoder`` when not given: the
    embedded model (no ``--pretrained_model_name_or_path``) takes the lab's best setting, rank 8
    and sparsity 0.5 with the text encoder adapted; any other model rank 32 and sparsity 0.8,
    UNet/transformer only."""
    embedded_model = settings.model.pretrained_model_name_or_path is None
    adapter, training = settings.adapter, settings.training
    if adapter.rank is None:
        adapter = dataclasses.replace(adapter, rank=EMBEDDED_RANK if embedded_model else DEFAULT_RANK)
    if adapter.target_sparsity is None:
        adapter = dataclasses.replace(
            adapter, target_sparsity=EMBEDDED_TARGET_SPARSITY if embedded_model else DEFAULT_TARGET_SPARSITY)
    if training.train_text_encoder is None:
        training = dataclasses.replace(training, train_text_encoder=embedded_model and adapter.method.adapts_layers)
    return dataclasses.replace(settings, adapter=adapter, training=training)


def parse_run_settings(argv: Optional[Sequence[str]] = None) -> RunSettings:
    """Parse the flags (``argv`` defaults to ``sys.argv[1:]``) and the ``--config`` file once,
    into resolved settings (see the module docstring)."""
    settings = resolve_model_defaults(RunSettings.from_flags(parse_args_with_config(build_parser(), argv)))
    return dataclasses.replace(
        settings,
        captions=resolve_caption_prefix(settings.captions, settings.data.instance_prompt),
        ema=resolve_ema_decay(settings.ema),
    )

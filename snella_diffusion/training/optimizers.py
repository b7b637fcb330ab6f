"""The optimizer of a training run: AdamW (optionally bitsandbytes' 8-bit AdamW) or Prodigy
(``prodigyopt``, an optional extra), with the flags of diffusers' DreamBooth scripts."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from ..errors import SnellaError
from .flag_settings import FlagSettings

if TYPE_CHECKING:
    from .run_settings import TrainingSettings

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "prodigy")


def parse_bool(text: str) -> bool:
    """"true"/"false" (also 1/0, yes/no) → bool, for flags such as ``--prodigy_decouple false``."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


DEFAULT_BETA_DECAY = 10.0
"""``--beta_decay`` of SNELLA runs of the DreamBooth script unless ``--reference_beta``: picked
on the personalization lab (issue 26, docs/lab.md) over the reference, a frozen β, a lower
scalar rate and a separate text-encoder rate."""


@dataclass(frozen=True)
class OptimizerSettings(FlagSettings):
    """``--optimizer``, the Prodigy flags and the per-group rates (AdamW's betas, weight decay
    and epsilon are the ``--adam_*`` flags of ``TrainingSettings``).

    ``snella_scalar_lr``, ``text_encoder_lr`` and ``beta_decay`` None: one parameter group at
    ``--learning_rate`` (the reference behaviour); ``training/param_groups.py`` splits them.
    The DreamBooth run fills ``beta_decay`` with :data:`DEFAULT_BETA_DECAY` for SNELLA adapters
    unless ``reference_beta`` (``RunSettings.from_flags``)."""

    optimizer: str
    prodigy_beta3: Optional[float]
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool
    snella_scalar_lr: Optional[float]
    text_encoder_lr: Optional[float]
    beta_decay: Optional[float]
    reference_beta: bool

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("optimizer")
        group.add_argument("--optimizer", type=str.lower, default="adamw", choices=list(OPTIMIZERS),
                           help="adamw, or prodigy (learning-rate free; use --learning_rate 1.0; needs "
                                "pip install 'snella-diffusion[prodigy]'). Betas, weight decay and epsilon "
                                "come from the --adam_* flags.")
        group.add_argument("--prodigy_beta3", type=float, default=None,
                           help="Prodigy: coefficient of the step-size running averages (default: sqrt(β2)).")
        group.add_argument("--prodigy_decouple", type=parse_bool, default=True,
                           help="Prodigy: AdamW-style decoupled weight decay (true/false).")
        group.add_argument("--prodigy_use_bias_correction", type=parse_bool, default=True,
                           help="Prodigy: Adam bias correction (true/false).")
        group.add_argument("--prodigy_safeguard_warmup", type=parse_bool, default=True,
                           help="Prodigy: remove the learning rate from the D estimate during warmup (true/false).")
        group.add_argument("--snella_scalar_lr", type=float, default=None,
                           help="Learning rate of every SNELLA layer's scalars α, γ, β (default: --learning_rate, "
                                "as the reference). Under Adam a scalar moves as fast as one factor entry but β "
                                "shifts all m·n entries of ΔW, so a lower rate keeps the constant offset small.")
        group.add_argument("--text_encoder_lr", type=float, default=None,
                           help="Learning rate of the text encoders' adapters (SNELLA or LoRA) with "
                                "--train_text_encoder (default: --learning_rate).")
        group.add_argument("--beta_decay", type=float, default=None,
                           help="Decoupled decay of SNELLA's β toward 0: each step β ← β·(1 − lr_β·beta_decay) "
                                f"before the Adam update (default {DEFAULT_BETA_DECAY:g} for SNELLA adapters, which "
                                "bounds |β| near 1/beta_decay: the learnt β adds β|β| to every entry of ΔW, and on "
                                "the lab it held ~90%% of ΔW's energy and made stacked adapters collide; "
                                "docs/lab.md).")
        group.add_argument("--reference_beta", action="store_true",
                           help="Learn SNELLA's β as the paper's reference does (in the main group, decayed by "
                                "--adam_weight_decay only) instead of the default --beta_decay.")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--optimizer`` and the Prodigy flags (the AdamW ones are the script's ``--adam_*``)."""
    OptimizerSettings.add_arguments(parser)


def check_optimizer_settings(settings: OptimizerSettings, use_8bit_adam: bool) -> None:
    """Reject optimizer flags that cannot work, before any model is loaded."""
    if settings.optimizer == "prodigy":
        if use_8bit_adam:
            raise SnellaError("--use_8bit_adam applies to --optimizer adamw, not prodigy")
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise SnellaError("--optimizer prodigy: prodigyopt is not installed "
                              "(pip install 'snella-diffusion[prodigy]')") from None
    elif settings.prodigy_beta3 is not None:
        raise SnellaError("--prodigy_beta3 applies to --optimizer prodigy")
    for flag in ("snella_scalar_lr", "text_encoder_lr", "beta_decay"):
        value = getattr(settings, flag)
        if value is not None and not value >= 0.0:
            raise SnellaError(f"--{flag}={value}: must be a number ≥ 0")


def make_optimizer(
    settings: OptimizerSettings, training: TrainingSettings, params: Sequence[Any], learning_rate: float
) -> Any:
    """The optimizer over ``params`` (parameters, or param-group dicts whose own ``lr`` /
    ``weight_decay`` win) for ``--optimizer`` (and ``--use_8bit_adam``), with the ``--adam_*``
    values of ``training``."""
    betas = (training.adam_beta1, training.adam_beta2)
    if settings.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if learning_rate <= 0.1:
            logger.warning("--optimizer prodigy: --learning_rate=%g; Prodigy is usually run at 1.0", learning_rate)
        return Prodigy(
            params, lr=learning_rate, betas=betas, beta3=settings.prodigy_beta3,
            weight_decay=training.adam_weight_decay, eps=training.adam_epsilon, decouple=settings.prodigy_decouple,
            use_bias_correction=settings.prodigy_use_bias_correction,
            safeguard_warmup=settings.prodigy_safeguard_warmup,
        )
    if training.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params, lr=learning_rate, betas=betas, weight_decay=training.adam_weight_decay, eps=training.adam_epsilon,
    )

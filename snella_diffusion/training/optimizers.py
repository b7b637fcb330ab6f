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


@dataclass(frozen=True)
class OptimizerSettings(FlagSettings):
    """``--optimizer`` and the Prodigy flags (AdamW's betas, weight decay and epsilon are the
    ``--adam_*`` flags of ``TrainingSettings``)."""

    optimizer: str
    prodigy_beta3: Optional[float]
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool

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


def make_optimizer(
    settings: OptimizerSettings, training: TrainingSettings, params: Sequence[torch.nn.Parameter], learning_rate: float
) -> Any:
    """The optimizer over ``params`` for ``--optimizer`` (and ``--use_8bit_adam``), with the
    ``--adam_*`` values of ``training``."""
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

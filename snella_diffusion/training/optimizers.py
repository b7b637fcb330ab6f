"""The optimizer of a training run: AdamW (optionally bitsandbytes' 8-bit AdamW) or Prodigy
(``prodigyopt``, an optional extra), with the flags of diffusers' DreamBooth scripts."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence

import torch

from ..errors import SnellaError

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


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--optimizer`` and the Prodigy flags (the AdamW ones are the script's ``--adam_*``)."""
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


def check_optimizer_args(args: argparse.Namespace) -> None:
    """Reject optimizer flags that cannot work, before any model is loaded."""
    if args.optimizer == "prodigy":
        if args.use_8bit_adam:
            raise SnellaError("--use_8bit_adam applies to --optimizer adamw, not prodigy")
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise SnellaError("--optimizer prodigy: prodigyopt is not installed "
                              "(pip install 'snella-diffusion[prodigy]')") from None
    elif args.prodigy_beta3 is not None:
        raise SnellaError("--prodigy_beta3 applies to --optimizer prodigy")


def make_optimizer(args: argparse.Namespace, params: Sequence[torch.nn.Parameter], learning_rate: float) -> Any:
    """The optimizer over ``params`` for ``--optimizer`` (and ``--use_8bit_adam``)."""
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if learning_rate <= 0.1:
            logger.warning("--optimizer prodigy: --learning_rate=%g; Prodigy is usually run at 1.0", learning_rate)
        return Prodigy(
            params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )

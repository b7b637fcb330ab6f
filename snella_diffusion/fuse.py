"""Fuse adapters into the base weights of a model and restore them bit for bit.

The work on one layer is ``SnellaLinear``'s (``fuse_adapters``, ``restore_base_weight``); this
module loops it over a model's layers and sums what they measured.

The fused weight is cast(W0 + Σ_k s_k·ΔW_k) with the sum in float32. Where the pristine base
weight W0 is kept is the caller's choice (``keep_original``):

- ``"cpu"`` (default): a copy in host memory, in the weight's dtype. No extra accelerator
  memory; unfuse copies it back (host-to-device traffic of the adapted weights).
- ``"device"``: a copy next to the weight (a buffer that follows ``.to()``): fastest unfuse,
  but the adapted weights' memory once more on the accelerator.
- ``False``: nothing kept; ``unfuse_snella`` is refused (``UnfuseError``) and removing the
  adapters leaves the fused weights in place (merge and unload).

With a kept copy the fused weight is always recomputed from it, so any number of fuse/unfuse
cycles ends exactly where it started. The copy's size is the adapted weights' size in their
dtype: with the default presets in bf16/fp16, SD1.5 0.48 GB, SDXL 4.4 GB, Flux.1-dev 17 GB
(``benchmarks/bench_fuse_memory.py``).

Into a half-precision weight the cast rounds ΔW to W0's spacing (~1.2e-4 in bf16, ~1.5e-5 in
fp16 for |W0| ~ 0.02), as fusing a LoRA does. Each fuse measures what survives as the
fraction of ΔW energy kept, 1 − ||cast(W0 + ΔW) − (W0 + ΔW)||² / ||ΔW||², which lies in
[0, 1] (round-to-nearest moves an entry by at most |ΔW|) and is 1 for float32 weights;
``fuse_snella`` logs it and ``fused_energy_kept`` returns it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Optional, Sequence

from torch import nn

from .errors import UnfuseError
from .layer import (
    DEFAULT_KEEP_ORIGINAL,
    KEEP_ORIGINAL_CHOICES,
    KeepOriginal,
    SnellaLinear,
    check_keep_original,
    snella_layers,
)

__all__ = [
    "DEFAULT_KEEP_ORIGINAL", "KEEP_ORIGINAL_CHOICES", "KeepOriginal", "UnfuseError", "check_fusable", "energy_kept_in",
    "fuse_layer", "fuse_snella", "fused_energy_kept", "log_energy_kept", "unfuse_snella",
]

logger = logging.getLogger(__name__)


def fused_energy_kept(model: nn.Module) -> Optional[float]:
    """The fraction of fused ΔW energy the base weights of ``model`` hold now,
    1 − Σ_l ||cast(W0 + ΔW) − (W0 + ΔW)||² / Σ_l ||ΔW||² over the layers with fused adapters
    (ΔW = Σ_k s_k·ΔW_k of what is fused there); 1.0 for float32 weights, None when nothing is
    fused (or the fused ΔW is zero)."""
    return energy_kept_in(snella_layers(model).values())


def energy_kept_in(layers: Iterable[SnellaLinear]) -> Optional[float]:
    """``fused_energy_kept`` over the given layers."""
    rounding = delta = 0.0
    for layer in layers:
        if layer.fused_adapters:
            rounding += layer.fused_delta_energy[0]
            delta += layer.fused_delta_energy[1]
    return None if delta == 0.0 else 1.0 - rounding / delta


def fuse_layer(
    layer: SnellaLinear, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
    keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
) -> None:
    """``layer.fuse_adapters(scale, adapter_names, keep_original)``: add scale·w_k·ΔW_k of the
    given (default: active) adapters into the base weight; already fused ones stay as they are."""
    layer.fuse_adapters(scale, adapter_names, keep_original)


def check_fusable(layers: Mapping[str, SnellaLinear]) -> None:
    """Raise SnellaError naming the first layer whose base weight is quantized (checked before
    any layer is fused, so a refused fuse changes nothing)."""
    for name, layer in layers.items():
        layer.check_fusable(name)


def fuse_snella(
    model: nn.Module, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
    keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
) -> int:
    """Fuse adapters into every SnellaLinear of ``model``; returns the number of layers fused.

    Fused adapters no longer run in the forward pass, so inference costs what the base model
    costs. ``keep_original`` says where the pristine base weights are kept: ``"cpu"``
    (default, host memory), ``"device"`` (beside the weights) or ``False`` (not kept:
    ``unfuse_snella`` then raises ``UnfuseError``). ``unfuse_snella`` undoes it exactly.
    Half-precision base weights round ΔW to their
    spacing: the fraction of ΔW energy kept is logged (INFO) and ``fused_energy_kept(model)``
    returns it.
    """
    check_keep_original(keep_original)
    layers = snella_layers(model)
    check_fusable(layers)
    for layer in layers.values():
        names = layer.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in layer.adapters
        ]
        if names:
            layer.fuse_adapters(scale, names, keep_original)
    log_energy_kept(layers.values())
    return len(layers)


def log_energy_kept(layers: Iterable[SnellaLinear]) -> None:
    """Log ``energy_kept_in(layers)`` at INFO level (nothing when nothing is fused)."""
    kept = energy_kept_in(layers)
    if kept is not None:
        logger.info("fused SNELLA adapters: the base weights keep %.2f %% of the ΔW energy", 100.0 * kept)


def unfuse_snella(model: nn.Module) -> int:
    """Restore every fused base weight bit for bit; returns the number of layers restored.

    Raises:
        UnfuseError: a layer was fused with ``keep_original=False`` (checked for every layer
            before any is restored, so nothing is half-undone).
    """
    layers = snella_layers(model)
    for name, layer in layers.items():
        layer.check_restorable(name)
    restored = 0
    for layer in layers.values():
        if layer.pristine_weight is not None:
            restored += 1
        layer.restore_base_weight()
    return restored

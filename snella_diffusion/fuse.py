"""Fuse adapters into the base weights and restore them bit for bit.

Fusing keeps a copy of the pristine base weight (in its own dtype) and always recomputes the
fused weight from it as cast(W0 + Σ_k s_k·ΔW_k) with the sum in float32, so any number of
fuse/unfuse cycles ends exactly where it started.

Into a half-precision weight the cast rounds ΔW to W0's spacing (~1.2e-4 in bf16, ~1.5e-5 in
fp16 for |W0| ~ 0.02), as fusing a LoRA does. Each fuse measures what survives as the
fraction of ΔW energy kept, 1 − ||cast(W0 + ΔW) − (W0 + ΔW)||² / ||ΔW||², which lies in
[0, 1] (round-to-nearest moves an entry by at most |ΔW|) and is 1 for float32 weights;
``fuse_snella`` logs it and ``fused_energy_kept`` returns it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import SnellaError
from .layer import SnellaLinear, snella_layers

logger = logging.getLogger(__name__)


def restore_base_weight(layer: SnellaLinear) -> None:
    """Put the pristine base weight back (a bit-exact copy) and mark nothing as fused."""
    if layer.unfused_weight is not None:
        with torch.no_grad():
            layer.base_layer.weight.copy_(layer.unfused_weight)
        layer.unfused_weight = None
    layer.fused_adapters = {}
    layer.fused_delta_energy = (0.0, 0.0)


def write_fused_weight(layer: SnellaLinear, fused: dict[str, float]) -> None:
    """Set the base weight to cast(W0 + Σ_k factor_k·ΔW_k) for ``fused = {name: factor}``,
    computed from the pristine copy in float32; an empty dict restores W0 exactly."""
    if not fused:
        restore_base_weight(layer)
        return
    weight = layer.base_layer.weight
    if layer.unfused_weight is None:
        layer.unfused_weight = weight.detach().clone()
    with torch.no_grad():
        total = layer.unfused_weight.to(torch.float32, copy=True)
        for name, factor in fused.items():
            total = total.add_(layer.adapters[name].delta_weight(), alpha=factor)
        fused_weight = total.to(weight.dtype)
        layer.fused_delta_energy = _rounding_and_delta_energy(layer.unfused_weight, total, fused_weight)
        weight.copy_(fused_weight)
    layer.fused_adapters = dict(fused)
    layer._delta_cache = None


def _rounding_and_delta_energy(pristine: Tensor, exact: Tensor, fused: Tensor) -> tuple[float, float]:
    """(||fused − exact||², ||exact − W0||²) in float32 sums, for the energy-kept figure;
    ``exact`` is W0 + Σ_k s_k·ΔW_k in float32, ``fused`` its cast to the weight's dtype."""
    if fused.dtype == exact.dtype:
        rounding = 0.0
    else:
        rounding = float(torch.sub(fused.to(exact.dtype), exact).square_().sum())
    delta_energy = float(torch.sub(exact, pristine.to(exact.dtype)).square_().sum())
    return rounding, delta_energy


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


def fuse_layer(layer: SnellaLinear, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Add scale·w_k·ΔW_k of the given (default: active) adapters into the base weight.

    Adapters already fused in this layer are left as they are (fusing is idempotent).
    """
    names = list(layer.active_adapters if adapter_names is None else adapter_names)
    for name in names:
        if name not in layer.adapters:
            raise SnellaError(f"no adapter named {name!r} to fuse")
    new = {n: scale * layer.adapter_weights.get(n, 1.0) for n in names if n not in layer.fused_adapters}
    if new:
        write_fused_weight(layer, {**layer.fused_adapters, **new})


def fuse_snella(
    model: nn.Module, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None
) -> int:
    """Fuse adapters into every SnellaLinear of ``model``; returns the number of layers fused.

    Fused adapters no longer run in the forward pass, so inference costs what the base model
    costs. ``unfuse_snella`` undoes it exactly. Half-precision base weights round ΔW to their
    spacing: the fraction of ΔW energy kept is logged (INFO) and ``fused_energy_kept(model)``
    returns it.
    """
    layers = snella_layers(model)
    for layer in layers.values():
        names = layer.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in layer.adapters
        ]
        if names:
            fuse_layer(layer, scale, names)
    log_energy_kept(layers.values())
    return len(layers)


def log_energy_kept(layers: Iterable[SnellaLinear]) -> None:
    """Log ``energy_kept_in(layers)`` at INFO level (nothing when nothing is fused)."""
    kept = energy_kept_in(layers)
    if kept is not None:
        logger.info("fused SNELLA adapters: the base weights keep %.2f %% of the ΔW energy", 100.0 * kept)


def unfuse_snella(model: nn.Module) -> int:
    """Restore every fused base weight bit for bit; returns the number of layers restored."""
    restored = 0
    for layer in snella_layers(model).values():
        if layer.unfused_weight is not None:
            restored += 1
        restore_base_weight(layer)
    return restored

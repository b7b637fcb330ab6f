"""Fuse adapters into the base weights and restore them bit for bit.

Fusing keeps a copy of the pristine base weight (in its own dtype) and always recomputes the
fused weight from it as cast(W0 + Σ_k s_k·ΔW_k) with the sum in float32, so any number of
fuse/unfuse cycles ends exactly where it started.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .errors import SnellaError
from .layer import SnellaLinear, snella_layers


def restore_base_weight(layer: SnellaLinear) -> None:
    """Put the pristine base weight back (a bit-exact copy) and mark nothing as fused."""
    if layer.unfused_weight is not None:
        with torch.no_grad():
            layer.base_layer.weight.copy_(layer.unfused_weight)
        layer.unfused_weight = None
    layer.fused_adapters = {}


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
        weight.copy_(total.to(weight.dtype))
    layer.fused_adapters = dict(fused)
    layer._delta_cache = None


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
    costs. ``unfuse_snella`` undoes it exactly.
    """
    layers = snella_layers(model)
    for layer in layers.values():
        names = layer.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in layer.adapters
        ]
        if names:
            fuse_layer(layer, scale, names)
    return len(layers)


def unfuse_snella(model: nn.Module) -> int:
    """Restore every fused base weight bit for bit; returns the number of layers restored."""
    restored = 0
    for layer in snella_layers(model).values():
        if layer.unfused_weight is not None:
            restored += 1
        restore_base_weight(layer)
    return restored

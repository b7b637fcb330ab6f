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


def fuse_layer(layer: SnellaLinear, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Add scale·w_k·ΔW_k of the given (default: active) adapters into the base weight."""
    names = list(layer.active_adapters if adapter_names is None else adapter_names)
    for name in names:
        if name not in layer.adapters:
            raise SnellaError(f"no adapter named {name!r} to fuse")
    weight = layer.base_layer.weight
    if layer.unfused_weight is None:
        layer.unfused_weight = weight.detach().clone()
    fused = dict(layer.fused_adapters)
    for name in names:
        fused[name] = fused.get(name, 0.0) + scale * layer.adapter_weights.get(name, 1.0)
    with torch.no_grad():
        total = layer.unfused_weight.to(torch.float32, copy=True)
        for name, factor in fused.items():
            total = total.add_(layer.adapters[name].delta_weight(), alpha=factor)
        weight.copy_(total.to(weight.dtype))
    layer.fused_adapters = fused
    layer._delta_cache = None


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

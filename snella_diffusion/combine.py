"""How several adapters' ΔW combine in one layer: the plain weighted sum, or a merge mode.

Every mode takes the per-adapter updates ΔW_k ``(m, n)`` and their weights w_k and returns one
``(m, n)`` float32 matrix:

- ``"sum"``: Σ_k w_k·ΔW_k (what a layer applies by default).
- ``"no_offset"``: Σ_k w_k·(ΔW_k − mean(ΔW_k)·11ᵀ): each update loses its constant component
  (the all-entries-equal part that SNELLA's per-layer β adds) before the sum.
- ``"ties"``: TIES-style merge of the weighted updates τ_k = w_k·ΔW_k: trim each τ_k to its
  ``density``·m·n entries of largest magnitude (the rest set to 0), elect each entry's sign as
  the sign of Σ_k trimmed τ_k (the sign holding the larger summed magnitude), and take the
  disjoint mean: the mean over the k whose trimmed τ_k is non-zero with the elected sign
  (0 where none agrees).

The functions work on any ΔW (SNELLA's or a LoRA's B·A), so the same modes can be compared
across methods.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .errors import SnellaError

COMBINE_MODES: tuple[str, ...] = ("sum", "ties", "no_offset")
DEFAULT_COMBINE = "sum"
# The fraction of each update's entries a TIES merge keeps (by magnitude).
DEFAULT_TIES_DENSITY = 0.2


def check_combine(mode: str, density: float = DEFAULT_TIES_DENSITY) -> None:
    """Raise SnellaError unless ``mode`` is one of ``COMBINE_MODES`` and 0 < density ≤ 1."""
    if mode not in COMBINE_MODES:
        raise SnellaError(f"combine={mode!r}: expected one of {', '.join(COMBINE_MODES)}")
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise SnellaError(f"ties_density={density!r}: expected a fraction in (0, 1]")


def constant_component(delta: Tensor) -> Tensor:
    """mean(ΔW)·11ᵀ of ``delta`` ``(m, n)``: its projection on the all-ones matrix (float32)."""
    return torch.full_like(delta, float(delta.double().mean()), dtype=torch.float32)


def remove_constant_component(delta: Tensor) -> Tensor:
    """ΔW − mean(ΔW)·11ᵀ in float32."""
    return delta.to(torch.float32) - float(delta.double().mean())


def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its ⌈density·numel⌉ largest-magnitude entries set to 0 (float32)."""
    flat = delta.to(torch.float32).reshape(-1)
    keep = max(1, math.ceil(density * flat.numel()))
    if keep >= flat.numel():
        return flat.reshape(delta.shape).clone()
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(keep).indices
    kept[index] = flat[index]
    return kept.reshape(delta.shape)


def ties_merge(deltas: Sequence[Tensor], density: float = DEFAULT_TIES_DENSITY) -> Tensor:
    """TIES merge of already weighted updates τ_k ``(m, n)``: trim, elect sign, disjoint mean."""
    trimmed = [trim_to_density(delta, density) for delta in deltas]
    elected = torch.sign(sum(trimmed))
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for tau in trimmed:
        agrees = (torch.sign(tau) == elected) & (tau != 0)
        total += torch.where(agrees, tau, torch.zeros_like(tau))
        count += agrees.to(count.dtype)
    return total / count.clamp_min(1.0)


def combine_deltas(
    deltas: Sequence[Tensor], weights: Sequence[float], mode: str = DEFAULT_COMBINE,
    density: float = DEFAULT_TIES_DENSITY,
) -> Tensor:
    """Combine updates ΔW_k ``(m, n)`` with weights w_k by ``mode`` (see the module docstring).

    Returns:
        ``(m, n)`` float32 on the deltas' device.
    Raises:
        SnellaError: an unknown mode, a density outside (0, 1], no deltas, or as many weights
            as deltas missing.
    """
    check_combine(mode, density)
    if not deltas:
        raise SnellaError("combine_deltas: no ΔW given")
    if len(weights) != len(deltas):
        raise SnellaError(f"combine_deltas: {len(weights)} weights for {len(deltas)} ΔW")
    if mode == "ties":
        return ties_merge([delta.to(torch.float32) * float(w) for delta, w in zip(deltas, weights)], density)
    total = torch.zeros_like(deltas[0], dtype=torch.float32)
    for delta, weight in zip(deltas, weights):
        part = remove_constant_component(delta) if mode == "no_offset" else delta.to(torch.float32)
        total.add_(part, alpha=float(weight))
    return total

"""ΔW of one SNELLA layer in plain torch: the definition of the method (docs/METHOD.md §1-2).

The fast path (``blocked``, ``sparsify`` and the layer's autograd function; ``kernels`` behind
a differentiable ``SnellaAdapter.delta_weight``) is tested against this module for values and
gradients (``tests/test_method.py``). It favours reading over speed: whole ``(m, n)``
matrices, plain autograd, no caches.

Names and shapes are those of the adapter file (m = out_features, n = in_features, P = 2 heads
of width d = r/P): ``in_factors`` A ``(P, n, d)``, ``out_factors`` B ``(P, m, d)``, the 0-d
scalars ``alpha``, ``gamma``, ``beta``, the ``sparsity`` s and the ``threshold`` τ. ΔW has the
``nn.Linear.weight`` layout ``(m, n)`` and the factors' dtype.

Distances use ||b - a||² = ||b||² + ||a||² - 2·b·a (docs/METHOD.md §1): one matrix product per
head and nothing larger than ``(P, m, n)``, so this definition runs at real layer sizes (a
Flux MLP layer has 37.7 M entries; the differences b - a would take r/P times more memory).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import SnellaError

GAMMA_FLOOR = 1e-4  # the softmax temperature used is max(gamma, GAMMA_FLOOR) (docs/METHOD.md §1)


def head_distances(in_factors: Tensor, out_factors: Tensor) -> Tensor:
    """D ``(P, m, n)``, D[p, o, i] = ||B[p, o] - A[p, i]||, with a zero gradient where D = 0.

    Rounding can make the squared distance slightly negative; it counts as 0. At D = 0 the
    square root has no derivative; like the library (docs/METHOD.md §1), the gradient there is
    0 (a subgradient): the inner ``where`` feeds the root 1 at those entries, so autograd never
    forms 0·∞, and the outer ``where`` sends them no gradient.
    """
    squared = (
        out_factors.square().sum(-1)[:, :, None]
        + in_factors.square().sum(-1)[:, None, :]
        - 2.0 * out_factors @ in_factors.transpose(1, 2)
    )
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


def merged_matrix(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                  beta: Tensor, kernel_scale: float = 0.1) -> Tensor:
    """M = κ(A, B) ``(m, n)`` (docs/METHOD.md §1).

    "linear":            M[o, i] = Σ_p B[p, o]·A[p, i]
    "piecewise_linear":  M = K = c·(D_0 - D_1)                    (SNELL)
    "mix":               M = K + α·softmax_o(K/γ) + β              (SNELLA, the default)

    c is ``kernel_scale``; the softmax runs over the outputs o (axis 0) for each input i, at the
    temperature max(γ, GAMMA_FLOOR).
    """
    if kernel == "linear":
        return torch.einsum("pod,pid->oi", out_factors, in_factors)
    if kernel not in ("mix", "piecewise_linear"):
        raise SnellaError(f"kernel={kernel!r}: expected 'mix', 'piecewise_linear' or 'linear'")
    distances = head_distances(in_factors, out_factors)
    kernel_values = kernel_scale * (distances[0] - distances[1])
    if kernel == "piecewise_linear":
        return kernel_values
    softmax = torch.softmax(kernel_values / gamma.clamp_min(GAMMA_FLOOR), dim=0)
    return kernel_values + alpha * softmax + beta


def select_threshold(merged: Tensor, sparsity: float, drop_count: Optional[int] = None) -> Tensor:
    """τ, the k-th smallest |M| (0-d, detached; docs/METHOD.md §2).

    k = round(s·m·n) (round half to even), or the exact ``drop_count`` the file may store
    beside s; τ = 0 when k = 0, so that nothing is removed.
    """
    count = round(float(sparsity) * merged.numel()) if drop_count is None else int(drop_count)
    magnitude = merged.detach().abs().reshape(-1)
    if count <= 0:
        return torch.zeros((), dtype=merged.dtype, device=merged.device)
    return torch.kthvalue(magnitude, min(count, magnitude.numel())).values


def survivor_gate(merged: Tensor, threshold: Tensor, sparsify: str = "official") -> Tensor:
    """G ``(m, n)``, detached, with ΔW = M ⊙ G (docs/METHOD.md §2).

    "official":        G = |M| where |M| > τ, else 0       (ΔW = M·|M| on the survivors)
    "soft_threshold":  G = max(|M| - τ, 0)                   (SNELL, Eq. 5)
    "dense":           G = 1                                 (ΔW = M; only at sparsity 0)
    """
    magnitude = merged.detach().abs()
    if sparsify == "official":
        return torch.where(magnitude > threshold, magnitude, 0.0)
    if sparsify == "soft_threshold":
        return (magnitude - threshold).clamp_min(0.0)
    if sparsify == "dense":
        return torch.ones_like(magnitude)
    raise SnellaError(f"sparsify={sparsify!r}: expected 'official', 'soft_threshold' or 'dense'")


def delta_weight(in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor,
                 sparsity: float, threshold: Optional[Tensor] = None, *, drop_count: Optional[int] = None,
                 kernel: str = "mix", kernel_scale: float = 0.1, sparsify: str = "official") -> Tensor:
    """ΔW_eff = M ⊙ G(|M|, τ) ``(m, n)`` of one layer (docs/METHOD.md §1-2).

    Args:
        in_factors, out_factors, alpha, gamma, beta: the trainable tensors (see module docstring).
        sparsity: s, the fraction of entries set to zero; ``drop_count`` overrides k = round(s·m·n).
        threshold: τ to use (a loaded file's); None selects it on M.
        kernel, kernel_scale, sparsify: the adapter config's ``kernel``, c and survivor rule.
    Returns:
        ΔW_eff, differentiable with respect to the factors and scalars through M only: the gate
        G is detached, so ∂L/∂M = G ⊙ ∂L/∂ΔW (docs/METHOD.md §2).
    """
    merged = merged_matrix(kernel, in_factors, out_factors, alpha, gamma, beta, kernel_scale)
    if threshold is None:
        threshold = select_threshold(merged, sparsity, drop_count)
    return merged * survivor_gate(merged, threshold.to(merged.dtype), sparsify)

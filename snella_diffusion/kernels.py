"""Kernelized merge M = κ(A, B) of docs/METHOD.md §1 over whole matrices, differentiable by autograd.

Shapes: ``in_factors`` A is ``(P, n, d)``, ``out_factors`` B is ``(P, m, d)`` with d = r/P; the
result M is ``(m, n)``, the ``nn.Linear.weight`` layout. Distances use the GEMM identity
||b - a||² = ||b||² + ||a||² - 2·b·a, so no ``(m, n, d)`` tensor is ever built.

``SnellaAdapter.merged_matrix`` uses it where M must carry autograd (``delta_weight`` with
trainable factors, gradient checks); training builds M and its backward block by block in
``blocked``, which also defines ``KernelGrads``, the gradients that backward returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class KernelTerms:
    """Intermediates of one kernel evaluation (all ``(…, m, n)``)."""

    distances: Optional[Tensor] = None  # (P, m, n) per-head Euclidean distances
    kernel: Optional[Tensor] = None  # K = c·(D_0 - D_1)
    softmax: Optional[Tensor] = None  # S = softmax over outputs of K/γ


def head_distances(in_factors: Tensor, out_factors: Tensor) -> Tensor:
    """Euclidean distances between every output and input vector, per head.

    One batched GEMM on augmented factors gives ||b||² + ||a||² - 2·b·a directly:
    [b, ||b||², 1] · [-2a, 1, ||a||²].

    Args:
        in_factors: ``(P, n, d)``.
        out_factors: ``(P, m, d)``.
    Returns:
        ``(P, m, n)`` with entry ``[p, o, i] = ||out_factors[p, o] - in_factors[p, i]||``.
    """
    out_aug = torch.cat(
        [out_factors, out_factors.square().sum(-1, keepdim=True), torch.ones_like(out_factors[..., :1])], -1
    )
    in_aug = torch.cat(
        [in_factors * -2.0, torch.ones_like(in_factors[..., :1]), in_factors.square().sum(-1, keepdim=True)], -1
    )
    squared = torch.bmm(out_aug, in_aug.transpose(1, 2))
    return squared.clamp_min_(0.0).sqrt_()


def kernel_matrix(
    kernel: str,
    in_factors: Tensor,
    out_factors: Tensor,
    alpha: Tensor,
    gamma: Tensor,
    beta: Tensor,
    scale: float,
    keep_terms: bool = False,
) -> tuple[Tensor, KernelTerms]:
    """M = κ(A, B), ``(m, n)``, in the dtype of the factors.

    Args:
        kernel: "mix", "piecewise_linear" or "linear".
        in_factors, out_factors: see module docstring.
        alpha, gamma, beta: 0-d tensors; gamma must already be positive.
        scale: c in K = c·(D_0 - D_1).
        keep_terms: also return the distances, K and the softmax (``KernelTerms``).
    """
    terms = KernelTerms()
    if kernel == "linear":
        out_flat = out_factors.transpose(0, 1).reshape(out_factors.shape[1], -1)
        in_flat = in_factors.transpose(0, 1).reshape(in_factors.shape[1], -1)
        return out_flat @ in_flat.T, terms

    distances = head_distances(in_factors, out_factors)
    kernel_values = torch.sub(distances[0], distances[1]).mul_(scale)
    if keep_terms:
        terms.distances = distances
    else:
        del distances
    if kernel == "piecewise_linear":
        return kernel_values, terms

    softmax = torch.softmax(kernel_values / gamma, dim=0)
    merged = torch.addcmul(kernel_values, softmax, alpha).add_(beta)
    if keep_terms:
        terms.kernel = kernel_values
        terms.softmax = softmax
    return merged, terms

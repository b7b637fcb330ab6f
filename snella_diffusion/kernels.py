"""Kernelized merge M = κ(A, B) of docs/METHOD.md §1, with a hand-written backward.

Shapes: ``in_factors`` A is ``(P, n, d)``, ``out_factors`` B is ``(P, m, d)`` with d = r/P; the
result M is ``(m, n)``, the ``nn.Linear.weight`` layout. Distances use the GEMM identity
||b - a||² = ||b||² + ||a||² - 2·b·a, so no ``(m, n, d)`` tensor is ever built.

The backward is written out instead of left to autograd so that the layer can rebuild M in
its own backward pass (no m×n tensor kept alive between forward and backward) and reduce the
factor gradients to small GEMMs against one coefficient matrix per head:
∂||b - a||/∂b = (b - a)/||b - a||.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class KernelTerms:
    """Intermediates of one kernel evaluation that the backward needs (all ``(…, m, n)``)."""

    distances: Optional[Tensor] = None  # (P, m, n) per-head Euclidean distances
    kernel: Optional[Tensor] = None  # K = c·(D_0 - D_1)
    softmax: Optional[Tensor] = None  # S = softmax over outputs of K/γ


@dataclass
class KernelGrads:
    in_factors: Tensor
    out_factors: Tensor
    alpha: Tensor
    gamma: Tensor
    beta: Tensor


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
        keep_terms: also return the intermediates ``kernel_matrix_backward`` needs.
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


def kernel_matrix_backward(
    kernel: str,
    grad_merged: Tensor,
    in_factors: Tensor,
    out_factors: Tensor,
    alpha: Tensor,
    gamma: Tensor,
    terms: KernelTerms,
    scale: float,
) -> KernelGrads:
    """Gradients of ``sum(grad_merged ⊙ M)`` with respect to the kernel's inputs.

    ``grad_merged`` is ``(m, n)`` and may be overwritten. ``terms`` must come from
    ``kernel_matrix(..., keep_terms=True)`` on the same inputs.
    """
    zero = torch.zeros((), dtype=grad_merged.dtype, device=grad_merged.device)
    if kernel == "linear":
        num_heads, m, width = out_factors.shape
        n = in_factors.shape[1]
        out_flat = out_factors.transpose(0, 1).reshape(m, -1)
        in_flat = in_factors.transpose(0, 1).reshape(n, -1)
        grad_out = (grad_merged @ in_flat).reshape(m, num_heads, width).transpose(0, 1)
        grad_in = (grad_merged.T @ out_flat).reshape(n, num_heads, width).transpose(0, 1)
        return KernelGrads(grad_in.contiguous(), grad_out.contiguous(), zero, zero, zero)

    if kernel == "mix":
        softmax, kernel_values = terms.softmax, terms.kernel
        grad_beta = grad_merged.sum()
        weighted = grad_merged * softmax
        column_sums = weighted.sum(0, keepdim=True)
        grad_alpha = column_sums.sum()
        # ∂L/∂Z for the logits Z = K/γ is α·S ⊙ (g - Σ_o g⊙S) (columns are per input i);
        # ``weighted`` becomes S ⊙ (g - Σ_o g⊙S) in place, α and 1/γ are applied as scalars.
        softmax_grad = weighted.addcmul_(softmax, column_sums, value=-1.0)
        grad_gamma = -alpha / (gamma * gamma) * torch.dot(softmax_grad.reshape(-1), kernel_values.reshape(-1))
        grad_kernel = grad_merged.addcmul_(softmax_grad, alpha / gamma)
        del weighted, softmax_grad
    else:
        grad_alpha = grad_gamma = grad_beta = zero
        grad_kernel = grad_merged

    grad_in = torch.empty_like(in_factors)
    grad_out = torch.empty_like(out_factors)
    for head, sign in ((0, scale), (1, -scale)):
        # C = ∂L/∂D / D, set to 0 where D = 0 (a finite subgradient there); the distance
        # buffer is consumed in place.
        coeff = terms.distances[head].reciprocal_().nan_to_num_(posinf=0.0).mul_(grad_kernel)
        a, b = in_factors[head], out_factors[head]
        # One GEMM gives both C·A and the row sums of C: C·[A, 1] (likewise Cᵀ·[B, 1]).
        row_terms = coeff @ torch.cat([a, torch.ones_like(a[:, :1])], 1)
        column_terms = coeff.T @ torch.cat([b, torch.ones_like(b[:, :1])], 1)
        grad_out[head] = (b * row_terms[:, -1:] - row_terms[:, :-1]).mul_(sign)
        grad_in[head] = (a * column_terms[:, -1:] - column_terms[:, :-1]).mul_(sign)
    return KernelGrads(grad_in, grad_out, grad_alpha, grad_gamma, grad_beta)

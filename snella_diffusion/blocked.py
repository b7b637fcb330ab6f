"""Blocked evaluation of one SNELLA layer: the merged weight and the backward, a slab at a time.

Every step of M = κ(A, B) is elementwise except the softmax, which runs over the outputs of
one input. So the entries that belong to a few inputs i (a few columns of M) depend on nothing
else, and the layer is evaluated in column blocks ``(m, b)`` of about ``BLOCK_ENTRIES`` entries
that stay in cache while the distances, the kernel, the softmax, the gate, the merge with W0
and, in backward, the coefficient matrix are computed on them. On a CPU, where each pass over
the m·n entries of a whole matrix is memory-bound, this replaces some thirty passes over main
memory per build with one write of the result.

Shapes: ``in_factors`` A ``(P, n, d)``, ``out_factors`` B ``(P, m, d)``, M ``(m, n)`` (the
``nn.Linear.weight`` layout); the scalars are 0-d tensors, gamma positive. ``block_entries``
overrides the per-device block size (``block_entries_for``).

Measured on SD1.5's 160 adapted layers (242 M entries, 2-core CPU): the per-step work of the
three builds, τ selection and the factor backward took 4.8–6.7 s blocked against 10.0 s
for the whole-matrix version and 7.4 s for that version compiled with Inductor.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from .kernels import KernelGrads
from .sparsify import survivor_gate

BLOCK_ENTRIES = 1 << 19  # CPU: 2 MiB of float32 per buffer, a block's working set fits in L3
ACCELERATOR_BLOCK_ENTRIES = 1 << 24  # GPU: few blocks, so few kernel launches
BLOCK_ALIGN = 16


def block_entries_for(device: torch.device, block_entries: Optional[int] = None) -> int:
    """``block_entries`` if given, else the default for ``device``'s type."""
    if block_entries:
        return block_entries
    return BLOCK_ENTRIES if torch.device(device).type == "cpu" else ACCELERATOR_BLOCK_ENTRIES


def column_blocks(columns: int, column_length: int, block_entries: int) -> Iterator[slice]:
    """Consecutive column slices of about ``block_entries`` entries each, their widths a
    multiple of ``BLOCK_ALIGN`` (whole cache lines of the row-major weight) unless that is all."""
    width = block_entries // max(1, column_length)
    width = max(BLOCK_ALIGN, width - width % BLOCK_ALIGN)
    for start in range(0, columns, width):
        yield slice(start, min(columns, start + width))


class _Factors:
    """The factors laid out once per call for the block products.

    For distance kernels: ``out_augmented`` ``(P, m, d+2)`` = c²·[b, ||b||², 1] and
    ``in_augmented_t`` ``(P, d+2, n)`` = [-2a, 1, ||a||²]ᵀ, so one batched GEMM and a square
    root give a block of scaled distances |c|·D. For the linear kernel: heads concatenated,
    ``in_flat`` ``(n, r)`` and ``out_flat`` ``(m, r)``.
    """

    def __init__(self, kernel: str, in_factors: Tensor, out_factors: Tensor, scale: float) -> None:
        self.kernel = kernel
        if kernel == "linear":
            self.in_flat = in_factors.transpose(0, 1).reshape(in_factors.shape[1], -1)
            self.out_flat = out_factors.transpose(0, 1).reshape(out_factors.shape[1], -1)
            return
        # K = c·(D_0 - D_1) = |c|·D_first - |c|·D_second with the heads swapped for c < 0.
        self.first, self.second = (0, 1) if scale >= 0 else (1, 0)
        ones_in = torch.ones_like(in_factors[..., :1])
        ones_out = torch.ones_like(out_factors[..., :1])
        out_augmented = torch.cat([out_factors, out_factors.square().sum(-1, keepdim=True), ones_out], -1)
        self.out_augmented = out_augmented.mul_(scale * scale)
        self.in_augmented_t = torch.cat(
            [in_factors * -2.0, ones_in, in_factors.square().sum(-1, keepdim=True)], -1
        ).transpose(1, 2).contiguous()


class _Workspace:
    """Block-sized scratch tensors reused by every block of one call. Allocating them afresh
    per block costs more than the arithmetic on them: allocations of this size are returned to
    the system when freed, and their pages are faulted in again on every block."""

    def __init__(self, rows: int, width: int, like: Tensor) -> None:
        self.rows, self.width, self.like = rows, width, like
        self.buffers: dict[str, Tensor] = {}
        self.views: dict[tuple[str, int], Tensor] = {}

    def take(self, name: str, columns: int, heads: int = 0) -> Tensor:
        """The buffer ``name`` as a contiguous ``(rows, columns)`` (or ``(heads, rows, columns)``)."""
        view = self.views.get((name, columns))
        if view is not None:
            return view
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = torch.empty(max(1, heads) * self.rows * self.width, dtype=self.like.dtype,
                                 device=self.like.device)
            self.buffers[name] = buffer
        shape = (heads, self.rows, columns) if heads else (self.rows, columns)
        view = buffer[: max(1, heads) * self.rows * columns].view(shape)
        self.views[(name, columns)] = view
        return view


def _plan(n: int, m: int, like: Tensor, block_entries: Optional[int]) -> tuple[list[slice], _Workspace]:
    """The column blocks of an ``(m, n)`` matrix and a workspace for the widest of them."""
    blocks = list(column_blocks(n, m, block_entries_for(like.device, block_entries)))
    width = max((c.stop - c.start for c in blocks), default=0)
    return blocks, _Workspace(m, width, like)


class _Block:
    """One column block ``(m, b)`` of M with what its backward needs: the scaled per-head
    distances |c|·D ``(P, m, b)``, K + β (the softmax logits times γ, shifted by β, which the
    softmax ignores) and the softmax S. All of them live in ``workspace``."""

    def __init__(self, factors: _Factors, columns: slice, alpha: Tensor, gamma: Tensor, beta: Tensor,
                 keep_softmax: bool, workspace: _Workspace) -> None:
        self.distances = self.shifted = self.softmax = None
        width = columns.stop - columns.start
        merged = workspace.take("merged", width)
        if factors.kernel == "linear":
            self.merged = torch.mm(factors.out_flat, factors.in_flat[columns].T, out=merged)
            return
        squared = torch.bmm(factors.out_augmented, factors.in_augmented_t[:, :, columns],
                            out=workspace.take("distances", width, heads=2))
        self.distances = squared.clamp_min_(0.0).sqrt_()
        kernel_values = torch.sub(self.distances[factors.first], self.distances[factors.second], out=merged)
        if factors.kernel == "piecewise_linear":
            self.merged = kernel_values
            return
        self.shifted = torch.add(kernel_values, beta, out=workspace.take("shifted", width))
        inverse_gamma = gamma.reciprocal()
        # exp((K - max_o K)/γ) in one fused pass, then the per-input sums.
        exps = torch.addcmul(_column_max(self.shifted).mul_(-inverse_gamma), self.shifted, inverse_gamma,
                             out=workspace.take("softmax", width)).exp_()
        sums = exps.sum(0, keepdim=True)
        # The same expression in forward and backward, so both build bit-identical weights.
        self.merged = torch.addcmul(self.shifted, exps, alpha / sums, out=merged)
        if keep_softmax:
            self.softmax = exps.mul_(sums.reciprocal_())


def _column_max(block: Tensor) -> Tensor:
    """max over rows of an ``(m, b)`` block, ``(1, b)``. ``amax(0)`` on a tall narrow block is
    several times slower than on a wide one, so rows are first folded into the width."""
    rows, width = block.shape
    fold = 1
    while fold < 16 and rows % (2 * fold) == 0:
        fold *= 2
    return block.view(rows // fold, fold * width).amax(0).view(fold, width).amax(0, keepdim=True)


def _gate(merged: Tensor, threshold: Tensor, sparsify_mode: str, workspace: _Workspace) -> Tensor:
    """G(|M|, τ) of a block, in the workspace (see ``sparsify.survivor_gate``)."""
    magnitude = torch.abs(merged, out=workspace.take("gate", merged.shape[1]))
    if sparsify_mode == "official" and magnitude.device.type == "cpu":
        # One pass instead of compare-and-multiply; reading τ back costs nothing on a CPU.
        return torch.threshold_(magnitude, float(threshold), 0.0)
    return survivor_gate(magnitude, threshold, sparsify_mode)


def _write_effective(target: Tensor, columns: slice, merged: Tensor, gate: Tensor, scale: float,
                     weight: Optional[Tensor]) -> None:
    """``target[:, columns]`` = scale·M⊙G (+ W0[:, columns]); consumes ``gate``."""
    delta = gate.mul_(merged)
    if weight is None:
        torch.mul(delta, scale, out=target[:, columns])
    else:
        torch.add(weight[:, columns], delta, alpha=scale, out=target[:, columns])


def _result(out: Optional[Tensor], m: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``out`` checked to be a contiguous ``(m, n)`` ``dtype`` tensor, or a new one."""
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({m}, {n}) {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return out


def merged_blocked(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                   beta: Tensor, scale: float, block_entries: Optional[int] = None,
                   out: Optional[Tensor] = None) -> Tensor:
    """M = κ(A, B) ``(m, n)`` in the factors' dtype (written into ``out`` when given)."""
    factors = _Factors(kernel, in_factors, out_factors, scale)
    n, m = in_factors.shape[1], out_factors.shape[1]
    result = _result(out, m, n, in_factors.dtype, in_factors.device)
    blocks, workspace = _plan(n, m, in_factors, block_entries)
    for columns in blocks:
        result[:, columns] = _Block(factors, columns, alpha, gamma, beta, False, workspace).merged
    return result


def effective_blocked(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                      beta: Tensor, kernel_scale: float, threshold: Tensor, sparsify_mode: str, scale: float,
                      weight: Optional[Tensor], out_dtype: torch.dtype, merged: Optional[Tensor] = None,
                      block_entries: Optional[int] = None, out: Optional[Tensor] = None) -> Tensor:
    """W0 + scale·ΔW_eff ``(m, n)`` in ``out_dtype``, ΔW_eff = M ⊙ G(|M|, τ).

    Args:
        weight: the frozen W0 ``(m, n)``, or None for scale·ΔW_eff alone.
        merged: M when already built (it is then read, not rebuilt).
        out: where to write the result (contiguous, ``out_dtype``).
    """
    n, m = in_factors.shape[1], out_factors.shape[1]
    factors = None if merged is not None else _Factors(kernel, in_factors, out_factors, kernel_scale)
    result = _result(out, m, n, out_dtype, in_factors.device)
    blocks, workspace = _plan(n, m, in_factors, block_entries)
    for columns in blocks:
        if merged is None:
            block = _Block(factors, columns, alpha, gamma, beta, False, workspace).merged
        else:
            block = merged[:, columns]
        _write_effective(result, columns, block, _gate(block, threshold, sparsify_mode, workspace), scale, weight)
    return result


def backward_blocked(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                     beta: Tensor, kernel_scale: float, threshold: Tensor, sparsify_mode: str, scale: float,
                     grad_delta: Tensor, weight: Optional[Tensor], effective_dtype: Optional[torch.dtype],
                     block_entries: Optional[int] = None,
                     effective_out: Optional[Tensor] = None) -> tuple[KernelGrads, Optional[Tensor]]:
    """Gradients of the factors and scalars, and optionally the forward weight, in one blocked pass.

    Args:
        grad_delta: ∂L/∂(W0 + scale·ΔW_eff) ``(m, n)`` in the factors' dtype, gᵀx (the gate is
            detached).
        weight, effective_dtype: when ``effective_dtype`` is given, the pass also returns
            W0 + scale·ΔW_eff ``(m, n)`` in that dtype, for the input gradient (written into
            ``effective_out`` when given).
    Returns:
        The gradients, and the effective weight or None.
    """
    n, m = in_factors.shape[1], out_factors.shape[1]
    factors = _Factors(kernel, in_factors, out_factors, kernel_scale)
    effective = None
    if effective_dtype is not None:
        effective = _result(effective_out, m, n, effective_dtype, in_factors.device)
    zero = torch.zeros((), dtype=grad_delta.dtype, device=grad_delta.device)
    grad_alpha, grad_gamma_dot, grad_beta = zero.clone(), zero.clone(), zero.clone()
    if kernel == "linear":
        grad_in_flat = torch.empty_like(factors.in_flat)
        grad_out_flat = torch.zeros_like(factors.out_flat)
    else:
        # Per head: [Σ_o C·b_o, Σ_o C] for each input and [Σ_i C·a_i, Σ_i C] for each output.
        out_extended = torch.cat([out_factors, torch.ones_like(out_factors[..., :1])], -1)
        in_extended = torch.cat([in_factors, torch.ones_like(in_factors[..., :1])], -1)
        in_terms = torch.empty_like(in_extended)
        out_terms = torch.zeros_like(out_extended)
    ratio = alpha / gamma
    blocks, workspace = _plan(n, m, in_factors, block_entries)
    for columns in blocks:
        width = columns.stop - columns.start
        block = _Block(factors, columns, alpha, gamma, beta, True, workspace)
        gate = _gate(block.merged, threshold, sparsify_mode, workspace)
        grad_merged = torch.mul(grad_delta[:, columns], gate, out=workspace.take("grad_merged", width))
        if scale != 1.0:
            grad_merged.mul_(scale)
        if effective is not None:
            _write_effective(effective, columns, block.merged, gate, scale, weight)
        del gate
        if kernel == "linear":
            grad_in_flat[columns] = grad_merged.T @ factors.out_flat
            grad_out_flat.addmm_(grad_merged, factors.in_flat[columns])
            continue
        if kernel == "mix":
            grad_beta += grad_merged.sum()
            weighted = torch.mul(grad_merged, block.softmax, out=workspace.take("weighted", width))
            output_sums = weighted.sum(0, keepdim=True)
            grad_alpha += output_sums.sum()
            # ∂L/∂Z for the logits Z = K/γ is α·S ⊙ (g - Σ_o g⊙S); α/γ is applied below. The
            # β in the shifted K drops out of the dot: each column of S ⊙ (g - Σ_o g⊙S) sums to 0.
            softmax_grad = weighted.addcmul_(block.softmax, output_sums, value=-1.0)
            grad_gamma_dot += torch.dot(softmax_grad.reshape(-1), block.shifted.reshape(-1))
            grad_merged.addcmul_(softmax_grad, ratio)
            del weighted, softmax_grad
        # Per head, |c|·C = ∂L/∂K / (|c|·D), 0 where D = 0 (a finite subgradient there); ±c² is
        # applied at the end.
        coeff = torch.div(grad_merged, block.distances, out=block.distances)
        coeff = coeff.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        in_terms[:, columns] = torch.bmm(coeff.transpose(1, 2), out_extended)
        out_terms.baddbmm_(coeff, in_extended[:, columns])
    if kernel == "linear":
        heads, width = in_factors.shape[0], in_factors.shape[2]
        grad_in = grad_in_flat.reshape(n, heads, width).transpose(0, 1).contiguous()
        grad_out = grad_out_flat.reshape(m, heads, width).transpose(0, 1).contiguous()
        return KernelGrads(grad_in, grad_out, zero, zero, zero), effective
    # ∂K/∂D_0 = c, ∂K/∂D_1 = -c; one more |c| undoes the scaled distances.
    factor = kernel_scale * abs(kernel_scale)
    signs = torch.tensor([factor, -factor], dtype=in_factors.dtype, device=in_factors.device).view(2, 1, 1)
    grad_in = (in_factors * in_terms[..., -1:] - in_terms[..., :-1]).mul_(signs)
    grad_out = (out_factors * out_terms[..., -1:] - out_terms[..., :-1]).mul_(signs)
    if kernel != "mix":
        return KernelGrads(grad_in, grad_out, zero, zero, zero), effective
    return KernelGrads(grad_in, grad_out, grad_alpha, -ratio / gamma * grad_gamma_dot, grad_beta), effective

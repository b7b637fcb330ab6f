"""Blocked evaluation of one SNELLA layer: the merged weight and the backward, a slab at a time.

Every step of M = κ(A, B) is elementwise except the softmax, which runs over the outputs of
one input. So the entries that belong to a few inputs i (a few columns of M) depend on nothing
else, and the layer is evaluated in column blocks ``(m, b)`` of about ``BLOCK_ENTRIES`` entries
that stay in cache while the distances, the kernel, the softmax, the gate, the merge with W0
and, in backward, the coefficient matrix are computed on them. On a CPU, where each pass over
the m·n entries of a whole matrix is memory-bound, this replaces some thirty passes over main
memory per build with one write of the result.

Every entry point takes the same grouped arguments: a ``KernelSpec`` (which κ, its scale c
and the survivor rule, in the file format's names) and a ``Factors`` (A, B, α, γ, β). The
kernel kind is looked up once, when the spec is made, in a table of three small classes
(``_LinearMerge``, ``_DistanceMerge``, ``_MixMerge``) that build a block of M and add a
block's share of the factor gradients.

Shapes: ``in_factors`` A ``(P, n, d)``, ``out_factors`` B ``(P, m, d)``, M ``(m, n)`` (the
``nn.Linear.weight`` layout); the scalars are 0-d tensors, gamma positive. ``block_entries``
overrides the per-device block size (``block_entries_for``).

This is the only fast path. Measured on SD1.5's 160 adapted layers (242 M entries, 2-core
CPU): the per-step work of the three builds, τ selection and the factor backward took
4.8–6.7 s blocked against 10.0 s for the whole-matrix version and 7.4 s for that version
compiled with Inductor, so the compiled whole-matrix path (``compile_kernels``, formerly
``fused.py``) never won and was retired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from .errors import SnellaError
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


@dataclass
class KernelGrads:
    """Gradients of a loss with respect to the ``Factors``, in their shapes."""

    in_factors: Tensor
    out_factors: Tensor
    alpha: Tensor
    gamma: Tensor
    beta: Tensor


@dataclass(frozen=True, eq=False)
class Factors:
    """The tensors of one adapter that ΔW is built from.

    ``in_factors`` A ``(P, n, d)``, ``out_factors`` B ``(P, m, d)``; ``alpha``, ``gamma``
    (already clamped positive, the softmax temperature) and ``beta`` are 0-d. All in one dtype
    for the blocked functions (``in_compute_dtype``).
    """

    in_factors: Tensor
    out_factors: Tensor
    alpha: Tensor
    gamma: Tensor
    beta: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of M."""
        return self.out_factors.shape[1], self.in_factors.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(in_factors, out_factors, alpha, gamma, beta)``."""
        return self.in_factors, self.out_factors, self.alpha, self.gamma, self.beta

    def in_compute_dtype(self) -> Factors:
        """The factors in float32, or float64 when they are float64 (gradient checks); no copy
        where they already are."""
        dtype = torch.promote_types(self.in_factors.dtype, torch.float32)
        return Factors(*(t.to(dtype) for t in self.tensors()))


@dataclass(frozen=True)
class KernelSpec:
    """How one adapter turns its factors into ΔW_eff, in the file format's names.

    Attributes:
        kernel: κ, "mix", "piecewise_linear" or "linear".
        kernel_scale: c in K = c·(D_0 - D_1) (unused by "linear").
        sparsify: the survivor rule G(|M|, τ) (``sparsify.survivor_gate``).
    """

    kernel: str
    kernel_scale: float
    sparsify: str
    _merge: type = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kernel not in _MERGES:
            raise SnellaError(f"kernel={self.kernel!r}: expected one of {', '.join(_MERGES)}")
        object.__setattr__(self, "_merge", _MERGES[self.kernel])

    def merge(self, factors: Factors) -> _Merge:
        """This kernel's block builder for ``factors``."""
        return self._merge(factors, self.kernel_scale)


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
    softmax ignores) and the softmax S (None where the kernel has none). All of them live in the
    call's workspace."""

    def __init__(self, merged: Tensor, distances: Optional[Tensor] = None, shifted: Optional[Tensor] = None,
                 softmax: Optional[Tensor] = None) -> None:
        self.merged, self.distances, self.shifted, self.softmax = merged, distances, shifted, softmax


class _LinearMerge:
    """κ = "linear": M = B·Aᵀ with the heads concatenated, ``in_flat`` ``(n, r)`` and
    ``out_flat`` ``(m, r)``; the backward sums ∂L/∂A and ∂L/∂B block by block."""

    def __init__(self, factors: Factors, kernel_scale: float) -> None:
        self.factors = factors
        in_factors, out_factors = factors.in_factors, factors.out_factors
        self.in_flat = in_factors.transpose(0, 1).reshape(in_factors.shape[1], -1)
        self.out_flat = out_factors.transpose(0, 1).reshape(out_factors.shape[1], -1)

    def block(self, columns: slice, workspace: _Workspace, keep_softmax: bool) -> _Block:
        """Columns ``columns`` of M."""
        merged = workspace.take("merged", columns.stop - columns.start)
        return _Block(torch.mm(self.out_flat, self.in_flat[columns].T, out=merged))

    def start_backward(self, zero: Tensor) -> None:
        """Allocate the gradient sums; ``zero`` is a 0-d zero in the gradients' dtype."""
        self.zero = zero
        self.grad_in_flat = torch.empty_like(self.in_flat)
        self.grad_out_flat = torch.zeros_like(self.out_flat)

    def add_block_gradients(self, block: _Block, grad_merged: Tensor, columns: slice,
                            workspace: _Workspace) -> None:
        """Add the block's share, given ∂L/∂M of the block ``(m, b)`` (may be overwritten)."""
        self.grad_in_flat[columns] = grad_merged.T @ self.out_flat
        self.grad_out_flat.addmm_(grad_merged, self.in_flat[columns])

    def gradients(self) -> KernelGrads:
        """The summed gradients; α, γ and β get zeros."""
        in_factors = self.factors.in_factors
        heads, width = in_factors.shape[0], in_factors.shape[2]
        m, n = self.factors.shape
        grad_in = self.grad_in_flat.reshape(n, heads, width).transpose(0, 1).contiguous()
        grad_out = self.grad_out_flat.reshape(m, heads, width).transpose(0, 1).contiguous()
        return KernelGrads(grad_in, grad_out, self.zero, self.zero, self.zero)


class _DistanceMerge:
    """κ = "piecewise_linear": M = K = c·(D_0 - D_1) of the per-head distances.

    The factors are laid out once per call: ``out_augmented`` ``(P, m, d+2)`` =
    c²·[b, ||b||², 1] and ``in_augmented_t`` ``(P, d+2, n)`` = [-2a, 1, ||a||²]ᵀ, so one
    batched GEMM and a square root give a block of scaled distances |c|·D.
    """

    def __init__(self, factors: Factors, kernel_scale: float) -> None:
        self.factors, self.kernel_scale = factors, kernel_scale
        in_factors, out_factors = factors.in_factors, factors.out_factors
        # K = c·(D_0 - D_1) = |c|·D_first - |c|·D_second with the heads swapped for c < 0.
        self.first, self.second = (0, 1) if kernel_scale >= 0 else (1, 0)
        ones_in = torch.ones_like(in_factors[..., :1])
        ones_out = torch.ones_like(out_factors[..., :1])
        out_augmented = torch.cat([out_factors, out_factors.square().sum(-1, keepdim=True), ones_out], -1)
        self.out_augmented = out_augmented.mul_(kernel_scale * kernel_scale)
        self.in_augmented_t = torch.cat(
            [in_factors * -2.0, ones_in, in_factors.square().sum(-1, keepdim=True)], -1
        ).transpose(1, 2).contiguous()

    def _kernel_block(self, columns: slice, workspace: _Workspace) -> tuple[Tensor, Tensor]:
        """The scaled distances |c|·D ``(P, m, b)`` and K ``(m, b)`` of the block (K is
        written into the workspace's "merged" buffer)."""
        width = columns.stop - columns.start
        merged = workspace.take("merged", width)
        squared = torch.bmm(self.out_augmented, self.in_augmented_t[:, :, columns],
                            out=workspace.take("distances", width, heads=2))
        distances = squared.clamp_min_(0.0).sqrt_()
        return distances, torch.sub(distances[self.first], distances[self.second], out=merged)

    def block(self, columns: slice, workspace: _Workspace, keep_softmax: bool) -> _Block:
        """Columns ``columns`` of M with their distances."""
        distances, kernel_values = self._kernel_block(columns, workspace)
        return _Block(kernel_values, distances)

    def start_backward(self, zero: Tensor) -> None:
        """Allocate the gradient sums; ``zero`` is a 0-d zero in the gradients' dtype."""
        self.zero = zero
        in_factors, out_factors = self.factors.in_factors, self.factors.out_factors
        # Per head: [Σ_o C·b_o, Σ_o C] for each input and [Σ_i C·a_i, Σ_i C] for each output.
        self.out_extended = torch.cat([out_factors, torch.ones_like(out_factors[..., :1])], -1)
        self.in_extended = torch.cat([in_factors, torch.ones_like(in_factors[..., :1])], -1)
        self.in_terms = torch.empty_like(self.in_extended)
        self.out_terms = torch.zeros_like(self.out_extended)

    def add_block_gradients(self, block: _Block, grad_merged: Tensor, columns: slice,
                            workspace: _Workspace) -> None:
        """Add the block's share, given ∂L/∂K of the block ``(m, b)``; consumes the block's
        distances."""
        # Per head, |c|·C = ∂L/∂K / (|c|·D), 0 where D = 0 (a finite subgradient there); ±c² is
        # applied at the end.
        coeff = torch.div(grad_merged, block.distances, out=block.distances)
        coeff = coeff.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        self.in_terms[:, columns] = torch.bmm(coeff.transpose(1, 2), self.out_extended)
        self.out_terms.baddbmm_(coeff, self.in_extended[:, columns])

    def gradients(self) -> KernelGrads:
        """The summed gradients of A and B; α, γ and β get zeros."""
        in_factors, out_factors = self.factors.in_factors, self.factors.out_factors
        # ∂K/∂D_0 = c, ∂K/∂D_1 = -c; one more |c| undoes the scaled distances.
        factor = self.kernel_scale * abs(self.kernel_scale)
        signs = torch.tensor([factor, -factor], dtype=in_factors.dtype, device=in_factors.device).view(2, 1, 1)
        grad_in = (in_factors * self.in_terms[..., -1:] - self.in_terms[..., :-1]).mul_(signs)
        grad_out = (out_factors * self.out_terms[..., -1:] - self.out_terms[..., :-1]).mul_(signs)
        return KernelGrads(grad_in, grad_out, self.zero, self.zero, self.zero)


class _MixMerge(_DistanceMerge):
    """κ = "mix": M = K + α·softmax_o(K/γ) + β over the outputs o of each input."""

    def block(self, columns: slice, workspace: _Workspace, keep_softmax: bool) -> _Block:
        """Columns ``columns`` of M with their distances, K + β and (``keep_softmax``) S."""
        width = columns.stop - columns.start
        distances, kernel_values = self._kernel_block(columns, workspace)
        alpha, gamma, beta = self.factors.alpha, self.factors.gamma, self.factors.beta
        shifted = torch.add(kernel_values, beta, out=workspace.take("shifted", width))
        inverse_gamma = gamma.reciprocal()
        # exp((K - max_o K)/γ) in one fused pass, then the per-input sums.
        exps = torch.addcmul(_column_max(shifted).mul_(-inverse_gamma), shifted, inverse_gamma,
                             out=workspace.take("softmax", width)).exp_()
        sums = exps.sum(0, keepdim=True)
        # The same expression in forward and backward, so both build bit-identical weights.
        merged = torch.addcmul(shifted, exps, alpha / sums, out=kernel_values)
        softmax = exps.mul_(sums.reciprocal_()) if keep_softmax else None
        return _Block(merged, distances, shifted, softmax)

    def start_backward(self, zero: Tensor) -> None:
        """Allocate the gradient sums, the scalars' included."""
        super().start_backward(zero)
        self.grad_alpha, self.grad_gamma_dot, self.grad_beta = zero.clone(), zero.clone(), zero.clone()
        self.ratio = self.factors.alpha / self.factors.gamma

    def add_block_gradients(self, block: _Block, grad_merged: Tensor, columns: slice,
                            workspace: _Workspace) -> None:
        """Add the block's share, given ∂L/∂M of the block ``(m, b)`` (overwritten with ∂L/∂K)."""
        self.grad_beta += grad_merged.sum()
        weighted = torch.mul(grad_merged, block.softmax, out=workspace.take("weighted", columns.stop - columns.start))
        output_sums = weighted.sum(0, keepdim=True)
        self.grad_alpha += output_sums.sum()
        # ∂L/∂Z for the logits Z = K/γ is α·S ⊙ (g - Σ_o g⊙S); α/γ is applied below. The
        # β in the shifted K drops out of the dot: each column of S ⊙ (g - Σ_o g⊙S) sums to 0.
        softmax_grad = weighted.addcmul_(block.softmax, output_sums, value=-1.0)
        self.grad_gamma_dot += torch.dot(softmax_grad.reshape(-1), block.shifted.reshape(-1))
        grad_merged.addcmul_(softmax_grad, self.ratio)
        del weighted, softmax_grad
        super().add_block_gradients(block, grad_merged, columns, workspace)

    def gradients(self) -> KernelGrads:
        """The summed gradients of A, B, α, γ and β."""
        grads = super().gradients()
        grad_gamma = -self.ratio / self.factors.gamma * self.grad_gamma_dot
        return KernelGrads(grads.in_factors, grads.out_factors, self.grad_alpha, grad_gamma, self.grad_beta)


_Merge = Union[_LinearMerge, _DistanceMerge, _MixMerge]
# The kernel kinds, looked up once per KernelSpec.
_MERGES: dict[str, type] = {"linear": _LinearMerge, "piecewise_linear": _DistanceMerge, "mix": _MixMerge}


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


def merged_blocked(spec: KernelSpec, factors: Factors, block_entries: Optional[int] = None,
                   out: Optional[Tensor] = None) -> Tensor:
    """M = κ(A, B) ``(m, n)`` in the factors' dtype (written into ``out`` when given)."""
    merge = spec.merge(factors)
    m, n = factors.shape
    result = _result(out, m, n, factors.in_factors.dtype, factors.in_factors.device)
    blocks, workspace = _plan(n, m, factors.in_factors, block_entries)
    for columns in blocks:
        result[:, columns] = merge.block(columns, workspace, False).merged
    return result


def effective_blocked(spec: KernelSpec, factors: Factors, threshold: Tensor, scale: float,
                      weight: Optional[Tensor], out_dtype: torch.dtype, merged: Optional[Tensor] = None,
                      block_entries: Optional[int] = None, out: Optional[Tensor] = None) -> Tensor:
    """W0 + scale·ΔW_eff ``(m, n)`` in ``out_dtype``, ΔW_eff = M ⊙ G(|M|, τ).

    Args:
        threshold: τ, 0-d.
        scale: the factor s on ΔW_eff (an adapter weight).
        weight: the frozen W0 ``(m, n)``, or None for scale·ΔW_eff alone.
        merged: M when already built (it is then read, not rebuilt; the factors then only lend
            their shapes, dtype and device).
        out: where to write the result (contiguous, ``out_dtype``).
    """
    m, n = factors.shape
    merge = None if merged is not None else spec.merge(factors)
    result = _result(out, m, n, out_dtype, factors.in_factors.device)
    blocks, workspace = _plan(n, m, factors.in_factors, block_entries)
    for columns in blocks:
        block = merge.block(columns, workspace, False).merged if merged is None else merged[:, columns]
        _write_effective(result, columns, block, _gate(block, threshold, spec.sparsify, workspace), scale, weight)
    return result


def backward_blocked(spec: KernelSpec, factors: Factors, threshold: Tensor, scale: float, grad_delta: Tensor,
                     weight: Optional[Tensor], effective_dtype: Optional[torch.dtype],
                     block_entries: Optional[int] = None,
                     effective_out: Optional[Tensor] = None) -> tuple[KernelGrads, Optional[Tensor]]:
    """Gradients of the factors and scalars, and optionally the forward weight, in one blocked pass.

    Args:
        threshold, scale: as in ``effective_blocked``.
        grad_delta: ∂L/∂(W0 + scale·ΔW_eff) ``(m, n)`` in the factors' dtype, gᵀx (the gate is
            detached).
        weight, effective_dtype: when ``effective_dtype`` is given, the pass also returns
            W0 + scale·ΔW_eff ``(m, n)`` in that dtype, for the input gradient (written into
            ``effective_out`` when given).
    Returns:
        The gradients, and the effective weight or None.
    """
    m, n = factors.shape
    merge = spec.merge(factors)
    effective = None
    if effective_dtype is not None:
        effective = _result(effective_out, m, n, effective_dtype, factors.in_factors.device)
    merge.start_backward(torch.zeros((), dtype=grad_delta.dtype, device=grad_delta.device))
    blocks, workspace = _plan(n, m, factors.in_factors, block_entries)
    for columns in blocks:
        width = columns.stop - columns.start
        block = merge.block(columns, workspace, True)
        gate = _gate(block.merged, threshold, spec.sparsify, workspace)
        grad_merged = torch.mul(grad_delta[:, columns], gate, out=workspace.take("grad_merged", width))
        if scale != 1.0:
            grad_merged.mul_(scale)
        if effective is not None:
            _write_effective(effective, columns, block.merged, gate, scale, weight)
        del gate
        merge.add_block_gradients(block, grad_merged, columns, workspace)
    return merge.gradients(), effective

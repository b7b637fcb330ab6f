"""The memory-lean product of a SNELLA layer: ``snella_linear`` and its autograd function.

Training goes through ``_SnellaLinearFunction``, a custom autograd function that builds
W0 + ΔW_eff, ΔW_eff = sparsify(κ(A, B)), in its forward, uses it for one GEMM, drops it, and
rebuilds it in its backward, where one pass also gives the factor gradients. Both run in
cache-sized column blocks (``blocked``); the weight-sized results borrow reused buffers
(``scratch.idle_buffers``). Nothing of size m×n lives from forward to backward (unless a
``forward_cache_mb`` budget asks to keep W0 + ΔW_eff in ``forward_cache.kept_weights``): the
saved tensors are the input, the (frozen) base weight, the factors, three scalars and τ.

Precision: the merged GEMM runs only where it loses nothing, in float32 (or float64). With
fp16/bf16 products (half-precision activations or autocast) W0 + ΔW_eff would round most of
ΔW_eff away, so ``snella_linear`` applies ``x·W0ᵀ + x·ΔW_effᵀ`` as two products instead, in
the forward, the backward and the forward cache alike; the factors and ΔW_eff stay float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocked import Factors, backward_blocked, effective_blocked, merged_blocked
from .errors import SnellaError
from .forward_cache import in_backward, kept_weights
from .quantized import FLOAT8_DTYPES, is_packed
from .scratch import idle_buffers

if TYPE_CHECKING:
    from .adapter import SnellaAdapter


def gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype a layer's products with ``x`` run in: the autocast dtype where autocast is on
    for ``x``'s device type, else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def merges_exactly(dtype: torch.dtype) -> bool:
    """Whether W0 + ΔW_eff held in ``dtype`` keeps ΔW_eff: true for float32 and float64.

    A bf16 (fp16) weight of magnitude 0.02 has a spacing of about 1.2e-4 (1.5e-5), so in a
    half-precision W0 + ΔW_eff every ΔW entry below half that spacing rounds away and the
    larger ones lose their low bits, while ΔW_eff alone cast to the same dtype keeps its
    relative precision (~2^-8 for bf16, ~2^-11 for fp16).
    """
    return torch.finfo(dtype).bits >= 32


class _SnellaLinearFunction(torch.autograd.Function):
    """y = x·(W0 + scale·ΔW_eff)ᵀ + b (or x·(scale·ΔW_eff)ᵀ with no base weight).

    ΔW_eff is rebuilt in backward instead of being saved (or taken from the forward cache).
    ``snella_linear`` passes a base weight only when the products run in float32/float64
    (``merges_exactly``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, in_factors, out_factors, alpha, gamma, beta, adapter, scale):
        factors = Factors(in_factors, out_factors, alpha, gamma, beta).in_compute_dtype()
        out_dtype = gemm_dtype(x)
        cache_key = _forward_cache_key(adapter, scale, out_dtype, weight) if adapter.forward_cache_bytes else None
        effective = kept_weights.lookup(adapter, cache_key) if cache_key is not None else None
        threshold = adapter.cached_threshold()
        if effective is not None and threshold is not None:
            threshold = threshold.to(factors.in_factors.dtype)
            kept = True
        else:
            effective, threshold = _build_effective(adapter, factors, threshold, scale, weight, out_dtype)
            kept = cache_key is not None and kept_weights.store(
                adapter, cache_key, effective, adapter.forward_cache_bytes, not in_backward()
            )
        output = F.linear(x, effective, bias)
        if not kept:
            idle_buffers.give_back(effective)
        del effective
        ctx.save_for_backward(x, weight, in_factors, out_factors, alpha, gamma, beta, threshold)
        ctx.spec = adapter.spec
        ctx.adapter = adapter
        ctx.cache_key = cache_key
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, in_factors, out_factors, alpha, gamma, beta, threshold = ctx.saved_tensors
        factors = Factors(in_factors, out_factors, alpha, gamma, beta).in_compute_dtype()
        dtype = factors.in_factors.dtype
        out_features, in_features = shape = factors.shape
        grad_x = grad_bias = None
        flat_grad = grad_output.reshape(-1, out_features)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        # Under autocast the output (hence grad_output) may be bf16/fp16 while x is float32.
        common = torch.promote_types(flat_grad.dtype, x.dtype)
        grad_delta = torch.matmul(flat_grad.T.to(common), x.reshape(-1, in_features).to(common),
                                  out=idle_buffers.borrow(shape, common, x.device)).to(dtype)
        cached = None
        if ctx.cache_key is not None:
            cached = kept_weights.lookup(ctx.adapter, ctx.cache_key)
            kept_weights.drop(ctx.adapter)
        effective_dtype = grad_output.dtype if ctx.needs_input_grad[0] and cached is None else None
        # One blocked pass rebuilds M and gives both the factor gradients and, for the input
        # gradient, the forward weight (unless the forward cache still holds it).
        effective_out = None if effective_dtype is None else idle_buffers.borrow(shape, effective_dtype, x.device)
        grads, effective = backward_blocked(ctx.spec, factors, threshold, ctx.scale, grad_delta, weight,
                                            effective_dtype, effective_out=effective_out)
        idle_buffers.give_back(grad_delta)
        if ctx.needs_input_grad[0]:
            weight_used = effective if cached is None else cached
            grad_x = grad_output @ weight_used.to(grad_output.dtype)
            if effective is not None:
                idle_buffers.give_back(effective)
            del effective, weight_used
        del cached
        return (
            grad_x, None, grad_bias,
            grads.in_factors.to(in_factors.dtype), grads.out_factors.to(out_factors.dtype),
            grads.alpha.to(alpha.dtype), grads.gamma.to(gamma.dtype), grads.beta.to(beta.dtype),
            None, None,
        )


def _forward_cache_key(adapter: SnellaAdapter, scale: float, dtype: torch.dtype, weight: Optional[Tensor]) -> tuple:
    """What W0 + scale·ΔW_eff depends on: the adapter's parameter versions and sparsity, the
    scale, the output dtype and the base weight's identity and version."""
    base = None if weight is None else (id(weight), weight._version)
    return adapter.version_key() + (float(scale), dtype, base)


def _build_effective(adapter: SnellaAdapter, factors: Factors, threshold: Optional[Tensor],
                     scale: float, weight: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W0 + scale·ΔW_eff ``(m, n)`` in ``out_dtype`` and τ in the compute dtype, selecting τ first
    when ``threshold`` is None (the first forward after a parameter change)."""
    dtype, device = factors.in_factors.dtype, factors.in_factors.device
    shape = factors.shape
    merged = None
    if threshold is None:
        merged = merged_blocked(adapter.spec, factors, out=idle_buffers.borrow(shape, dtype, device))
        threshold = adapter.select_threshold_on(merged)
    threshold = threshold.to(dtype)
    effective = effective_blocked(adapter.spec, factors, threshold, scale, weight, out_dtype, merged=merged,
                                  out=idle_buffers.borrow(shape, out_dtype, device))
    if merged is not None:
        idle_buffers.give_back(merged)
    return effective, threshold


def snella_linear(
    x: Tensor,
    adapter: SnellaAdapter,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
) -> Tensor:
    """Apply ``x·(W0 + scale·ΔW_eff)ᵀ + b`` with the memory-lean autograd function.

    When the products run in float32 (or float64), W0 + scale·ΔW_eff is built in that dtype
    and used for one GEMM. When they run in fp16/bf16 (a half-precision ``x``, or autocast),
    the sum would round ΔW_eff away (``merges_exactly``), so the layer computes
    ``x·W0ᵀ + b + x·(scale·ΔW_eff)ᵀ`` instead, with ΔW_eff cast to that dtype on its own; the
    backward follows the same rule. A float8 ``weight`` is never merged either: it is cast to
    the product dtype for ``x·W0ᵀ`` and ΔW_eff applied beside it.

    Args:
        x: ``(..., n)`` input.
        adapter: the adapter holding A, B, the scalars and the sparsity.
        weight: ``(m, n)`` frozen base weight, or None for the adapter branch alone.
        bias: ``(m,)`` or None.
    Returns:
        ``(..., m)`` in the product dtype (``gemm_dtype(x)``).
    Raises:
        SnellaError: ``weight`` is packed (a tensor subclass or integer data): its product must
            go through its quantized module, as ``SnellaLinear`` does.
    """
    dtype = gemm_dtype(x)
    if weight is not None and is_packed(weight) and weight.dtype not in FLOAT8_DTYPES:
        raise SnellaError(
            f"snella_linear: the base weight is packed ({type(weight).__name__}, {weight.dtype}); "
            "compute its product through its module and pass weight=None (SnellaLinear does)"
        )
    if weight is not None and (not merges_exactly(dtype) or weight.dtype in FLOAT8_DTYPES):
        base = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        return base + snella_linear(x, adapter, scale=scale)
    return _SnellaLinearFunction.apply(
        x, weight, bias, adapter.in_factors, adapter.out_factors, adapter.alpha,
        adapter.effective_gamma(), adapter.beta, adapter, float(scale),
    )

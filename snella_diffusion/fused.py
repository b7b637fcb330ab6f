"""The elementwise pipeline of one SNELLA layer over whole matrices, as pure functions that
``torch.compile`` can fuse: the ``compile_kernels=True`` path.

Inductor fuses the twenty-odd passes of building M and the thirty of its backward into a few
loops (on one 5120×1280 layer, building M took 0.47 s eager and 0.05 s compiled). Compilation
costs tens of seconds once (``dynamic=True``: one graph serves every layer shape). The default
path, ``blocked``, gets the same locality without compiling by working on cache-sized column
blocks, and on a CPU it is the faster one: over SD1.5's 160 layers, one step's kernel work took
4.8–6.7 s blocked and 7.4 s compiled here (the compiled path still writes whole-matrix
intermediates and keeps about nine m×n buffers in backward).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels import KernelGrads, KernelTerms, kernel_matrix, kernel_matrix_backward
from .sparsify import survivor_gate


def merged_matrix(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                  beta: Tensor, kernel_scale: float) -> Tensor:
    """M = κ(A, B), ``(m, n)``."""
    return kernel_matrix(kernel, in_factors, out_factors, alpha, gamma, beta, kernel_scale)[0]


def effective_weight(merged: Tensor, threshold: Tensor, sparsify_mode: str, scale: float,
                     weight: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """scale·ΔW_eff (+ W0), ``(m, n)`` in ``out_dtype``; ΔW_eff = M ⊙ G(|M|, τ).

    Works in place on a fresh buffer, so at most two m×n float32 tensors are alive.
    """
    effective = survivor_gate(merged.abs(), threshold, sparsify_mode).mul_(merged)
    if scale != 1.0:
        effective.mul_(scale)
    if weight is not None:
        effective.add_(weight)
    return effective.to(out_dtype)


def effective_weight_from_factors(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor,
                                  gamma: Tensor, beta: Tensor, kernel_scale: float, threshold: Tensor,
                                  sparsify_mode: str, scale: float, weight: Optional[Tensor],
                                  out_dtype: torch.dtype) -> Tensor:
    """The two steps above in one call (forward with τ already selected)."""
    merged = merged_matrix(kernel, in_factors, out_factors, alpha, gamma, beta, kernel_scale)
    return effective_weight(merged, threshold, sparsify_mode, scale, weight, out_dtype)


def merged_with_terms(kernel: str, in_factors: Tensor, out_factors: Tensor, alpha: Tensor, gamma: Tensor,
                      beta: Tensor, kernel_scale: float) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """M ``(m, n)`` with the intermediates its backward needs: per-head distances
    ``(P, m, n)``, K and the softmax S (None where the kernel has none)."""
    merged, terms = kernel_matrix(kernel, in_factors, out_factors, alpha, gamma, beta, kernel_scale,
                                  keep_terms=True)
    return merged, terms.distances, terms.kernel, terms.softmax


def gradients_from_terms(kernel: str, merged: Tensor, distances: Optional[Tensor], kernel_values: Optional[Tensor],
                         softmax: Optional[Tensor], in_factors: Tensor, out_factors: Tensor, alpha: Tensor,
                         gamma: Tensor, kernel_scale: float, threshold: Tensor, sparsify_mode: str,
                         scale: float, grad_delta: Tensor) -> KernelGrads:
    """Gradients of the factors and scalars from ∂L/∂ΔW_eff ``(m, n)`` (the gate is detached),
    reusing the M built for the input gradient. ``grad_delta`` and ``distances`` are overwritten.
    """
    grad_merged = grad_delta.mul_(survivor_gate(merged.abs(), threshold, sparsify_mode))
    if scale != 1.0:
        grad_merged.mul_(scale)
    terms = KernelTerms(distances=distances, kernel=kernel_values, softmax=softmax)
    return kernel_matrix_backward(kernel, grad_merged, in_factors, out_factors, alpha, gamma, terms,
                                  kernel_scale)


_compiled: dict[str, Callable] = {}


def _shape_generic(compiled: Callable) -> Callable:
    """Call ``compiled`` with parameter shapes dynamic and duck shaping off. By default Dynamo
    keeps nn.Parameter shapes static (the factors and W0 are parameters) and, after a first
    layer with m == n, assumes every m equals its n; a UNet's dozen layer shapes then exhaust
    the recompile limit (8) and fall back to eager. This way one graph serves every shape."""
    from torch._dynamo import config as dynamo_config
    from torch.fx.experimental import _config as fx_config

    def call(*args):
        with fx_config.patch(use_duck_shape=False), dynamo_config.patch(force_parameter_static_shapes=False):
            return compiled(*args)

    return call


def pipeline(name: str, compiled: bool) -> Callable:
    """The function ``name`` of this module, compiled with Inductor when ``compiled``."""
    function = globals()[name]
    if not compiled:
        return function
    if name not in _compiled:
        _compiled[name] = _shape_generic(torch.compile(function, dynamic=True))
    return _compiled[name]

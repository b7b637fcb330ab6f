"""SnellaLinear: a frozen linear layer plus one or more SNELLA adapters.

Training goes through ``_SnellaLinearFunction``, a custom autograd function that builds
W0 + ΔW_eff, ΔW_eff = sparsify(κ(A, B)), in its forward, uses it for one GEMM, drops it, and
rebuilds it in its backward, where one pass also gives the factor gradients. Both run in
cache-sized column blocks (``blocked``); the weight-sized results borrow reused buffers
(``scratch``). Nothing of size m×n lives from forward to backward (unless a
``forward_cache_mb`` budget asks to keep W0 + ΔW_eff): the saved tensors are the input, the
(frozen) base weight, the factors, three scalars and τ.

τ is cached per adapter and keyed on the parameters' version counters, so it is selected once
per optimizer step: gradient-accumulation micro-batches and gradient-checkpointing recomputes
reuse it.

Precision: the merged GEMM runs only where it loses nothing, in float32 (or float64). With
fp16/bf16 products (half-precision activations or autocast) W0 + ΔW_eff would round most of
ΔW_eff away, so ``snella_linear`` applies ``x·W0ᵀ + x·ΔW_effᵀ`` as two products instead, in
the forward, the backward and the forward cache alike; the factors and ΔW_eff stay float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import forward_cache, scratch
from .blocked import backward_blocked, effective_blocked, merged_blocked
from .config import SnellaConfig
from .errors import SnellaError
from .fused import pipeline
from .kernels import kernel_matrix
from .sparsify import drop_count_for, select_threshold, survivor_gate

GAMMA_FLOOR = 1e-4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the factors are float64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _in_compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The factors and scalars in the ΔW compute dtype (no copy when already there)."""
    dtype = _compute_dtype(tensors[0].dtype)
    return tuple(t.to(dtype) for t in tensors)


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


class SnellaAdapter(nn.Module):
    """Trainable factors and sparsity state of one adapter on an ``(m, n)`` linear map.

    Parameters (float32 whatever the base dtype):
        in_factors ``(P, n, r/P)``, out_factors ``(P, m, r/P)``, alpha, gamma, beta (0-d).
    Buffers:
        sparsity (float32, fraction of ΔW entries set to zero), drop_count (int64, the exact
        number removed, k = round(s·m·n)), threshold (float32, the τ last used).
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        config: SnellaConfig,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.kernel = config.kernel
        self.kernel_scale = config.kernel_scale
        self.sparsify_mode = config.sparsify
        self.threshold_sample_size = config.threshold_sample_size
        self.compile_kernels = config.compile_kernels
        self.forward_cache_bytes = config.forward_cache_mb << 20
        heads, width = config.num_heads, config.head_width
        factory = {"device": device, "dtype": torch.float32}
        self.in_factors = nn.Parameter(torch.empty(heads, in_features, width, **factory))
        self.out_factors = nn.Parameter(torch.empty(heads, out_features, width, **factory))
        self.alpha = nn.Parameter(torch.ones((), **factory))
        self.gamma = nn.Parameter(torch.ones((), **factory))
        self.beta = nn.Parameter(torch.zeros((), **factory))
        self.register_buffer("sparsity", torch.zeros((), **factory))
        self.register_buffer("threshold", torch.zeros((), **factory))
        self.register_buffer("drop_count", torch.zeros((), dtype=torch.int64, device=device))
        self.drop_count_host = 0
        self._threshold_key: Optional[tuple] = None
        self.reset_parameters()
        self.set_sparsity(config.init_sparsity)

    @property
    def numel(self) -> int:
        """m·n, the number of entries of ΔW."""
        return self.out_features * self.in_features

    def reset_parameters(self) -> None:
        """Kaiming-uniform factors (bound 1/sqrt(rows·r/P)), alpha = gamma = 1, beta = 0."""
        nn.init.kaiming_uniform_(self.in_factors, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.out_factors, a=math.sqrt(5))
        with torch.no_grad():
            self.alpha.fill_(1.0)
            self.gamma.fill_(1.0)
            self.beta.zero_()
        self._threshold_key = None

    def set_sparsity(self, sparsity: float, drop_count: Optional[int] = None) -> None:
        """Set s (and k = round(s·m·n), or the given exact ``drop_count``).

        s = 1 (a layer the allocator gave no budget) removes every entry.
        """
        if not 0.0 <= sparsity <= 1.0:
            raise SnellaError(f"sparsity={sparsity}: must lie in [0, 1]")
        count = drop_count_for(sparsity, self.numel) if drop_count is None else int(drop_count)
        if not 0 <= count <= self.numel:
            raise SnellaError(f"drop_count={count}: must lie in [0, {self.numel}]")
        self.drop_count_host = count
        with torch.no_grad():
            self.sparsity.fill_(sparsity)
            self.drop_count.fill_(count)
        self._threshold_key = None

    def effective_gamma(self) -> Tensor:
        """gamma clamped to stay positive (the softmax temperature)."""
        return self.gamma.clamp_min(GAMMA_FLOOR)

    def version_key(self) -> tuple:
        """Changes whenever a parameter or the sparsity changes (in-place updates included)."""
        params = (self.in_factors, self.out_factors, self.alpha, self.gamma, self.beta)
        return tuple((id(p), p._version) for p in params) + (self.drop_count_host,)

    def cached_threshold(self) -> Optional[Tensor]:
        """τ if it was selected for the current parameters, else None."""
        return self.threshold if self._threshold_key == self.version_key() else None

    def record_threshold(self, threshold: Tensor) -> None:
        with torch.no_grad():
            self.threshold.copy_(threshold)
        self._threshold_key = self.version_key()

    def merged_matrix(self, keep_terms: bool = False):
        """M = κ(A, B) in float32 (float64 for float64 factors), ``(m, n)``, with autograd."""
        factors = _in_compute_dtype(
            self.in_factors, self.out_factors, self.alpha, self.effective_gamma(), self.beta
        )
        return kernel_matrix(
            self.kernel,
            *factors,
            self.kernel_scale,
            keep_terms=keep_terms,
        )

    def _training_merged(self) -> Tensor:
        """M ``(m, n)`` as a training forward builds it (blocked, no autograd)."""
        with torch.no_grad():
            factors = _in_compute_dtype(
                self.in_factors, self.out_factors, self.alpha, self.effective_gamma(), self.beta
            )
            return merged_blocked(self.kernel, *factors, self.kernel_scale)

    def select_threshold_on(self, merged: Tensor) -> Tensor:
        """Select τ on M ``(m, n)`` for the current sparsity and record it for these parameters."""
        threshold = select_threshold(merged, self.drop_count_host, self.threshold_sample_size, absolute=True)
        self.record_threshold(threshold)
        return threshold

    def refresh_threshold(self) -> Tensor:
        """τ for the current parameters, selected on the M a training forward builds (so a saved
        or fused adapter uses bit for bit the τ training used); cached like in training."""
        threshold = self.cached_threshold()
        return threshold if threshold is not None else self.select_threshold_on(self._training_merged())

    def delta_weight(self) -> Tensor:
        """ΔW_eff ``(m, n)`` in float32 (float64 for float64 factors), bit-identical to the ΔW a
        training forward uses. With autograd on and trainable factors it is differentiable
        through M (the gate, taken from the training M, is detached)."""
        merged = self._training_merged()
        threshold = self.cached_threshold()
        if threshold is None:
            threshold = self.select_threshold_on(merged)
        threshold = threshold.to(merged.dtype)
        with torch.no_grad():
            # M is given, so the factors only lend their shapes and device here.
            delta = effective_blocked(self.kernel, self.in_factors, self.out_factors, self.alpha, self.gamma,
                                      self.beta, self.kernel_scale, threshold, self.sparsify_mode, 1.0, None,
                                      merged.dtype, merged=merged)
        if not (torch.is_grad_enabled() and self.in_factors.requires_grad):
            return delta
        # Values stay exactly the training ΔW (x - x is 0); the gradient flows through M ⊙ G.
        differentiable = self.merged_matrix()[0] * survivor_gate(merged.abs(), threshold, self.sparsify_mode)
        return delta + (differentiable - differentiable.detach())

    def keep_count(self) -> int:
        """Entries kept by the current sparsity, m·n - k."""
        return self.numel - self.drop_count_host

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.drop_count.is_meta:
            return
        self.drop_count_host = int(self.drop_count)
        # A state dict may hold a τ saved before any forward: select it again (deterministic).
        # Adapter files store a τ refreshed at save time; load_snella reuses that one.
        self._threshold_key = None


class _SnellaLinearFunction(torch.autograd.Function):
    """y = x·(W0 + scale·ΔW_eff)ᵀ + b (or x·(scale·ΔW_eff)ᵀ with no base weight).

    ΔW_eff is rebuilt in backward instead of being saved (or taken from ``forward_cache``).
    ``snella_linear`` passes a base weight only when the products run in float32/float64
    (``merges_exactly``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, in_factors, out_factors, alpha, gamma, beta, adapter, scale):
        dtype = _compute_dtype(in_factors.dtype)
        factors = _in_compute_dtype(in_factors, out_factors, alpha, gamma, beta)
        out_dtype = gemm_dtype(x)
        cache_key = _forward_cache_key(adapter, scale, out_dtype, weight) if adapter.forward_cache_bytes else None
        effective = forward_cache.lookup(adapter, cache_key) if cache_key is not None else None
        threshold = adapter.cached_threshold()
        if effective is not None and threshold is not None:
            threshold = threshold.to(dtype)
            kept = True
        else:
            effective, threshold = _build_effective(adapter, factors, threshold, scale, weight, out_dtype)
            kept = cache_key is not None and forward_cache.store(
                adapter, cache_key, effective, adapter.forward_cache_bytes, not forward_cache.in_backward()
            )
        output = F.linear(x, effective, bias)
        if not kept:
            scratch.give_back(effective)
        del effective
        ctx.save_for_backward(x, weight, in_factors, out_factors, alpha, gamma, beta, threshold)
        ctx.adapter_spec = (adapter.kernel, adapter.kernel_scale, adapter.sparsify_mode, adapter.compile_kernels)
        ctx.adapter = adapter
        ctx.cache_key = cache_key
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, in_factors, out_factors, alpha, gamma, beta, threshold = ctx.saved_tensors
        kernel, kernel_scale, sparsify_mode, compiled = ctx.adapter_spec
        dtype = _compute_dtype(in_factors.dtype)
        factors = _in_compute_dtype(in_factors, out_factors, alpha, gamma, beta)
        out_features = factors[1].shape[1]
        in_features = factors[0].shape[1]
        grad_x = grad_bias = None
        flat_grad = grad_output.reshape(-1, out_features)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        # Under autocast the output (hence grad_output) may be bf16/fp16 while x is float32.
        common = torch.promote_types(flat_grad.dtype, x.dtype)
        shape = (out_features, in_features)
        grad_delta = torch.matmul(flat_grad.T.to(common), x.reshape(-1, in_features).to(common),
                                  out=scratch.borrow(shape, common, x.device)).to(dtype)
        cached = None
        if ctx.cache_key is not None:
            cached = forward_cache.lookup(ctx.adapter, ctx.cache_key)
            forward_cache.drop(ctx.adapter)
        effective_dtype = grad_output.dtype if ctx.needs_input_grad[0] and cached is None else None
        if compiled:
            grads, effective = _compiled_backward(kernel, factors, kernel_scale, threshold, sparsify_mode, ctx.scale,
                                                  weight, effective_dtype, grad_delta)
        else:
            # One blocked pass rebuilds M and gives both the factor gradients and, for the
            # input gradient, the forward weight (unless the forward cache still holds it).
            effective_out = None if effective_dtype is None else scratch.borrow(shape, effective_dtype, x.device)
            grads, effective = backward_blocked(
                kernel, *factors, kernel_scale, threshold, sparsify_mode, ctx.scale, grad_delta, weight,
                effective_dtype, effective_out=effective_out,
            )
        scratch.give_back(grad_delta)
        if ctx.needs_input_grad[0]:
            weight_used = effective if cached is None else cached
            grad_x = grad_output @ weight_used.to(grad_output.dtype)
            if effective is not None:
                scratch.give_back(effective)
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


def _build_effective(adapter: SnellaAdapter, factors: tuple[Tensor, ...], threshold: Optional[Tensor],
                     scale: float, weight: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W0 + scale·ΔW_eff ``(m, n)`` in ``out_dtype`` and τ in the compute dtype, selecting τ first
    when ``threshold`` is None (the first forward after a parameter change)."""
    if adapter.compile_kernels:
        return _compiled_forward(adapter, factors, threshold, scale, weight, out_dtype)
    dtype, device = factors[0].dtype, factors[0].device
    shape = (factors[1].shape[1], factors[0].shape[1])
    merged = None
    if threshold is None:
        merged = merged_blocked(adapter.kernel, *factors, adapter.kernel_scale,
                                out=scratch.borrow(shape, dtype, device))
        threshold = adapter.select_threshold_on(merged)
    threshold = threshold.to(dtype)
    effective = effective_blocked(
        adapter.kernel, *factors, adapter.kernel_scale, threshold, adapter.sparsify_mode, scale, weight, out_dtype,
        merged=merged, out=scratch.borrow(shape, out_dtype, device),
    )
    if merged is not None:
        scratch.give_back(merged)
    return effective, threshold


def _compiled_forward(adapter: SnellaAdapter, factors: tuple[Tensor, ...], threshold: Optional[Tensor],
                      scale: float, weight: Optional[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """W0 + scale·ΔW_eff and τ through the Inductor-compiled whole-matrix pipeline
    (``compile_kernels``)."""
    dtype = factors[0].dtype
    if threshold is None:
        merged = pipeline("merged_matrix", True)(adapter.kernel, *factors, adapter.kernel_scale)
        threshold = adapter.select_threshold_on(merged)
        threshold = threshold.to(dtype)
        effective = pipeline("effective_weight", True)(merged, threshold, adapter.sparsify_mode, scale, weight,
                                                       out_dtype)
        return effective, threshold
    threshold = threshold.to(dtype)
    effective = pipeline("effective_weight_from_factors", True)(
        adapter.kernel, *factors, adapter.kernel_scale, threshold, adapter.sparsify_mode, scale, weight, out_dtype,
    )
    return effective, threshold


def _compiled_backward(kernel: str, factors: tuple[Tensor, ...], kernel_scale: float, threshold: Tensor,
                       sparsify_mode: str, scale: float, weight: Optional[Tensor],
                       effective_dtype: Optional[torch.dtype], grad_delta: Tensor):
    """The backward through the compiled whole-matrix pipeline (``compile_kernels``);
    ``grad_delta`` is overwritten."""
    merged, distances, kernel_values, softmax = pipeline("merged_with_terms", True)(kernel, *factors, kernel_scale)
    effective = None
    if effective_dtype is not None:
        effective = pipeline("effective_weight", True)(merged, threshold, sparsify_mode, scale, weight,
                                                       effective_dtype)
    grads = pipeline("gradients_from_terms", True)(
        kernel, merged, distances, kernel_values, softmax, *factors[:4], kernel_scale, threshold,
        sparsify_mode, scale, grad_delta,
    )
    return grads, effective


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
    backward follows the same rule.

    Args:
        x: ``(..., n)`` input.
        adapter: the adapter holding A, B, the scalars and the sparsity.
        weight: ``(m, n)`` frozen base weight, or None for the adapter branch alone.
        bias: ``(m,)`` or None.
    Returns:
        ``(..., m)`` in the product dtype (``gemm_dtype(x)``).
    """
    dtype = gemm_dtype(x)
    if weight is not None and not merges_exactly(dtype):
        base = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        return base + snella_linear(x, adapter, scale=scale)
    return _SnellaLinearFunction.apply(
        x, weight, bias, adapter.in_factors, adapter.out_factors, adapter.alpha,
        adapter.effective_gamma(), adapter.beta, adapter, float(scale),
    )


class SnellaLinear(nn.Module):
    """A frozen ``nn.Linear`` (or subclass) with SNELLA adapters.

    The first active adapter's tensors are exposed as ``in_factors`` ``(P, n, r/P)``,
    ``out_factors`` ``(P, m, r/P)``, ``alpha``, ``gamma``, ``beta``, ``sparsity`` and
    ``threshold``. Several adapters may be resident; the active ones are combined as
    Σ_k w_k·ΔW_k.
    """

    def __init__(self, base_layer: nn.Linear, config: SnellaConfig, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise SnellaError(f"SnellaLinear wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.forward_mode = config.forward_mode
        self.adapter_dropout = config.adapter_dropout
        self.drop_path = config.drop_path
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, SnellaConfig] = {}
        self.active_adapters: list[str] = []
        self.adapter_weights: dict[str, float] = {}
        self.disabled = False
        self.fused_adapters: dict[str, float] = {}
        # (rounding energy, ΔW energy) of the fused adapters, set by ``fuse`` (fused_energy_kept).
        self.fused_delta_energy: tuple[float, float] = (0.0, 0.0)
        # The pristine base weight while adapters are fused; a buffer so that it follows
        # .to(device/dtype) like the weight it restores, non-persistent so it is never saved.
        self.register_buffer("unfused_weight", None, persistent=False)
        # The pristine base weight on the CPU (``fuse_snella(keep_original="cpu")``): a plain
        # attribute, so moving the model to a GPU leaves it in host memory.
        self.unfused_weight_cpu: Optional[Tensor] = None
        # True once adapters were fused with ``keep_original=False``: W0 is gone for good.
        self.original_discarded = False
        self._delta_cache: Optional[tuple[tuple, Tensor]] = None
        # False: an inference forward builds Σ w_k·ΔW_k, uses it and drops it (one layer's
        # worth of memory at a time, e.g. validation during training; see ``delta_cache``).
        self.cache_inference_delta = True
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: SnellaConfig) -> SnellaAdapter:
        """Create an adapter ``name`` on the base weight's device and make it active."""
        if name in self.adapters:
            raise SnellaError(f"adapter {name!r} already exists on this layer")
        adapter = SnellaAdapter(
            self.out_features, self.in_features, config, device=self.base_layer.weight.device
        )
        self.adapters[name] = adapter
        self.configs[name] = config
        self.active_adapters.append(name)
        self.adapter_weights[name] = 1.0
        self._delta_cache = None
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise SnellaError(f"no adapter named {name!r} on this layer")
        del self.adapters[name]
        del self.configs[name]
        self.adapter_weights.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self._delta_cache = None

    def set_active(self, names: list[str], weights: Optional[list[float]] = None) -> None:
        """Activate ``names`` with per-adapter ``weights`` (default 1.0 each)."""
        weights = [1.0] * len(names) if weights is None else list(weights)
        for name in names:
            if name not in self.adapters:
                raise SnellaError(f"no adapter named {name!r} on this layer")
        self.active_adapters = list(names)
        for name, weight in zip(names, weights):
            self.adapter_weights[name] = float(weight)
        self._delta_cache = None

    @property
    def primary(self) -> SnellaAdapter:
        """The first active adapter (or the first resident one when none is active)."""
        name = self.active_adapters[0] if self.active_adapters else next(iter(self.adapters))
        return self.adapters[name]

    in_factors = property(lambda self: self.primary.in_factors)
    out_factors = property(lambda self: self.primary.out_factors)
    alpha = property(lambda self: self.primary.alpha)
    gamma = property(lambda self: self.primary.gamma)
    beta = property(lambda self: self.primary.beta)
    sparsity = property(lambda self: self.primary.sparsity)
    threshold = property(lambda self: self.primary.threshold)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code that reads ``.weight`` (dtype checks) still works."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def delta_weight(self, adapter_name: Optional[str] = None) -> Tensor:
        """ΔW_eff ``(m, n)`` in float32: of ``adapter_name``, or Σ_k w_k·ΔW_k of the active ones."""
        if adapter_name is not None:
            if adapter_name not in self.adapters:
                raise SnellaError(f"no adapter named {adapter_name!r} on this layer")
            return self.adapters[adapter_name].delta_weight()
        total = torch.zeros(
            self.out_features, self.in_features, device=self.base_layer.weight.device
        )
        for name in self.active_adapters:
            total = total + self.adapter_weights[name] * self.adapters[name].delta_weight()
        return total

    def _applied_adapters(self) -> list[str]:
        if self.disabled:
            return []
        return [name for name in self.active_adapters if name not in self.fused_adapters]

    def _summed_delta(self, names: list[str]) -> Tensor:
        """Σ w_k·ΔW_k ``(m, n)`` in float32, without autograd."""
        with torch.no_grad():
            total = self.adapters[names[0]].delta_weight().mul_(self.adapter_weights[names[0]])
            for name in names[1:]:
                total.add_(self.adapters[name].delta_weight(), alpha=self.adapter_weights[name])
        return total

    def _cached_delta(self, names: list[str]) -> Tensor:
        """Σ w_k·ΔW_k in the base dtype, rebuilt only when an adapter, weight or dtype changes
        (built afresh and not kept when ``cache_inference_delta`` is False)."""
        weight = self.base_layer.weight
        if not self.cache_inference_delta:
            self._delta_cache = None
            return self._summed_delta(names).to(weight.dtype)
        key = tuple((n, self.adapter_weights[n], self.adapters[n].version_key()) for n in names)
        key += (weight.dtype, weight.device)
        if self._delta_cache is None or self._delta_cache[0] != key:
            self._delta_cache = None
            self._delta_cache = (key, self._summed_delta(names).to(weight.dtype))
        return self._delta_cache[1]

    def _drop_path(self, output: Tensor) -> Tensor:
        if not self.training or self.drop_path == 0.0:
            return output
        keep = 1.0 - self.drop_path
        shape = (output.shape[0],) + (1,) * (output.dim() - 1)
        mask = torch.empty(shape, dtype=output.dtype, device=output.device).bernoulli_(keep)
        return output * mask / keep

    def forward(self, x: Tensor) -> Tensor:
        names = self._applied_adapters()
        if not names:
            return self.base_layer(x)
        trainable = [n for n in names if self.adapters[n].in_factors.requires_grad]
        if not (torch.is_grad_enabled() and trainable):
            delta = self._cached_delta(names)
            return self.base_layer(x) + F.linear(x, delta.to(x.dtype))
        self._delta_cache = None
        if len(names) > 1:
            raise SnellaError(
                f"training with several active adapters ({names}) is not supported: "
                "activate the one being trained only"
            )
        adapter = self.adapters[names[0]]
        scale = self.adapter_weights[names[0]]
        if self.forward_mode == "merged":
            return snella_linear(x, adapter, self.base_layer.weight, self.base_layer.bias, scale)
        adapter_input = F.dropout(x, self.adapter_dropout, self.training)
        branch = snella_linear(adapter_input, adapter, scale=scale)
        return self.base_layer(x) + self._drop_path(branch)

    def extra_repr(self) -> str:
        adapters = ", ".join(self.adapters.keys())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"mode={self.forward_mode}, adapters=[{adapters}]"
        )


def snella_layers(model: nn.Module) -> dict[str, SnellaLinear]:
    """Every SnellaLinear in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SnellaLinear)}

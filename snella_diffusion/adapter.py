"""SnellaAdapter: the trainable factors of one adapter on one linear map, its sparsity and τ.

ΔW_eff = M ⊙ G(|M|, τ) with M = κ(A, B) (``blocked``, ``kernels``) and τ the k-th smallest
|M|, k = round(s·m·n) (``sparsify``). τ is cached per adapter and keyed on the parameters'
version counters (``version_key``), so it is selected once per optimizer step: gradient-
accumulation micro-batches and gradient-checkpointing recomputes reuse it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .blocked import Factors, KernelSpec, effective_blocked, merged_blocked
from .config import SnellaConfig
from .errors import SnellaError
from .kernels import kernel_matrix
from .method import GAMMA_FLOOR
from .sparsify import drop_count_for, select_threshold, survivor_gate


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
        self.spec = KernelSpec(config.kernel, config.kernel_scale, config.sparsify)
        self.threshold_sample_size = config.threshold_sample_size
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

    kernel = property(lambda self: self.spec.kernel, doc="κ: 'mix', 'piecewise_linear' or 'linear'.")
    kernel_scale = property(lambda self: self.spec.kernel_scale, doc="c in K = c·(D_0 - D_1).")
    sparsify_mode = property(lambda self: self.spec.sparsify, doc="The survivor rule (config ``sparsify``).")

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

    def factors(self) -> Factors:
        """A, B, α, the clamped γ and β as they are (float32 parameters, with autograd)."""
        return Factors(self.in_factors, self.out_factors, self.alpha, self.effective_gamma(), self.beta)

    def version_key(self) -> tuple:
        """Changes whenever a parameter or the sparsity changes (in-place updates included)."""
        params = (self.in_factors, self.out_factors, self.alpha, self.gamma, self.beta)
        return tuple((id(p), p._version) for p in params) + (self.drop_count_host,)

    def cached_threshold(self) -> Optional[Tensor]:
        """τ if it was selected for the current parameters, else None."""
        return self.threshold if self._threshold_key == self.version_key() else None

    def record_threshold(self, threshold: Tensor) -> None:
        """Keep τ (0-d) as the one selected for the current parameters (``cached_threshold``)."""
        with torch.no_grad():
            self.threshold.copy_(threshold)
        self._threshold_key = self.version_key()

    def merged_matrix(self, keep_terms: bool = False):
        """M = κ(A, B) in float32 (float64 for float64 factors), ``(m, n)``, with autograd."""
        factors = self.factors().in_compute_dtype()
        return kernel_matrix(self.kernel, *factors.tensors(), self.kernel_scale, keep_terms=keep_terms)

    def _training_merged(self) -> Tensor:
        """M ``(m, n)`` as a training forward builds it (blocked, no autograd)."""
        with torch.no_grad():
            return merged_blocked(self.spec, self.factors().in_compute_dtype())

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
            delta = effective_blocked(self.spec, self.factors(), threshold, 1.0, None, merged.dtype, merged=merged)
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

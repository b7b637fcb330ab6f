"""SnellaLinear: a frozen linear layer with SNELLA adapters, and the state it owns.

The layer holds its adapters (``adapter.SnellaAdapter``) and runs training forwards through
``autograd.snella_linear``. Everything else a layer's base weight goes through is a method
here, so no other module writes its fields:

- fusing (``fuse_adapters``, ``write_fused_weight``, ``restore_base_weight``,
  ``remove_adapter``, ``unwrap``): the fused weight is cast(W0 + Σ_k s_k·ΔW_k) with the sum
  in float32, computed from a kept pristine W0 so that any number of fuse/unfuse cycles ends
  exactly where it started (``fuse.py`` loops these over a model and explains where W0 is
  kept);
- the inference ΔW cache (``release_delta_cache``, ``delta_cache_bytes``,
  ``set_inference_delta_caching``): an unfused inference forward keeps Σ_k w_k·ΔW_k in the base
  dtype (in the compute dtype over a quantized base) until an adapter, weight or dtype changes
  (``delta_cache.py`` loops these).

Over a quantized base (float8 storage, torchao, optimum-quanto, bitsandbytes 4-bit:
``quantized.base_quantization``) every forward is base(x) + x·ΔWᵀ, the base product through the
quantized module and ΔW cast from float32 to the compute dtype; the packed weight is never
written, and fusing into it is refused.

``from snella_diffusion.layer import SnellaAdapter, snella_linear, gemm_dtype, merges_exactly``
keeps working: those live in ``adapter.py`` and ``autograd.py`` and are re-exported here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import GAMMA_FLOOR, SnellaAdapter
from .autograd import gemm_dtype, merges_exactly, snella_linear
from .blocked import Factors, effective_blocked
from .config import SnellaConfig
from .errors import SnellaError, UnfuseError
from .quantized import base_quantization

__all__ = [
    "DEFAULT_KEEP_ORIGINAL", "GAMMA_FLOOR", "KEEP_ORIGINAL_CHOICES", "KeepOriginal", "SnellaAdapter",
    "SnellaLinear", "gemm_dtype", "merges_exactly", "snella_layers", "snella_linear",
]

KeepOriginal = Union[str, bool]
KEEP_ORIGINAL_CHOICES: tuple[KeepOriginal, ...] = ("cpu", "device", False)
DEFAULT_KEEP_ORIGINAL: KeepOriginal = "cpu"


def check_keep_original(keep_original: KeepOriginal) -> None:
    """Raise SnellaError unless ``keep_original`` is "cpu", "device" or False."""
    if keep_original not in KEEP_ORIGINAL_CHOICES or keep_original is True:
        raise SnellaError(f"keep_original={keep_original!r}: expected one of 'cpu', 'device', False")


def _discarded_error(layer_name: str) -> UnfuseError:
    return UnfuseError(
        f"layer {layer_name or '<model>'}: adapters were fused with keep_original=False, so the base "
        "weights were not kept and cannot be restored; reload the base model (or fuse with "
        "keep_original='cpu' to be able to unfuse)"
    )


def _rounding_and_delta_energy(pristine: Tensor, exact: Tensor, fused: Tensor) -> tuple[float, float]:
    """(||fused − exact||², ||exact − W0||²) in float32 sums, for the energy-kept figure;
    ``exact`` is W0 + Σ_k s_k·ΔW_k in float32, ``fused`` its cast to the weight's dtype; W0 is
    ``pristine`` (on any device), or the weight before this fuse when W0 was not kept."""
    if fused.dtype == exact.dtype:
        rounding = 0.0
    else:
        rounding = float(torch.sub(fused.to(exact.dtype), exact).square_().sum())
    delta_energy = float(torch.sub(exact, pristine.to(exact.device, exact.dtype)).square_().sum())
    return rounding, delta_energy


class SnellaLinear(nn.Module):
    """A frozen ``nn.Linear`` (or subclass) with SNELLA adapters.

    The first active adapter's tensors are exposed as ``in_factors`` ``(P, n, r/P)``,
    ``out_factors`` ``(P, m, r/P)``, ``alpha``, ``gamma``, ``beta``, ``sparsity`` and
    ``threshold``. Several adapters may be resident; the active ones are combined as
    Σ_k w_k·ΔW_k.

    State read by other modules and written only by this class's methods: ``fused_adapters``
    ``{name: factor}`` (fused into the base weight), ``fused_delta_energy`` (rounding energy,
    ΔW energy) of that fuse, ``unfused_weight`` / ``unfused_weight_cpu`` (the kept W0),
    ``original_discarded``, ``disabled`` and ``cache_inference_delta``.
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
        # (rounding energy, ΔW energy) of the fused adapters (``fuse.fused_energy_kept``).
        self.fused_delta_energy: tuple[float, float] = (0.0, 0.0)
        # The pristine base weight while adapters are fused; a buffer so that it follows
        # .to(device/dtype) like the weight it restores, non-persistent so it is never saved.
        self.register_buffer("unfused_weight", None, persistent=False)
        # The pristine base weight on the CPU (``keep_original="cpu"``): a plain attribute, so
        # moving the model to a GPU leaves it in host memory.
        self.unfused_weight_cpu: Optional[Tensor] = None
        # True once adapters were fused with ``keep_original=False``: W0 is gone for good.
        self.original_discarded = False
        self._delta_cache: Optional[tuple[tuple, Tensor]] = None
        # False: an inference forward builds Σ w_k·ΔW_k, uses it and drops it (one layer's
        # worth of memory at a time, e.g. validation during training).
        self._cache_inference_delta = True
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    # --- adapters ------------------------------------------------------------------------------

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
        """Forget adapter ``name`` (its ΔW stays in a fused weight; see ``remove_adapter``)."""
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

    def set_disabled(self, disabled: bool) -> None:
        """Run the base layer alone (True) or with the active adapters again (False)."""
        self.disabled = bool(disabled)

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

    @property
    def base_quantization(self) -> Optional[str]:
        """The base layer's quantized storage ("float8 storage", "torchao Int8Tensor", ...), or
        None for a plain float weight (``quantized.base_quantization``); read at each forward, so
        a base quantized after ``apply_snella`` is seen too."""
        return base_quantization(self.base_layer)

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

    # --- forward -------------------------------------------------------------------------------

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
        quantized = self.base_quantization is not None
        if not (torch.is_grad_enabled() and trainable):
            delta = self._cached_delta(names, gemm_dtype(x) if quantized else self.base_layer.weight.dtype)
            return self.base_layer(x) + F.linear(x, delta.to(x.dtype))
        self._delta_cache = None
        if len(names) > 1:
            raise SnellaError(
                f"training with several active adapters ({names}) is not supported: "
                "activate the one being trained only"
            )
        adapter = self.adapters[names[0]]
        scale = self.adapter_weights[names[0]]
        if self.forward_mode == "merged" and not quantized:
            return snella_linear(x, adapter, self.base_layer.weight, self.base_layer.bias, scale)
        adapter_input = F.dropout(x, self.adapter_dropout, self.training)
        branch = snella_linear(adapter_input, adapter, scale=scale)
        return self.base_layer(x) + self._drop_path(branch)

    # --- the inference ΔW cache ------------------------------------------------------------------

    def _cached_delta(self, names: list[str], dtype: torch.dtype) -> Tensor:
        """Σ w_k·ΔW_k in ``dtype`` (the base weight's dtype, or the compute dtype over a quantized
        base), rebuilt only when an adapter, the weight or ``dtype`` changes (built afresh and
        not kept when ``cache_inference_delta`` is False)."""
        weight = self.base_layer.weight
        if not self._cache_inference_delta:
            self._delta_cache = None
            return self._summed_delta(names).to(dtype)
        key = tuple((n, self.adapter_weights[n], self.adapters[n].version_key()) for n in names)
        key += (weight.dtype, weight.device, dtype)
        if self._delta_cache is None or self._delta_cache[0] != key:
            self._delta_cache = None
            self._delta_cache = (key, self._summed_delta(names).to(dtype))
        return self._delta_cache[1]

    @property
    def cache_inference_delta(self) -> bool:
        """Whether an inference forward keeps Σ w_k·ΔW_k for the next one."""
        return self._cache_inference_delta

    def set_inference_delta_caching(self, enabled: bool) -> None:
        """Keep (True) or build afresh and drop (False) the inference ΔW; False frees it now."""
        self._cache_inference_delta = bool(enabled)
        if not enabled:
            self.release_delta_cache()

    def release_delta_cache(self) -> None:
        """Free the inference ΔW cache (rebuilt by the next inference forward)."""
        self._delta_cache = None

    def delta_cache_bytes(self) -> int:
        """Bytes held by the inference ΔW cache."""
        if self._delta_cache is None:
            return 0
        cached = self._delta_cache[1]
        return cached.numel() * cached.element_size()

    # --- fusing --------------------------------------------------------------------------------

    @property
    def pristine_weight(self) -> Optional[Tensor]:
        """The kept base weight W0 of a fused layer (on its device or the CPU), or None."""
        return self.unfused_weight if self.unfused_weight is not None else self.unfused_weight_cpu

    def check_restorable(self, layer_name: str = "") -> None:
        """Raise UnfuseError when adapters are fused and W0 was not kept (``keep_original=False``)."""
        if self.fused_adapters and self.original_discarded:
            raise _discarded_error(layer_name)

    def restore_base_weight(self, layer_name: str = "") -> None:
        """Put the pristine base weight back (a bit-exact copy) and mark nothing as fused.

        Raises:
            UnfuseError: adapters are fused and W0 was not kept (``keep_original=False``).
        """
        self.check_restorable(layer_name)
        pristine = self.pristine_weight
        if pristine is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(pristine)
        self.unfused_weight = None
        self.unfused_weight_cpu = None
        self.fused_adapters = {}
        self.fused_delta_energy = (0.0, 0.0)

    def _keep_pristine(self, keep_original: KeepOriginal) -> None:
        weight = self.base_layer.weight.detach()
        if keep_original == "device":
            self.unfused_weight = weight.clone()
        elif keep_original == "cpu":
            self.unfused_weight_cpu = weight.to("cpu", copy=True)
        else:
            self.original_discarded = True

    def write_fused_weight(self, fused: dict[str, float], keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
                           layer_name: str = "") -> None:
        """Set the base weight to cast(W0 + Σ_k factor_k·ΔW_k) for ``fused = {name: factor}``,
        computed in float32 from the pristine copy (kept as ``keep_original`` says at the first
        fuse); an empty dict restores W0 exactly. Without a kept W0 (``keep_original=False``)
        only adding adapters is possible: their ΔW goes onto the fused weight."""
        if not fused:
            self.restore_base_weight(layer_name)
            return
        self.check_fusable(layer_name)
        check_keep_original(keep_original)
        weight = self.base_layer.weight
        if self.pristine_weight is None and not self.original_discarded:
            self._keep_pristine(keep_original)
        pristine = self.pristine_weight
        if self._fuses_in_one_pass(fused, pristine):
            with torch.no_grad():
                name, factor = next(iter(fused.items()))
                self.fused_delta_energy = self._fuse_one_float32(name, factor, pristine)
            self.fused_adapters = dict(fused)
            self._delta_cache = None
            return
        with torch.no_grad():
            reference = pristine if pristine is not None else weight
            if pristine is not None:
                total = pristine.to(weight.device, torch.float32, copy=True)
                adding = fused
            else:
                if any(name not in fused for name in self.fused_adapters):
                    raise _discarded_error(layer_name)
                total = weight.to(torch.float32, copy=True)
                adding = {n: f for n, f in fused.items() if n not in self.fused_adapters}
            for name, factor in adding.items():
                total = total.add_(self.adapters[name].delta_weight(), alpha=factor)
            fused_weight = total.to(weight.dtype)
            self.fused_delta_energy = _rounding_and_delta_energy(reference, total, fused_weight)
            weight.copy_(fused_weight)
        self.fused_adapters = dict(fused)
        self._delta_cache = None

    def check_fusable(self, layer_name: str = "") -> None:
        """Raise SnellaError when the base weight is quantized: ΔW is never written into packed,
        8-bit or float8 weights (most of a small ΔW would round away); the unfused forward
        computes base(x) + x·ΔWᵀ instead."""
        quantization = self.base_quantization
        if quantization is not None:
            raise SnellaError(
                f"layer {layer_name or '<unnamed>'}: cannot fuse SNELLA adapters into a quantized base "
                f"weight ({quantization}); keep the adapters unfused (the forward adds x·ΔWᵀ beside "
                "the quantized product) or load the base unquantized to fuse"
            )

    def _fuses_in_one_pass(self, fused: dict[str, float], pristine: Optional[Tensor]) -> bool:
        """Whether the fused weight is W0 + s·ΔW of one adapter into a float32 weight with W0
        kept on the same device: then one blocked pass writes it."""
        weight = self.base_layer.weight
        return (len(fused) == 1 and not self.fused_adapters and weight.dtype == torch.float32
                and pristine is not None and pristine.device == weight.device and pristine.dtype == torch.float32)

    def _fuse_one_float32(self, name: str, factor: float, pristine: Tensor) -> tuple[float, float]:
        """W0 + factor·ΔW written over the float32 weight by one blocked pass that builds ΔW block
        by block (``blocked.effective_blocked``: the same expressions and the same float32 sum as
        adding ``delta_weight()``, without the whole-matrix M, ΔW and sum); returns the energies
        (0, ||W − W0||²) with W0 the kept ``pristine`` weight."""
        adapter = self.adapters[name]
        threshold = adapter.refresh_threshold()
        factors = Factors(*(t.to(torch.float32) for t in adapter.factors().tensors()))
        fused = effective_blocked(adapter.spec, factors, threshold.to(torch.float32), factor, pristine,
                                  torch.float32, out=self.base_layer.weight.data)
        return _rounding_and_delta_energy(pristine, fused, fused)

    def fuse_adapters(self, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
                      keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL) -> None:
        """Add scale·w_k·ΔW_k of the given (default: active) adapters into the base weight.

        Adapters already fused in this layer are left as they are (fusing is idempotent);
        ``keep_original`` as in ``fuse.fuse_snella``.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            if name not in self.adapters:
                raise SnellaError(f"no adapter named {name!r} to fuse")
        new = {n: scale * self.adapter_weights.get(n, 1.0) for n in names if n not in self.fused_adapters}
        if new:
            self.write_fused_weight({**self.fused_adapters, **new}, keep_original)

    def check_removable(self, adapter_name: str, layer_name: str = "") -> None:
        """Raise UnfuseError when ``adapter_name`` is fused here and W0 was not kept, so its ΔW
        cannot be taken out of the base weight."""
        if self.original_discarded and adapter_name in self.fused_adapters:
            raise UnfuseError(
                f"layer {layer_name}: adapter {adapter_name!r} was fused with keep_original=False, so "
                "its ΔW cannot be taken out of the base weight; remove all adapters (the fused "
                "weights stay) or reload the base model"
            )

    def remove_adapter(self, adapter_name: str, layer_name: str = "") -> None:
        """Delete ``adapter_name`` and take its ΔW out of the base weight if it was fused; the
        other fused adapters stay fused (with W0 kept where it was kept)."""
        if self.original_discarded:
            self.delete_adapter(adapter_name)
            return
        still_fused = {k: v for k, v in self.fused_adapters.items() if k != adapter_name}
        keep = "device" if self.unfused_weight is not None else DEFAULT_KEEP_ORIGINAL
        self.restore_base_weight(layer_name)
        self.delete_adapter(adapter_name)
        if len(self.adapters):
            self.write_fused_weight(still_fused, keep, layer_name)

    def unwrap(self, layer_name: str = "") -> nn.Linear:
        """The base layer, its pristine weight restored where it was kept (fused with
        ``keep_original=False``, it keeps the fused weight: merge and unload)."""
        if not self.original_discarded:
            self.restore_base_weight(layer_name)
        return self.base_layer

    def extra_repr(self) -> str:
        adapters = ", ".join(self.adapters.keys())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"mode={self.forward_mode}, adapters=[{adapters}]"
        )


def snella_layers(model: nn.Module) -> dict[str, SnellaLinear]:
    """Every SnellaLinear in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SnellaLinear)}

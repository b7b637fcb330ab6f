"""The SNELLA weight adapter ComfyUI's loader uses (``comfy.weight_adapter``).

ComfyUI's ``comfy.lora.load_lora`` offers every key prefix its key map knows to each class in
``comfy.weight_adapter.adapters``; a class claims a prefix by returning an instance from
``load``. When the model is patched, ``comfy.lora.calculate_weight`` calls the instance's
``calculate_weight`` with the (possibly row-sliced) weight, and ComfyUI's bypass mode (newer
versions) adds ``h(x, base_out)`` to the layer's output instead of touching the weight.

The methods live in :class:`SnellaAdapterMethods`, which imports nothing from ComfyUI;
:func:`adapter_class` combines them with ComfyUI's ``WeightAdapterBase`` the first time it is
called inside a ComfyUI process. Interface read from ComfyUI a125cd84 (v0.3.64,
``comfy/weight_adapter/base.py``, ``comfy/lora.py``) and 511d2e5f (``bypass.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SnellaError
from .layout import SnellaLayerTensors

logger = logging.getLogger(__name__)

ADAPTER_NAME = "snella"
_ADAPTER_CLASS: Optional[type] = None


class SnellaAdapterMethods:
    """What ComfyUI calls on a SNELLA layer; mixed into ``WeightAdapterBase`` by
    :func:`adapter_class`.

    Attributes:
        loaded_keys: the file keys this layer claimed.
        layer: the decoded tensors (float32 factors, scalars, τ, config).
        weights: empty: ComfyUI's bypass mode casts every tensor in ``weights`` to the base
            dtype, which would round the float32 factors, so they live in ``layer``.
        multiplier: set by ComfyUI's bypass hook (the strength); 1 otherwise.
    """

    name = ADAPTER_NAME
    multiplier = 1.0

    def __init__(self, loaded_keys: set[str], layer: SnellaLayerTensors) -> None:
        self.loaded_keys = loaded_keys
        self.layer = layer
        self.weights: tuple = ()
        self._bypass_delta: Optional[Tensor] = None

    @classmethod
    def load(cls, x: str, lora: Mapping[str, Tensor], alpha: Optional[float] = None,
             dora_scale: Optional[Tensor] = None, loaded_keys: Optional[set[str]] = None):
        """Claim the SNELLA layer stored under prefix ``x`` of the file's tensors ``lora``;
        None when there is none (``alpha`` and ``dora_scale`` belong to LoRA files).

        Raises:
            SnellaFormatError naming the key when the layer is incomplete or malformed.
        """
        layer = SnellaLayerTensors.find(x, lora)
        if layer is None:
            return None
        claimed = set(layer.keys)
        if loaded_keys is not None:
            loaded_keys.update(claimed)
        return cls(claimed, layer)

    def _target(self, weight: Tensor, key: Any, offset: Optional[tuple[int, int, int]]) -> Optional[Tensor]:
        """The view of ``weight`` this layer's ΔW lands in: ``weight`` itself (ComfyUI narrows a
        fused q/k/v weight before calling), else its ``offset = (dim, start, length)`` slice."""
        rows, numel = self.layer.out_features, self.layer.out_features * self.layer.in_features
        if weight.shape[0] == rows and weight.numel() == numel:
            return weight
        if offset is not None:
            dim, start, length = offset
            view = weight.narrow(dim, start, length)
            if view.shape[0] == rows and view.numel() == numel:
                return view
        logger.error("SNELLA %s (%s): the weight %s does not fit the layer's %dx%d ΔW; not merged",
                     self.layer.prefix, key, tuple(weight.shape), self.layer.out_features, self.layer.in_features)
        return None

    def calculate_weight(self, weight: Tensor, key: Any, strength: float, strength_model: float,
                         offset: Optional[tuple[int, int, int]], function: Optional[Callable[[Tensor], Tensor]],
                         intermediate_dtype: torch.dtype = torch.float32, original_weight: Any = None) -> Tensor:
        """Add ``strength·ΔW`` to ``weight`` in place and return it.

        ΔW is built in float32 by the library's adapter with the file's τ (as ``fuse_snella``);
        ``strength·ΔW`` is formed in ``intermediate_dtype`` widened to at least float32, passed
        through ``function`` (ComfyUI's per-key transform, e.g. Flux's swapped adaLN halves) in
        the weight's dtype and added. ``strength_model`` was already applied to the weight by
        ComfyUI. A ``weight`` that is ComfyUI's row slice of a fused weight is updated in place.
        """
        if strength == 0.0:
            return weight
        target = self._target(weight, key, offset)
        if target is None:
            return weight
        compute_dtype = torch.promote_types(intermediate_dtype, torch.float32)
        delta = self.layer.delta_weight(weight.device).to(compute_dtype).reshape(target.shape)
        update = (delta * strength).to(target.dtype)
        target += update if function is None else function(update)
        return weight

    def _delta_in(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """weight·ΔW on ``device`` in ``dtype``, built once for bypass forwards (float32 build)."""
        cached = self._bypass_delta
        if cached is None or cached.device != device or cached.dtype != dtype:
            cached = self.layer.delta_weight(device).to(dtype)
            self._bypass_delta = cached
        return cached

    def h(self, x: Tensor, base_out: Tensor) -> Tensor:
        """Bypass mode: ``multiplier·x·ΔWᵀ`` in ``base_out``'s dtype; the base weight is never
        touched (a quantized weight would round a merged ΔW away).

        Raises:
            SnellaError when the module's outputs are not this layer's rows (a fused q/k/v
            module: ComfyUI's bypass loader passes no row offset).
        """
        outputs = base_out.shape[-1]
        if outputs != self.layer.out_features:
            raise SnellaError(
                f"SNELLA layer {self.layer.prefix}: bypass mode adds a {self.layer.out_features}-row ΔW to a "
                f"module with {outputs} outputs (a fused q/k/v weight); load this file with the regular "
                "Load LoRA node, which patches the right rows")
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32
        out = F.linear(x.to(dtype), self._delta_in(x.device, dtype))
        multiplier = float(getattr(self, "multiplier", 1.0))
        if multiplier != 1.0:
            out = out * multiplier
        return out.to(base_out.dtype)

    def g(self, y: Tensor) -> Tensor:
        """Bypass mode's output transform: none for SNELLA."""
        return y


def adapter_class() -> type:
    """``SnellaWeightAdapter``: :class:`SnellaAdapterMethods` on ComfyUI's ``WeightAdapterBase``
    (imported here, so only inside a ComfyUI process)."""
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is None:
        from comfy.weight_adapter.base import WeightAdapterBase

        _ADAPTER_CLASS = type("SnellaWeightAdapter", (SnellaAdapterMethods, WeightAdapterBase),
                              {"__module__": __name__, "__doc__": SnellaAdapterMethods.__doc__})
    return _ADAPTER_CLASS


def register() -> type:
    """Append the SNELLA adapter to ``comfy.weight_adapter.adapters`` (once) so ComfyUI's Load
    LoRA nodes load ``snella-export --to comfyui`` files; returns the class."""
    import comfy.weight_adapter as comfy_adapters

    cls = adapter_class()
    if not any(getattr(known, "name", None) == ADAPTER_NAME for known in comfy_adapters.adapters):
        comfy_adapters.adapters.append(cls)
    return cls

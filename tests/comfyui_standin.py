"""A minimal stand-in of the ComfyUI interface the SNELLA node uses, written here from ComfyUI's
behaviour (read at a125cd84 / 511d2e5f; CI has no ComfyUI):

- ``comfy.weight_adapter.base.WeightAdapterBase``: ``load(x, lora, alpha, dora_scale,
  loaded_keys)`` returns an instance or None; ``calculate_weight(weight, key, strength,
  strength_model, offset, function, intermediate_dtype, original_weight)``; ``h``/``g`` for
  bypass mode.
- ``comfy.weight_adapter.adapters``: the list of classes the loader offers each key prefix to.
- :func:`load_lora`: for every prefix of the model's key map, read ``<x>.alpha`` /
  ``<x>.dora_scale``, offer the prefix to every registered class, keep what claims it; report
  the file keys nobody claimed (ComfyUI logs "lora key not loaded" for each).
- :func:`calculate_weight`: for each patch ``(strength, adapter, strength_model, offset,
  function)`` narrow the weight to the offset's rows, scale by strength_model, let the adapter
  update the view, continue on the full weight.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch


class WeightAdapterBase:
    """ComfyUI's base: the loader and the patcher call only these."""

    name: str
    loaded_keys: set[str]
    weights: list

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError

    def h(self, x, base_out):
        raise NotImplementedError

    def g(self, y):
        return y


class StandInLoRA(WeightAdapterBase):
    """A LoRA-like class registered before SNELLA, so the loop offers every prefix to two
    classes; it claims ``<x>.lora_up.weight`` / ``<x>.lora_down.weight`` pairs only."""

    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha))


def comfy_modules() -> dict[str, types.ModuleType]:
    """``comfy``, ``comfy.weight_adapter``, ``comfy.weight_adapter.base`` for ``sys.modules``."""
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    package = types.ModuleType("comfy.weight_adapter")
    package.__path__ = []
    base = types.ModuleType("comfy.weight_adapter.base")
    base.WeightAdapterBase = WeightAdapterBase
    package.base = base
    package.WeightAdapterBase = WeightAdapterBase
    package.adapters = [StandInLoRA]
    comfy.weight_adapter = package
    return {"comfy": comfy, "comfy.weight_adapter": package, "comfy.weight_adapter.base": base}


def load_lora(lora: dict[str, torch.Tensor], key_map: dict[str, Any],
              adapters: list[type]) -> tuple[dict[Any, Any], set[str]]:
    """``({model key or (key, offset[, function]): adapter}, unclaimed file keys)``."""
    patches: dict[Any, Any] = {}
    loaded: set[str] = set()
    for prefix, target in key_map.items():
        alpha = None
        if f"{prefix}.alpha" in lora:
            alpha = lora[f"{prefix}.alpha"].item()
            loaded.add(f"{prefix}.alpha")
        dora_scale = lora.get(f"{prefix}.dora_scale")
        for cls in adapters:
            adapter = cls.load(prefix, lora, alpha, dora_scale, loaded)
            if adapter is not None:
                patches[target] = adapter
                loaded.update(adapter.loaded_keys)
    return patches, set(lora) - loaded


def add_patches(patches: dict[Any, Any], strength: float,
                strength_model: float = 1.0) -> dict[str, list[tuple]]:
    """Per model key, the patch tuples ``(strength, adapter, strength_model, offset, function)``
    (a target is a key, ``(key, offset)`` or ``(key, offset, function)``)."""
    by_key: dict[str, list[tuple]] = {}
    for target, adapter in patches.items():
        key, offset, function = (target, None, None) if isinstance(target, str) else (
            target[0], target[1], target[2] if len(target) > 2 else None)
        by_key.setdefault(key, []).append((strength, adapter, strength_model, offset, function))
    return by_key


def calculate_weight(patches: list[tuple], weight: torch.Tensor, key: str,
                     intermediate_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Apply the patches of one model weight, as ComfyUI's patcher does."""
    for strength, adapter, strength_model, offset, function in patches:
        function = function or (lambda tensor: tensor)
        full: Optional[torch.Tensor] = None
        if offset is not None:
            full, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        output = adapter.calculate_weight(weight, key, strength, strength_model, offset, function,
                                          intermediate_dtype, None)
        weight = output if full is None else full
    return weight

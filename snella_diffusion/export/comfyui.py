"""``snella-export --to comfyui``: each layer's SNELLA factors, scalars and τ under the key
prefix ComfyUI's key map gives the layer, for the SNELLA weight adapter
(``snella_diffusion.comfyui``) to rebuild ΔW exactly inside ComfyUI.

Prefixes (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``):
UNets and CLIP text encoders take the kohya names of :mod:`.families` (``lora_unet_…``,
``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``); SD3 and Flux.1 transformers take
``transformer.<diffusers path>``, which ComfyUI maps onto its own weights (for q, k, v and the
MLP input: onto row slices of the fused weight, ``comfy.utils.mmdit_to_diffusers`` /
``flux_to_diffusers``), so each SNELLA layer keeps its own τ. The families with a
:class:`~.families.NameMap` (Z-Image, Flux.2, Krea 2, Lumina 2, Wan, Qwen-Image 2.1, Ideogram 4,
LTX-2, HunyuanVideo 1.5) take its ``comfyui_prefix``:
the layer's own key, or ``transformer.<path>`` where ComfyUI maps a row slice. No dense ΔW is
written; a layer whose every entry is dropped (ΔW = 0) is left out.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from torch import Tensor

from ..comfyui.layout import LAYOUT_VERSION, encode_layer
from ..errors import SnellaError
from .base import BaseModel
from .deltas import AdapterSource, layer_shape
from .families import LayerKey, flux_fused_targets

# Flux layers ComfyUI maps besides those holding a BFL name in .families: the final adaLN,
# whose swapped scale/shift halves ComfyUI's key map undoes with a transform of the update.
FLUX_EXTRA_PATHS = ("norm_out.linear",)


def comfyui_prefix(base: BaseModel, layer: LayerKey, spelled: Callable[[LayerKey], str]) -> str:
    """The key prefix ComfyUI maps onto ``layer`` for the base's family.

    Raises:
        SnellaError: the layer has no name ComfyUI maps (a Flux layer outside ``flux_to_diffusers``).
    """
    component, path = layer
    family = base.family
    if family.names is not None and component in family.names.components:
        return family.names.comfyui_prefix(component, path)
    if family.name in ("flux", "chroma") and component == "transformer":
        _, covered = flux_fused_targets({path})
        if path not in covered and path not in FLUX_EXTRA_PATHS:
            raise SnellaError(
                f"layer transformer.{path}: ComfyUI's Flux key map (comfy.utils.flux_to_diffusers) has no "
                "name for this layer, so ComfyUI could not load it; train without it or export with --to peft")
        return f"transformer.{path}"
    if family.name in ("sd3", "pixart", "qwen-image", "hidream") and component == "transformer":
        return f"transformer.{path}"
    return family.kohya_key(component, spelled(layer))


def comfyui_tensors(sources: list[AdapterSource], base: BaseModel, adapter_weight: float,
                    spelled: Callable[[LayerKey], str],
                    layers: list[LayerKey]) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """The file's tensors, ``{prefix: "component.path"}`` of the written ``layers``, and the
    layers left out because their ΔW is zero.

    Raises:
        SnellaError: more than one adapter (ComfyUI keeps one adapter per key: list each file in
            its own Load LoRA node), or a layer ComfyUI cannot name.
    """
    if len(sources) != 1:
        raise SnellaError(
            f"--to comfyui takes one ADAPTER, got {len(sources)}: export each file on its own and chain "
            "one Load LoRA node per file in ComfyUI (each keeps its own strength)")
    source = sources[0]
    weight = adapter_weight * source.weight
    tensors: dict[str, Tensor] = {}
    prefixes: dict[str, str] = {}
    zero: list[str] = []
    for layer in layers:
        component, path = layer
        params = source.file.layers[component][path]
        shape = layer_shape(sources, layer)
        prefix = comfyui_prefix(base, layer, spelled)
        if prefix in prefixes:
            raise SnellaError(f"layers {prefixes[prefix]} and {component}.{path} both map to ComfyUI key {prefix}: "
                              "export each component into its own file with --component")
        drop_count = int(params["drop_count"]) if "drop_count" in params else None
        all_dropped = drop_count == shape[0] * shape[1] if drop_count is not None else float(params["sparsity"]) == 1.0
        if weight == 0.0 or all_dropped:
            zero.append(f"{component}.{path}")
            continue
        tensors.update(encode_layer(prefix, params, source.file.config, shape, weight))
        prefixes[prefix] = f"{component}.{path}"
    return tensors, prefixes, zero


def comfyui_metadata(prefixes: dict[str, str], zero: list[str]) -> dict[str, str]:
    """Header entries of a comfyui export beside the common ones (the SNELLA config is there
    already as ``snella_config``); ComfyUI itself reads only the tensors."""
    return {
        "snella_comfyui_layout": str(LAYOUT_VERSION),
        "snella_comfyui_layers": json.dumps(prefixes, sort_keys=True),
        "snella_comfyui_zero_layers": json.dumps(zero),
    }


def check_comfyui_flags(dtype: Optional[str], rank_flags: tuple) -> None:
    """Raises SnellaError naming the flag a comfyui export cannot honour."""
    if dtype not in (None, "fp32"):
        raise SnellaError(
            f"--dtype {dtype}: --to comfyui keeps the SNELLA factors float32 (rounded to fp16 they moved "
            "patched weights by up to 86x max|ΔW|); leave --dtype out")
    if any(flag is not None for flag in rank_flags):
        raise SnellaError("--rank / --energy / --max_rank apply to --to lora or peft, not comfyui")

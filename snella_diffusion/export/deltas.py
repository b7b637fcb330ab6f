"""The ΔW an export writes: Σ_k w_k·ΔW_k of the given SNELLA files, layer by layer.

Each layer's sum is built by a :class:`~snella_diffusion.layer.SnellaLinear` holding every
file's adapter for that layer, activated with the files' weights, so it is the very sum
``set_snella_adapters`` applies and ``fuse_snella`` fuses (float32, the file's τ). The wrapped
base weight is left uninitialised: ΔW does not depend on it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..io import SnellaFile, copy_adapter_params, file_sha256, plan_load, read_snella_file
from ..layer import SnellaLinear
from .base import BaseModel
from .families import LayerKey

CHECK_ADAPTER_NAME = "snella_export"


@dataclasses.dataclass
class AdapterSource:
    """One SNELLA file to export, its weight w_k and its SHA-256."""

    path: Path
    weight: float
    file: SnellaFile
    sha256: str


def read_adapters(specs: list[tuple[Union[str, os.PathLike], float]]) -> list[AdapterSource]:
    """Read and validate every ``(path, weight)``; raises SnellaFormatError naming the file."""
    if not specs:
        raise SnellaError("no ADAPTER given: pass at least one SNELLA .safetensors file")
    sources = []
    for path, weight in specs:
        snella_file = read_snella_file(path)
        sources.append(AdapterSource(snella_file.path, float(weight), snella_file, file_sha256(snella_file.path)))
    return sources


def needed_components(adapters: list[AdapterSource]) -> list[str]:
    return sorted({component for adapter in adapters for component in adapter.file.layers})


def check_against_base(adapters: list[AdapterSource], base: BaseModel) -> None:
    """Every adapted layer exists in the base as a linear layer of the same shape.

    Raises:
        SnellaFormatError / SnellaError naming the file and the first layer at fault.
    """
    for adapter in adapters:
        for component, layers in adapter.file.layers.items():
            if component not in base.components:
                first = next(iter(layers))
                raise SnellaError(
                    f"{adapter.path}: layer {component}.{first}: the base {base.source} "
                    f"({base.pipeline_class}) has no component {component!r} "
                    f"(it has {sorted(base.components)})"
                )
        plan_load(adapter.file, {c: base.components[c] for c in adapter.file.layers}, CHECK_ADAPTER_NAME)


def adapted_layers(adapters: list[AdapterSource]) -> list[LayerKey]:
    """Every ``(component, module path)`` adapted by at least one file, sorted."""
    return sorted({(c, p) for adapter in adapters for c, layers in adapter.file.layers.items() for p in layers})


def layer_shape(adapters: list[AdapterSource], layer: LayerKey) -> tuple[int, int]:
    """``(m, n)`` of an adapted layer, as the files record it."""
    key = f"{layer[0]}.{layer[1]}"
    for adapter in adapters:
        if key in adapter.file.shapes:
            out_features, in_features = adapter.file.shapes[key]
            return int(out_features), int(in_features)
    raise SnellaError(f"layer {key} is adapted by none of the files")


@torch.no_grad()
def merged_delta(adapters: list[AdapterSource], layer: LayerKey, scale: float = 1.0) -> Tensor:
    """``scale·Σ_k w_k·ΔW_k`` of ``layer`` over the files that adapt it, ``(m, n)`` float32."""
    component, path = layer
    out_features, in_features = layer_shape(adapters, layer)
    base = nn.Linear(in_features, out_features, bias=False, device="meta").to_empty(device="cpu")
    wrapper = None
    names, weights = [], []
    for index, adapter in enumerate(adapters):
        params = adapter.file.layers.get(component, {}).get(path)
        if params is None:
            continue
        name = f"adapter_{index}"
        if wrapper is None:
            wrapper = SnellaLinear(base, adapter.file.config, name)
        else:
            wrapper.add_adapter(name, adapter.file.config)
        copy_adapter_params(wrapper.adapters[name], params)
        names.append(name)
        weights.append(scale * adapter.weight)
    if wrapper is None:
        raise SnellaError(f"layer {component}.{path} is adapted by none of the files")
    wrapper.set_active(names, weights)
    return wrapper.delta_weight()

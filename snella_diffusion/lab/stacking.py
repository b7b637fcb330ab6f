"""Stacking two adapters in the lab (issue 26): the same combine modes for any method's ΔW.

SNELLA adapters stack inside the pipeline (``loaders.set_snella_adapters(..., combine=...)``).
For LoRA (or any method whose ΔW the lab can read, ``diagnostics.lora_deltas``) the per-layer
updates of each adapter are combined with ``combine.combine_deltas`` and written into the base
weights: W ← W0 + combined ΔW. A layer adapted by only some of the adapters combines those.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from snella_diffusion.combine import DEFAULT_TIES_DENSITY, combine_deltas


def combine_layer_deltas(
    adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float], mode: str,
    density: float = DEFAULT_TIES_DENSITY,
) -> dict[str, Tensor]:
    """``{layer: combined ΔW}`` over the layers of every adapter's ``{layer: ΔW}`` (float32)."""
    layers = list(dict.fromkeys(name for adapter in adapters for name in adapter))
    combined = {}
    for name in layers:
        present = [(adapter[name], weight) for adapter, weight in zip(adapters, weights) if name in adapter]
        combined[name] = combine_deltas([d for d, _ in present], [w for _, w in present], mode, density)
    return combined


@torch.no_grad()
def add_to_base_weights(pipe: Any, deltas: Mapping[str, Tensor]) -> int:
    """Add ``{"<component>.<module path>": ΔW}`` to the pipeline's linear weights, in place
    (in float32, cast back to the weight's dtype); returns the number of layers changed."""
    for key, delta in deltas.items():
        component, _, path = key.partition(".")
        weight = getattr(pipe, component).get_submodule(path).weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(deltas)

"""ΔW diagnostics of a trained adapter and of two stacked adapters (issue 26).

Per layer l with update ΔW_l ``(m_l, n_l)`` and base weight W0_l:

- constant share: the fraction of ΔW's energy in its constant component mean(ΔW)·11ᵀ, i.e.
  m·n·mean(ΔW)² / ‖ΔW‖²_F; pooled over layers as Σ_l m_l n_l mean_l² / Σ_l ‖ΔW_l‖²;
- relative norm ‖ΔW‖_F / ‖W0‖_F; pooled as sqrt(Σ‖ΔW_l‖² / Σ‖W0_l‖²), plus the largest layer's;
- kept fraction: the fraction of non-zero entries of ΔW, and their histogram over layers;
- between two adapters A and B: mask overlap |A≠0 ∧ B≠0| / |A≠0 ∨ B≠0| (Jaccard) beside its
  value at chance for independent masks of the same kept fractions, ka·kb / (ka + kb − ka·kb),
  and the cosine ⟨ΔW_A, ΔW_B⟩ / (‖ΔW_A‖‖ΔW_B‖), per layer and pooled (sums over layers).

Updates are read from a pipeline's SNELLA layers (``snella_deltas``) or PEFT LoRA layers
(``lora_deltas``) as ``{"<component>.<module path>": ΔW}`` in float32.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

KEPT_FRACTION_BINS = 10


def constant_share(delta: Tensor) -> float:
    """m·n·mean(ΔW)² / ‖ΔW‖²_F of one update (0 for ΔW = 0)."""
    values = delta.double()
    energy = float(values.square().sum())
    return values.numel() * float(values.mean()) ** 2 / energy if energy > 0 else 0.0


def kept_fraction(delta: Tensor) -> float:
    """The fraction of non-zero entries of ΔW."""
    return float((delta != 0).double().mean())


def adapter_diagnostics(deltas: Mapping[str, Tensor], bases: Mapping[str, Tensor]) -> dict[str, Any]:
    """Diagnostics of one adapter's updates ``{layer: ΔW}`` against the base weights ``{layer: W0}``.

    Returns:
        ``constant_share`` (pooled), ``relative_norm`` (pooled), ``max_relative_norm`` and
        ``max_relative_norm_layer``, ``kept_fraction`` (entries, pooled), and
        ``kept_fraction_histogram``: layer counts in ``KEPT_FRACTION_BINS`` equal bins of [0, 1].
    """
    constant = energy = base_energy = kept = entries = 0.0
    relative: dict[str, float] = {}
    fractions = []
    for name, delta in deltas.items():
        values = delta.double()
        layer_energy = float(values.square().sum())
        layer_base = float(bases[name].double().square().sum())
        constant += values.numel() * float(values.mean()) ** 2
        energy += layer_energy
        base_energy += layer_base
        kept += float((delta != 0).sum())
        entries += delta.numel()
        fractions.append(kept_fraction(delta))
        relative[name] = (layer_energy / layer_base) ** 0.5 if layer_base > 0 else float("inf")
    worst = max(relative, key=relative.get) if relative else None
    histogram, _ = np.histogram(fractions, bins=KEPT_FRACTION_BINS, range=(0.0, 1.0))
    return {
        "constant_share": constant / energy if energy > 0 else 0.0,
        "relative_norm": (energy / base_energy) ** 0.5 if base_energy > 0 else 0.0,
        "max_relative_norm": relative[worst] if worst else 0.0,
        "max_relative_norm_layer": worst,
        "kept_fraction": kept / entries if entries else 0.0,
        "kept_fraction_histogram": histogram.tolist(),
    }


def pair_diagnostics(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, float]:
    """Mask overlap (Jaccard, and its chance value) and cosine of two adapters' updates, pooled
    over the layers both adapt."""
    shared = [name for name in first if name in second]
    intersection = union = dot = first_energy = second_energy = 0.0
    chance_intersection = chance_union = 0.0
    for name in shared:
        a, b = first[name].double(), second[name].double()
        mask_a, mask_b = a != 0, b != 0
        intersection += float((mask_a & mask_b).sum())
        union += float((mask_a | mask_b).sum())
        ka, kb = float(mask_a.double().mean()), float(mask_b.double().mean())
        chance_intersection += ka * kb * a.numel()
        chance_union += (ka + kb - ka * kb) * a.numel()
        dot += float((a * b).sum())
        first_energy += float(a.square().sum())
        second_energy += float(b.square().sum())
    norms = (first_energy * second_energy) ** 0.5
    return {
        "layers": float(len(shared)),
        "mask_overlap": intersection / union if union else 0.0,
        "mask_overlap_chance": chance_intersection / chance_union if chance_union else 0.0,
        "cosine": dot / norms if norms > 0 else 0.0,
    }


def _components(pipe: Any) -> dict[str, torch.nn.Module]:
    names = ("unet", "transformer", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)}


@torch.no_grad()
def snella_deltas(pipe: Any, adapter_name: Optional[str] = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``{layer: ΔW}``, ``{layer: W0}``) of a pipeline's SNELLA layers: adapter
    ``adapter_name``'s update, or the active adapters combined (unfused pipelines)."""
    from snella_diffusion.layer import snella_layers

    deltas, bases = {}, {}
    for component, model in _components(pipe).items():
        for path, layer in snella_layers(model).items():
            if adapter_name is not None and adapter_name not in layer.adapters:
                continue
            deltas[f"{component}.{path}"] = layer.delta_weight(adapter_name).detach().float().cpu()
            bases[f"{component}.{path}"] = layer.base_layer.weight.detach().float().cpu()
    return deltas, bases


@torch.no_grad()
def lora_deltas(pipe: Any, adapter_name: Optional[str] = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(``{layer: ΔW}``, ``{layer: W0}``) of a pipeline's PEFT LoRA layers (scale included):
    adapter ``adapter_name`` (default: each layer's first adapter)."""
    deltas, bases = {}, {}
    for component, model in _components(pipe).items():
        for path, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or not len(lora_a):
                continue
            name = adapter_name if adapter_name is not None else next(iter(lora_a.keys()))
            if name not in lora_a:
                continue
            deltas[f"{component}.{path}"] = module.get_delta_weight(name).detach().float().cpu()
            bases[f"{component}.{path}"] = module.get_base_layer().weight.detach().float().cpu()
    return deltas, bases

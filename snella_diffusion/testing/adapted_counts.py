"""Adapted layers of a target preset on a published config, counted on the ``meta`` device
(nothing allocated): what ``benchmarks/count_adapted_layers.py`` tables and
``benchmarks/wan_memory.py`` builds its accounting on."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SnellaConfig
from ..inject import apply_snella
from .reference_configs import build_reference_model

GIB = 1024 ** 3


@dataclass(frozen=True)
class AdaptedCount:
    """One model's counts; sizes in GiB of bf16 (2 bytes per parameter, float32 adapter)."""

    model: str
    preset: str
    rank: int
    adapted_layers: int
    adapted_weights: int
    adapter_parameters: int
    denoiser_parameters: int
    base_bf16_gib: float
    adapter_fp32_gib: float


def count_adapted(model: str, preset: str = "dit", rank: int = 8) -> AdaptedCount:
    """Build ``model`` on ``meta``, apply SNELLA with ``preset`` at ``rank`` and count."""
    denoiser = build_reference_model(model, device="meta")
    base_parameters = sum(parameter.numel() for parameter in denoiser.parameters())
    layers = apply_snella(denoiser, SnellaConfig(rank=rank, target_modules=preset))
    adapted_weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    adapter_parameters = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return AdaptedCount(
        model=model, preset=preset, rank=rank, adapted_layers=len(layers), adapted_weights=adapted_weights,
        adapter_parameters=adapter_parameters, denoiser_parameters=base_parameters,
        base_bf16_gib=round(2 * base_parameters / GIB, 2), adapter_fp32_gib=round(4 * adapter_parameters / GIB, 3),
    )

"""The inference ΔW cache of SnellaLinear layers: measure it, free it, or turn it off.

An unfused inference forward keeps Σ_k w_k·ΔW_k per layer (one ``(m, n)`` matrix in the base
dtype) so that a denoising loop builds it once. That is a second copy of every adapted weight:
on Flux.1-dev with the ``dit`` preset (8.6 G adapted entries) about 17 GB in bf16. Validation
during training runs under ``without_delta_cache``: each layer builds its ΔW, uses it and
drops it, so validation needs one layer's ΔW at a time on top of the model.

The cache is ``SnellaLinear``'s (``delta_cache_bytes``, ``release_delta_cache``,
``set_inference_delta_caching``); these functions loop over the layers of models.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .layer import snella_layers


def delta_cache_bytes(*models: nn.Module) -> int:
    """Bytes held by the inference ΔW caches of every SnellaLinear in ``models``."""
    return sum(layer.delta_cache_bytes() for model in models for layer in snella_layers(model).values())


def release_delta_caches(*models: nn.Module) -> None:
    """Free the inference ΔW caches of every SnellaLinear in ``models``."""
    for model in models:
        for layer in snella_layers(model).values():
            layer.release_delta_cache()


@contextlib.contextmanager
def without_delta_cache(*models: nn.Module) -> Iterator[None]:
    """Inference forwards inside build each layer's ΔW afresh and keep nothing; existing
    caches are freed on entry. The layers' previous setting is restored on exit."""
    layers = [layer for model in models for layer in snella_layers(model).values()]
    previous = [layer.cache_inference_delta for layer in layers]
    for layer in layers:
        layer.set_inference_delta_caching(False)
    try:
        yield
    finally:
        for layer, setting in zip(layers, previous):
            layer.set_inference_delta_caching(setting)

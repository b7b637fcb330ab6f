"""Generated latents reach the VAE in the VAE's dtype.

Under mixed precision the trainer keeps the VAE in float32 (SD/SDXL VAEs overflow in fp16)
while the denoiser runs in fp16/bf16, so a diffusers pipeline built from those modules hands
half-precision latents to a float32 VAE decoder (``RuntimeError: Input type (c10::BFloat16)
and bias type (float) should be the same``). diffusers' own scripts avoid it by loading the
whole sampling pipeline in one dtype; here the decoder casts its inputs instead, so class-image
generation and validation share the training modules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def _cast_inputs_to(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return hook


def decoder_modules(vae: nn.Module) -> list[nn.Module]:
    """The modules a latent enters first when ``vae.decode`` runs (``post_quant_conv`` when the
    VAE has one, and the ``decoder``)."""
    return [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)) if isinstance(m, nn.Module)]


@contextlib.contextmanager
def decode_in_vae_dtype(vae: nn.Module) -> Iterator[nn.Module]:
    """While active, latents of any floating dtype given to ``vae.decode`` are cast to the
    VAE's own dtype first (the output is then in the VAE's dtype)."""
    dtype = next(vae.parameters()).dtype
    handles = [m.register_forward_pre_hook(_cast_inputs_to(dtype)) for m in decoder_modules(vae)]
    try:
        yield vae
    finally:
        for handle in handles:
            handle.remove()

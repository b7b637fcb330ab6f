"""Loss options of diffusers' training scripts and kohya's: ``--noise_offset``,
``--input_perturbation`` and the loss mask of ``--masked_loss``.

With ``noise`` ε ``(B, C, h, w)`` drawn for a batch, and all draws from the run's checkpointed
noise generator (in this order):

- noise offset o: ε ← ε + o·n, n ~ N(0, 1) of shape ``(B, C, 1, 1)`` (one shift per sample and
  channel); the target uses the shifted ε (diffusers' ``train_text_to_image``).
- input perturbation q: the denoiser input is built from ε + q·n', n' ~ N(0, 1) like ε, while
  the target keeps ε (Ning et al. 2023, diffusers' ``--input_perturbation``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def perturb_noise(
    noise: Tensor, generator: Optional[torch.Generator], noise_offset: float = 0.0, input_perturbation: float = 0.0
) -> tuple[Tensor, Optional[Tensor]]:
    """``(target noise, input noise or None)`` for the offsets above (draws on the CPU generator)."""
    if noise_offset:
        shift = torch.randn((noise.shape[0], noise.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * shift.to(noise)
    input_noise = None
    if input_perturbation:
        input_noise = noise + input_perturbation * torch.randn(noise.shape, generator=generator).to(noise)
    return noise, input_noise


def latent_loss_mask(pixel_mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """A pixel mask ``(B, 1, H, W)`` averaged over each latent cell → ``(B, 1, h, w)`` float32."""
    return F.interpolate(pixel_mask.float(), size=latent_size, mode="area")

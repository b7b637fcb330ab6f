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

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .flag_settings import FlagSettings


@dataclass(frozen=True)
class LossSettings(FlagSettings):
    """The loss options of a run (see the module docstring)."""

    noise_offset: float
    input_perturbation: float
    masked_loss: bool
    mask_dir: Optional[str]

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("loss")
        group.add_argument("--noise_offset", type=float, default=0.0,
                           help="Add this times N(0,1) per sample and channel to the training noise (0: off).")
        group.add_argument("--input_perturbation", type=float, default=0.0,
                           help="Perturb the noise of the denoiser input (not of the target) by this times N(0,1) (0: off).")
        group.add_argument("--masked_loss", action="store_true",
                           help="Weight the loss by a mask in latent space: each image's alpha channel, or --mask_dir.")
        group.add_argument("--mask_dir", type=str, default=None,
                           help="With --masked_loss: a folder of grayscale masks named like the images (white trains).")


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

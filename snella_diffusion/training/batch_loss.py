"""The DreamBooth loss of one batch (noise, timesteps, prediction, mask, prior preservation)."""

from __future__ import annotations

from typing import Any

import torch

from ..families import ModelFamily, TrainingComponents
from .loss_options import latent_loss_mask, perturb_noise
from .objectives import dreambooth_loss


def training_loss(
    family: ModelFamily,
    components: TrainingComponents,
    objective: Any,
    batch: dict[str, Any],
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    denoiser: torch.nn.Module,
    generator: torch.Generator,
    prior_loss_weight: float,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> torch.Tensor:
    """The DreamBooth loss of one batch: draw noise (``--noise_offset``,
    ``--input_perturbation``) and timesteps from ``generator``, predict, weight by the
    batch's ``loss_masks`` in latent space if any, and add the prior-preservation term on the
    class samples (after ``batch["num_instance"]``). A 0-dim float tensor."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noise, input_noise = perturb_noise(noise, generator, noise_offset, input_perturbation)
    sample = objective.prepare(latents, noise, generator, input_noise=input_noise)
    prediction = family.predict(components, sample.noisy_latents, sample.timesteps, conditioning, batch, denoiser=denoiser)
    mask = batch.get("loss_masks")
    if mask is not None:
        mask = latent_loss_mask(mask, tuple(latents.shape[-2:])).to(latents.device)
    return dreambooth_loss(prediction, sample.target, sample.weights, batch["num_instance"], prior_loss_weight, mask)

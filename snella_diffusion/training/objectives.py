"""Training objectives: what the denoiser sees and what it is compared with.

An objective turns clean latents and noise into an :class:`ObjectiveBatch` (the noisy input,
timesteps, regression target and optional per-sample loss weights). ``NoiseObjective`` is the
DDPM objective of Stable Diffusion (epsilon or v-prediction, optional min-SNR-γ weighting);
flow-matching objectives for DiTs plug in through the same ``prepare`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SnellaError


@dataclass
class ObjectiveBatch:
    """Inputs and target of one denoiser call.

    Attributes:
        noisy_latents: ``(B, C, h, w)`` the denoiser input.
        timesteps: ``(B,)`` the timesteps passed to the denoiser.
        target: same shape as ``noisy_latents``, what the prediction is regressed on.
        weights: ``(B,)`` per-sample loss weights, or None for uniform weighting.
    """

    noisy_latents: Tensor
    timesteps: Tensor
    target: Tensor
    weights: Optional[Tensor] = None


class TrainingObjective(Protocol):
    def prepare(self, latents: Tensor, noise: Tensor, generator: Optional[torch.Generator] = None,
                input_noise: Optional[Tensor] = None) -> ObjectiveBatch:
        """``input_noise`` (``--input_perturbation``) replaces ``noise`` in the denoiser input only."""
        ...


def snr_of(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t) for each timestep, float32 ``(B,)``."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for epsilon targets and
    min(SNR, γ)/(SNR + 1) for v targets (the v loss already carries a factor SNR + 1)."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


class NoiseObjective:
    """DDPM training: x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε with t uniform over the scheduler's
    training timesteps; the target is ε ("epsilon") or v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x_0
    ("v_prediction"), as the scheduler config says."""

    def __init__(self, scheduler: Any, snr_gamma: Optional[float] = None) -> None:
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise SnellaError(
                f"scheduler prediction_type={self.prediction_type!r}: training supports "
                "'epsilon' and 'v_prediction'"
            )
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.snr_gamma = snr_gamma

    def prepare(self, latents: Tensor, noise: Tensor, generator: Optional[torch.Generator] = None,
                input_noise: Optional[Tensor] = None) -> ObjectiveBatch:
        count = latents.shape[0]
        timesteps = torch.randint(0, self.num_timesteps, (count,), generator=generator, device="cpu")
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        weights = None
        if self.snr_gamma is not None:
            snr = snr_of(self.scheduler.alphas_cumprod, timesteps)
            weights = min_snr_weights(snr, self.snr_gamma, self.prediction_type)
        return ObjectiveBatch(noisy, timesteps, target, weights)


def weighted_mse(
    prediction: Tensor, target: Tensor, weights: Optional[Tensor] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Mean squared error in float32; with ``weights`` ``(B,)``, the mean of per-sample MSEs
    times their weights; with ``mask`` ``(B, 1, h, w)`` each squared error is multiplied by the
    mask of its position before the means (kohya's masked loss)."""
    if weights is None and mask is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is not None:
        per_sample = per_sample * mask.float()
    if weights is None:
        return per_sample.mean()
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    return (per_sample * weights.float()).mean()


def dreambooth_loss(
    prediction: Tensor,
    target: Tensor,
    weights: Optional[Tensor],
    num_instance: int,
    prior_loss_weight: float = 1.0,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Instance loss on the first ``num_instance`` samples plus ``prior_loss_weight`` times the
    prior-preservation loss on the rest (class samples), each a ``weighted_mse`` (with the
    rows of ``mask`` ``(B, 1, h, w)`` when given)."""
    head = None if weights is None else weights[:num_instance]
    head_mask = None if mask is None else mask[:num_instance]
    loss = weighted_mse(prediction[:num_instance], target[:num_instance], head, head_mask)
    if prediction.shape[0] > num_instance:
        tail = None if weights is None else weights[num_instance:]
        tail_mask = None if mask is None else mask[num_instance:]
        loss = loss + prior_loss_weight * weighted_mse(prediction[num_instance:], target[num_instance:], tail, tail_mask)
    return loss

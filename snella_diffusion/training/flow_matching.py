"""Rectified-flow (flow-matching) training pieces for SD3 and Flux.

Conventions (those of diffusers' SD3/Flux DreamBooth scripts, so flags mean what users expect):
a noise level σ ∈ (0, 1] mixes a clean latent x0 and Gaussian noise ε as

    x_σ = (1 - σ)·x0 + σ·ε,     target velocity v = ε - x0,

and the transformer receives the timestep t = σ·N (N = ``num_train_timesteps``, 1000).
σ is drawn by first drawing u ∈ [0, 1) from the ``--weighting_scheme`` density (logit-normal,
"mode", or uniform), taking the training timestep of index ⌊u·N⌋ of the scheduler's
descending table, and reading its σ (shifted by the scheduler's ``shift``). The schemes
"sigma_sqrt" and "cosmap" sample u uniformly and weight the loss instead.

Flux additionally packs latents into 2×2 patches, with one (0, row, column) id per patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .objectives import ObjectiveBatch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def _check_scheme(scheme: str) -> None:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"--weighting_scheme={scheme!r}: expected one of {WEIGHTING_SCHEMES}")


def mode_transform(u: Tensor, mode_scale: float) -> Tensor:
    """f(u) = 1 - u - s·(cos²(πu/2) - 1 + u), the SD3 paper's "mode" map of a uniform u.

    f(0) = 1, f(1) = 0 and f(1 - u) = 1 - f(u); s > 0 moves mass towards the middle, s < 0
    towards the ends, s = 0 is the identity up to u → 1 - u. f is monotone for
    -1 ≤ s ≤ 2/(π - 2) ≈ 1.75.
    """
    return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


def sample_density(
    scheme: str,
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Draw u ∈ [0, 1) for ``batch_size`` samples, float32 ``(batch_size,)``.

    "logit_normal": u = sigmoid(z), z ~ N(logit_mean, logit_std²); "mode": u = f_mode(v) with
    v ~ U[0, 1); "sigma_sqrt", "cosmap", "none": u ~ U[0, 1).
    """
    _check_scheme(scheme)
    if scheme == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=device)
        u = torch.sigmoid(normal * logit_std + logit_mean)
    elif scheme == "mode":
        u = mode_transform(torch.rand(batch_size, generator=generator, device=device), mode_scale)
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
    return u.clamp(0.0, 1.0 - 1e-7)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """σ' = shift·σ / (1 + (shift - 1)·σ): more time at high noise for shift > 1."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The training-time σ table of a FlowMatchEulerDiscreteScheduler.

    Index i (0 ≤ i < N) holds σ_i = shift((N - i)/N), descending from 1 to shift(1/N); the
    model timestep is σ·N. Schedulers with ``use_dynamic_shifting`` (Flux.1) train unshifted.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "FlowMatchSchedule":
        """Read ``num_train_timesteps``, ``shift`` and ``use_dynamic_shifting`` from a
        scheduler config (``scheduler.config`` or its scheduler_config.json)."""
        shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
        return cls(int(config.get("num_train_timesteps", 1000)), shift)

    def sigma_table(self, device: Optional[torch.device] = None) -> Tensor:
        """σ for each training index, float32 ``(N,)``, descending."""
        steps = torch.arange(self.num_train_timesteps, 0, -1, dtype=torch.float32, device=device)
        return shift_sigmas(steps / self.num_train_timesteps, self.shift)

    def sigmas_for(self, u: Tensor) -> Tensor:
        """σ of the training index ⌊u·N⌋ for each u ∈ [0, 1), float32, same shape as u."""
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.sigma_table(u.device)[indices]

    def sample(
        self,
        scheme: str,
        batch_size: int,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``(sigmas, timesteps)``, each float32 ``(batch_size,)``; timesteps = σ·N."""
        u = sample_density(scheme, batch_size, logit_mean, logit_std, mode_scale, generator, device)
        sigmas = self.sigmas_for(u)
        return sigmas, sigmas * self.num_train_timesteps


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample loss weight, same shape as ``sigmas``.

    "sigma_sqrt": σ⁻²; "cosmap": 2 / (π·(1 - 2σ + 2σ²)); otherwise 1.
    """
    _check_scheme(scheme)
    if scheme == "sigma_sqrt":
        return sigmas.float().pow(-2.0)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas.float() + 2.0 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, ..., 1)`` matching ``like``'s rank and dtype."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def add_flow_noise(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_σ = (1 - σ)·x0 + σ·ε; ``sigmas`` is ``(B,)``, latents and noise ``(B, ...)``."""
    sigma = _broadcast(sigmas, latents)
    return (1.0 - sigma) * latents + sigma * noise


def flow_target(latents: Tensor, noise: Tensor) -> Tensor:
    """The velocity the model learns: ε - x0."""
    return noise - latents


def precondition_outputs(model_output: Tensor, noisy_latents: Tensor, sigmas: Tensor) -> Tensor:
    """Turn a velocity prediction into an x0 estimate, x_σ - σ·v (SD3's ``--precondition_outputs``;
    the target then is x0 itself)."""
    return noisy_latents - _broadcast(sigmas, noisy_latents) * model_output


class FlowMatchingObjective:
    """Rectified-flow training for the ``prepare`` interface of ``objectives.py``.

    ``prepare`` draws σ per sample (``--weighting_scheme``), returns x_σ, the timesteps σ·N,
    the target (ε - x0, or x0 with ``precondition``: the family's ``predict`` then returns
    x_σ - σ·v) and the per-sample loss weights (None where they are all 1).
    """

    def __init__(
        self,
        schedule: FlowMatchSchedule,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition: bool = False,
    ) -> None:
        _check_scheme(weighting_scheme)
        self.schedule = schedule
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.precondition = precondition

    def sigmas_of(self, timesteps: Tensor) -> Tensor:
        """σ from the timesteps ``prepare`` returned, float32 ``(B,)``."""
        return timesteps.float() / self.schedule.num_train_timesteps

    def draw_sigmas(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``(sigmas, timesteps)`` of one batch, float32 ``(batch_size,)`` on the CPU."""
        return self.schedule.sample(self.weighting_scheme, batch_size, self.logit_mean, self.logit_std,
                                    self.mode_scale, generator=generator)

    def prepare(self, latents: Tensor, noise: Tensor, generator: Optional[torch.Generator] = None,
                input_noise: Optional[Tensor] = None) -> ObjectiveBatch:
        """``input_noise`` (``--input_perturbation``) replaces ``noise`` in x_σ only."""
        sigmas, timesteps = self.draw_sigmas(latents.shape[0], generator)
        sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
        noisy = add_flow_noise(latents, noise if input_noise is None else input_noise, sigmas)
        target = latents if self.precondition else flow_target(latents, noise)
        weights = None
        if self.weighting_scheme in ("sigma_sqrt", "cosmap"):
            weights = loss_weighting(self.weighting_scheme, sigmas)
        return ObjectiveBatch(noisy, timesteps, target, weights)


def pack_latents(latents: Tensor, patch: int = 2) -> Tensor:
    """Flux packing: ``(B, C, H, W)`` → ``(B, (H/p)·(W/p), p²C)``, each token one p×p patch
    (channel-major inside the patch; p = ``patch``, 2 for Flux). H and W must be multiples of p."""
    batch, channels, height, width = latents.shape
    if height % patch or width % patch:
        need = "even" if patch == 2 else f"multiples of {patch}"
        raise ValueError(f"latent size {height}x{width}: packing {patch}x{patch} patches, both must be {need}")
    patches = latents.view(batch, channels, height // patch, patch, width // patch, patch)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), channels * patch ** 2)


def unpack_latents(packed: Tensor, height: int, width: int, patch: int = 2) -> Tensor:
    """Inverse of ``pack_latents``: ``(B, (H/p)·(W/p), p²C)`` → ``(B, C, H, W)``, H, W in latent px."""
    batch, tokens, features = packed.shape
    if tokens != (height // patch) * (width // patch):
        raise ValueError(f"{tokens} tokens do not tile a {height}x{width} latent in {patch}x{patch} patches")
    channels = features // patch ** 2
    patches = packed.view(batch, height // patch, width // patch, channels, patch, patch)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Flux position ids of the packed tokens, ``((H/2)·(W/2), 3)``: (0, row, column)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    columns = torch.arange(width // 2, device=device, dtype=dtype)
    grid = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    grid[..., 1] = rows[:, None]
    grid[..., 2] = columns[None, :]
    return grid.reshape(-1, 3)


def text_ids(sequence_length: int, device=None, dtype=torch.float32) -> Tensor:
    """Flux position ids of the text tokens, ``(L, 3)``, all zero."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)


def guidance_vector(guidance_scale: float, batch_size: int, enabled: bool, device=None) -> Optional[Tensor]:
    """The distilled-guidance input of Flux.1-dev, float32 ``(B,)`` filled with the scale, or
    None for transformers without a guidance embedding (Flux.1-schnell)."""
    if not enabled:
        return None
    return torch.full((batch_size,), float(guidance_scale), device=device, dtype=torch.float32)

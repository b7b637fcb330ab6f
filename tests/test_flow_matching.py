"""Flow-matching pieces: σ sampling per weighting scheme, loss weights, noising, SD3
preconditioning and Flux latent packing, checked against closed-form expectations."""

import math

import pytest
import torch

from snella_diffusion.training.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchSchedule,
    add_flow_noise,
    flow_target,
    guidance_vector,
    latent_image_ids,
    loss_weighting,
    mode_transform,
    pack_latents,
    precondition_outputs,
    sample_density,
    shift_sigmas,
    text_ids,
    unpack_latents,
)

DRAWS = 200_000


def draw(scheme, **kwargs):
    return sample_density(scheme, DRAWS, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_density_has_requested_mean_and_spread(mean, std):
    u = draw("logit_normal", logit_mean=mean, logit_std=std)
    logits = torch.logit(u.double())
    assert abs(logits.mean().item() - mean) < 0.02
    assert abs(logits.std().item() - std) < 0.02
    # median of sigmoid(N(m, s)) is sigmoid(m)
    assert abs(u.median().item() - 1 / (1 + math.exp(-mean))) < 0.01


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_uniform_schemes_sample_uniformly(scheme):
    u = draw(scheme)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0) / DRAWS
    assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.005)


@pytest.mark.parametrize("scale", [0.0, 0.8, 1.29])
def test_mode_density_follows_its_inverse_cdf(scale):
    """u = f(v), f decreasing from 1 to 0, so P(u <= f(v0)) = 1 - v0."""
    u = draw("mode", mode_scale=scale)
    for v0 in (0.1, 0.25, 0.5, 0.75, 0.9):
        threshold = mode_transform(torch.tensor(v0), scale).item()
        assert abs((u <= threshold).double().mean().item() - (1 - v0)) < 0.005
    # the analytic density 1/|f'(v)| at the middle: f'(1/2) = -1 - s(1 - π/2)
    middle = ((u - 0.5).abs() < 0.01).double().mean().item() / 0.02
    assert abs(middle - 1 / (1 + scale * (1 - math.pi / 2))) < 0.05


def test_mode_scale_moves_mass_to_the_middle():
    plain, peaked = draw("mode", mode_scale=0.0), draw("mode", mode_scale=1.29)
    assert ((peaked - 0.5).abs() < 0.2).float().mean() > ((plain - 0.5).abs() < 0.2).float().mean() + 0.1


def test_schedule_table_matches_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        schedule = FlowMatchSchedule.from_scheduler_config(scheduler.config)
        assert torch.allclose(schedule.sigma_table(), scheduler.sigmas.float(), atol=1e-6)
        assert torch.allclose(schedule.sigma_table() * 1000, scheduler.timesteps.float(), atol=1e-3)
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    assert FlowMatchSchedule.from_scheduler_config(dynamic.config).shift == 1.0


def test_sampled_sigmas_follow_u_through_the_shifted_table():
    schedule = FlowMatchSchedule(1000, shift=3.0)
    sigmas, timesteps = schedule.sample("none", DRAWS, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(timesteps, sigmas * 1000)
    assert 0.0 < sigmas.min().item() and sigmas.max().item() <= 1.0
    # u uniform, σ = shift(1 - u): median shift(1/2) = 0.75, P(σ <= shift(x)) = x
    assert abs(sigmas.median().item() - 0.75) < 0.005
    for x in (0.2, 0.5, 0.8):
        assert abs((sigmas <= shift_sigmas(torch.tensor(x), 3.0)).float().mean().item() - x) < 0.005
    unshifted, _ = FlowMatchSchedule(1000, 1.0).sample(
        "logit_normal", DRAWS, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(2)
    )
    logits = torch.logit(unshifted.double().clamp(1e-4, 1 - 1e-4))
    assert abs(logits.mean().item()) < 0.02 and abs(logits.std().item() - 1.0) < 0.03


def test_loss_weights_match_their_formulas():
    sigmas = torch.tensor([0.1, 0.5, 0.9, 1.0])
    assert torch.allclose(loss_weighting("sigma_sqrt", sigmas), 1 / sigmas**2)
    expected = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    assert torch.allclose(loss_weighting("cosmap", sigmas), expected)
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones(4))
    assert set(WEIGHTING_SCHEMES) == {"sigma_sqrt", "logit_normal", "mode", "cosmap", "none"}
    with pytest.raises(ValueError, match="--weighting_scheme='bogus'"):
        loss_weighting("bogus", sigmas)


def test_noising_target_and_preconditioning_are_consistent():
    generator = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    noisy = add_flow_noise(latents, noise, sigmas)
    assert torch.allclose(noisy[0], latents[0]) and torch.allclose(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.7 * latents[1] + 0.3 * noise[1])
    velocity = flow_target(latents, noise)
    # a perfect velocity prediction preconditions back to the clean latent
    assert torch.allclose(precondition_outputs(velocity, noisy, sigmas), latents, atol=1e-6)


def test_pack_unpack_roundtrip_and_patch_layout():
    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    assert packed.shape == (2, 12, 16)
    # token (row 1, column 2) holds channel c's 2x2 patch at latent rows 2-3, columns 4-5
    token = packed[1, 1 * 4 + 2].view(4, 2, 2)
    assert torch.equal(token, latents[1, :, 2:4, 4:6])
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_flux_ids_and_guidance():
    ids = latent_image_ids(6, 8)
    assert ids.shape == (12, 3)
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(text_ids(5), torch.zeros(5, 3))
    assert guidance_vector(3.5, 2, enabled=True).tolist() == [3.5, 3.5]
    assert guidance_vector(3.5, 2, enabled=False) is None


def test_ids_match_the_flux_pipeline_layout():
    from diffusers import FluxPipeline

    assert torch.equal(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    latents = torch.randn(2, 4, 6, 8)
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 6, 8))

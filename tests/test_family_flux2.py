"""Flux.2 klein (``Flux2KleinPipeline``): a tiny pipeline of the real diffusers/transformers
classes (27-layer Qwen3ForCausalLM with a chat template, AutoencoderKLFlux2 with batch-norm
statistics, Flux2Transformer2DModel) saved and loaded by path; prompt encoding, latents, the
model call and σ sampling against the pipeline's and the diffusers example's conventions; the
loss falling on a fixed batch; the DreamBooth script's SNELLA adapter reloading and unloading
exactly; its LoRA A/B file loading with ``load_lora_weights``; adapted-layer counts of the
published klein-4B config."""

import pytest
import torch

from family_runs import (
    CPU,
    LONGER,
    PROMPT,
    check_exported_lora_loads,
    family_settings,
    published_count,
    saved_family_run,
    walked_linear_count,
)
from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.testing.tiny_dit_models import (
    TINY_FLUX2_BN_MEAN,
    TINY_FLUX2_BN_VAR,
    tiny_flux2_klein_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 32


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_flux2_klein_pipeline, "Flux2KleinPipeline", (16, 8, 8), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(klein_run):
    _, images = klein_run.check_saved_pipeline_samples_as_built(tiny_flux2_klein_pipeline, "flux2-klein",
                                                                max_sequence_length=LENGTH)
    assert images.shape == (1, 32, 32, 3)


def test_prompt_encoding_matches_the_pipeline(klein_run):
    family, components = klein_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape == theirs.shape == (2, LENGTH, 3 * 16)
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-6)
    from snella_diffusion.families.flux2 import text_position_ids

    assert torch.equal(text_position_ids(2, LENGTH), text_ids)


def test_latents_are_patchified_and_batch_normalised(klein_run):
    from diffusers import Flux2KleinPipeline

    family, components = klein_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 16, 8, 8) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        mode = components.vae.encode(pixels).latent_dist.mode()
    expected = (Flux2KleinPipeline._patchify_latents(mode) - TINY_FLUX2_BN_MEAN) / (TINY_FLUX2_BN_VAR + 1e-4) ** 0.5
    assert torch.allclose(latents, expected, atol=1e-5)


def test_model_call_matches_the_pipelines_conventions(klein_run):
    """predict == the transformer called with the pipeline's own packing, ids and unpacking,
    timestep t/1000, no guidance."""
    from diffusers import Flux2KleinPipeline

    family, components = klein_run.loaded()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
        ids = Flux2KleinPipeline._prepare_latent_ids(latents)
        output = components.denoiser(hidden_states=Flux2KleinPipeline._pack_latents(latents), timestep=timesteps / 1000,
                                     guidance=None, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                     return_dict=False)[0]
        theirs = Flux2KleinPipeline._unpack_latents_with_ids(output, ids)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sigmas_are_the_schedulers_table(klein_run):
    klein_run.check_sigmas_are_the_unshifted_training_table()


def test_loss_falls_in_20_steps_on_a_fixed_batch(klein_run):
    losses = klein_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    # small steps on the tiny model: the loss falls at every step, by 1-2% in 20
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[20] < 0.99 * losses[0], losses


def test_configure_rejects_what_klein_cannot_do(klein_run):
    klein_run.check_configure_refuses({
        "--train_text_encoder: Flux.2 klein trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=34: Flux.2 needs a multiple of 4": family_settings(resolution=34),
    })


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(klein_run, guidance_scale):
    sampled = klein_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    assert "prompt_embeds" in sampled.cached_inputs


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(klein_run, tmp_path, monkeypatch):
    stored = klein_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 12 + 2  # 1 double + 1 single block


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(klein_run, tmp_path):
    assert klein_run.check_lora_file_loads(tmp_path) == (12 + 2) * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(klein_run, tmp_path,
                                                                                        monkeypatch):
    klein_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def _walked_count(transformer) -> int:
    """Linear layers of every double block's attention and two MLPs, and of every single
    block's attention (its fused qkv+MLP input and its output projection)."""
    return (walked_linear_count(transformer.transformer_blocks, ("attn", "ff", "ff_context"))
            + walked_linear_count(transformer.single_transformer_blocks, ("attn",)))


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("flux2-klein", tmp_path)
    walked = _walked_count(build_reference_model("flux2-klein", device="meta"))
    assert counted["adapted_layers"] == walked == 5 * 12 + 20 * 2
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 3.88
    from snella_diffusion.families.dit import expand_block_filters

    single_only = apply_snella(build_reference_model("flux2-klein", device="meta"),
                               SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@single"])))
    assert len(single_only) == 20 * 2


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(klein_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(klein_run, tmp_path)

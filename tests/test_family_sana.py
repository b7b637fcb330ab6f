"""Sana (``SanaPipeline``): a tiny pipeline of the real diffusers/transformers classes (Gemma-2
encoder with an offline Gemma tokenizer, a deep-compression AutoencoderDC, SanaTransformer2DModel,
a flow DPM-Solver scheduler) saved and loaded by path; prompt encoding, latents, the model call
and σ sampling against the pipeline's and the example's conventions; the loss falling on a fixed
batch; the DreamBooth script's SNELLA adapter reloading and unloading exactly; its LoRA A/B file
loading with ``load_lora_weights``; adapted-layer counts of the published Sana-1600M config."""

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
from snella_diffusion.testing.tiny_dit_models import TINY_SANA_VAE_SCALE, tiny_sana_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 32  # --max_sequence_length: LONGER is 24 tokens


@pytest.fixture(scope="module")
def sana_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_sana_pipeline, "SanaPipeline", (4, 8, 8), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(sana_run):
    _, images = sana_run.check_saved_pipeline_samples_as_built(tiny_sana_pipeline, "sana", max_sequence_length=LENGTH,
                                                               use_resolution_binning=False)
    assert images.shape == (1, 32, 32, 3)


def test_prompt_encoding_matches_the_pipeline_without_complex_human_instruction(sana_run):
    family, components = sana_run.loaded()
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, "  A Photo of SKS dog on the grass with a red ball "], CPU)
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            [PROMPT, LONGER], do_classifier_free_guidance=True, device=CPU, max_sequence_length=LENGTH,
            complex_human_instruction=None)
        ours_negative = family.negative_prompt_inputs(components, CPU)
        with_instruction, instruction_mask, _, _ = pipeline.encode_prompt(
            [PROMPT], do_classifier_free_guidance=False, device=CPU, max_sequence_length=LENGTH,
            complex_human_instruction=["Describe:", "User Prompt: "])
    assert ours["prompt_embeds"].shape == embeds.shape == (2, LENGTH, 32)
    # lower-cased and stripped like the pipeline's preprocessing
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.equal(ours["prompt_attention_mask"], mask.long())
    tokenizer = components.modules["tokenizer"]
    assert ours["prompt_attention_mask"].sum(dim=1).tolist() == [len(tokenizer(p).input_ids) for p in (PROMPT, LONGER)]
    assert torch.allclose(ours_negative["negative_prompt_embeds"], negative[:1], atol=1e-6)
    assert torch.equal(ours_negative["negative_prompt_attention_mask"], negative_mask[:1].long())
    # the pipeline's own default (an instruction before the prompt) would encode differently
    assert (with_instruction[0] - embeds[0]).abs().max() > 1e-3


def test_latents_are_the_scaled_dc_ae_latents(sana_run):
    family, components = sana_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 4, 8, 8) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        raw = components.vae.encode(pixels).latent
    assert torch.allclose(latents, raw * TINY_SANA_VAE_SCALE, atol=1e-6)
    assert family.native_resolution(components) == 32


def test_model_call_matches_the_examples_conventions(sana_run):
    """predict == transformer(x_σ, embeds, mask, timestep = t), the example's call (and the
    pipeline's, whose scheduler timesteps are σ·1000)."""
    family, components = sana_run.loaded()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        theirs = components.denoiser(hidden_states=latents, encoder_hidden_states=conditioning["prompt_embeds"],
                                     encoder_attention_mask=conditioning["prompt_attention_mask"],
                                     timestep=timesteps, return_dict=False)[0]
        unmasked = family.predict(components, latents, timesteps,
                                  {**conditioning, "prompt_attention_mask": torch.ones(2, LENGTH, dtype=torch.long)}, {})
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - unmasked).abs().max() > 1e-6


def test_sigmas_are_the_unshifted_training_table_the_example_builds(sana_run):
    """The example builds a FlowMatchEulerDiscreteScheduler from the published flow-DPM config:
    its flow_shift is not a training shift, so σ = 1 - ⌊u·N⌋/N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, components = sana_run.loaded()
    example = FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    schedule = family.objective(components).schedule
    assert components.noise_scheduler.config.flow_shift == 3.0 and schedule.shift == 1.0
    assert torch.allclose(schedule.sigmas_for(u), example.sigmas[(u * 1000).long()], atol=1e-6)
    assert torch.allclose(schedule.sigmas_for(u), 1 - torch.floor(u * 1000) / 1000, atol=1e-6)


def test_loss_falls_in_20_steps_on_a_fixed_batch(sana_run):
    losses = sana_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_sana_cannot_do(sana_run):
    sana_run.check_configure_refuses({
        "--train_text_encoder: Sana trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=34: Sana needs a multiple of 4": family_settings(resolution=34),
    })


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(sana_run, tmp_path, monkeypatch):
    adapter = sana_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(adapter.layers["transformer"]) == 2 * 8  # self- and cross-attention q/k/v/out


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(sana_run, tmp_path):
    assert sana_run.check_lora_file_loads(tmp_path) == 2 * 8 * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(sana_run, tmp_path, monkeypatch):
    sana_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("sana", tmp_path)
    model = build_reference_model("sana", device="meta")
    walked = walked_linear_count(model.transformer_blocks, ("attn1", "attn2"))
    assert counted["adapted_layers"] == walked == 20 * 8
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 1.60
    # the MLP is convolutional (GLUMBConv): no Linear the preset could take
    assert walked_linear_count(model.transformer_blocks, ("ff",)) == 0


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(sana_run, guidance_scale):
    sampled = sana_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    prompted = sampled.prompted_inputs
    assert prompted["complex_human_instruction"] is None and prompted["use_resolution_binning"] is False
    assert sampled.cached_inputs["negative_prompt_attention_mask"].shape == (1, LENGTH)
    assert sampled.images.shape == (1, 32, 32, 3)


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(sana_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(sana_run, tmp_path)

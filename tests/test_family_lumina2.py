"""Lumina-Image 2.0 (``Lumina2Pipeline``): a tiny pipeline of the real diffusers/transformers
classes (Gemma-2 encoder with an offline Gemma tokenizer, AutoencoderKL, Lumina2Transformer2DModel)
saved and loaded by path; prompt encoding (system prompt), latents, the model call (reversed
time, negated output) and the example's reversed σ sampling; the loss falling on a fixed batch;
the DreamBooth script's SNELLA adapter reloading and unloading exactly; its LoRA A/B file
loading with ``load_lora_weights``; adapted-layer counts of the published config."""

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
from snella_diffusion.families.lumina2 import SYSTEM_PROMPT
from snella_diffusion.testing.tiny_dit_models import (
    TINY_LUMINA2_VAE_SCALE,
    TINY_LUMINA2_VAE_SHIFT,
    tiny_lumina2_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 128  # --max_sequence_length: LONGER behind the system prompt is 98 tokens


@pytest.fixture(scope="module")
def lumina_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_lumina2_pipeline, "Lumina2Pipeline", (4, 4, 4), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(lumina_run):
    loaded, images = lumina_run.check_saved_pipeline_samples_as_built(tiny_lumina2_pipeline, "lumina2",
                                                                      max_sequence_length=LENGTH)
    assert images.shape == (1, 32, 32, 3)
    assert loaded.system_prompt == SYSTEM_PROMPT


def test_prompt_encoding_matches_the_pipeline(lumina_run):
    family, components = lumina_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, mask, negative, negative_mask = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], do_classifier_free_guidance=True, device=CPU, max_sequence_length=LENGTH)
        ours_negative = family.negative_prompt_inputs(components, CPU)
    assert ours["prompt_embeds"].shape == embeds.shape == (2, LENGTH, 32)
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.equal(ours["prompt_attention_mask"], mask.long())
    # "<system prompt> <Prompt Start> <prompt>" is tokenized whole, right-padded
    tokenizer = components.modules["tokenizer"]
    for row, prompt in enumerate((PROMPT, LONGER)):
        text = SYSTEM_PROMPT + " <Prompt Start> " + prompt
        assert int(mask[row].sum()) == len(tokenizer(text).input_ids) < LENGTH
        assert mask[row, : int(mask[row].sum())].all()
    # the empty negative prompt has no system prompt
    assert torch.allclose(ours_negative["negative_prompt_embeds"], negative[:1], atol=1e-6)
    assert int(ours_negative["negative_prompt_attention_mask"].sum()) == len(tokenizer("").input_ids)


def test_latents_are_the_shifted_scaled_sample(lumina_run):
    family, components = lumina_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 4, 4) and family.pixel_multiple(components) == 16
    with torch.no_grad():
        sample = components.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(2))
    assert torch.allclose(latents, (sample - TINY_LUMINA2_VAE_SHIFT) * TINY_LUMINA2_VAE_SCALE, atol=1e-6)


def test_model_call_matches_the_pipelines_conventions(lumina_run):
    """predict == -transformer(x, 1 - t/1000, embeds, mask), the pipeline's call and sign."""
    family, components = lumina_run.loaded()
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, mask, _, _ = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], do_classifier_free_guidance=False, device=CPU, max_sequence_length=LENGTH)
        theirs = -components.denoiser(hidden_states=latents, timestep=torch.tensor([0.75, 0.25]),
                                      encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                      return_dict=False)[0]
        unmasked = family.predict(components, latents, timesteps,
                                  {**conditioning, "prompt_attention_mask": torch.ones(2, LENGTH, dtype=torch.long)}, {})
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - unmasked).abs().max() > 1e-6  # the mask takes part in the call


def test_noise_levels_are_the_examples_reversed_shifted_table(lumina_run):
    """The example mixes (1 - σ)·ε + σ·x0 with σ = scheduler.sigmas[⌊u·N⌋] (shift 6): the noise
    level is 1 - σ, and the transformer's timestep, 1 - level, is that σ."""
    from snella_diffusion.training.flow_matching import add_flow_noise

    family, components = lumina_run.loaded()
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    table = components.noise_scheduler.sigmas[(u * 1000).long()]
    schedule = family.objective(components).schedule
    assert schedule.shift == 6.0
    assert torch.allclose(schedule.sigmas_for(u), 1 - table, atol=1e-6)
    assert torch.allclose(1 - table, 1 - 6 * (1 - torch.floor(u * 1000) / 1000) / (1 + 5 * (1 - torch.floor(u * 1000) / 1000)),
                          atol=1e-6)
    latents, noise = torch.randn(5, 4, 4, 4), torch.randn(5, 4, 4, 4)
    ours = add_flow_noise(latents, noise, schedule.sigmas_for(u))
    example = (1 - table).view(-1, 1, 1, 1) * noise + table.view(-1, 1, 1, 1) * latents
    assert torch.allclose(ours, example, atol=1e-6)
    sigmas, timesteps = schedule.sample("none", 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(timesteps, sigmas * 1000) and float(sigmas.mean()) < 0.3  # shift 6: mostly low noise


def test_loss_falls_in_20_steps_on_a_fixed_batch(lumina_run):
    losses = lumina_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_lumina2_cannot_do(lumina_run):
    lumina_run.check_configure_refuses({
        "--train_text_encoder: Lumina2 trains the transformer only": family_settings(train_text_encoder=True),
        "--max_sequence_length=513: Lumina2 takes at most 512": family_settings("--max_sequence_length", "513"),
        "--resolution=40: Lumina2 needs a multiple of 16": family_settings(resolution=40),
    })


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(lumina_run, tmp_path, monkeypatch):
    adapter = lumina_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(adapter.layers["transformer"]) == 4 * 7  # 2 main + 2 refiner blocks


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(lumina_run, tmp_path):
    assert lumina_run.check_lora_file_loads(tmp_path) == 4 * 7 * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(lumina_run, tmp_path,
                                                                                        monkeypatch):
    lumina_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=16)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("lumina2", tmp_path)
    model = build_reference_model("lumina2", device="meta")
    blocks = [*model.layers, *model.noise_refiner, *model.context_refiner]
    walked = walked_linear_count(blocks, ("attn", "feed_forward"))
    assert counted["adapted_layers"] == walked == (26 + 2 + 2) * 7
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 2.61
    main_only = apply_snella(build_reference_model("lumina2", device="meta"),
                             SnellaConfig(rank=4, target_modules=expand_block_filters([r"dit@layers"])))
    assert len(main_only) == 26 * 7 and all(name.startswith("layers.") for name in main_only)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(lumina_run, guidance_scale):
    sampled = lumina_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    assert sampled.cached_inputs["negative_prompt_attention_mask"].shape == (1, LENGTH)


def test_exported_peft_file_loads_with_the_pipelines_load_lora_weights(lumina_run, tmp_path):
    """snella-export --to peft at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output. diffusers' Lumina 2 loader converts only ``diffusion_model.`` files with lora_A / lora_B (and
    Lumina 2's published q/k/v widths): ``--to lora`` writes ComfyUI's ``lora_unet_`` names, which it
    does not read, so the diffusers route is ``--to peft``."""
    check_exported_lora_loads(lumina_run, tmp_path, to="peft")

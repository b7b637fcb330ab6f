"""Z-Image (``ZImagePipeline``): a tiny pipeline of the real diffusers/transformers classes (Qwen3
text encoder with a chat template, AutoencoderKL, ZImageTransformer2DModel) saved and loaded by
path; prompt encoding, latents, the model call and σ sampling against the pipeline's and the
diffusers example's conventions; the loss falling on a fixed batch; the DreamBooth script's
SNELLA adapter reloading and unloading exactly; its LoRA A/B file loading with
``load_lora_weights``; adapted-layer counts of the published config."""

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
    TINY_Z_IMAGE_VAE_SCALE,
    TINY_Z_IMAGE_VAE_SHIFT,
    tiny_z_image_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 64  # --max_sequence_length: the longer prompt and its chat template fit


@pytest.fixture(scope="module")
def z_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_z_image_pipeline, "ZImagePipeline", (4, 16, 16), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(z_run):
    _, images = z_run.check_saved_pipeline_samples_as_built(tiny_z_image_pipeline, "z-image", max_sequence_length=LENGTH)
    assert images.shape == (1, 32, 32, 3)


def test_prompt_encoding_matches_the_pipeline(z_run):
    family, components = z_run.loaded()
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, _ = pipeline.encode_prompt([PROMPT, LONGER], CPU, do_classifier_free_guidance=False,
                                           max_sequence_length=LENGTH)
    from snella_diffusion.families.z_image import unpadded_prompts

    assert ours["prompt_embeds"].shape == (2, LENGTH, 32)
    tokenizer = components.modules["tokenizer"]
    text = "<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
    assert ours["prompt_embeds_mask"][0].sum() == len(tokenizer(text).input_ids)
    unpadded = unpadded_prompts(ours["prompt_embeds"], ours["prompt_embeds_mask"])
    assert [u.shape for u in unpadded] == [t.shape for t in theirs]
    for mine, their in zip(unpadded, theirs):
        assert torch.allclose(mine, their, atol=1e-6)


def test_latents_are_the_shifted_scaled_mode(z_run):
    family, components = z_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 4, 16, 16) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        mean = components.vae.encode(pixels).latent_dist.mean
    assert torch.allclose(latents, (mean - TINY_Z_IMAGE_VAE_SHIFT) * TINY_Z_IMAGE_VAE_SCALE, atol=1e-6)


def test_model_call_matches_the_examples_conventions(z_run):
    """predict == -transformer(list of (C, 1, H, W), (1000 - t)/1000, unpadded prompts), as the
    example and the pipeline call it."""
    family, components = z_run.loaded()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    pipeline = family.pipeline(components)
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        prompts, _ = pipeline.encode_prompt([PROMPT, LONGER], CPU, do_classifier_free_guidance=False,
                                            max_sequence_length=LENGTH)
        outputs = components.denoiser(list(latents.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, prompts,
                                      return_dict=False)[0]
    theirs = -torch.stack(outputs).squeeze(2)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sigmas_are_the_schedulers_shifted_table(z_run):
    family, components = z_run.loaded()
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    scheduler = components.noise_scheduler
    expected = scheduler.sigmas[(u * 1000).long()]
    assert torch.allclose(family.objective(components).schedule.sigmas_for(u), expected, atol=1e-6)
    assert family.objective(components).schedule.shift == 3.0


def test_loss_falls_in_20_steps_on_a_fixed_batch(z_run):
    losses = z_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_z_image_cannot_do(z_run):
    z_run.check_configure_refuses({
        "--train_text_encoder: Z-Image trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=34: Z-Image needs a multiple of 4": family_settings(resolution=34),
    })


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(z_run, tmp_path, monkeypatch):
    stored = z_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 4 * 7  # 2 main + 2 refiner blocks


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(z_run, tmp_path):
    assert z_run.check_lora_file_loads(tmp_path) == 4 * 7 * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(z_run, tmp_path, monkeypatch):
    z_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def _walked_count(transformer) -> int:
    """Linear layers of the attention and the MLP of every block (main, noise and context refiners)."""
    blocks = [*transformer.layers, *transformer.noise_refiner, *transformer.context_refiner]
    return walked_linear_count(blocks, ("attention", "feed_forward"))


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("z-image", tmp_path)
    walked = _walked_count(build_reference_model("z-image", device="meta"))
    assert counted["adapted_layers"] == walked == (30 + 2 + 2) * 7
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 6.15
    from snella_diffusion.families.dit import expand_block_filters

    main_only = apply_snella(build_reference_model("z-image", device="meta"),
                             SnellaConfig(rank=4, target_modules=expand_block_filters([r"dit@layers"])))
    assert len(main_only) == 30 * 7 and all(name.startswith("layers.") for name in main_only)


@pytest.mark.parametrize("guidance_scale", [0.0, 5.0])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(z_run, guidance_scale):
    sampled = z_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    assert isinstance(sampled.cached_inputs["prompt_embeds"], list)


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(z_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(z_run, tmp_path)

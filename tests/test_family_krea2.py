"""Krea 2 (``Krea2Pipeline``): a tiny pipeline of the real diffusers/transformers classes
(Qwen3VLModel read at two tapped layers, the Qwen-Image VAE, Krea2Transformer2DModel with its
text fusion) saved and loaded by path; prompt encoding, latents, the model call and σ sampling
against the pipeline's and the diffusers example's conventions; the loss falling on a fixed
batch; the DreamBooth script's SNELLA adapter reloading and unloading exactly; its LoRA A/B file
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
from snella_diffusion.families.krea2 import TEMPLATE_PREFIX, TEMPLATE_SUFFIX
from snella_diffusion.testing.tiny_dit_models import (
    TINY_KREA2_SELECT_LAYERS,
    TINY_QWEN_LATENTS_MEAN,
    TINY_QWEN_LATENTS_STD,
    tiny_krea2_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 64  # --max_sequence_length: the longer prompt (49 byte-level tokens) and the 5 suffix tokens fit


@pytest.fixture(scope="module")
def krea_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_krea2_pipeline, "Krea2Pipeline", (4, 8, 8), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(krea_run):
    _, images = krea_run.check_saved_pipeline_samples_as_built(tiny_krea2_pipeline, "krea2", max_sequence_length=LENGTH)
    assert images.shape == (1, 32, 32, 3)
    # the pipeline settings of model_index.json reach the family and the pipeline it builds
    family, components = krea_run.loaded()
    assert family.select_layers(components) == TINY_KREA2_SELECT_LAYERS == family.pipeline(components).text_encoder_select_layers


def test_prompt_encoding_matches_the_pipeline(krea_run):
    family, components = krea_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, their_mask = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape == theirs.shape == (2, LENGTH, len(TINY_KREA2_SELECT_LAYERS), 32)
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-6)
    assert torch.equal(ours["prompt_embeds_mask"], their_mask)
    # [prompt | padding | 5 suffix tokens] after the 34 prefix tokens are dropped
    tokenizer = components.modules["tokenizer"]
    assert len(tokenizer(TEMPLATE_PREFIX).input_ids) == 34 and len(tokenizer(TEMPLATE_SUFFIX).input_ids) == 5
    lengths = [len(tokenizer(prompt).input_ids) for prompt in (PROMPT, LONGER)]
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == [length + 5 for length in lengths]
    assert ours["prompt_embeds_mask"][0, -5:].all() and not ours["prompt_embeds_mask"][0, lengths[0]:-5].any()


def test_latents_are_normalised_per_channel(krea_run):
    family, components = krea_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 8, 8) and family.pixel_multiple(components) == 8
    with torch.no_grad():
        raw = components.vae.encode(pixels[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(2))[:, :, 0]
    for channel, (mean, std) in enumerate(zip(TINY_QWEN_LATENTS_MEAN, TINY_QWEN_LATENTS_STD)):
        assert torch.allclose(latents[:, channel], (raw[:, channel] - mean) / std, atol=1e-6)


def test_model_call_matches_the_examples_conventions(krea_run):
    """predict == the transformer called with the pipeline's packing, [text, image] position
    ids and unpacking, timestep t/1000, the boolean text mask."""
    from diffusers import Krea2Pipeline

    family, components = krea_run.loaded()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    pipeline = family.pipeline(components)
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, mask = pipeline.encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
        output = components.denoiser(
            hidden_states=pipeline._pack_latents(latents, 2, 4, 8, 8), encoder_hidden_states=embeds,
            timestep=timesteps / 1000, position_ids=Krea2Pipeline.prepare_position_ids(LENGTH, 4, 4, CPU),
            encoder_attention_mask=mask, return_dict=False)[0]
        theirs = pipeline._unpack_latents(output, 32, 32)[:, :, 0]
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sigmas_are_the_schedulers_unshifted_training_table(krea_run):
    krea_run.check_sigmas_are_the_unshifted_training_table()


def test_loss_falls_in_20_steps_on_a_fixed_batch(krea_run):
    losses = krea_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_krea2_cannot_do(krea_run):
    krea_run.check_configure_refuses({
        "--train_text_encoder: Krea 2 trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=36: Krea 2 needs a multiple of 8": family_settings(resolution=36),
    })


@pytest.mark.parametrize("guidance_scale", [0.0, 4.5])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(krea_run, guidance_scale):
    sampled = krea_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    assert sampled.cached_inputs["negative_prompt_embeds_mask"].shape == (1, LENGTH)


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(krea_run, tmp_path, monkeypatch):
    stored = krea_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == (2 + 1 + 1) * 8  # 2 blocks, 1 layer-wise and 1 refiner text block


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(krea_run, tmp_path):
    assert krea_run.check_lora_file_loads(tmp_path) == (2 + 1 + 1) * 8 * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(krea_run, tmp_path, monkeypatch):
    krea_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=8)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("krea2", tmp_path)
    transformer = build_reference_model("krea2", device="meta")
    fusion = transformer.text_fusion
    walked = walked_linear_count([*transformer.transformer_blocks, *fusion.layerwise_blocks, *fusion.refiner_blocks],
                                 ("attn", "ff"))
    assert counted["adapted_layers"] == walked == (28 + 2 + 2) * 8
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 12.82
    main_only = apply_snella(build_reference_model("krea2", device="meta"),
                             SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@double"])))
    assert len(main_only) == 28 * 8 and all(name.startswith("transformer_blocks.") for name in main_only)


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(krea_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(krea_run, tmp_path)

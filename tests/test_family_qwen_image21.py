"""Qwen-Image 2.1 (``QwenImage21Pipeline``, text to image): a tiny pipeline of the real diffusers
and transformers classes (Qwen3VLForConditionalGeneration, the 16× AutoencoderKLQwenImage21 over
RGBA, QwenImage21Transformer2DModel) with a stand-in processor (transformers cannot build
Qwen3VLProcessor without torchvision: see ``tiny_qwen21_processor``), saved and loaded by path;
prompt encoding, latents, the model call and σ sampling against the pipeline's conventions; the
loss falling on a fixed batch; the DreamBooth script's SNELLA adapter reloading and unloading
exactly; its LoRA A/B file loading with ``load_lora_weights``; adapted-layer counts of the
published config."""

import pytest
import torch

from family_runs import CPU, LONGER, PROMPT, FamilyRun, family_settings, published_count, walked_linear_count
from snella_diffusion import SnellaConfig, SnellaError, apply_snella
from snella_diffusion.families import detect_family
from snella_diffusion.families.qwen_image21 import PROMPT_TEMPLATE, SYSTEM_BLOCK
from snella_diffusion.testing.tiny_dit_models import (
    TINY_QWEN21_LATENTS_MEAN,
    TINY_QWEN21_LATENTS_STD,
    tiny_qwen21_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 64  # --max_sequence_length: the longer prompt after the system block (40 tokens) fits
SAMPLE = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}


@pytest.fixture(scope="module")
def qwen21_run(tmp_path_factory):
    from diffusers import QwenImage21Pipeline

    folder = tmp_path_factory.mktemp("qwen21") / "pipeline"
    tiny_qwen21_pipeline(0).save_pretrained(folder)
    return FamilyRun(folder, QwenImage21Pipeline, latent_shape=(4, 2, 2), flags=("--max_sequence_length", str(LENGTH)))


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(qwen21_run):
    from diffusers import DiffusionPipeline, QwenImage21Pipeline

    built, loaded = tiny_qwen21_pipeline(0), DiffusionPipeline.from_pretrained(qwen21_run.folder)
    assert type(loaded) is QwenImage21Pipeline
    images = [pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLE).images for pipe in (built, loaded)]
    assert images[0].shape == (1, 32, 32, 4)  # the VAE decodes RGBA
    assert abs(images[0] - images[1]).max() < 1e-5
    family, _ = detect_family(str(qwen21_run.folder))
    assert family.name == "qwen-image-2.1"


def test_prompt_encoding_matches_the_pipeline(qwen21_run):
    family, components = qwen21_run.loaded()
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, mask, image_slots = pipeline.encode_prompt([PROMPT, LONGER], device=CPU)
    # the pipeline pads to the batch's longest prompt; the family to --max_sequence_length
    assert embeds.shape == (2, 40, 32) and ours["prompt_embeds"].shape == (2, LENGTH, 32)
    assert torch.equal(ours["prompt_embeds"][:, :40], embeds)
    assert ours["prompt_embeds"][:, 40:].abs().max() == 0
    assert torch.equal(ours["prompt_embeds_mask"][:, :40], mask) and not image_slots.any()
    # the system block the pipeline drops, counted by both
    tokenizer = components.modules["processor"].tokenizer
    assert len(tokenizer(SYSTEM_BLOCK).input_ids) == pipeline._drop_idx == 40
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == [22, 40]
    # the hidden state before the encoder's final norm (what the pipeline reads): the model's
    # last_hidden_state is the norm of it
    tokens = tokenizer([PROMPT_TEMPLATE.format(PROMPT)], return_tensors="pt")
    body = components.modules["text_encoder"].model
    with torch.no_grad():
        normed = body(**tokens).last_hidden_state[0, 40:]
        assert torch.allclose(body.language_model.norm(ours["prompt_embeds"][0, :22]), normed, atol=1e-5)
    assert (ours["prompt_embeds"][0, :22] - normed).abs().max() > 0.1
    short_family, short_components = qwen21_run.loaded("--max_sequence_length", "30")
    with pytest.raises(SnellaError, match="40 tokens with the chat template: more than --max_sequence_length=30"):
        short_family.encode_prompt(short_components, [LONGER], CPU)


def test_latents_are_one_opaque_rgba_frame_normalised_per_channel(qwen21_run):
    family, components = qwen21_run.loaded()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 4, 4) and family.pixel_multiple(components) == 32
    rgba = torch.cat([pixels, torch.ones(2, 1, 64, 64)], dim=1)[:, :, None]
    with torch.no_grad():
        raw = components.vae.encode(rgba).latent_dist.sample(torch.Generator().manual_seed(2))[:, :, 0]
    for channel, (mean, std) in enumerate(zip(TINY_QWEN21_LATENTS_MEAN, TINY_QWEN21_LATENTS_STD)):
        assert torch.allclose(latents[:, channel], (raw[:, channel] - mean) / std, atol=1e-6)


@pytest.mark.parametrize("prompts", [[PROMPT, LONGER], [LONGER, LONGER]], ids=["padded", "unpadded"])
def test_model_call_matches_the_pipelines_conventions(qwen21_run, prompts):
    """predict == the transformer called as the pipeline calls it: its prompt encoding (padded to
    the batch's longest prompt, no mask when nothing is padded), the plain row-major flatten,
    t / 1000, one (1, h, w) shape and the appended image slots, the last h·w tokens unpacked."""
    family, components = qwen21_run.loaded()
    pipeline = family.pipeline(components)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        ours = family.predict(components, latents, timesteps, family.encode_prompt(components, prompts, CPU), {})
        embeds, mask, image_slots = pipeline.encode_prompt(prompts, device=CPU)
        packed = pipeline._pack_latents(latents, 2, 4, 4, 4)
        output = components.denoiser(
            hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2,
            img_mask=torch.cat([image_slots, image_slots.new_ones(2, 16 // 4)], dim=1), return_dict=False)[0]
        theirs = pipeline._unpack_latents(output[:, -16:], 64, 64, pipeline.vae_scale_factor)[:, :, 0]
    assert (mask is None) == (prompts[0] == prompts[1])
    assert ours.shape == latents.shape and theirs.abs().mean() > 0.1
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sigmas_are_the_schedulers_unshifted_training_table(qwen21_run):
    qwen21_run.check_sigmas_are_the_unshifted_training_table()


def test_loss_falls_in_20_steps_on_a_fixed_batch(qwen21_run):
    losses = qwen21_run.losses_on_a_fixed_batch()
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_qwen_image21_cannot_do(qwen21_run):
    family, index = detect_family(str(qwen21_run.folder))
    components = family.load(str(qwen21_run.folder), index)
    with pytest.raises(SnellaError, match="--train_text_encoder: Qwen-Image 2.1 trains the transformer only"):
        family.configure(components, family_settings(train_text_encoder=True))
    with pytest.raises(SnellaError, match="--resolution=48: Qwen-Image 2.1 needs a multiple of 32"):
        family.configure(components, family_settings(resolution=48))


def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(qwen21_run):
    family, components = qwen21_run.loaded()
    with_prompt = family.pipeline(components)(**family.validation_inputs(components, PROMPT),
                                              generator=torch.Generator().manual_seed(0), **SAMPLE).images
    family.release_text_encoders(components, PROMPT, CPU)
    assert components.modules["text_encoder"] is None
    inputs = family.validation_inputs(components, PROMPT)
    assert "prompt" not in inputs and inputs["prompt_embeds_mask"].shape == (1, 22)
    cached = family.pipeline(components)(**inputs, generator=torch.Generator().manual_seed(0), **SAMPLE).images
    assert abs(cached - with_prompt).max() < 1e-5
    with pytest.raises(SnellaError, match="'a cat' was not cached before the text encoder was freed"):
        family.validation_inputs(components, "a cat")


def test_validation_guidance_scale_reaches_the_pipelines_true_cfg_scale(qwen21_run, caplog):
    import argparse

    from snella_diffusion.training.run_settings import ValidationSettings

    family, components = qwen21_run.loaded()
    parser = argparse.ArgumentParser()
    ValidationSettings.add_arguments(parser)
    flags = vars(parser.parse_args(["--validation_guidance_scale", "4"]))
    settings = ValidationSettings(**{name: flags[name] for name in ValidationSettings.__dataclass_fields__})
    guidance = settings.guidance_kwargs(family.guidance_argument)
    assert guidance == {"true_cfg_scale": 4.0}
    # the pipeline takes it (it has no guidance_scale argument) and, with no negative prompt,
    # samples unguided: the same images as without it
    inputs = family.validation_inputs(components, PROMPT)
    generator = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING"):
        guided = family.pipeline(components)(**inputs, **guidance, generator=generator, **SAMPLE).images
    plain = family.pipeline(components)(**inputs, generator=torch.Generator().manual_seed(0), **SAMPLE).images
    assert abs(guided - plain).max() == 0


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(qwen21_run, tmp_path, monkeypatch):
    stored = qwen21_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 2 * 7  # 2 blocks of q, k, v, out, proj, gate_layer, out


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(qwen21_run, tmp_path):
    assert qwen21_run.check_lora_file_loads(tmp_path) == 2 * 7 * 2


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("qwen-image-2.1", tmp_path)
    transformer = build_reference_model("qwen-image-2.1", device="meta")
    walked = walked_linear_count(transformer.transformer_blocks, ("attn", "img_mlp"))
    assert counted["adapted_layers"] == walked == 32 * 7
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 7.12
    first = apply_snella(build_reference_model("qwen-image-2.1", device="meta"),
                         SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@double:0-7"])))
    assert len(first) == 8 * 7 and all(int(name.split(".")[1]) < 8 for name in first)

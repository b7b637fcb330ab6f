"""Chroma (``ChromaPipeline``): a tiny pipeline of the real diffusers/transformers classes (T5
encoder with a masked prompt, AutoencoderKL, ChromaTransformer2DModel) saved and loaded by path;
prompt encoding, latents, the model call and σ sampling against the pipeline's conventions; the
loss falling on a fixed batch; the DreamBooth script's SNELLA adapter reloading and unloading
exactly; its LoRA A/B file loading with ``load_lora_weights``; export keys on ComfyUI's names;
adapted-layer counts of the published Chroma1-HD config."""

import pytest
import torch

from family_runs import (
    CPU,
    LONGER,
    PROMPT,
    check_exported_lora_loads,
    exported_key_prefixes,
    family_settings,
    published_count,
    saved_family_run,
    walked_linear_count,
)
from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.testing.tiny_dit_models import (
    TINY_CHROMA_VAE_SCALE,
    TINY_CHROMA_VAE_SHIFT,
    tiny_chroma_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 32  # --max_sequence_length: the longer prompt (24 T5 pieces + </s>) fits with padding


@pytest.fixture(scope="module")
def chroma_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_chroma_pipeline, "ChromaPipeline", (4, 16, 16), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(chroma_run):
    _, images = chroma_run.check_saved_pipeline_samples_as_built(tiny_chroma_pipeline, "chroma",
                                                                 max_sequence_length=LENGTH)
    assert images.shape == (1, 32, 32, 3)


def test_prompt_encoding_matches_the_pipeline(chroma_run):
    family, components = chroma_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, text_ids, their_mask, *_ = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], device=CPU, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape == theirs.shape == (2, LENGTH, 64)
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-6)
    assert torch.equal(ours["prompt_attention_mask"], their_mask)
    # the mask keeps the prompt's tokens and </s> and one padding token
    tokenizer = components.modules["tokenizer"]
    lengths = [len(tokenizer(text).input_ids) for text in (PROMPT, LONGER)]
    assert ours["prompt_attention_mask"].sum(dim=1).tolist() == [length + 1 for length in lengths]
    assert text_ids.abs().max() == 0 and text_ids.shape == (LENGTH, 3)


def test_latents_are_the_shifted_scaled_sample(chroma_run):
    family, components = chroma_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 16, 16) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        sample = components.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(2))
    assert torch.allclose(latents, (sample - TINY_CHROMA_VAE_SHIFT) * TINY_CHROMA_VAE_SCALE, atol=1e-6)


def test_model_call_matches_the_pipelines_conventions(chroma_run):
    """predict == the transformer called with the pipeline's own packing, image ids, extended
    attention mask and unpacking, timestep t/1000, no guidance input."""
    from diffusers import ChromaPipeline

    family, components = chroma_run.loaded()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    pipeline = family.pipeline(components)
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, text_ids, mask, *_ = pipeline.encode_prompt([PROMPT, LONGER], device=CPU,
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=LENGTH)
        packed = ChromaPipeline._pack_latents(latents, 2, 4, 16, 16)
        image_ids = ChromaPipeline._prepare_latent_image_ids(2, 8, 8, CPU, torch.float32)
        attention_mask = pipeline._prepare_attention_mask(2, packed.shape[1], torch.float32, mask)
        output = components.denoiser(hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=embeds,
                                     txt_ids=text_ids, img_ids=image_ids, attention_mask=attention_mask,
                                     return_dict=False)[0]
        theirs = ChromaPipeline._unpack_latents(output, 32, 32, pipeline.vae_scale_factor)
        unmasked = family.predict(components, latents, timesteps,
                                  {**conditioning, "prompt_attention_mask": torch.ones(2, LENGTH)}, {})
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - unmasked).abs().max() > 1e-6  # the mask takes part in the call


def test_sigmas_are_the_schedulers_unshifted_training_table(chroma_run):
    """The published scheduler shifts dynamically only at sampling: training σ are
    scheduler.sigmas[⌊u·N⌋], unshifted, as for Flux.1."""
    chroma_run.check_sigmas_are_the_unshifted_training_table()


def test_loss_falls_in_20_steps_on_a_fixed_batch(chroma_run):
    losses = chroma_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_chroma_cannot_do(chroma_run):
    chroma_run.check_configure_refuses({
        "--train_text_encoder: Chroma trains the transformer only": family_settings(train_text_encoder=True),
        "--max_sequence_length=513: Chroma takes at most 512": family_settings("--max_sequence_length", "513"),
        "--resolution=34: Chroma needs a multiple of 4": family_settings(resolution=34),
    })


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(chroma_run, guidance_scale):
    sampled = chroma_run.check_validation_from_cached_embeddings(guidance_scale=guidance_scale)
    assert sampled.cached_inputs["negative_prompt_attention_mask"].shape == (1, LENGTH)


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(chroma_run, tmp_path, monkeypatch):
    stored = chroma_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 12 + 5  # 1 double + 1 single block


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(chroma_run, tmp_path):
    assert chroma_run.check_lora_file_loads(tmp_path) == (12 + 5) * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(chroma_run, tmp_path,
                                                                                        monkeypatch):
    chroma_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def _comfyui_chroma_names(to: str) -> set[str]:
    """What ComfyUI's Chroma (a subclass of its Flux model, comfy/model_base.py) maps: kohya keys
    ``lora_unet_`` + its module names with ``_`` (comfy/lora.py model_lora_keys_unet; modules of
    comfy/ldm/chroma/layers.py: DoubleStreamBlock img_attn.qkv/proj, img_mlp.0/2, txt_*, and
    SingleStreamBlock linear1 (q, k, v and the MLP input fused) / linear2), and
    ``transformer.<diffusers name>`` through comfy.utils.flux_to_diffusers."""
    if to == "comfyui":
        double = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        return ({f"transformer.transformer_blocks.0.attn.{name}" for name in double}
                | {f"transformer.transformer_blocks.0.{name}"
                   for name in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")}
                | {f"transformer.single_transformer_blocks.0.{name}"
                   for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")})
    double = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
              "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    return ({f"lora_unet_double_blocks_0_{name}" for name in double}
            | {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"})


@pytest.mark.parametrize("to", ["diff", "lora", "comfyui"])
def test_export_keys_map_onto_comfyuis_chroma_names(chroma_run, tmp_path, to):
    assert exported_key_prefixes(chroma_run, to, tmp_path) == _comfyui_chroma_names(to)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("chroma", tmp_path)
    transformer = build_reference_model("chroma", device="meta")
    walked = (walked_linear_count(transformer.transformer_blocks, ("attn", "ff", "ff_context"))
              + walked_linear_count(transformer.single_transformer_blocks, ("attn", "proj_mlp", "proj_out")))
    assert counted["adapted_layers"] == walked == 19 * 12 + 38 * 5
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 8.90
    single_only = apply_snella(build_reference_model("chroma", device="meta"),
                               SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@single"])))
    assert len(single_only) == 38 * 5


def test_exported_peft_file_loads_with_the_pipelines_load_lora_weights(chroma_run, tmp_path):
    """snella-export --to peft at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output. diffusers' Chroma loader converts a kohya file's fused q/k/v with Flux.1's published widths
    (3072 each, hard-coded in ``_convert_kohya_flux_lora_to_diffusers``), which the tiny model does
    not have: the diffusers route tested here is ``--to peft``; the ``--to lora`` file is
    ComfyUI's (Flux names, checked by the key tests)."""
    check_exported_lora_loads(chroma_run, tmp_path, to="peft")

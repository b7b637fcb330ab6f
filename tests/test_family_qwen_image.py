"""Qwen-Image (``QwenImagePipeline``): a tiny pipeline of the real diffusers/transformers classes
(Qwen2.5-VL text encoder, Qwen-Image VAE and transformer) saved and loaded by path; prompt
encoding, latent normalisation, the model call and σ sampling against the pipeline's and the
diffusers example's own conventions; the loss falling on a fixed batch; the DreamBooth script's
SNELLA adapter reloading exactly and unloading exactly; its LoRA A/B file loading with
``load_lora_weights``; adapted-layer counts of the published config."""

import pytest
import torch

from family_runs import (
    CPU,
    LONGER,
    PROMPT,
    check_exported_lora_loads,
    check_refused_before_loading,
    exported_key_prefixes,
    family_settings,
    published_count,
    saved_family_run,
    walked_linear_count,
)
from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.families.qwen_image import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from snella_diffusion.testing.tiny_dit_models import (
    TINY_QWEN_LATENTS_MEAN,
    TINY_QWEN_LATENTS_STD,
    tiny_qwen_image_pipeline,
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_qwen_image_pipeline, "QwenImagePipeline", (4, 8, 8), 16)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(qwen_run):
    loaded, images = qwen_run.check_saved_pipeline_samples_as_built(tiny_qwen_image_pipeline, "qwen-image",
                                                                    max_sequence_length=16)
    assert images.shape == (1, 32, 32, 3)
    # the template and the dropped prefix are the pipeline's
    assert (loaded.prompt_template_encode, loaded.prompt_template_encode_start_idx) == (PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS)


def test_tiny_tokenizer_splits_the_template_prefix_as_the_published_one(qwen_run):
    """34 tokens before the prompt (<|im_start|>, system, \\n, Describe, the, ..., user, \\n), so
    the pipeline's fixed drop of 34 leaves exactly the prompt and the template's end."""
    from transformers import AutoTokenizer

    from snella_diffusion.testing.tiny_dit_models import TINY_QWEN_ENDOFTEXT, TINY_QWEN_VOCAB

    tokenizer = AutoTokenizer.from_pretrained(qwen_run.folder, subfolder="tokenizer")
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prefix).input_ids)
    assert len(tokens) == TEMPLATE_PREFIX_TOKENS
    assert tokens[:4] == ["<|im_start|>", "system", "Ċ", "Describe"] and tokens[-3:] == ["<|im_start|>", "user", "Ċ"]
    ids = tokenizer(PROMPT_TEMPLATE.format(PROMPT)).input_ids
    assert tokenizer.decode(ids[TEMPLATE_PREFIX_TOKENS:]) == PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token_id == TINY_QWEN_ENDOFTEXT and len(tokenizer) <= TINY_QWEN_VOCAB


def test_prompt_encoding_matches_the_pipeline(qwen_run):
    family, components = qwen_run.loaded("--max_sequence_length", "24")
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, their_mask = pipeline.encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=24)
    assert ours["prompt_embeds"].shape == (2, 24, 32) and ours["prompt_embeds_mask"].dtype == torch.long
    lengths = ours["prompt_embeds_mask"].sum(dim=1).tolist()
    # the tokens after the template's 34-token prefix, the longer prompt truncated at 24
    tokenizer = components.modules["tokenizer"]
    assert lengths == [len(tokenizer(PROMPT_TEMPLATE.format(PROMPT)).input_ids) - 34, 24]
    assert torch.equal(ours["prompt_embeds_mask"][:, : theirs.shape[1]], their_mask)
    assert torch.allclose(ours["prompt_embeds"][:, : theirs.shape[1]], theirs, atol=1e-6)
    assert ours["prompt_embeds"][0, lengths[0]:].abs().max() == 0  # padding is zeros


def test_latents_are_normalised_per_channel(qwen_run):
    family, components = qwen_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 8, 8) and family.vae_scale_factor(components) == 4
    with torch.no_grad():
        raw = components.vae.encode(pixels[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(2))[:, :, 0]
    for channel, (mean, std) in enumerate(zip(TINY_QWEN_LATENTS_MEAN, TINY_QWEN_LATENTS_STD)):
        assert torch.allclose(latents[:, channel], (raw[:, channel] - mean) / std, atol=1e-6)


def test_model_call_matches_the_pipelines_conventions(qwen_run):
    """predict == the transformer called as the pipeline calls it: packed with the pipeline's
    own _pack_latents, img_shapes of one frame, timestep t/1000, no mask for an unpadded prompt."""
    from diffusers import QwenImagePipeline

    family, components = qwen_run.loaded()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, PROMPT], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        packed = QwenImagePipeline._pack_latents(latents[:, None].permute(0, 2, 1, 3, 4), 2, 4, 8, 8)
        embeds = conditioning["prompt_embeds"][:, : int(conditioning["prompt_embeds_mask"].sum(dim=1).max())]
        theirs = components.denoiser(hidden_states=packed, encoder_hidden_states=embeds, timestep=timesteps / 1000,
                                     img_shapes=[(1, 4, 4)] * 2, return_dict=False)[0]
        theirs = QwenImagePipeline._unpack_latents(theirs, 32, 32, 4)[:, :, 0]
    assert ours.shape == latents.shape
    assert torch.equal(ours, theirs)


def test_sigmas_are_the_examples_scheduler_table(qwen_run):
    """σ for a drawn u is scheduler.sigmas[⌊u·N⌋] of the scheduler the example builds
    (from_pretrained(..., shift=3.0): unshifted under dynamic shifting, shifted by 3 without)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, components = qwen_run.loaded()
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    for dynamic in (True, False):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(qwen_run.folder, subfolder="scheduler", shift=3.0,
                                                                    use_dynamic_shifting=dynamic)
        components.modules["scheduler"] = scheduler
        schedule = family.objective(components).schedule
        expected = scheduler.sigmas[(u * 1000).long()]
        assert torch.allclose(schedule.sigmas_for(u), expected, atol=1e-6), dynamic
    assert schedule.shift == 3.0


def test_loss_falls_in_20_steps_on_a_fixed_batch(qwen_run):
    losses = qwen_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_qwen_image_cannot_do(qwen_run):
    qwen_run.check_configure_refuses({
        "--train_text_encoder: Qwen-Image trains the transformer only": family_settings(train_text_encoder=True),
        "--max_sequence_length=1025": family_settings("--max_sequence_length", "1025"),
        "--resolution=36: Qwen-Image needs a multiple of 8": family_settings(resolution=36),
    })


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(qwen_run, tmp_path, monkeypatch):
    stored = qwen_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 2 * 12


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(qwen_run, tmp_path):
    assert qwen_run.check_lora_file_loads(tmp_path) == 2 * 12 * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(qwen_run, tmp_path, monkeypatch):
    qwen_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=8)


def _walked_count(transformer) -> int:
    """Linear layers of every block's joint attention and of its image and text MLPs."""
    return walked_linear_count(transformer.transformer_blocks, ("attn", "img_mlp", "txt_mlp"))


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("qwen-image", tmp_path)
    walked = _walked_count(build_reference_model("qwen-image", device="meta"))
    assert counted["adapted_layers"] == walked == 60 * 12
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 20.43
    from snella_diffusion.families.dit import expand_block_filters

    filtered = apply_snella(build_reference_model("qwen-image", device="meta"),
                            SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@double:0-9"])))
    assert len(filtered) == 10 * 12 and all(int(name.split(".")[1]) < 10 for name in filtered)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the one-step sample
def test_one_validation_step_is_refused_before_any_model_loads(qwen_run, tmp_path, monkeypatch):
    """QwenImagePipeline's scheduler (shift_terminal, as published) returns NaN images at one
    step (checked here), so the script refuses one validation or class-image step up front."""
    import numpy as np

    pipeline = qwen_run.pipeline_class.from_pretrained(qwen_run.folder)
    images = [pipeline(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, height=32,
                       width=32, output_type="np").images for steps in (1, 2)]
    assert np.isnan(images[0]).any() and not np.isnan(images[1]).any()
    check_refused_before_loading(qwen_run.folder, tmp_path, monkeypatch, ["--validation_inference_steps", "1"],
                                 r"^--validation_inference_steps=1: the pipeline's scheduler stretches its schedule to "
                                 r"shift_terminal=0\.02, which makes one-step samples NaN")
    check_refused_before_loading(qwen_run.folder, tmp_path, monkeypatch,
                                 ["--with_prior_preservation", "--class_prompt", "a photo of a dog", "--class_data_dir",
                                  str(tmp_path / "class"), "--class_inference_steps", "1"],
                                 r"^--class_inference_steps=1: the pipeline's scheduler stretches its schedule")


def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(qwen_run):
    sampled = qwen_run.check_validation_from_cached_embeddings("--max_sequence_length", "24")
    assert sampled.cached_inputs["prompt_embeds_mask"].all()  # trimmed to the prompt


def _comfyui_qwen_image_names(blocks: int) -> set[str]:
    """The Linear modules of ComfyUI's Qwen-Image model the dit preset's layers correspond to
    (comfy/ldm/qwen_image/model.py: Attention.to_q/to_k/to_v/to_out[0]/add_q_proj/add_k_proj/
    add_v_proj/to_add_out, FeedForward.net[0] (GELU).proj and net[2]); comfy/lora.py maps
    ``transformer.<name>`` and ``<name>`` onto them."""
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    return {f"transformer_blocks.{index}.{name}" for index in range(blocks) for name in per_block}


@pytest.mark.parametrize("to", ["diff", "lora", "comfyui"])
def test_export_keys_map_onto_comfyuis_qwen_image_names(qwen_run, tmp_path, to):
    """snella-export --to diff / lora (kohya keys ``transformer.<name>.diff`` / ``.lora_down.weight``)
    and --to comfyui (the node's file: its header lists the key prefix of each layer)."""
    prefixes = exported_key_prefixes(qwen_run, to, tmp_path)
    assert all(prefix.startswith("transformer.") for prefix in prefixes)
    assert {prefix.removeprefix("transformer.") for prefix in prefixes} == _comfyui_qwen_image_names(2)


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(qwen_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(qwen_run, tmp_path)

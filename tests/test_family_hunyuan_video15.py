"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, text-to-video): a tiny pipeline of the real
diffusers/transformers classes (Qwen2.5-VL text model with a code-built tokenizer whose template
prefix is the pipeline's 108 tokens, ByT5-shaped T5 glyph encoder, AutoencoderKLHunyuanVideo15,
HunyuanVideo15Transformer3DModel) saved and loaded by path; prompt encoding, scaled latents, the
model call and σ sampling against the pipeline's conventions; the loss falling on a fixed batch;
the DreamBooth script on synthetic clips and a still image: adapter reload exact, unload exact,
validation video, the LoRA A/B file; adapted-layer counts of the published config."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from snella_diffusion import SnellaConfig, SnellaError, apply_snella, read_snella_file
from snella_diffusion.families import detect_family
from snella_diffusion.families.hunyuan_video15 import pipeline_defaults, trim_padding
from snella_diffusion.testing.tiny_hunyuan_video_models import (
    TINY_HY15_IMAGE_EMBED_DIM,
    TINY_HY15_SCALING_FACTOR,
    pipeline_system_message,
    tiny_hunyuan_video15_pipeline,
)
from snella_diffusion.training.video_files import probe_clip

from family_runs import (
    CLIP_SCRIPT_FLAGS,
    FamilyRun,
    check_refused_before_loading,
    family_settings,
    record_script_run,
    walked_linear_count,
    write_clip_folder,
)

PROMPT = "a photo of sks dog"
GLYPHS = 'a sign saying "HELLO" and “world”'
CPU = torch.device("cpu")
LENGTH = 64  # --max_sequence_length: every test prompt fits
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def built():
    return tiny_hunyuan_video15_pipeline(0)


@pytest.fixture(scope="module")
def folder(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("hunyuan-video15") / "pipeline"
    built.save_pretrained(path)
    return path


def _loaded(folder, *flags, resolution=16):
    family, index = detect_family(str(folder))
    components = family.load(str(folder), index)
    family.configure(components, family_settings("--max_sequence_length", str(LENGTH), *flags, resolution=resolution))
    return family, components


def _pixels(frames=9, batch=2, seed=1):
    return torch.rand(batch, 3, frames, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _chat_ids(tokenizer, prompt):
    conversation = [[{"role": "system", "content": pipeline_system_message()}, {"role": "user", "content": prompt}]]
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True).input_ids[0]


def test_tiny_pipeline_reloads_by_path_and_is_detected(built, folder):
    from diffusers import DiffusionPipeline, HunyuanVideo15Pipeline

    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is HunyuanVideo15Pipeline
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(built, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ids = _chat_ids(loaded.tokenizer, PROMPT)
    assert ids == _chat_ids(built.tokenizer, PROMPT)
    # the template before the prompt is the 108 tokens the pipeline crops: the prompt starts at 108
    assert pipeline_defaults().template_tokens == 108
    assert ids[108:108 + len(loaded.tokenizer(PROMPT).input_ids)] == loaded.tokenizer(PROMPT).input_ids
    assert loaded.tokenizer.convert_ids_to_tokens(ids[105:108]) == ["<|im_start|>", "user", "Ċ"]
    family, _ = detect_family(str(folder))
    assert family.name == "hunyuan-video-1.5" and family.is_video


def test_prompt_encoding_matches_the_pipeline(folder):
    family, components = _loaded(folder, "--max_sequence_length", "1000")
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, GLYPHS], CPU)
        theirs = pipeline.encode_prompt([PROMPT, GLYPHS], device=CPU, dtype=torch.float32, batch_size=2)
    assert [tuple(t.shape) for t in ours.values()] == [(2, 1000, 16), (2, 1000), (2, 256, 32), (2, 256)]
    for mine, pipelines in zip(ours.values(), theirs):
        assert torch.equal(mine.float(), pipelines)
    tokenizer = components.modules["tokenizer"]
    # valid Qwen tokens after the crop: the prompt and the 5 of "<|im_end|>\n<|im_start|>assistant\n"
    assert ours["prompt_embeds_mask"].sum(1).tolist() == [len(tokenizer(p).input_ids) + 5 for p in (PROMPT, GLYPHS)]
    # ByT5: nothing for a prompt without quotes; 'Text "HELLO". Text "world". ' and </s> for the other
    assert ours["prompt_embeds_mask_2"].sum(1).tolist() == [0, len('Text "HELLO". Text "world". ') + 1]
    assert torch.equal(ours["prompt_embeds_2"][0], torch.zeros(256, 32))
    family, components = _loaded(folder)  # --max_sequence_length 64: the first 64 of the same positions
    with torch.no_grad():
        short = family.encode_prompt(components, [PROMPT, GLYPHS], CPU)
    assert short["prompt_embeds"].shape == (2, LENGTH, 16)
    assert torch.allclose(short["prompt_embeds"], ours["prompt_embeds"][:, :LENGTH], atol=1e-6)
    assert torch.equal(short["prompt_embeds_mask"], ours["prompt_embeds_mask"][:, :LENGTH])


def test_latents_are_the_mode_times_the_scaling_factor(folder):
    family, components = _loaded(folder)
    pixels = _pixels()
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 4, 3, 4, 4)  # (9 - 1)/4 + 1 latent frames, 16/4 px
    with torch.no_grad():  # one clip per call: the diffusers VAE fails on batches of two (see encode_latents)
        mode = torch.cat([components.vae.encode(clip).latent_dist.mean for clip in pixels.split(1)])
    assert torch.allclose(latents, mode * TINY_HY15_SCALING_FACTOR, atol=1e-6)
    # what the pipeline hands its decoder: latents / scaling_factor
    assert torch.allclose(latents / components.vae.config.scaling_factor, mode, atol=1e-6)
    assert family.encode_latents(components, pixels[:, :, 0]).shape == (2, 4, 1, 4, 4)
    assert (family.temporal_factor(components), family.pixel_multiple(components)) == (4, 4)
    assert family.default_num_frames(components) == 121
    assert family.native_resolution(components) == 12  # the pipeline's default 12 × 20 for target_size 16
    for target_size, side in ((640, 480), (960, 720)):  # the published 480p and 720p releases (16× VAE)
        published = SimpleNamespace(denoiser=SimpleNamespace(config=SimpleNamespace(target_size=target_size)),
                                    vae=SimpleNamespace(config=SimpleNamespace(spatial_compression_ratio=16)))
        assert family.native_resolution(published) == side


def test_model_call_matches_the_pipelines_full_length_call(folder):
    family, components = _loaded(folder)
    pipeline = family.pipeline(components)
    latents = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, GLYPHS], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, mask, glyphs, glyph_mask = pipeline.encode_prompt([PROMPT, GLYPHS], device=CPU, dtype=torch.float32,
                                                                  batch_size=2)
        # the pipeline's call: [latents, zero condition latents, zero mask] and 729 zero image tokens
        theirs = components.denoiser(
            hidden_states=torch.cat([latents, torch.zeros(2, 5, 3, 4, 4)], dim=1), timestep=timesteps,
            encoder_hidden_states=embeds, encoder_attention_mask=mask, encoder_hidden_states_2=glyphs,
            encoder_attention_mask_2=glyph_mask, image_embeds=torch.zeros(2, 729, TINY_HY15_IMAGE_EMBED_DIM),
            return_dict=False)[0]
    assert embeds.shape[1] == 1000 and ours.shape == latents.shape
    assert (theirs - ours).abs().max() < 1e-5 and theirs.abs().mean() > 0.1


def test_padding_is_trimmed_after_the_last_position_valid_in_any_sample():
    embeds = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    kept, mask = trim_padding(embeds, torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0]]))
    assert torch.equal(kept, embeds[:, :3]) and mask.tolist() == [[1, 1, 0], [1, 0, 1]]
    kept, mask = trim_padding(embeds, torch.zeros(2, 5, dtype=torch.int64))  # an empty ByT5 block: one masked position
    assert torch.equal(kept, embeds[:, :1]) and mask.tolist() == [[0], [0]]


def test_sigmas_are_the_shifted_table_drawn_logit_normal(folder):
    family, components = _loaded(folder)
    objective = family.objective(components)
    assert objective.schedule.shift == components.noise_scheduler.config.shift == 5.0
    assert objective.weighting_scheme == "logit_normal"
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    plain = (1000 - (u * 1000).floor()) / 1000
    assert torch.allclose(objective.schedule.sigmas_for(u), 5.0 * plain / (1 + 4.0 * plain), atol=1e-6)


def _family_run(folder):
    from diffusers import HunyuanVideo15Pipeline

    return FamilyRun(folder, HunyuanVideo15Pipeline, (4, 1, 8, 8), ("--max_sequence_length", str(LENGTH)))


def test_loss_falls_in_20_steps_on_a_fixed_batch(folder):
    losses = _family_run(folder).losses_on_a_fixed_batch(pixels=_pixels(), prompts=(PROMPT, GLYPHS), resolution=16)
    assert losses[20] < 0.9 * losses[0], losses


def test_configure_rejects_what_hunyuan_video15_cannot_do(folder):
    family, index = detect_family(str(folder))
    components = family.load(str(folder), index)
    with pytest.raises(SnellaError, match="--train_text_encoder: HunyuanVideo 1.5 trains the transformer only"):
        family.configure(components, family_settings(train_text_encoder=True))
    with pytest.raises(SnellaError, match="--resolution=18: HunyuanVideo 1.5 needs a multiple of 4"):
        family.configure(components, family_settings(resolution=18))


def test_validation_guidance_scale_is_refused_before_any_model_loads(folder, tmp_path, monkeypatch):
    check_refused_before_loading(folder, tmp_path, monkeypatch, ["--validation_guidance_scale", "6"],
                                 r"^--validation_guidance_scale: the hunyuan-video-1.5 pipeline takes no guidance "
                                 r"argument")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("hunyuan-clips"))


def _run_script(run, clips, output_dir, *flags):
    return run.run_script(output_dir, *CLIP_SCRIPT_FLAGS, "--resolution", "16", "--num_frames", "9", *flags,
                          instance_dir=clips)


def _output(family, components, transformer, t=600.0):
    latents = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        return family.call_transformer(transformer, latents, torch.tensor([t]), conditioning)


# Linear layers the dit preset adapts: per double-stream block the 8 joint-attention projections
# and the 2 + 2 of the video and text MLPs; per token-refiner block 4 attention and 2 MLP layers.
BLOCK_PARTS = ("attn", "ff", "ff_context")
REFINER_PARTS = ("attn", "ff")


def _walked_count(transformer) -> int:
    return (walked_linear_count(transformer.transformer_blocks, BLOCK_PARTS)
            + walked_linear_count(transformer.context_embedder.token_refiner.refiner_blocks, REFINER_PARTS))


@pytest.mark.slow
def test_script_trains_on_clips_and_an_image_reloads_and_unloads_exactly(folder, clip_folder, tmp_path, monkeypatch,
                                                                          caplog):
    seen = record_script_run(monkeypatch)
    caplog.set_level(logging.INFO, logger="snella_diffusion.training.video_dataset")
    adapter = _run_script(_family_run(folder), clip_folder, tmp_path, "--cache_latents", "--num_frames", "17",
                          "--validation_prompt", PROMPT, "--num_validation_images", "1",
                          "--validation_inference_steps", "2")
    assert len(seen["losses"]) == 3 and all(np.isfinite(seen["losses"]))
    # frame-count buckets: the 17- and 9-frame clips and the still apart
    assert "video buckets (frames, height, width): (1, 16, 16): 1, (9, 16, 16): 1, (17, 16, 16): 1" in caplog.text
    assert (tmp_path / "validation" / "step_3.png").is_file()
    video = probe_clip(tmp_path / "validation" / "step_3_0_0.mp4")
    assert (video.frames, video.height, video.width, video.fps) == (17, 16, 16, 24.0)
    layers = read_snella_file(adapter).layers["transformer"]
    assert len(layers) == _walked_count(seen["transformer"]) == 2 * 12 + 1 * 6

    _family_run(folder).check_adapter_reloads_and_unloads(adapter, seen["transformer"], _output)


@pytest.mark.slow
def test_lora_file_loads_into_the_transformer(folder, clip_folder, tmp_path):
    """HunyuanVideo15Pipeline has no load_lora_weights (diffusers 0.42 gives it no LoRA loader
    mixin); its transformer's own ``load_lora_adapter`` (PeftAdapterMixin) reads the file."""
    from diffusers import HunyuanVideo15Pipeline
    from safetensors.torch import load_file

    assert not hasattr(HunyuanVideo15Pipeline, "load_lora_weights")
    _run_script(_family_run(folder), clip_folder, tmp_path, "--adapter", "lora")
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert len(saved) == 2 * (2 * 12 + 6) and all(key.startswith("transformer.") for key in saved)
    family, components = _loaded(folder)
    transformer = HunyuanVideo15Pipeline.from_pretrained(folder).transformer
    before = _output(family, components, transformer)
    transformer.load_lora_adapter(saved, prefix="transformer")
    loaded = [p.detach() for name, p in transformer.named_parameters() if "lora_" in name]
    assert len(loaded) == len(saved)
    for key, tensor in saved.items():
        assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in loaded), key
    assert (_output(family, components, transformer) - before).abs().max() > 0


def test_published_config_layer_count_matches_a_walk_of_the_module_tree():
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from count_adapted_layers import count_adapted
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    counted = count_adapted("hunyuan-video1.5")
    transformer = build_reference_model("hunyuan-video1.5", device="meta")
    assert counted.adapted_layers == _walked_count(transformer) == 54 * 12 + 2 * 6 == 660
    assert round(counted.denoiser_parameters / 1e9, 2) == 8.33
    assert counted.base_bf16_gib == round(2 * counted.denoiser_parameters / 1024 ** 3, 2) == 15.51
    row = (f"| HunyuanVideo 1.5 (480p, 720p) | {counted.adapted_layers} | {counted.adapted_weights / 1e9:.2f} G | "
           f"{counted.adapter_parameters / 1e6:.1f} M | {counted.denoiser_parameters / 1e9:.2f} G | "
           f"{counted.base_bf16_gib} |")
    page = (REPO / "docs" / "video.md").read_text()
    assert row in page, row
    # the page's memory sentence at the default rank 32: float32 value, gradient and 2 AdamW moments
    rank32 = count_adapted("hunyuan-video1.5", rank=32).adapter_parameters
    assert f"trains {rank32 / 1e6:.1f} M float32 parameters,\n{16 * rank32 / 1024 ** 3:.2f} GiB" in page
    assert f"{counted.base_bf16_gib + round(16 * rank32 / 1024 ** 3, 2):.1f} GiB before activations" in page
    filtered = apply_snella(transformer, SnellaConfig(rank=4, target_modules=expand_block_filters(
        ["dit@double:0-9", "dit@context_embedder"])))
    blocks = [name for name in filtered if name.startswith("transformer_blocks.")]
    assert len(blocks) == 10 * 12 and {int(name.split(".")[1]) for name in blocks} == set(range(10))
    assert len(filtered) - len(blocks) == 2 * 6
    assert all(name.startswith("context_embedder.token_refiner.") for name in filtered if name not in blocks)

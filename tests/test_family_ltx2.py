"""LTX-2 (``LTX2Pipeline``), video stream only: a tiny pipeline of the real diffusers/transformers
classes (Gemma-3 with a code-built tokenizer, text connectors, the LTX-2 video and audio VAEs,
vocoder, audio-video transformer) saved and loaded by path; prompt encoding, normalised latents,
the model call and σ against the pipeline's and the LTX-2 trainer's conventions; the audio stream
isolated from the video; the loss falling on a fixed batch of clips; the DreamBooth script on
synthetic clips and a still image (adapter reload exact, unload exact, validation video, a LoRA
file the pipeline's ``load_lora_weights`` reads); adapted-layer counts of the published config."""

from pathlib import Path

import numpy as np
import pytest
import torch
from family_runs import (
    CLIP_SCRIPT_FLAGS,
    CPU,
    LONGER,
    PROMPT,
    FamilyRun,
    check_refused_before_loading,
    family_settings,
    published_count,
    record_script_run,
    walked_linear_count,
    write_clip_folder,
)

from snella_diffusion import SnellaConfig, SnellaError, apply_snella, read_snella_file
from snella_diffusion.families import detect_family
from snella_diffusion.families.ltx2 import ShiftedLogitNormalObjective, pack_video, token_shift, unpack_video
from snella_diffusion.testing.tiny_ltx2_models import (
    TINY_LTX2_LATENTS_MEAN,
    TINY_LTX2_LATENTS_STD,
    tiny_ltx2_pipeline,
)
from snella_diffusion.training.flow_matching import FlowMatchingObjective
from snella_diffusion.training.video_files import probe_clip

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 16  # --max_sequence_length
# CFG, spatio-temporal and modality guidance off: one transformer call per step
PLAIN = {"guidance_scale": 1.0, "stg_scale": 0.0, "modality_scale": 1.0, "guidance_rescale": 0.0,
         "audio_guidance_scale": 1.0, "audio_stg_scale": 0.0, "audio_modality_scale": 1.0,
         "audio_guidance_rescale": 0.0, "spatio_temporal_guidance_blocks": None}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from diffusers import LTX2Pipeline

    folder = tmp_path_factory.mktemp("ltx2") / "pipeline"
    tiny_ltx2_pipeline(0).save_pretrained(folder)
    return FamilyRun(folder, LTX2Pipeline, (4, 1, 4, 4), ("--max_sequence_length", str(LENGTH)))


def _pixels(frames=9, batch=2, seed=1):
    return torch.rand(batch, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(run):
    from diffusers import DiffusionPipeline, LTX2Pipeline

    built, loaded = tiny_ltx2_pipeline(0), DiffusionPipeline.from_pretrained(run.folder)
    assert type(loaded) is LTX2Pipeline
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "num_frames": 9, "output_type": "np",
              "max_sequence_length": LENGTH, **PLAIN}
    videos = [pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames for pipe in (built, loaded)]
    assert videos[0].shape == (1, 9, 32, 32, 3)
    assert abs(videos[0] - videos[1]).max() < 1e-5
    family, _ = detect_family(str(run.folder))
    assert family.name == "ltx2" and family.is_video


def test_prompt_encoding_matches_the_pipeline_left_padded(run):
    family, components = run.loaded()
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, mask, _, _ = pipeline.encode_prompt([PROMPT, LONGER], do_classifier_free_guidance=False,
                                                     max_sequence_length=LENGTH, device=CPU)
    assert ours["prompt_embeds"].shape == (2, LENGTH, 32 * 3)  # width 32 × (embeddings + 2 layers)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["prompt_attention_mask"], mask)
    tokens = len(components.modules["tokenizer"](PROMPT).input_ids)
    assert mask[0].tolist() == [0] * (LENGTH - tokens) + [1] * tokens  # padded on the left


def test_latents_are_the_mode_normalised_per_channel(run):
    family, components = run.loaded()
    pixels = _pixels()
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 4, 3, 4, 4)  # (9 - 1)/4 + 1 latent frames, 32/8 px
    assert family.temporal_factor(components) == 4 and family.pixel_multiple(components) == 32
    assert family.default_num_frames(components) == 121 and family.native_resolution(components) == 512
    with torch.no_grad():
        mode = components.vae.encode(pixels).latent_dist.mode()
    for channel, (mean, std) in enumerate(zip(TINY_LTX2_LATENTS_MEAN, TINY_LTX2_LATENTS_STD)):
        assert torch.allclose(latents[:, channel], (mode[:, channel] - mean) / std, atol=1e-6)
    pipeline = family.pipeline(components)  # the pipeline's own denormalisation inverts them
    restored = pipeline._denormalize_latents(latents, components.vae.latents_mean, components.vae.latents_std)
    assert torch.allclose(restored, mode, atol=1e-5)
    assert family.encode_latents(components, pixels[:, :, 0]).shape == (2, 4, 1, 4, 4)


def test_packing_is_the_pipelines():
    from diffusers import LTX2Pipeline

    latents = torch.randn(2, 4, 3, 4, 6)
    for patch, patch_t in ((1, 1), (2, 1), (2, 3)):
        packed = pack_video(latents, patch, patch_t)
        assert torch.equal(packed, LTX2Pipeline._pack_latents(latents, patch, patch_t))
        assert torch.equal(unpack_video(packed, 3 // patch_t, 4 // patch, 6 // patch, patch, patch_t), latents)


def _pipeline_calls(family, components, steps=2):
    """The keyword arguments of each transformer call of a plain (unguided) pipeline run."""
    pipeline = family.pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    calls = []
    handle = components.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    try:
        pipeline(PROMPT, num_inference_steps=steps, height=32, width=32, num_frames=9, max_sequence_length=LENGTH,
                 output_type="latent", generator=torch.Generator().manual_seed(0), **PLAIN)
    finally:
        handle.remove()
    return pipeline, calls


def test_model_call_matches_the_pipelines_with_the_audio_stream_isolated(run):
    family, components = run.loaded()
    pipeline, calls = _pipeline_calls(family, components)
    assert len(calls) == 2
    for step, call in enumerate(calls):  # timestep = sigma = σ·1000 of the scheduler's step
        assert torch.equal(call["timestep"], call["sigma"])
        assert torch.allclose(call["timestep"], pipeline.scheduler.sigmas[step] * 1000, atol=1e-3)
    call = calls[1]
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        captions, audio_captions, mask = family.caption_tokens(components, conditioning, torch.float32)
        assert torch.equal(captions, call["encoder_hidden_states"]) and torch.equal(mask, call["encoder_attention_mask"])
        latents = unpack_video(call["hidden_states"], call["num_frames"], call["height"], call["width"])
        ours = family.predict(components, latents, call["timestep"], conditioning, {})
        isolated = {**call, "isolate_modalities": True, "return_dict": False}
        theirs = components.denoiser(**isolated)[0]
        noisy_audio = {**isolated, "audio_hidden_states": torch.randn_like(call["audio_hidden_states"]) * 3}
        joint = components.denoiser(**{**call, "return_dict": False})[0]
    assert call["fps"] == 24.0 and call["use_cross_timestep"] and not call["isolate_modalities"]
    assert ours.shape == latents.shape
    assert torch.allclose(pack_video(ours), theirs, atol=1e-5)
    # isolated, the video does not see the audio stream; joint, it does (through audio-to-video attention)
    assert torch.equal(components.denoiser(**noisy_audio)[0], theirs)
    assert (joint - theirs).abs().max() > 1e-4


def test_sigmas_are_the_ltx2_trainers_shifted_logit_normal(run):
    family, components = run.loaded()
    objective = family.objective(components)
    assert isinstance(objective, ShiftedLogitNormalObjective)
    assert objective.tokens_of(torch.zeros(1, 4, 3, 4, 4)) == 48
    assert token_shift(1024) == pytest.approx(0.95) and token_shift(4096) == pytest.approx(2.05)
    assert token_shift(48) == pytest.approx(0.95 - 1.1 * 976 / 3072)
    count, tokens = 5, 2048
    sigmas, timesteps = objective.draw_sigmas_for(count, tokens, torch.Generator().manual_seed(3))
    # the same draws by hand: z, uniform, branch, in that order
    generator = torch.Generator().manual_seed(3)
    mu = 0.95 + (2.05 - 0.95) * (tokens - 1024) / 3072
    z = torch.randn(count, generator=generator) + mu
    low, high = torch.sigmoid(torch.tensor(mu - 2.5758)), torch.sigmoid(torch.tensor(mu + 3.0902))
    stretched = ((torch.sigmoid(z) - low) / (high - low)).clamp(max=1.0)  # none below 1e-3 to reflect here
    uniform = 0.999 * torch.rand(count, generator=generator) + 0.001
    expected = torch.where(torch.rand(count, generator=generator) < 0.1, uniform, stretched)
    assert stretched.min() > 1e-3 and torch.allclose(sigmas, expected) and torch.allclose(timesteps, 1000 * sigmas)
    many = {t: objective.draw_sigmas_for(40000, t, torch.Generator().manual_seed(0))[0] for t in (1024, 4096)}
    for drawn in many.values():
        assert drawn.min() >= 1e-3 and drawn.max() <= 1.0
    assert many[4096].median() > many[1024].median() + 0.05  # more tokens, more noise
    family, components = run.loaded("--weighting_scheme", "logit_normal")
    explicit = family.objective(components)
    assert type(explicit) is FlowMatchingObjective and explicit.schedule.shift == 1.0


def test_loss_falls_in_20_steps_on_a_fixed_batch_of_clips(run):
    losses = run.losses_on_a_fixed_batch(pixels=_pixels())
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_ltx2_cannot_do(run):
    import dataclasses

    family, index = detect_family(str(run.folder))
    components = family.load(str(run.folder), index)
    with pytest.raises(SnellaError, match="--wan_expert=high: applies to Wan 2.2 A14B; LTX-2 has one transformer"):
        family.configure(components, dataclasses.replace(family_settings(), wan_expert="high"))
    with pytest.raises(SnellaError, match="--train_text_encoder: LTX-2 trains the transformer only"):
        family.configure(components, family_settings(train_text_encoder=True))
    with pytest.raises(SnellaError, match="--resolution=48: LTX-2 needs a multiple of 32"):
        family.configure(components, family_settings(resolution=48))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the one-step sample
def test_one_validation_step_is_refused_before_any_model_loads(run, tmp_path, monkeypatch):
    """LTX2Pipeline returns NaN frames at one step (checked here), so the family refuses
    ``--validation_inference_steps 1`` before anything loads."""
    pipeline = tiny_ltx2_pipeline(0)
    frames = [pipeline(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, height=32,
                       width=32, num_frames=9, output_type="np", max_sequence_length=LENGTH, **PLAIN).frames
              for steps in (1, 2)]
    assert np.isnan(frames[0]).any() and not np.isnan(frames[1]).any()

    check_refused_before_loading(run.folder, tmp_path, monkeypatch, ["--validation_inference_steps", "1"],
                                 r"^--validation_inference_steps=1: the pipeline's scheduler stretches its schedule to "
                                 r"shift_terminal=0\.1, which makes one-step samples NaN")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("ltx2-clips"))


def test_frame_buckets_follow_the_vaes_temporal_factor(run, clip_folder):
    from snella_diffusion.training.run_settings import parse_run_settings
    from snella_diffusion.training.video_dataset import (
        VideoDataError,
        fit_frame_count,
        load_video_records,
        make_video_dataset,
    )

    family, components = run.loaded()
    flags = ["--instance_data_dir", str(clip_folder), "--caption_extension", ".txt", "--num_frames"]
    settings = parse_run_settings([*flags, "17"])
    dataset = make_video_dataset(settings, load_video_records(settings), family, components, 32, None)
    assert [record.name for record in dataset.records] == ["clip_17.mp4", "clip_9.mp4", "still.png"]
    assert dataset.frames_of_record == [17, 9, 1]
    assert dataset.bucket_keys == [(1, 32, 32), (9, 32, 32), (17, 32, 32)]
    assert tuple(dataset[0]["instance"].pixels.shape) == (3, 17, 32, 32)
    with pytest.raises(VideoDataError, match=r"--num_frames=11: must be 4·k\+1"):  # the tiny VAE's factor
        make_video_dataset(parse_run_settings([*flags, "11"]), dataset.records, family, components, 32, None)
    assert [fit_frame_count(frames, 8) for frames in (121, 60, 8)] == [121, 57, 1]  # the published VAE's 8k+1


def _run_script(run, clips, output_dir, *flags):
    return run.run_script(output_dir, *CLIP_SCRIPT_FLAGS, "--resolution", "32", "--num_frames", "9", *flags,
                          instance_dir=clips)


def _output(family, components, transformer, t=600.0):
    latents = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        return family.predict(components, latents, torch.tensor([t]), conditioning, {}, denoiser=transformer)


def test_script_trains_on_clips_and_an_image_reloads_and_unloads_exactly(run, clip_folder, tmp_path, monkeypatch):
    seen = record_script_run(monkeypatch)
    adapter = _run_script(run, clip_folder, tmp_path, "--cache_latents", "--validation_prompt", PROMPT,
                          "--num_validation_images", "1", "--validation_inference_steps", "2")
    assert len(seen["losses"]) == 3 and all(np.isfinite(seen["losses"]))
    assert (tmp_path / "validation" / "step_3.png").is_file()
    video = probe_clip(tmp_path / "validation" / "step_3_0_0.mp4")
    assert (video.frames, video.height, video.width, video.fps) == (9, 32, 32, 24.0)
    assert len(read_snella_file(adapter).layers["transformer"]) == 2 * 10

    run.check_adapter_reloads_and_unloads(adapter, seen["transformer"], _output)


def test_a_lora_file_loads_with_the_pipelines_load_lora_weights(run, tmp_path):
    assert run.check_lora_file_loads(tmp_path) == 2 * 10 * 2  # A and B of 10 layers in each of 2 blocks


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("ltx2", tmp_path)
    transformer = build_reference_model("ltx2", device="meta")
    walked = walked_linear_count(transformer.transformer_blocks, ("attn1", "attn2", "ff"))
    assert counted["adapted_layers"] == walked == 48 * 10
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 18.88
    audio = sum(p.numel() for name, p in transformer.named_parameters() if "audio" in name)
    first_ten = apply_snella(transformer, SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@double:0-9"])))
    assert len(first_ten) == 10 * 10 and {int(name.split(".")[1]) for name in first_ten} == set(range(10))
    assert not any("audio" in name for name in first_ten)
    page = (Path(__file__).resolve().parents[1] / "docs" / "video.md").read_text()
    row = (f"| LTX-2 19B | {walked} | {counted['adapted_weights'] / 1e9:.2f} G | "
           f"{counted['adapter_parameters'] / 1e6:.1f} M | {counted['denoiser_parameters'] / 1e9:.2f} G | "
           f"{round(2 * counted['denoiser_parameters'] / 1024 ** 3, 2)} |")
    assert row in page, row
    # memory: bf16 base; SNELLA at rank 32 (the rank-8 count plus, in each of the 48 identical
    # blocks, what rank 32 adds on one real block) in float32 with its gradient and two AdamW
    # moments, 16 bytes a parameter
    one_block = [apply_snella(build_reference_model("ltx2", device="meta", num_layers=1), SnellaConfig(rank=rank,
                              target_modules="dit")) for rank in (8, 32)]
    sizes = [sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad)
             for layers in one_block]
    assert sizes[0] * 48 == counted["adapter_parameters"]
    rank32 = 48 * sizes[1]
    assert (f"stream included ({audio / 1e9:.2f} G of the {counted['denoiser_parameters'] / 1e9:.2f} G parameters), "
            f"**{2 * counted['denoiser_parameters'] / 1024 ** 3:.1f} GiB**") in " ".join(page.split())
    assert f"rank 32 holds {rank32 / 1e6:.1f} M float32 parameters, **{16 * rank32 / 1024 ** 3:.2f} GiB**" in \
        " ".join(page.split())

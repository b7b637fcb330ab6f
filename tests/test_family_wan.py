"""Wan (``WanPipeline``): a tiny pipeline of the real diffusers/transformers classes (UMT5 encoder
with a code-built tokenizer, AutoencoderKLWan, WanTransformer3DModel; one transformer as Wan 2.1,
two and a boundary as Wan 2.2 A14B) saved and loaded by path; prompt encoding, normalised latents,
the model call and σ sampling against the pipeline's conventions; the loss falling on a fixed
batch; the A14B expert split (hooks count which transformer a sample reaches); the DreamBooth
script on synthetic clips and a still image: adapter reload exact, unload exact, validation video;
adapted-layer counts of the published configs."""

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from family_runs import (
    CLIP_SCRIPT_FLAGS,
    CPU,
    LONGER,
    PROMPT,
    REPO,
    check_exported_lora_loads,
    family_settings,
    record_script_run,
    saved_family_run,
    write_clip_folder,
)
from snella_diffusion import SnellaConfig, apply_snella, read_snella_file
from snella_diffusion.families import detect_family
from snella_diffusion.testing.tiny_video_models import (
    TINY_WAN_LATENTS_MEAN,
    TINY_WAN_LATENTS_STD,
    tiny_wan_pipeline,
)
from snella_diffusion.training.video_dataset import VideoDataError
from snella_diffusion.training.video_files import probe_clip

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 32  # --max_sequence_length


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """Wan 2.1 (one transformer); ``latent_shape``: one 32 px image as a one-frame video."""
    return saved_family_run(tmp_path_factory, tiny_wan_pipeline, "WanPipeline", (4, 1, 8, 8), LENGTH)


@pytest.fixture(scope="module")
def a14b_run(tmp_path_factory):
    """Wan 2.2 A14B (two transformers and a boundary)."""
    return saved_family_run(tmp_path_factory, partial(tiny_wan_pipeline, two_experts=True), "WanPipeline", (4, 1, 8, 8),
                            LENGTH)


def _pixels(frames=9, batch=2, seed=1):
    return torch.rand(batch, 3, frames, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(wan_run):
    _, videos = wan_run.check_saved_pipeline_samples_as_built(tiny_wan_pipeline, "wan", height=16, width=16,
                                                              num_frames=5, max_sequence_length=LENGTH)
    assert videos.shape == (1, 5, 16, 16, 3)
    family, _ = detect_family(str(wan_run.folder))
    assert family.is_video


def test_prompt_encoding_matches_the_pipeline_zero_padded(wan_run):
    family, components = wan_run.loaded()
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)["prompt_embeds"]
        theirs, _ = pipeline.encode_prompt([PROMPT, LONGER], do_classifier_free_guidance=False,
                                           max_sequence_length=LENGTH, device=CPU)
    assert ours.shape == (2, LENGTH, 64)
    assert torch.allclose(ours, theirs, atol=1e-6)
    tokens = len(components.modules["tokenizer"](PROMPT).input_ids)  # the words and </s>
    assert ours[0, :tokens].abs().sum(-1).min() > 0 and torch.equal(ours[0, tokens:], torch.zeros(LENGTH - tokens, 64))


def test_latents_are_the_mode_normalised_per_channel(wan_run):
    family, components = wan_run.loaded()
    pixels = _pixels()
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 4, 3, 4, 4)  # (9 - 1)/4 + 1 latent frames, 16/4 px
    assert family.temporal_factor(components) == 4 and family.pixel_multiple(components) == 8
    with torch.no_grad():
        mode = components.vae.encode(pixels).latent_dist.mean
    for channel, (mean, std) in enumerate(zip(TINY_WAN_LATENTS_MEAN, TINY_WAN_LATENTS_STD)):
        assert torch.allclose(latents[:, channel], (mode[:, channel] - mean) / std, atol=1e-6)
    # the pipeline decodes latents / (1/std) + mean: the inverse
    decoded_input = latents / (1.0 / torch.tensor(TINY_WAN_LATENTS_STD).view(1, 4, 1, 1, 1)) \
        + torch.tensor(TINY_WAN_LATENTS_MEAN).view(1, 4, 1, 1, 1)
    assert torch.allclose(decoded_input, mode, atol=1e-5)
    one_frame = family.encode_latents(components, pixels[:, :, 0])
    assert one_frame.shape == (2, 4, 1, 4, 4)


def test_model_call_matches_the_pipelines(wan_run):
    family, components = wan_run.loaded()
    latents = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        theirs = components.denoiser(hidden_states=latents, timestep=timesteps,
                                     encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False)[0]
    assert ours.shape == latents.shape and torch.equal(ours, theirs)


def test_ti2v_expanded_timesteps_are_the_pipelines_per_token_timesteps(tmp_path_factory):
    ti2v = saved_family_run(tmp_path_factory, partial(tiny_wan_pipeline, expand_timesteps=True), "WanPipeline",
                            (4, 1, 8, 8), LENGTH)
    family, components = ti2v.loaded()
    assert family.default_num_frames(components) == 121
    latents = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        ours = family.predict(components, latents, t, conditioning, {})
        per_token = (torch.ones(latents.shape)[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0)  # the pipeline's mask · t
        theirs = components.denoiser(hidden_states=latents, timestep=per_token,
                                     encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False)[0]
    assert per_token.shape == (1, 3 * 2 * 2) and torch.equal(ours, theirs)


def test_sigmas_are_the_flow_shifted_table(wan_run):
    family, components = wan_run.loaded()
    objective = family.objective(components)
    assert objective.schedule.shift == components.noise_scheduler.config.flow_shift == 3.0
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    plain = (1000 - (u * 1000).floor()) / 1000
    assert torch.allclose(objective.schedule.sigmas_for(u), 3.0 * plain / (1 + 2.0 * plain), atol=1e-6)


def test_loss_falls_in_20_steps_on_a_fixed_batch(wan_run):
    losses = wan_run.losses_on_a_fixed_batch(pixels=_pixels())
    assert losses[20] < 0.95 * losses[0], losses


def _count_calls(components):
    counts = {"transformer": 0, "transformer_2": 0}
    handles = [components.modules[name].register_forward_hook(
        lambda module, args, output, name=name: counts.__setitem__(name, counts[name] + 1)) for name in counts]
    return counts, handles


def test_a14b_samples_above_the_boundary_only_reach_the_high_noise_transformer(a14b_run):
    family, components = a14b_run.loaded()
    assert family.expert(components) == "both" and family.boundary_timestep(components) == 875.0
    latents = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        counts, handles = _count_calls(components)
        high = family.predict(components, latents, torch.tensor([900.0, 875.0]), conditioning, {})
        assert counts == {"transformer": 1, "transformer_2": 0}
        low = family.predict(components, latents, torch.tensor([874.0, 100.0]), conditioning, {})
        assert counts == {"transformer": 1, "transformer_2": 1}
        mixed = family.predict(components, latents, torch.tensor([900.0, 100.0]), conditioning, {})
        assert counts == {"transformer": 2, "transformer_2": 2}
        for handle in handles:
            handle.remove()
        alone = [family.call_transformer(components, components.modules[name], latents[i:i + 1],
                                         torch.tensor([t]), conditioning["prompt_embeds"][i:i + 1])
                 for i, (name, t) in enumerate((("transformer", 900.0), ("transformer_2", 100.0)))]
    assert torch.allclose(mixed, torch.cat(alone), atol=1e-6)
    assert not torch.allclose(high[1], low[0])


@pytest.mark.parametrize("expert, component", [("high", "transformer"), ("low", "transformer_2")])
def test_an_expert_trains_on_its_side_of_the_boundary_only(a14b_run, expert, component):
    family, components = a14b_run.loaded("--weighting_scheme", "logit_normal", wan_expert=expert)
    assert components.denoiser_component == component and family.extra_denoisers(components) == {}
    objective = family.objective(components)
    _, timesteps = objective.draw_sigmas(4000, torch.Generator().manual_seed(0))
    table = family.objective(a14b_run.loaded()[1]).schedule.sigma_table() * 1000
    assert all(bool((table == t).any()) for t in timesteps[:50])  # entries of the shifted training table
    side = table >= 875.0 if expert == "high" else table < 875.0
    assert torch.equal(table[objective.allowed], table[side])  # every entry of the expert's side, no other
    if expert == "high":
        assert timesteps.min() >= 875.0 and timesteps.min() < 880.0 and timesteps.max() > 995.0
    else:
        assert timesteps.max() < 875.0 and timesteps.max() > 860.0 and timesteps.min() < 100.0
    _, full = family.objective(a14b_run.loaded()[1]).draw_sigmas(4000, torch.Generator().manual_seed(0))
    assert (full >= 875.0).any() and (full < 875.0).any()


def test_configure_rejects_what_wan_cannot_do(wan_run):
    wan_run.check_configure_refuses({
        "--wan_expert=high: .* has one transformer; the flag applies to Wan 2.2 A14B":
            family_settings(resolution=16, wan_expert="high"),
        "--train_text_encoder: Wan trains the transformer only":
            family_settings(resolution=16, train_text_encoder=True),
        "--resolution=20: Wan needs a multiple of 8": family_settings(resolution=20),
    })


@pytest.mark.parametrize("flag, with_class", [("--with_prior_preservation", True), ("--masked_loss", False)])
def test_what_video_runs_cannot_do_yet_is_refused_in_one_line_before_the_model_loads(wan_run, tmp_path, monkeypatch,
                                                                                      flag, with_class):
    family, _ = detect_family(str(wan_run.folder))
    monkeypatch.setattr(type(family), "load", lambda *args: pytest.fail("the model was loaded"))
    class_flags = ("--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a photo of a dog") * with_class
    with pytest.raises(VideoDataError, match=f"^{flag}: not available for video models yet"):
        wan_run.run_script(tmp_path, flag, *class_flags)


@pytest.mark.slow
def test_images_as_one_frame_videos_with_captions_buckets_ema_prodigy_config_and_caches_resume_exactly(
        wan_run, tmp_path, monkeypatch):
    wan_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=8, prior=False)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("wan-clips"))


def _run_script(run, clips, output_dir, *flags):
    return run.run_script(output_dir, *CLIP_SCRIPT_FLAGS, "--resolution", "16", "--num_frames", "17",
                          *flags, instance_dir=clips)


def _output(family, components, transformer, t=600.0):
    latents = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        return family.call_transformer(components, transformer, latents, torch.tensor([t]), conditioning["prompt_embeds"])


@pytest.mark.slow
def test_script_trains_on_clips_and_an_image_reloads_and_unloads_exactly(wan_run, clip_folder, tmp_path,
                                                                          monkeypatch):
    seen = record_script_run(monkeypatch)
    adapter = _run_script(wan_run, clip_folder, tmp_path, "--cache_latents", "--validation_prompt", PROMPT,
                          "--num_validation_images", "1", "--validation_inference_steps", "2")
    assert len(seen["losses"]) == 3 and all(np.isfinite(seen["losses"]))
    assert (tmp_path / "validation" / "step_3.png").is_file()
    video = probe_clip(tmp_path / "validation" / "step_3_0_0.mp4")
    assert (video.frames, video.height, video.width, video.fps) == (17, 16, 16, 16.0)
    assert len(read_snella_file(adapter).layers["transformer"]) == 2 * 10

    wan_run.check_adapter_reloads_and_unloads(adapter, seen["transformer"], _output)


@pytest.mark.slow
def test_script_trains_both_a14b_experts_into_one_file(a14b_run, clip_folder, tmp_path):
    from diffusers import WanPipeline

    from snella_diffusion.loaders import load_snella_weights

    adapter = _run_script(a14b_run, clip_folder, tmp_path, "--wan_expert", "both", "--num_frames", "9")
    layers = read_snella_file(adapter).layers
    assert sorted(layers) == ["transformer", "transformer_2"]
    assert len(layers["transformer"]) == len(layers["transformer_2"]) == 2 * 10
    family, components = a14b_run.loaded()
    pipeline = WanPipeline.from_pretrained(a14b_run.folder)
    before = {name: _output(family, components, getattr(pipeline, name)) for name in ("transformer", "transformer_2")}
    load_snella_weights(pipeline, adapter)
    for name in before:
        assert (_output(family, components, getattr(pipeline, name)) - before[name]).abs().max() > 0, name


def _walked_count(transformer) -> int:
    """Linear layers of the self-attention, cross-attention and MLP of every block."""
    return sum(
        sum(isinstance(module, torch.nn.Linear) for part in (block.attn1, block.attn2, block.ffn)
            for module in part.modules())
        for block in transformer.blocks
    )


def test_published_config_layer_counts_match_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    output = tmp_path / "counts.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_adapted_layers.py"), "--video",
                    "--json", str(output)], check=True, capture_output=True, cwd=REPO)
    counted = {count["model"]: count for count in json.loads(output.read_text())}
    expected = {"wan2.1-1.3b": (30 * 10, 1.42), "wan2.1-14b": (40 * 10, 14.29), "wan2.2-5b": (30 * 10, 5.0)}
    assert sorted(counted) == sorted(expected)
    for model, (layers, billions) in expected.items():
        assert counted[model]["adapted_layers"] == _walked_count(build_reference_model(model, device="meta")) == layers
        assert round(counted[model]["denoiser_parameters"] / 1e9, 2) == billions
    first_ten = apply_snella(build_reference_model("wan2.1-14b", device="meta"),
                             SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@blocks:0-9"])))
    assert len(first_ten) == 10 * 10
    assert {int(name.split(".")[1]) for name in first_ten} == set(range(10))


def test_memory_table_of_the_video_page_is_the_accounting_scripts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from wan_memory import memory_rows, tokens_of
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert tokens_of(81, 480, 832, 8) == 21 * 30 * 52 == 32760  # latent frames × 2×2 patches of the 8× VAE
    assert tokens_of(121, 704, 1280, 16) == 31 * 22 * 40
    rows = [row for model in ("wan2.1-14b", "wan2.2-5b") for row in memory_rows(model)]
    five = next(r for r in rows if (r.model, r.frames, r.height) == ("wan2.2-5b", 121, 704))
    kept, one_block = 30 * 27280 * 3072, 27280 * (14 * 3072 + 2 * 14336)  # bf16 block inputs, one block recomputed
    assert five.activations_gib == round((kept + one_block) * 2 / 1024 ** 3, 1) == 8.3
    assert five.weights_gib == round(2 * 5.0e9 / 1024 ** 3, 1)
    page = (REPO / "docs" / "video.md").read_text()
    for row in rows:
        line = (f"| {row.model} | {row.frames} × {row.height} × {row.width} | {row.tokens} | {row.weights_gib} | "
                f"{row.adapter_gib} | {row.activations_gib} | **{row.total_gib}** |")
        assert line in page, line


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(wan_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(wan_run, tmp_path)

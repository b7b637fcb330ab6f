"""Small family flags of issues 22 and 25: Lumina 2's ``--system_prompt``, Sana's
``--complex_human_instruction`` (each checked against the family's own pipeline encoding the
same prompt), video ``--frame_fps`` (on clips written at a known rate: the sampled frame
indices, and the decoded frames' content) and the model card of a ``--wan_expert low`` run."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from family_runs import CPU, LONGER, PROMPT, FamilyRun
from snella_diffusion import SnellaError, read_snella_file
from snella_diffusion.testing.tiny_dit_models import tiny_lumina2_pipeline, tiny_sana_pipeline
from snella_diffusion.testing.tiny_video_models import moving_square_frames, tiny_wan_pipeline
from snella_diffusion.training.captions import CaptionOptions
from snella_diffusion.training.run_settings import parse_run_settings
from snella_diffusion.training.video_dataset import VideoDataError, VideoDataset, load_video_records
from snella_diffusion.training.video_files import write_video

pytestmark = pytest.mark.usefixtures("single_thread")

CUSTOM_SYSTEM = "You draw dogs."
LUMINA_LENGTH = 128
SANA_LENGTH = 64


@pytest.fixture(scope="module")
def lumina_run(tmp_path_factory):
    from diffusers import Lumina2Pipeline

    folder = tmp_path_factory.mktemp("lumina2") / "pipeline"
    tiny_lumina2_pipeline(0).save_pretrained(folder)
    return FamilyRun(folder, Lumina2Pipeline, latent_shape=(4, 4, 4), flags=("--max_sequence_length", str(LUMINA_LENGTH)))


@pytest.fixture(scope="module")
def sana_run(tmp_path_factory):
    from diffusers import SanaPipeline

    folder = tmp_path_factory.mktemp("sana") / "pipeline"
    tiny_sana_pipeline(0).save_pretrained(folder)
    return FamilyRun(folder, SanaPipeline, latent_shape=(4, 8, 8), flags=("--max_sequence_length", str(SANA_LENGTH)))


def test_lumina2_system_prompt_encodes_as_the_pipeline_and_reaches_validation(lumina_run):
    family, components = lumina_run.loaded("--system_prompt", CUSTOM_SYSTEM)
    _, default = lumina_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, mask, _, _ = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], do_classifier_free_guidance=False, device=CPU, max_sequence_length=LUMINA_LENGTH,
            system_prompt=CUSTOM_SYSTEM)
        with_default = family.encode_prompt(default, [PROMPT], CPU)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    assert torch.equal(ours["prompt_attention_mask"], mask.long())
    # the custom prompt is shorter than the pipeline's default: fewer tokens before the prompt
    tokenizer = components.modules["tokenizer"]
    assert ours["prompt_attention_mask"][0].sum().item() == len(tokenizer(f"{CUSTOM_SYSTEM} <Prompt Start> {PROMPT}").input_ids)
    assert ours["prompt_attention_mask"][0].sum() < with_default["prompt_attention_mask"][0].sum()
    assert family.validation_inputs(components, PROMPT)["system_prompt"] == CUSTOM_SYSTEM


def test_sana_complex_human_instruction_encodes_as_the_pipeline_and_reaches_validation(sana_run):
    from diffusers import SanaPipeline

    family, components = sana_run.loaded("--complex_human_instruction")
    _, custom = sana_run.loaded("--complex_human_instruction", "Describe the dog:")
    _, none = sana_run.loaded()
    call = inspect.unwrap(SanaPipeline.__call__)  # the instruction is __call__'s one list default
    defaults = [*(call.__defaults__ or ()), *(call.__kwdefaults__ or {}).values()]
    instruction = next(value for value in defaults if isinstance(value, list) and "User Prompt: " in value)
    pipeline = family.pipeline(components)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, mask, _, _ = pipeline.encode_prompt(
            [PROMPT, LONGER], do_classifier_free_guidance=False, device=CPU, max_sequence_length=SANA_LENGTH,
            complex_human_instruction=instruction)
        ours_custom = family.encode_prompt(custom, [PROMPT], CPU)
        custom_embeds, custom_mask, _, _ = pipeline.encode_prompt(
            [PROMPT], do_classifier_free_guidance=False, device=CPU, max_sequence_length=SANA_LENGTH,
            complex_human_instruction=["Describe the dog:"])
        plain = family.encode_prompt(none, [PROMPT], CPU)
    assert ours["prompt_embeds"].shape == (2, SANA_LENGTH, 32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    assert torch.equal(ours["prompt_attention_mask"], mask.long())
    torch.testing.assert_close(ours_custom["prompt_embeds"], custom_embeds, rtol=0, atol=1e-6)
    assert torch.equal(ours_custom["prompt_attention_mask"], custom_mask.long())
    assert (ours["prompt_embeds"][:1] - plain["prompt_embeds"]).abs().max() > 1e-3
    assert family.validation_inputs(components, PROMPT)["complex_human_instruction"] == instruction
    assert family.validation_inputs(none, PROMPT)["complex_human_instruction"] is None


def test_a_family_flag_given_to_another_family_is_refused(sana_run, lumina_run):
    with pytest.raises(SnellaError, match=r"^--system_prompt: applies to Lumina 2 \(Lumina2Pipeline\); the sana family"):
        sana_run.loaded("--system_prompt", CUSTOM_SYSTEM)
    with pytest.raises(SnellaError, match=r"^--complex_human_instruction: applies to Sana .* the lumina2 family"):
        lumina_run.loaded("--complex_human_instruction")


@pytest.fixture(scope="module")
def fps_folder(tmp_path_factory):
    """clip_30fps.mp4: 25 frames at 30 fps; the red square's left edge is at column 2·i in frame i."""
    folder = tmp_path_factory.mktemp("fps-clips")
    write_video(folder / "clip_30fps.mp4", moving_square_frames(25, width=64), fps=30)
    (folder / "clip_30fps.txt").write_text("sks square")
    return folder


def _fps_dataset(folder: Path, *flags: str, num_frames: int = 9, sampling: str = "first") -> VideoDataset:
    settings = parse_run_settings(["--instance_data_dir", str(folder), "--caption_extension", ".txt", *flags])
    records = load_video_records(settings)
    return VideoDataset(records, CaptionOptions(fallback_prompt="sks"), [(16, 32)], num_frames, 4,
                        frame_sampling=sampling, frame_fps=settings.video.frame_fps)


def _square_columns(frames) -> list[int]:
    """The red square's left edge in each decoded frame (row 12, the square's middle)."""
    return [int(np.flatnonzero(np.asarray(frame)[12, :, 0] > 150)[0]) for frame in frames]


def test_frame_fps_samples_the_source_frames_nearest_to_the_target_rate(fps_folder):
    # 30 fps sampled at 12 fps: one frame every 2.5 source frames, rounded to the nearest:
    # 0, 2.5, 5, 7.5, 10, ... → 0, 3, 5, 8, 10, 13, 15, 18, 20 (half-way rounds up)
    dataset = _fps_dataset(fps_folder, "--frame_fps", "12")
    assert dataset.records[0].info.fps == 30.0
    assert dataset.frame_indices(0) == [0, 3, 5, 8, 10, 13, 15, 18, 20]
    assert _square_columns(dataset.frames_of(0)) == [2 * i for i in (0, 3, 5, 8, 10, 13, 15, 18, 20)]
    # at 10 fps every 3rd frame; 25 frames hold 9 such (0..24), 4·2+1 = 9 fit Wan's VAE
    assert _fps_dataset(fps_folder, "--frame_fps", "10", num_frames=17).frame_indices(0) == list(range(0, 25, 3))
    # 25 frames at a 2.5 step hold 10 samples (the 10th is frame 23): 4·2+1 = 9 are used
    assert _fps_dataset(fps_folder, "--frame_fps", "12", num_frames=81).frames_of_record == [9]
    # at the clip's own rate, every frame
    assert _fps_dataset(fps_folder, "--frame_fps", "30", num_frames=5).frame_indices(0) == [0, 1, 2, 3, 4]


def test_frame_fps_with_a_random_start_keeps_the_offsets_inside_the_clip(fps_folder):
    dataset = _fps_dataset(fps_folder, "--frame_fps", "12", sampling="random")
    starts = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        indices = dataset.frame_indices(0)
        starts.add(indices[0])
        assert [index - indices[0] for index in indices] == [0, 3, 5, 8, 10, 13, 15, 18, 20]
        assert 0 <= indices[0] <= 24 - 20
    assert len(starts) > 1


def test_frame_fps_refusals_name_the_flags_or_the_clip(fps_folder, tmp_path):
    with pytest.raises(VideoDataError, match=r"^--frame_fps=12 and --frame_stride=2: give one of the two"):
        _fps_dataset(fps_folder, "--frame_fps", "12", "--frame_stride", "2")
    with pytest.raises(VideoDataError, match=r"^--frame_fps=0: must be positive"):
        _fps_dataset(fps_folder, "--frame_fps", "0")
    with pytest.raises(VideoDataError, match=r"^--frame_fps=40: .*clip_30fps\.mp4 plays at 30 fps, slower than the target"):
        _fps_dataset(fps_folder, "--frame_fps", "40")
    from snella_diffusion.training.video_dataset import refuse_video_flags

    with pytest.raises(VideoDataError, match=r"^--frame_fps: applies to video models \(Wan, LTX-2, HunyuanVideo 1.5\); the flux family"):
        refuse_video_flags(parse_run_settings(["--frame_fps", "16"]), "flux")


@pytest.mark.slow
def test_wan_low_expert_card_names_transformer_2(tmp_path):
    """``--wan_expert low`` trains Wan 2.2 A14B's ``transformer_2``: the adapter holds it and the
    model card names it (the family's default denoiser is ``transformer``)."""
    from train_scripts.train_dreambooth_snella import main, parse_args

    folder = tmp_path / "pipeline"
    tiny_wan_pipeline(0, two_experts=True).save_pretrained(folder)
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "clip.mp4", moving_square_frames(9), fps=16)
    output = tmp_path / "out"
    adapter = main(parse_args([
        "--pretrained_model_name_or_path", str(folder), "--output_dir", str(output), "--instance_data_dir", str(clips),
        "--instance_prompt", "sks", "--resolution", "16", "--num_frames", "9", "--max_train_steps", "2",
        "--train_batch_size", "1", "--rank", "4", "--learning_rate", "1e-2", "--checkpointing_steps", "100",
        "--max_sequence_length", "32", "--report_to", "none", "--seed", "1", "--wan_expert", "low",
    ]))
    assert sorted(read_snella_file(adapter).layers) == ["transformer_2"]
    card = (output / "README.md").read_text()
    assert "- Trained denoiser: `transformer_2`" in card
    assert "`transformer`" not in card
    assert "| transformer_2 | 20 |" in card

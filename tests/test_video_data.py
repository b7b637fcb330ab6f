"""Video training data (``training/video_files.py``, ``training/video_dataset.py``): clips the
test writes with PyAV (a red square moving 2 px per frame) decode to the written frames, in
order, within codec tolerance; frame counts fit the VAE's 4k+1; stride and start; buckets over
frames and size; images as one-frame samples; one-line errors for a corrupt clip and for a
missing PyAV."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from snella_diffusion.testing.tiny_video_models import SQUARE_COLOUR, moving_square_frames
from snella_diffusion.training.captions import CaptionOptions
from snella_diffusion.training.data import collate_dreambooth
from snella_diffusion.training.run_settings import parse_run_settings
from snella_diffusion.training.video_dataset import (
    VideoDataError,
    VideoDataset,
    check_video_settings,
    fit_frame_count,
    load_video_records,
)
from snella_diffusion.training.video_files import VideoFileError, probe_clip, read_frames, write_video


def square_left_edges(frames: np.ndarray, side: int = 8) -> list[float]:
    """Per frame, the left edge of a ``side``-pixel square: the mean column of the pixels closer
    to the square's red than to the background, less (side - 1)/2."""
    red = np.asarray(SQUARE_COLOUR, dtype=np.float32)
    distance = np.abs(frames.astype(np.float32) - red).sum(-1)
    return [float(np.nonzero(frame < 120)[1].mean()) - (side - 1) / 2 for frame in distance]


@pytest.mark.parametrize("suffix, mean_tolerance", [(".mp4", 4.0), (".webm", 4.0), (".mov", 4.0), (".gif", 16.0)])
def test_decoded_frames_equal_the_written_ones_in_order(tmp_path, suffix, mean_tolerance):
    """H.264/VP9 at CRF 12 in 4:2:0: mean |error| ≤ 4 of 255 (2.1 measured; the square's edges
    lose chroma resolution); GIF quantises to a palette: ≤ 16 (11.4 measured). Either way every
    frame's square sits where it was written, ±0.5 px (frame order)."""
    written = moving_square_frames(17)
    path = write_video(tmp_path / f"clip{suffix}", written, fps=8)
    info = probe_clip(path)
    assert (info.frames, info.height, info.width) == (17, 32, 48)
    decoded = np.stack([np.asarray(image) for image in read_frames(path, range(17))])
    assert decoded.shape == written.shape
    assert np.abs(decoded.astype(int) - written.astype(int)).mean() <= mean_tolerance
    assert square_left_edges(decoded) == pytest.approx([2.0 * i for i in range(17)], abs=0.5)
    some = np.stack([np.asarray(image) for image in read_frames(path, [3, 4, 10])])
    assert square_left_edges(some) == pytest.approx([6.0, 8.0, 20.0], abs=0.5)


def test_frame_counts_fit_the_temporal_factor():
    assert [fit_frame_count(n, 4) for n in (1, 4, 5, 8, 9, 16, 17, 80, 81)] == [1, 1, 5, 5, 9, 13, 17, 77, 81]
    settings = parse_run_settings(["--num_frames", "10"])
    with pytest.raises(VideoDataError, match=r"--num_frames=10: must be 4·k\+1 \(1, 5, 9, …\)"):
        check_video_settings(settings, 4)
    with pytest.raises(VideoDataError, match="--with_prior_preservation: not available for video models"):
        check_video_settings(parse_run_settings(["--with_prior_preservation"]), 4)
    with pytest.raises(VideoDataError, match="--instance_data_dir: a video model trains on a folder"):
        load_video_records(parse_run_settings([]))
    from snella_diffusion.families import FAMILIES
    from snella_diffusion.training.run_setup import load_run_images

    with pytest.raises(VideoDataError, match="--num_frames: applies to video models .Wan, LTX-2, HunyuanVideo 1.5.; the stable-diffusion family"):
        load_run_images(parse_run_settings(["--num_frames", "9"]), FAMILIES["stable-diffusion"])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """clip_09.mp4 (9 frames), clip_17.mp4 (17 frames), still.png (48x32), each with a caption."""
    folder = tmp_path_factory.mktemp("clips")
    for frames in (9, 17):
        write_video(folder / f"clip_{frames:02d}.mp4", moving_square_frames(frames), fps=8)
        (folder / f"clip_{frames:02d}.txt").write_text(f"sks square, {frames} frames")
    Image.fromarray(moving_square_frames(1)[0]).save(folder / "still.png")
    (folder / "still.txt").write_text("sks square, still")
    return folder


def _dataset(folder, num_frames=17, stride=1, sampling="first", repeats=1, seed=0):
    records = load_video_records(parse_run_settings(["--instance_data_dir", str(folder), "--caption_extension", ".txt"]))
    return VideoDataset(records, CaptionOptions(fallback_prompt="sks"), [(16, 24)], num_frames, 4, stride, sampling,
                        repeats=repeats, seed=seed)


def test_clips_and_images_load_with_captions_and_the_image_is_one_frame(clip_folder):
    dataset = _dataset(clip_folder)
    assert [r.name for r in dataset.records] == ["clip_09.mp4", "clip_17.mp4", "still.png"]
    assert [dataset[i]["instance_prompt"] for i in range(3)] == ["sks square, 9 frames", "sks square, 17 frames",
                                                                  "sks square, still"]
    shapes = [tuple(dataset[i]["instance"].pixels.shape) for i in range(3)]
    assert shapes == [(3, 9, 16, 24), (3, 17, 16, 24), (3, 1, 16, 24)]
    pixels = dataset[1]["instance"].pixels
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # frames are resized (48x32 → 24x16, one crop for all): the square's edge moves 1 px a frame, in order
    frames = ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    edges = square_left_edges(frames, side=4)
    assert edges == pytest.approx([i * 1.0 for i in range(17)], abs=0.75)


def test_clips_of_9_and_17_frames_land_in_different_buckets(clip_folder):
    dataset = _dataset(clip_folder, num_frames=17, repeats=2)
    assert dataset.bucket_keys == [(1, 16, 24), (9, 16, 24), (17, 16, 24)]
    assert dataset.buckets_of_items == [1, 2, 0, 1, 2, 0]
    assert dataset.needs_bucket_batches
    settings = parse_run_settings(["--train_batch_size", "2"])
    from snella_diffusion.training.data_arguments import make_training_loader

    loader = make_training_loader(settings, dataset, dataset)
    batches = list(loader)
    assert len(batches) == 3
    assert sorted(tuple(b["pixel_values"].shape) for b in batches) == [
        (2, 3, 1, 16, 24), (2, 3, 9, 16, 24), (2, 3, 17, 16, 24)]
    # --num_frames 9: both clips train 9 frames, one bucket
    assert _dataset(clip_folder, num_frames=9).bucket_keys == [(1, 16, 24), (9, 16, 24)]


def test_stride_and_random_start(clip_folder):
    strided = _dataset(clip_folder, num_frames=9, stride=2)
    assert strided.frames_of_record == [5, 9, 1]  # the 9-frame clip holds 5 frames at stride 2
    assert strided.frame_indices(0) == [0, 2, 4, 6, 8]
    assert strided.frame_indices(1) == list(range(0, 17, 2))
    drawn = _dataset(clip_folder, num_frames=5, sampling="random", seed=3)
    starts = set()
    for epoch in range(8):
        drawn.set_epoch(epoch)
        indices = drawn.frame_indices(1)
        assert indices == list(range(indices[0], indices[0] + 5)) and 0 <= indices[0] <= 12
        assert drawn.frame_indices(1) == indices  # a function of (seed, epoch, index)
        starts.add(indices[0])
    assert len(starts) > 1
    frames = drawn[1]["instance"].pixels
    expected = _dataset(clip_folder, num_frames=17)[1]["instance"].pixels[:, indices[0]:indices[0] + 5]
    assert torch.equal(frames, expected)


def test_collate_stacks_clips_on_a_frame_axis(clip_folder):
    dataset = _dataset(clip_folder, num_frames=9)
    batch = collate_dreambooth([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 9, 16, 24) and batch["num_instance"] == 2


def test_a_corrupt_clip_is_named_in_one_line(tmp_path, capsys):
    from train_scripts.train_dreambooth_snella import cli

    folder = tmp_path / "data"
    folder.mkdir()
    write_video(folder / "good.mp4", moving_square_frames(9), fps=8)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(VideoFileError, match=r"broken\.mp4: cannot decode the video"):
        load_video_records(parse_run_settings(["--instance_data_dir", str(folder)]))
    # through the script: the clips are read before any model is loaded (a model index is enough)
    model = tmp_path / "wan"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(SystemExit) as exited:
        cli(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(folder),
             "--instance_prompt", "sks", "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder / 'broken.mp4'}: cannot decode the video (")


def test_missing_pyav_is_one_line_naming_the_file_and_the_extra(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", moving_square_frames(5), fps=8)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoFileError) as raised:
        probe_clip(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message == f"{path}: reading video files needs PyAV: pip install 'snella-diffusion[video]' (or: pip install av)"

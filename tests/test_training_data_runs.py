"""End-to-end runs of the DreamBooth script with the training-data options on the tiny
pipelines of every family (SD, SDXL, SD3, Flux, PixArt): captions reach the tokenizers with
their images, batches come from one aspect-ratio bucket, a local imagefolder dataset trains,
the saved EMA adapter equals the EMA of the raw trajectory (and survives a resume), and a
job config file applies, loses to flags and reloads to the same run."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from snella_diffusion.families import base, tokens
from snella_diffusion.training.buckets import kohya_buckets
from snella_diffusion.training.ema import ema_decay_at

from train_scripts import train_dreambooth_snella as script

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline,
            "flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}
# two images per aspect ratio: wide, tall, square
SIZES = [(64, 40), (80, 50), (40, 64), (50, 80), (48, 48), (60, 60)]
BUCKET_FLAGS = ("--enable_bucket", "--bucket_reso_steps", "8", "--resolution", "32")
PARAMS = ("in_factors", "out_factors", "alpha", "gamma", "beta")


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-runs-pipelines")
    folders = {}
    for name, build in BUILDERS.items():
        folders[name] = root / name
        build(0).save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="session")
def captioned_dir(tmp_path_factory):
    """Six solid-colour RGBA images (left half opaque) of three aspect ratios, each with a
    one-tag caption naming its colour."""
    folder = tmp_path_factory.mktemp("captioned")
    for (name, colour), (width, height) in zip(COLOURS.items(), SIZES):
        image = Image.new("RGB", (width, height), colour)
        alpha = Image.new("L", (width, height), 0)
        alpha.paste(255, (0, 0, width // 2, height))
        image.putalpha(alpha)
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    return folder


def run(folder, output_dir, *flags):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    args = script.parse_args([
        "--pretrained_model_name_or_path", str(folder), "--output_dir", str(output_dir), "--rank", "4",
        "--train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "1",
        "--checkpointing_steps", "100", "--max_sequence_length", "16", *flags,
    ])
    return script.main(args), args


def nearest_colour(pixels):
    """The name of the colour nearest to the mean RGB of ``pixels`` ``(3, H, W)`` in [-1, 1]."""
    mean = ((pixels.float().mean(dim=(1, 2)) + 1) * 127.5).numpy()
    return min(COLOURS, key=lambda name: np.abs(mean - np.array(COLOURS[name])).sum())


@pytest.fixture
def recorder(monkeypatch):
    """Records, in call order, the pixel batches encoded by the VAE and the prompts handed to
    the tokenizers (CLIP and T5)."""
    events = []
    original_encode = base.ModelFamily.encode_latents

    def encode_latents(self, components, pixels, generator=None):
        events.append(("pixels", [nearest_colour(p) for p in pixels], tuple(pixels.shape[-2:])))
        return original_encode(self, components, pixels, generator)

    original_tokenize, original_tokens = tokens.tokenize, tokens.padded_tokens

    def record_tokenize(tokenizer, prompts):
        events.append(("prompts", list(prompts)))
        return original_tokenize(tokenizer, prompts)

    def record_padded_tokens(tokenizer, prompts, max_length, device):
        events.append(("prompts", list(prompts)))
        return original_tokens(tokenizer, prompts, max_length, device)

    monkeypatch.setattr(base.ModelFamily, "encode_latents", encode_latents)
    monkeypatch.setattr(tokens, "tokenize", record_tokenize)
    monkeypatch.setattr(tokens, "padded_tokens", record_padded_tokens)
    return events


def steps_of(events):
    """(colours of the batch, its pixel size, the prompts tokenized next) per training step."""
    steps = []
    for index, event in enumerate(events):
        if event[0] == "pixels":
            prompts = next(e[1] for e in events[index + 1:] if e[0] == "prompts")
            steps.append((event[1], event[2], prompts))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_captions_buckets_and_loss_options_train_every_family(pipelines, captioned_dir, tmp_path, recorder, name):
    """Sidecar captions (shuffled: encoded batch by batch), kohya buckets, alpha-mask loss,
    noise offset, input perturbation, Prodigy and EMA in one 3-step run (one epoch)."""
    adapter, args = run(
        pipelines[name], tmp_path, "--instance_data_dir", str(captioned_dir), "--caption_extension", ".txt",
        "--shuffle_caption", "--max_train_steps", "3", *BUCKET_FLAGS, "--masked_loss", "--noise_offset", "0.05",
        "--input_perturbation", "0.05", "--optimizer", "prodigy", "--learning_rate", "1.0", "--use_ema",
    )
    steps = steps_of(recorder)
    assert len(steps) == 3
    seen = []
    buckets = kohya_buckets(32, 16, 64, 8)
    for colours, size, prompts in steps:
        assert prompts == colours  # each image's caption, in the batch order of its pixels
        assert size in buckets
        seen += colours
    assert sorted(seen) == sorted(COLOURS)  # one epoch: every image once
    assert len({size for _, size, _ in steps}) == 3  # one bucket per aspect ratio, one size per batch
    ema, raw = load_file(adapter), load_file(tmp_path / script.RAW_OUTPUT_FILE)
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("in_factors"))
    card = (tmp_path / "README.md").read_text()
    for text in ("| `caption_extension` | `.txt` |", "| `enable_bucket` | `True` |", "| `optimizer` | `prodigy` |",
                 "| `use_ema` | `True` |", "| `masked_loss` | `True` |", "| `noise_offset` | `0.05` |", "```toml"):
        assert text in card, text
    saved = tomllib.loads((tmp_path / "config.toml").read_text())
    assert saved["caption_extension"] == ".txt" and saved["optimizer"] == "prodigy"


@pytest.mark.slow
def test_local_imagefolder_with_metadata_trains(pipelines, tmp_path, recorder):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for name in ("red", "blue"):
        Image.new("RGB", (40, 40), COLOURS[name]).save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a {name} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    adapter, args = run(pipelines["sd"], tmp_path / "out", "--dataset_name", str(folder), "--caption_column", "text",
                        "--cache_dir", str(tmp_path / "cache"), "--repeats", "2", "--max_train_steps", "2",
                        "--caption_prefix", "sks", "--resolution", "32")
    assert adapter.is_file()
    encoded = {prompt for event in recorder if event[0] == "prompts" for prompt in event[1]}
    assert encoded == {"sks, a red square", "sks, a blue square"}  # precomputed once: the captions
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| `dataset_name` | `{folder}` |" in card and "| `repeats` | `2` |" in card


def trajectory(output_dir, steps):
    return [load_file(output_dir / f"checkpoint-{step}" / "snella_weights.safetensors") for step in steps]


@pytest.mark.slow
def test_ema_adapter_equals_the_ema_of_the_raw_trajectory_and_resumes_exactly(pipelines, captioned_dir, tmp_path):
    """4 steps with a checkpoint after each (raw adapters), buckets and cached latents: the
    final adapter is the EMA recomputed here from checkpoints 1-4; a run resumed at step 2
    ends with the same EMA and raw adapters, bit for bit."""
    flags = ("--instance_data_dir", str(captioned_dir), "--caption_extension", ".txt", "--max_train_steps", "4",
             "--checkpointing_steps", "1", "--use_ema", "--ema_decay", "0.8", *BUCKET_FLAGS, "--cache_latents",
             "--caption_dropout", "0.3")
    straight, _ = run(pipelines["sd"], tmp_path / "straight", *flags)
    raw_steps = trajectory(tmp_path / "straight", range(1, 5))
    saved_ema = load_file(straight)
    saved_raw = load_file(tmp_path / "straight" / script.RAW_OUTPUT_FILE)
    checked = 0
    for key in saved_ema:
        if not key.endswith(PARAMS):
            continue
        average = None
        for update, state in enumerate(raw_steps, start=1):
            decay = ema_decay_at(update, 0.8)
            value = state[key].float()
            average = value.clone() if average is None else average.mul_(decay).add_(value, alpha=1.0 - decay)
        assert torch.equal(saved_ema[key], average), key
        assert torch.equal(saved_raw[key], raw_steps[-1][key]), key
        checked += 1
    assert checked >= 5 * 60
    assert any(not torch.equal(saved_ema[k], saved_raw[k]) for k in saved_ema if k.endswith("out_factors"))

    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, _ = run(pipelines["sd"], tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    for first, second in ((straight, resumed),
                          (tmp_path / "straight" / script.RAW_OUTPUT_FILE, tmp_path / "resumed" / script.RAW_OUTPUT_FILE)):
        tensors = [load_file(first), load_file(second)]
        assert tensors[0].keys() == tensors[1].keys()
        for key in tensors[0]:
            assert torch.equal(tensors[0][key], tensors[1][key]), key


@pytest.mark.slow
def test_config_file_applies_flags_win_and_the_saved_config_repeats_the_run(pipelines, captioned_dir, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        f'[data]\ninstance_data_dir = "{captioned_dir}"\ncaption_extension = ".txt"\ncaption_prefix = "sks"\n'
        f'aspect_ratio_buckets = "24,40;40,24;32,32"\nresolution = 32\n'
        '[training]\nmax_train_steps = 5\nrank = 4\nnoise_offset = 0.1\nrandom_flip = true\n'
    )
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    adapter, args = run(pipelines["sd"], first_dir, "--config", str(job), "--max_train_steps", "2")
    assert args.training.max_train_steps == 2 and args.loss.noise_offset == 0.1 and args.data.random_flip
    assert args.buckets.aspect_ratio_buckets == "24,40;40,24;32,32"
    saved = tomllib.loads((first_dir / "config.toml").read_text())
    assert saved["max_train_steps"] == 2 and saved["caption_prefix"] == "sks" and saved["rank"] == 4

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    reloaded = script.parse_args(["--config", str(first_dir / "config.toml"), "--output_dir", str(second_dir)])
    expected = {k: v for k, v in saved.items() if k != "output_dir"}
    assert {k: v for k, v in reloaded.flags().items() if v is not None and k != "output_dir"} == expected
    second = script.main(reloaded)
    resaved = tomllib.loads((second_dir / "config.toml").read_text())
    assert {k: v for k, v in resaved.items() if k != "output_dir"} == expected
    tensors = [load_file(adapter), load_file(second)]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key
    assert "max_train_steps = 2" in (first_dir / "README.md").read_text()

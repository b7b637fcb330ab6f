"""DreamBooth with SNELLA on UNet pipelines through the training script's ``main(args)``:
tiny SD 1.x and SDXL pipelines built from configs, saved to a folder and loaded by path.

Covers every output file, adapter reload (changes the UNet output), the loss on a fixed
batch and fixed noise going down, exact resume from a checkpoint, a 2-process gloo run, the
objectives against their formulas, and each bad-input message."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from snella_diffusion import load_snella, read_snella_file
from snella_diffusion.errors import SnellaError
from snella_diffusion.testing.tiny_models import tiny_ddpm_scheduler, tiny_sd_pipeline, tiny_sdxl_pipeline
from snella_diffusion.training.checkpointing import ADAPTER_FILE
from snella_diffusion.training.data import (
    DataError,
    load_image_folder,
    synthetic_instance_images,
    transform_image,
    warn_small_images,
    write_images,
)
from snella_diffusion.families import UnknownModelFamilyError, detect_family, family_for_class
from snella_diffusion.training.batch_loss import training_loss
from snella_diffusion.training.checkpointing import resolve_resume_path
from snella_diffusion.training.loop import NonFiniteLossError
from snella_diffusion.training.run_checks import resolve_report_to
from snella_diffusion.training.objectives import (
    NoiseObjective,
    dreambooth_loss,
    min_snr_weights,
    snr_of,
    weighted_mse,
)

from train_scripts import train_dreambooth_snella as script

REPO = Path(__file__).resolve().parents[1]

PROMPT = "a photo of sks toy"
STEPS = 30
HALF = STEPS // 2
FAST_FLAGS = [
    "--rank", "4", "--train_batch_size", "2", "--allocator_interval", "3",
    "--allocator_warmup_steps", "3", "--allocator_final_steps", "6", "--target_sparsity", "0.6",
    "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "3",
]


def run_main(*flags: str) -> Path:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # another test may have left a different precision
    return script.main(script.parse_args([*FAST_FLAGS, *flags]))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_v_folder(tmp_path_factory):
    """Stable Diffusion 2.x style: the same pipeline class, a v-prediction scheduler."""
    folder = tmp_path_factory.mktemp("tiny-sd-v") / "pipeline"
    tiny_sd_pipeline(seed=0, prediction_type="v_prediction").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    write_images(synthetic_instance_images(count=4, size=48, seed=1), folder, "toy")
    return folder


@pytest.fixture(scope="session")
def sd_run(tmp_path_factory, sd_folder, instance_dir):
    """30 steps on tiny SD, checkpoints and validation every 15 steps, lr 1e-3."""
    output = tmp_path_factory.mktemp("sd-run")
    run_main(
        "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(output), "--max_train_steps", str(STEPS),
        "--checkpointing_steps", str(HALF), "--validation_steps", str(HALF), "--validation_prompt", PROMPT,
        "--learning_rate", "1e-3", "--random_flip", "--report_to", "tensorboard",
    )
    return output


def unet_of(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def adapter_tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_sd_run_writes_every_output(sd_run, sd_folder):
    snella_file = read_snella_file(sd_run / ADAPTER_FILE)
    assert sorted(snella_file.layers) == ["unet"]
    assert snella_file.base_model == str(sd_folder)
    assert snella_file.config.rank == 4 and snella_file.config.target_sparsity == 0.6
    assert len(snella_file.layers["unet"]) == 60  # 6 transformer blocks × 10 linears
    for step in (HALF, STEPS):
        grid = Image.open(sd_run / "validation" / f"step_{step}.png")
        assert grid.size == (256, 128)  # 2 samples of 32 px in one row, each enlarged 4× to 128 px
        checkpoint = sd_run / f"checkpoint-{step}"
        for name in (ADAPTER_FILE, "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
            assert (checkpoint / name).is_file(), name
    assert Image.open(sd_run / "allocation.png").size[0] > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((sd_run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, STEPS + 1))
    card = (sd_run / "README.md").read_text()
    for text in (str(sd_folder), PROMPT, "| `target_sparsity` | `0.6` |", "| unet | 60 |", "validation/step_30.png"):
        assert text in card, text
    allocation = json.loads((sd_run / "allocation.json").read_text())
    assert allocation["history_steps"] == [0, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    sparsity = np.array(allocation["final_sparsity"])
    numels = np.array([int(snella_file.layers["unet"][name.split(".", 1)[1]]["in_factors"].shape[1])
                       * int(snella_file.layers["unet"][name.split(".", 1)[1]]["out_factors"].shape[1])
                       for name in allocation["layers"]])
    kept = ((1 - sparsity) * numels).round().sum()
    assert abs(kept - round(0.4 * numels.sum())) <= len(numels)  # final budget reached
    assert sparsity.std() > 0.05  # layers competed: not one uniform sparsity


def test_adapter_reloads_and_changes_the_unet_output(sd_run, sd_folder):
    base, adapted = unet_of(sd_folder), unet_of(sd_folder)
    layers = load_snella(adapted, sd_run / ADAPTER_FILE)
    assert len(layers) == 60
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        before = base(latents, torch.tensor([500, 500]), encoder_hidden_states=context).sample
        after = adapted(latents, torch.tensor([500, 500]), encoder_hidden_states=context).sample
    assert (after - before).abs().mean() > 1e-3 * before.abs().mean()


def test_model_card_snippet_loads_the_adapter_into_a_pipeline(sd_run, sd_folder):
    from diffusers import DiffusionPipeline

    from snella_diffusion import snella_layers
    from snella_diffusion.loaders import load_snella_weights

    card = (sd_run / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("{sd_folder}")' in card
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    load_snella_weights(pipe, sd_run / ADAPTER_FILE)
    assert len(snella_layers(pipe.unet)) == 60


def test_training_lowers_the_loss_on_a_fixed_batch_and_noise(sd_folder):
    """30 SNELLA steps (allocator included) with the script's loss on one batch, re-seeding
    the noise/timestep generator each step, as in ``main``."""
    from snella_diffusion import BiLevelAllocator, SnellaConfig, apply_snella
    from snella_diffusion.training.data import DreamBoothDataset, collate_dreambooth

    family, index = detect_family(str(sd_folder))
    components = family.load(str(sd_folder), index)
    config = SnellaConfig(rank=4, target_sparsity=0.6, allocator_warmup_steps=3, allocator_final_steps=6,
                          allocator_interval=3)
    apply_snella(components.denoiser, config)
    allocator = BiLevelAllocator(components.denoiser, config, total_steps=30)
    dataset = DreamBoothDataset(synthetic_instance_images(4, 48, seed=1), PROMPT, 32, center_crop=True)
    batch = collate_dreambooth([dataset[i] for i in range(4)])
    with torch.no_grad():
        latents = family.encode_latents(components, batch["pixel_values"], torch.Generator().manual_seed(0))
        conditioning = family.encode_prompt(components, batch["prompts"], torch.device("cpu"))
    objective = family.objective(components)
    optimizer = torch.optim.AdamW([p for p in components.denoiser.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(31):
        loss = training_loss(family, components, objective, batch, latents, conditioning,
                             components.denoiser, torch.Generator().manual_seed(5), 1.0)
        losses.append(loss.item())
        if step < 30:
            loss.backward()
            optimizer.step()
            allocator.step()
            optimizer.zero_grad()
    assert losses[30] < 0.95 * losses[0], losses
    assert allocator.keep_counts() != {n: a.numel for n, a in allocator.adapters.items()}


def test_resume_from_latest_checkpoint_is_exact(sd_run, sd_folder, instance_dir, tmp_path):
    shutil.copytree(sd_run / f"checkpoint-{HALF}", tmp_path / f"checkpoint-{HALF}")
    run_main(
        "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", str(STEPS),
        "--checkpointing_steps", str(HALF), "--learning_rate", "1e-3", "--random_flip",
        "--resume_from_checkpoint", "latest", "--report_to", "none",
    )
    straight, resumed = adapter_tensors(sd_run / ADAPTER_FILE), adapter_tensors(tmp_path / ADAPTER_FILE)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    states = [torch.load(folder / f"checkpoint-{STEPS}" / "custom_checkpoint_0.pkl", weights_only=False)
              for folder in (sd_run, tmp_path)]
    assert states[0]["step_count"] == states[1]["step_count"] == STEPS
    assert states[0]["drop_counts"] == states[1]["drop_counts"]
    assert states[0]["history_kept"] == states[1]["history_kept"]
    for kind in ("sensitivity", "uncertainty"):
        for name, tensors in states[0][kind].items():
            for mine, theirs in zip(tensors, states[1][kind][name]):
                assert torch.equal(mine, theirs), (kind, name)


@pytest.mark.slow
def test_sdxl_with_text_encoders_trains_and_saves_every_component(sdxl_folder, instance_dir, tmp_path):
    run_main(
        "--pretrained_model_name_or_path", str(sdxl_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "4",
        "--train_text_encoder", "--validation_prompt", PROMPT, "--validation_steps", "4",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--learning_rate", "1e-2",
        "--gradient_checkpointing", "--report_to", "none",
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    snella_file = read_snella_file(tmp_path / ADAPTER_FILE)
    assert sorted(snella_file.layers) == ["text_encoder", "text_encoder_2", "unet"]
    assert len(snella_file.layers["text_encoder"]) == len(snella_file.layers["text_encoder_2"]) == 12
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    assert {name.split(".", 1)[0] for name in allocation["layers"]} == {"unet", "text_encoder", "text_encoder_2"}
    for name in ("validation/step_4.png", "allocation.png", "README.md"):
        assert (tmp_path / name).exists(), name
    assert "| text_encoder_2 | 12 |" in (tmp_path / "README.md").read_text()

    family, index = detect_family(str(sdxl_folder))
    components = family.load(str(sdxl_folder), index)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([400])

    def output():
        with torch.no_grad():
            conditioning = family.encode_prompt(components, [PROMPT], device)
            return family.predict(components, latents, timesteps, conditioning, {})

    before = output()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        load_snella(components.modules[component], tmp_path / ADAPTER_FILE, component=component)
    after = output()
    assert (after - before).abs().mean() > 1e-3 * before.abs().mean()


@pytest.mark.parametrize("base", ["sd", "sdxl"])
def test_lora_with_text_encoders_saves_what_diffusers_loads(base, sd_folder, sdxl_folder, instance_dir, tmp_path,
                                                           monkeypatch):
    from diffusers import DiffusionPipeline

    folder = {"sd": sd_folder, "sdxl": sdxl_folder}[base]
    run_main(
        "--pretrained_model_name_or_path", str(folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "3",
        "--adapter", "lora", "--train_text_encoder", "--learning_rate", "1e-2", "--report_to", "none",
        "--checkpointing_steps", "100",
    )
    saved = adapter_tensors(tmp_path / "pytorch_lora_weights.safetensors")
    encoders = ["text_encoder", "text_encoder_2"] if base == "sdxl" else ["text_encoder"]
    assert {key.split(".", 1)[0] for key in saved} == {"unet", *encoders}
    pipe = DiffusionPipeline.from_pretrained(folder)
    tokens = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(tokens)[0]
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        after = pipe.text_encoder(tokens)[0]
    # Each saved text-encoder factor is in the loaded encoder, bit for bit (diffusers renames the
    # keys on load, so they are matched by value), and the loaded factors move its output.
    loaded = [p.detach() for name, p in pipe.text_encoder.named_parameters() if "lora_" in name]
    text_keys = [key for key in saved if key.startswith("text_encoder.")]
    assert len(text_keys) == len(loaded) > 0
    for key in text_keys:
        assert any(p.shape == saved[key].shape and torch.equal(p, saved[key]) for p in loaded), key
    assert any(p.abs().max() > 0 for p in loaded)
    assert (after - before).abs().max() > 0

    # The model card describes the LoRA run, and its snippet loads the file for real.
    card = (tmp_path / "README.md").read_text()
    assert "# LoRA DreamBooth adapter" in card and "SNELLA settings" not in card and "Final sparsity" not in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    loading = "\n".join(line for line in snippet if not line.startswith("image = "))  # no sampling
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(loading, "README.md", "exec"), scope)
    assert len(scope["pipe"].get_active_adapters()) == 1


@pytest.mark.slow
def test_two_gloo_processes_agree_on_every_sparsity(sdxl_folder, instance_dir, tmp_path):
    """torchrun, 2 CPU ranks over gloo; SDXL with its text encoders adapted (the first encoder's
    last layer gets no gradient: DDP must allow unused parameters)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "train_scripts" / "train_dreambooth_snella.py"), *FAST_FLAGS,
        "--pretrained_model_name_or_path", str(sdxl_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "8",
        "--train_batch_size", "1", "--learning_rate", "1e-3", "--train_text_encoder", "--report_to", "none",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    ranks = allocation["drop_counts_per_rank"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    assert len(set(allocation["final_sparsity"])) > 1  # reallocated by score, not uniform
    assert "| `processes` | `2` |" in (tmp_path / "README.md").read_text()


def test_v_prediction_pipeline_trains_with_a_v_target(sd_v_folder, instance_dir, tmp_path):
    run_main(
        "--pretrained_model_name_or_path", str(sd_v_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "2",
        "--snr_gamma", "5.0", "--report_to", "none",
    )
    card = (tmp_path / "README.md").read_text()
    assert "| `objective` | `NoiseObjective (v_prediction)` |" in card and "stable-diffusion" in card
    assert read_snella_file(tmp_path / ADAPTER_FILE).base_model == str(sd_v_folder)


def test_v_prediction_target_and_min_snr_weights_match_their_formulas():
    scheduler = tiny_ddpm_scheduler("v_prediction")
    objective = NoiseObjective(scheduler, snr_gamma=5.0)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    batch = objective.prepare(latents, noise, torch.Generator().manual_seed(1))
    alpha_bar = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(batch.noisy_latents, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise, atol=1e-5)
    assert torch.allclose(batch.target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents, atol=1e-5)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    assert torch.allclose(snr_of(scheduler.alphas_cumprod, batch.timesteps), snr, rtol=1e-5)
    assert torch.allclose(batch.weights, torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    assert torch.allclose(min_snr_weights(torch.tensor([10.0, 2.0]), 5.0, "epsilon"), torch.tensor([0.5, 1.0]))
    per_sample = ((batch.target - latents) ** 2).mean(dim=(1, 2, 3))
    assert torch.isclose(weighted_mse(latents, batch.target, batch.weights), (per_sample * batch.weights).mean())
    expected = (per_sample[:2] * batch.weights[:2]).mean() + 0.5 * (per_sample[2:] * batch.weights[2:]).mean()
    assert torch.isclose(dreambooth_loss(latents, batch.target, batch.weights, 2, 0.5), expected)


def test_transform_resizes_crops_flips_and_normalizes():
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    centered = transform_image(image, 10, True, False, np.random.default_rng(0))
    assert centered.pixels.shape == (3, 10, 10) and centered.original_size == (20, 40)
    assert centered.crop_top_left == (0, 5)
    assert centered.pixels.min() >= -1 and centered.pixels.max() <= 1
    assert centered.pixels[:, :, 0].mean() > 0.9 and centered.pixels[:, :, -1].mean() < -0.9
    flipped = [transform_image(image, 10, True, True, np.random.default_rng(seed)).pixels for seed in range(8)]
    assert any(torch.equal(f, centered.pixels.flip(-1)) for f in flipped)
    assert any(torch.equal(f, centered.pixels) for f in flipped)


# --- bad input ------------------------------------------------------------------------------


def test_missing_or_empty_instance_folder_is_named(tmp_path, sd_folder):
    with pytest.raises(DataError, match="--instance_data_dir=.*nowhere: no such folder"):
        run_main("--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir",
                 str(tmp_path / "nowhere"), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty: the folder holds no images"):
        run_main("--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir",
                 str(tmp_path / "empty"), "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"))


def test_corrupt_images_are_named(tmp_path):
    write_images(synthetic_instance_images(count=1), tmp_path, "good")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read image file.*broken.png.*empty.jpg"):
        load_image_folder(tmp_path, "--instance_data_dir")


def test_non_rgb_images_are_converted_and_small_ones_warned(tmp_path, caplog):
    Image.new("L", (40, 40), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 100)).save(tmp_path / "alpha.png")
    Image.new("P", (12, 20)).save(tmp_path / "palette.png")
    images = load_image_folder(tmp_path, "--instance_data_dir")
    assert {name: image.mode for name, image in images.items()} == {
        "alpha.png": "RGB", "gray.png": "RGB", "palette.png": "RGB"}
    assert np.asarray(images["gray.png"])[0, 0].tolist() == [128, 128, 128]
    with caplog.at_level("WARNING"):
        assert warn_small_images(images, 32, "--instance_data_dir") == ["palette.png"]
    assert "palette.png 12x20" in caplog.text and "upscaled" in caplog.text
    upscaled = transform_image(images["palette.png"], 32, True, False, np.random.default_rng(0))
    assert upscaled.pixels.shape == (3, 32, 32)


def test_unknown_model_family_is_named(tmp_path, instance_dir):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownModelFamilyError, match="'KandinskyPipeline' is not a supported.*StableDiffusionXLPipeline"):
        run_main("--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(instance_dir),
                 "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"))
    with pytest.raises(UnknownModelFamilyError, match="no model_index.json"):
        detect_family(str(instance_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_xformers_without_cuda_is_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        script.cli(["--output_dir", str(tmp_path), "--enable_xformers_memory_efficient_attention"])
    assert raised.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: --enable_xformers_memory_efficient_attention: xformers has no CPU kernels")
    assert "Traceback" not in error
    assert not list(tmp_path.iterdir())  # rejected before anything was written


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, sd_folder, instance_dir):
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+.*checkpoint-\d+\) is intact"):
        run_main(
            "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "6",
            "--checkpointing_steps", "1", "--learning_rate", "1e30", "--max_grad_norm", "0", "--report_to", "none",
        )
    assert not (tmp_path / ADAPTER_FILE).exists()
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints and not list(tmp_path.glob(".checkpoint-*"))
    from safetensors.torch import load_file

    kept = load_file(checkpoints[-1] / ADAPTER_FILE)  # complete: every tensor reads back, all finite
    assert kept and all(torch.isfinite(tensor).all() for tensor in kept.values())
    # At lr 1e30 the factors are finite but far outside any trained range: ΔW would overflow
    # float32, so the loader refuses the file rather than load an adapter that gives inf.
    with pytest.raises(SnellaError, match="may reach"):
        read_snella_file(checkpoints[-1] / ADAPTER_FILE)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = """--revision --variant --resolution --center_crop --random_flip --train_batch_size
    --max_train_steps --num_train_epochs --gradient_accumulation_steps --gradient_checkpointing
    --learning_rate --scale_lr --lr_scheduler --lr_warmup_steps --use_8bit_adam --adam_beta1 --adam_beta2
    --adam_weight_decay --adam_epsilon --max_grad_norm --mixed_precision --allow_tf32
    --enable_xformers_memory_efficient_attention --snr_gamma --seed --with_prior_preservation
    --class_data_dir --class_prompt --num_class_images --prior_loss_weight --sample_batch_size
    --train_text_encoder --validation_prompt --num_validation_images --validation_steps
    --checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint --report_to --logging_dir
    --cache_latents --rank --kernel --target_modules --init_sparsity --target_sparsity
    --allocator_warmup_steps --allocator_final_steps --allocator_interval --importance_beta1
    --importance_beta2 --forward_mode --forward_cache_mb --pretrained_model_name_or_path --instance_data_dir
    --instance_prompt --output_dir""".split()
    # "  --flag VALUE", "  --flag" alone, or "  --flag, --no-flag" (a BooleanOptionalAction)
    missing = [flag for flag in flags if not any(f"  {flag}{end}" in text for end in (" ", "\n", ","))]
    assert not missing


def test_speed_flags_reach_the_adapter_config():
    args = script.parse_args([*FAST_FLAGS, "--instance_prompt", PROMPT, "--output_dir", "unused",
                              "--forward_cache_mb", "256", "--threshold_sample_size", "4096"])
    config = args.adapter.snella_config(family_for_class("StableDiffusionPipeline").denoiser_preset, total_steps=10)
    assert config.forward_cache_mb == 256 and config.threshold_sample_size == 4096
    assert not config.compile_kernels


def test_resume_from_an_unfitting_or_missing_checkpoint_is_named(sd_run, sd_folder, instance_dir, tmp_path):
    from snella_diffusion.training.checkpointing import CheckpointError

    shutil.copytree(sd_run / f"checkpoint-{HALF}", tmp_path / f"checkpoint-{HALF}")
    with pytest.raises(CheckpointError, match=f"checkpoint-{HALF}.*another --rank"):
        run_main(
            "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", str(STEPS),
            "--rank", "8", "--resume_from_checkpoint", "latest", "--report_to", "none",
        )
    with pytest.raises(CheckpointError, match="--resume_from_checkpoint=checkpoint-7: no such checkpoint folder"):
        resolve_resume_path(tmp_path, "checkpoint-7")


def test_bad_flag_combinations_are_named(tmp_path):
    with pytest.raises(SnellaError, match="--with_prior_preservation needs --class_data_dir"):
        run_main("--with_prior_preservation", "--class_prompt", "a toy", "--output_dir", str(tmp_path))
    with pytest.raises(SnellaError, match="--instance_prompt is required"):
        run_main("--instance_data_dir", str(tmp_path), "--output_dir", str(tmp_path))


def test_prior_preservation_generates_class_images_and_caches_latents(tmp_path, sd_folder, instance_dir):
    class_dir = tmp_path / "class"
    run_main(
        "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a toy",
        "--num_class_images", "3", "--sample_batch_size", "2", "--cache_latents", "--report_to", "none",
    )
    generated = sorted(class_dir.glob("*.png"))
    assert len(generated) == 3 and all(Image.open(p).size == (32, 32) for p in generated)
    assert "class prompt: `a photo of a toy`" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / ADAPTER_FILE).is_file()


def test_bf16_mixed_precision_trains_unet_and_text_encoder(tmp_path, sd_folder, instance_dir):
    """Autocast makes the adapted layers' outputs bf16 while LayerNorm feeds them float32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        run_main(
            "--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--max_train_steps", "3",
            "--mixed_precision", "bf16", "--train_text_encoder", "--report_to", "none",
        )
    finally:
        AcceleratorState._reset_state(True)
    snella_file = read_snella_file(tmp_path / ADAPTER_FILE)
    assert sorted(snella_file.layers) == ["text_encoder", "unet"]
    assert all(t.dtype == torch.float32 for layer in snella_file.layers["unet"].values() for t in
               (layer["in_factors"], layer["out_factors"]))
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    assert allocation["history_steps"][-1] == 3  # final budget applied although 3 % interval != 0


def test_report_to_falls_back_when_tensorboard_is_missing(monkeypatch, caplog):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    assert resolve_report_to(None) is None
    with caplog.at_level("WARNING"):
        assert resolve_report_to("tensorboard") is None
    assert "tensorboard is not installed" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert resolve_report_to(None) == "tensorboard"
    assert resolve_report_to("none") is None

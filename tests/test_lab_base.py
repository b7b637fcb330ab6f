"""The lab's pretrained base (issue 16): shipped weights and their hash check, deterministic
pretraining, the base loaded by path drawing its prompts, and DreamBooth on it raising the
concept fidelity, with SNELLA and with a LoRA file diffusers loads."""

import shutil

import numpy as np
import pytest
import torch

from snella_diffusion.errors import SnellaError
from snella_diffusion.io import file_sha256
from snella_diffusion.lab import pretrain, shipped, world
from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE
from snella_diffusion.lab.evaluate import sample, score_prompts

DREAMBOOTH_STEPS = 200
DREAMBOOTH_LR = {"snella": "3e-2", "lora": "3e-3"}  # each adapter's lab pick (SNELLA with its default β decay)
FIDELITY_PROBES = 32


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory):
    return shipped.materialize_base(tmp_path_factory.mktemp("lab") / "base")


@pytest.fixture(scope="session")
def base_pipeline(base_folder):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(base_folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def fidelity(pipeline):
    prompts = [world.INSTANCE_PROMPT] * FIDELITY_PROBES
    return score_prompts(sample(pipeline, prompts, seed=500, steps=10), prompts)["concept_loose"]


@pytest.fixture(scope="session")
def dreambooth_runs(base_folder, tmp_path_factory):
    """One SNELLA and one LoRA run of the same settings: {adapter: output folder}."""
    from train_scripts.train_dreambooth_snella import main, parse_args

    root = tmp_path_factory.mktemp("lab-dreambooth")
    instance = root / "instance"
    instance.mkdir()
    for index, image in enumerate(world.instance_pil_images(5, seed=12345)):
        image.save(instance / f"sks_{index}.png")
    runs = {}
    for adapter in ("snella", "lora"):
        out = root / adapter
        main(parse_args([
            "--pretrained_model_name_or_path", str(base_folder), "--instance_data_dir", str(instance),
            "--instance_prompt", world.INSTANCE_PROMPT, "--with_prior_preservation",
            "--class_data_dir", str(root / "class"), "--class_prompt", world.CLASS_PROMPT,
            "--num_class_images", "8", "--sample_batch_size", "8", "--validation_guidance_scale", str(BASE_GUIDANCE_SCALE),
            "--max_train_steps", str(DREAMBOOTH_STEPS), "--learning_rate", DREAMBOOTH_LR[adapter], "--train_batch_size", "2",
            "--rank", "8", "--adapter", adapter, "--checkpointing_steps", "100000", "--report_to", "none",
            "--output_dir", str(out),
        ]))
        runs[adapter] = out
    return runs


def test_shipped_weights_fit_and_match_their_hash():
    record = shipped.shipped_record()
    assert shipped.WEIGHTS_FILE.stat().st_size == record["bytes"] <= 8 * 2**20
    assert file_sha256(shipped.WEIGHTS_FILE) == record["sha256"]


def test_a_modified_weights_file_is_rejected_by_name(tmp_path):
    copy = tmp_path / "lab_base.fp16.safetensors"
    shutil.copy(shipped.WEIGHTS_FILE, copy)
    with open(copy, "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(SnellaError, match="lab_base.fp16.safetensors: SHA-256"):
        shipped.load_shipped_pipeline(weights_file=copy)


def test_pretraining_is_deterministic(tmp_path):
    def run(folder):
        pretrain.main(pretrain.parse_args([
            "--output_dir", str(folder), "--max_steps", "3", "--vae_steps", "2", "--batch_size", "4",
            "--warmup_steps", "2", "--eval_inference_steps", "0", "--log_every", "1",
        ]))
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder / "pipeline", subfolder="unet").state_dict()

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert all(torch.equal(first[key], second[key]) for key in first)
    from snella_diffusion.lab.base import unet

    untrained = unet(0).state_dict()
    assert any(not torch.equal(first[key], untrained[key]) for key in first)


@pytest.mark.slow
def test_the_base_loaded_by_path_draws_its_prompts(base_pipeline):
    from diffusers import StableDiffusionPipeline

    assert isinstance(base_pipeline, StableDiffusionPipeline)
    prompts = world.base_prompts()
    scores = score_prompts(sample(base_pipeline, prompts, seed=2024), prompts)
    # Shipped base (2,906 steps, guidance 3): these 48 samples score colour 100 %, shape 96 %,
    # size 98 %, all three 94 % (192 random prompts: 100 %, 96 %, 94 %, 91 %); chance is 17 %,
    # 25 %, 50 % and 2 %. The acceptance line is colour ≥ 95 %, its goal all three ≥ 85 %.
    assert scores["color"] >= 0.95
    assert scores["size"] >= 0.85
    assert scores["all"] >= 0.80
    assert scores["concept_loose"] == 0.0


@pytest.mark.slow
def test_dreambooth_raises_fidelity_with_snella_and_lora(base_folder, base_pipeline, dreambooth_runs):
    from diffusers import StableDiffusionPipeline

    from snella_diffusion.loaders import load_snella_weights

    before = fidelity(base_pipeline)
    snella = StableDiffusionPipeline.from_pretrained(base_folder)
    snella.set_progress_bar_config(disable=True)
    load_snella_weights(snella, dreambooth_runs["snella"] / "snella_weights.safetensors")
    lora = StableDiffusionPipeline.from_pretrained(base_folder)
    lora.set_progress_bar_config(disable=True)
    lora.load_lora_weights(dreambooth_runs["lora"])
    assert lora.get_active_adapters(), "diffusers loaded no LoRA adapter"
    after_snella, after_lora = fidelity(snella), fidelity(lora)
    # The base shows the concept in 0 of the 32 probes; after 200 steps at least 3 of them must
    # (both pass on the 2,906-step base at guidance 3; the lab's 64-sample numbers: docs/lab.md).
    assert after_snella >= before + 0.09, (before, after_snella)
    assert after_lora >= before + 0.09, (before, after_lora)

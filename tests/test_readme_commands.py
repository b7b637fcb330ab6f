"""Every command and Python example in README.md runs, on tiny models: the same flags, with the
hub ids replaced by tiny pipelines built from configs, the data folders by generated images and
the sizes (steps, resolution, rank, sequence length, inference steps) made tiny.

The README is parsed, so a new recipe whose base model has no tiny stand-in here fails the test
instead of going untested. fp16 recipes run as written: accelerate accepts fp16 autocast on
the CPU; bf16 recipes run in bf16."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, save_snella
from snella_diffusion.tiny_dit_models import TINY_DIT_BUILDERS
from snella_diffusion.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from snella_diffusion.training.data import synthetic_instance_images, write_images

from train_scripts import train_classification_snella as classification_script
from train_scripts import train_dreambooth_snella as dreambooth_script

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# hub id in the README -> tiny stand-in
TINY_BASES = {
    "runwayml/stable-diffusion-v1-5": "sd",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "pixart-sigma",
}
# flag -> tiny value (flags not listed keep the README's value)
TINY_SIZES = {
    "--resolution": "32", "--max_train_steps": "2", "--rank": "4", "--validation_steps": "1",
    "--checkpointing_steps": "1", "--max_sequence_length": "16", "--num_class_images": "2",
    "--gradient_accumulation_steps": "2", "--min_bucket_reso": "16", "--max_bucket_reso": "64",
}
TINY_EXTRA = ["--num_validation_images", "1", "--validation_inference_steps", "1", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("single_thread")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands(script_name: str) -> list[list[str]]:
    """The README's command lines that run ``script_name``, as argument lists after the script."""
    found = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command)
                scripts = [i for i, w in enumerate(words) if w.endswith(script_name)]
                if scripts:
                    found.append(words[scripts[0] + 1:])
    return found


DREAMBOOTH = shell_commands("train_dreambooth_snella.py")


def flag_value(arguments: list[str], flag: str):
    for index, word in enumerate(arguments):
        if word == flag:
            return arguments[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def tiny_arguments(arguments: list[str], replace: dict[str, str]) -> list[str]:
    """``--flag=value`` split, values of ``replace`` and ``TINY_SIZES`` substituted."""
    split: list[str] = []
    for word in arguments:
        split.extend(word.split("=", 1) if word.startswith("--") and "=" in word else [word])
    for index, word in enumerate(split[:-1]):
        if word in replace:
            split[index + 1] = replace[word]
        elif word in TINY_SIZES:
            split[index + 1] = TINY_SIZES[word]
    return split


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, **TINY_DIT_BUILDERS}
    for name in set(TINY_BASES.values()):
        builders[name](0).save_pretrained(root / name)
    images = write_images(synthetic_instance_images(count=2, size=48, seed=1), root / "dog", "dog")
    for index, image in enumerate(images):  # sidecar captions for the captioned-dataset recipe
        image.with_suffix(".txt").write_text(f"a toy, picture {index}")
    return root


def in_fresh_accelerate_state(run, *args):
    """``run(*args)`` with accelerate's process-wide state reset before and after (each README
    command sets its own --mixed_precision)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        return run(*args)
    finally:
        AcceleratorState._reset_state(True)


def run_dreambooth(arguments: list[str]):
    return in_fresh_accelerate_state(dreambooth_script.main, dreambooth_script.parse_args(arguments))


def run_classification(arguments: list[str]):
    return in_fresh_accelerate_state(classification_script.main, classification_script.parse_args(arguments))


def test_readme_names_every_recipe_base():
    bases = [flag_value(arguments, "--pretrained_model_name_or_path") for arguments in DREAMBOOTH]
    assert None in bases  # the quick start's embedded model
    assert len(bases) >= 6 and all(base is None or base in TINY_BASES for base in bases), bases


@pytest.mark.slow
@pytest.mark.parametrize("arguments", DREAMBOOTH, ids=lambda a: flag_value(a, "--pretrained_model_name_or_path") or "quick-start")
def test_dreambooth_recipe_runs_on_a_tiny_model(tiny_world, tmp_path, arguments):
    base = flag_value(arguments, "--pretrained_model_name_or_path")
    replace = {"--output_dir": str(tmp_path / "out"), "--instance_data_dir": str(tiny_world / "dog"),
               "--class_data_dir": str(tmp_path / "class")}
    if base is not None:
        replace["--pretrained_model_name_or_path"] = str(tiny_world / TINY_BASES[base])
    tiny = tiny_arguments(arguments, replace)
    if base is None:
        tiny += ["--max_train_steps", "2"]
    if "--enable_bucket" in tiny and "--bucket_reso_steps" not in tiny:
        tiny += ["--bucket_reso_steps", "16"]  # the default, 64, exceeds the tiny resolution
    if "--with_prior_preservation" in tiny and "--num_class_images" not in tiny:
        tiny += ["--num_class_images", "2"]  # the default, 100, is a real run's size
    adapter = run_dreambooth([*tiny, *TINY_EXTRA])
    assert adapter.is_file() and (tmp_path / "out" / "README.md").is_file()
    if "--with_prior_preservation" in tiny:
        assert len(list((tmp_path / "class").glob("*.png"))) == 2


@pytest.fixture(scope="module")
def adapter_folders(tiny_world):
    """The adapter files the README's Python examples load, saved from tiny pipelines."""
    def save(pipe, path, seed):
        layers = apply_snella(pipe.unet, SnellaConfig(rank=4, target_modules="unet"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in layers.values():
                layer.out_factors.add_(torch.randn(layer.out_factors.shape, generator=generator))
        save_snella(pipe.unet, path)

    save(tiny_sd_pipeline(0), tiny_world / "examples" / "sd15-dog-snella" / "snella_weights.safetensors", 1)
    save(tiny_sd_pipeline(0), tiny_world / "examples" / "style" / "snella_weights.safetensors", 2)
    save(tiny_sdxl_pipeline(0), tiny_world / "examples" / "sdxl-dog-snella" / "snella_weights.safetensors", 3)
    return tiny_world / "examples"


PYTHON_EXAMPLES = [block for block in code_blocks("python") if "from_pretrained" in block]


def test_readme_python_examples_cover_every_task():
    joined = "\n".join(PYTHON_EXAMPLES)
    for call in ("apply_snella(", "load_snella_weights(", "fuse_snella(", "CUSTOM_PIPELINE"):
        assert call in joined, call


@pytest.mark.slow
@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=lambda b: b.splitlines()[-1][:40])
def test_python_example_runs_on_a_tiny_model(tiny_world, adapter_folders, monkeypatch, example):
    monkeypatch.chdir(adapter_folders)
    code = example
    for hub_id, tiny in TINY_BASES.items():
        code = code.replace(f'"{hub_id}"', repr(str(tiny_world / tiny)))
    code = code.replace("num_inference_steps=25", "num_inference_steps=2")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


CLASSIFICATION = shell_commands("train_classification_snella.py")


@pytest.mark.slow
def test_classification_embedded_command_runs_with_tiny_sizes(tmp_path):
    embedded = [a for a in CLASSIFICATION if flag_value(a, "--pretrained_model_name_or_path") is None]
    assert len(embedded) == 1
    arguments = tiny_arguments(embedded[0], {"--output_dir": str(tmp_path / "out")})
    payload = run_classification([*arguments, "--seeds", "0", "--pretrain_epochs", "1", "--epochs", "1",
                                  "--method", "snella"])
    assert [row["method"] for row in payload["rows"]] == ["snella"]
    assert (tmp_path / "out" / "results.md").is_file()


def write_fgvc_dataset(folder: Path) -> None:
    """Three colour classes in the FGVC layout (``train.json``/``val.json``/``test.json``)."""
    import json

    from PIL import Image

    entries = {"train": {}, "test": {}}
    for cls, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        for index in range(6):
            split = "train" if index < 4 else "test"
            relative = f"images/class{cls}/img{index}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 24), tuple(c + 5 * index for c in colour)).save(folder / relative)
            entries[split][relative] = cls + 1
    for name, split in (("train", "train"), ("val", "test"), ("test", "test")):
        (folder / f"{name}.json").write_text(json.dumps(entries[split]))


@pytest.mark.slow
def test_classification_paper_command_runs_on_a_tiny_vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    paper = [a for a in CLASSIFICATION if flag_value(a, "--pretrained_model_name_or_path") is not None]
    assert len(paper) == 1
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=48)).save_pretrained(tmp_path / "vit")
    write_fgvc_dataset(tmp_path / "cub")
    arguments = tiny_arguments(paper[0], {
        "--pretrained_model_name_or_path": str(tmp_path / "vit"), "--dataset_dir": str(tmp_path / "cub"),
        "--output_dir": str(tmp_path / "out"), "--train_batch_size": "4",
    })
    payload = run_classification([*arguments, "--epochs", "1", "--seeds", "0"])
    assert [row["method"] for row in payload["rows"]] == ["snella", "snell", "lora", "full"]
    assert (tmp_path / "out" / "results.md").is_file()


EXPORTS = shell_commands("snella-export")
# --base in the README's export commands -> tiny stand-in
EXPORT_BASES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "./sdxl-base": "sdxl", "./flux-dev": "flux"}
EXPORT_SIZES = {"--rank": "4", "--max_rank": "4"}


def test_readme_export_commands_cover_every_format():
    assert {flag_value(arguments, "--to") for arguments in EXPORTS} == {"diff", "lora", "peft", "comfyui"}
    assert all(flag_value(arguments, "--base") in EXPORT_BASES for arguments in EXPORTS)


def tiny_adapter(base_folder: Path, base: str, path: Path, seed: int) -> str:
    """A SNELLA file for the tiny ``base`` with non-trivial factors; returns its path."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_folder)
    denoiser = pipe.transformer if base == "flux" else pipe.unet
    layers = apply_snella(denoiser, SnellaConfig(rank=4, target_modules="dit" if base == "flux" else "unet"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.out_factors.add_(torch.randn(layer.out_factors.shape, generator=generator))
    save_snella(denoiser, path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("arguments", EXPORTS, ids=lambda a: f"{flag_value(a, '--to')}-{flag_value(a, '--base')}")
def test_export_command_runs_on_a_tiny_model(tiny_world, tmp_path, arguments):
    from snella_diffusion.export.cli import main as export_main

    base = EXPORT_BASES[flag_value(arguments, "--base")]
    base_folder = tiny_world / base
    first_flag = next(i for i, word in enumerate(arguments) if word.startswith("-"))
    adapters = []
    for index, spec in enumerate(arguments[:first_flag]):
        _, _, weight = spec.partition(":")
        path = tiny_adapter(base_folder, base, tmp_path / f"adapter{index}.safetensors", seed=index)
        adapters.append(f"{path}:{weight}" if weight else path)
    output = tmp_path / "exported.safetensors"
    flags = tiny_arguments(arguments[first_flag:], {"--base": str(base_folder), "-o": str(output), **EXPORT_SIZES})
    assert export_main([*adapters, *flags]) == 0
    from safetensors.torch import load_file

    tensors = load_file(output)
    suffixes = {"diff": (".diff",), "lora": (".lora_down.weight", ".lora_up.weight", ".alpha"),
                "peft": (".lora_A.weight", ".lora_B.weight"),
                "comfyui": (".snella.in_factors", ".snella.out_factors", ".snella.scalars", ".snella.spec",
                            ".snella.scales")}[flag_value(arguments, "--to")]
    assert tensors and all(key.endswith(suffixes) for key in tensors)

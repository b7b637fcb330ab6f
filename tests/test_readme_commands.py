"""Every command and Python example in README.md and docs/*.md runs, on tiny models: the same
flags, with the hub ids replaced by tiny pipelines built from configs, the data folders by
generated images and the sizes (steps, resolution, rank, sequence length, inference steps) made
tiny. A command shown on several pages runs once.

The pages are parsed, so a new recipe whose base model has no tiny stand-in here fails the test
instead of going untested, and a shell command that no test here runs must be listed in
``NOT_RUN_HERE`` with the reason. fp16 recipes run as written: accelerate accepts fp16
autocast on the CPU; bf16 recipes run in bf16. The pages' shape is checked too: the README stays
a front page (at most ``README_MAX_LINES`` lines), every relative link and anchor resolves, and
the README's numbers are the topic pages' numbers."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from benchmark_scripts import load_benchmark

from snella_diffusion import SnellaConfig, apply_snella, save_snella
from snella_diffusion.families import read_scheduler_config
from snella_diffusion.testing.gguf_files import write_q8_0_checkpoint
from snella_diffusion.testing.tiny_dit_models import TINY_DIT_BUILDERS
from snella_diffusion.testing.tiny_dit_models import tiny_ideogram4_pipeline, tiny_qwen21_pipeline
from snella_diffusion.testing.tiny_ltx2_models import TINY_LTX2_BUILDERS
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from snella_diffusion.testing.tiny_video_models import TINY_VIDEO_BUILDERS
from snella_diffusion.testing.tiny_hunyuan_video_models import TINY_HUNYUAN_VIDEO_BUILDERS
from snella_diffusion.training.data import synthetic_instance_images, write_images

from train_scripts import train_classification_snella as classification_script
from train_scripts import train_dreambooth_snella as dreambooth_script

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 450

# hub id in the pages -> tiny stand-in
TINY_BASES = {
    "runwayml/stable-diffusion-v1-5": "sd",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "pixart-sigma",
    "Qwen/Qwen-Image": "qwen-image",
    "Tongyi-MAI/Z-Image": "z-image",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux2-klein",
    "lodestones/Chroma1-HD": "chroma",
    "black-forest-labs/FLUX.2-dev": "flux2",
    "krea/Krea-2-Raw": "krea2",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan-a14b",
    "Alpha-VLLM/Lumina-Image-2.0": "lumina2",
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": "sana",
    "HiDream-ai/HiDream-I1-Full": "hidream",
    "ideogram-ai/ideogram-v4": "ideogram4",
    "Qwen/Qwen-Image-2.1": "qwen-image-2.1",
    "Lightricks/LTX-2": "ltx2",
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v": "hunyuan-video15",
}
# flag -> tiny value (flags not listed keep the page's value)
TINY_SIZES = {
    "--resolution": "32", "--max_train_steps": "2", "--rank": "4", "--validation_steps": "1",
    "--checkpointing_steps": "1", "--max_sequence_length": "16", "--num_class_images": "2",
    "--gradient_accumulation_steps": "2", "--min_bucket_reso": "16", "--max_bucket_reso": "64",
    "--num_frames": "5",
    "--blocks_to_swap": "1",
}
TINY_EXTRA = ["--num_validation_images", "1", "--validation_inference_steps", "1", "--report_to", "none"]
# data folder named on a page -> the kohya <repeats>_<prompt> layout in the tiny world standing for it
TINY_KOHYA_LAYOUTS = {"train": "kohya/train", "reg": "kohya/reg"}
# pages whose data-file blocks (toml, yaml, json) another test reads, and which test
DATA_FILE_BLOCKS = {
    "docs/training-data-formats.md": "tests/test_dataset_configs.py::test_every_example_of_the_formats_page_reads",
}

# The programs whose commands the tests below run (a command runs one when one of its words ends
# with the program's name).
RUN_HERE = ("train_dreambooth_snella.py", "train_classification_snella.py", "snella-export",
            "bench_train_step.py")
# Shell commands shown on the pages that no test here runs, each with the reason (the command as
# shlex splits it, comments dropped, joined by single spaces).
NOT_RUN_HERE = {
    "pip install torch": "installs a package; tests/test_install.py installs the project into a fresh venv",
    "pip install .[tensorboard]": "installs the project; tests/test_install.py does the same into a fresh venv",
    "pip install -c .ci/constraints.txt torch==2.13.0": "installs a package (the quick start's first step)",
    "pip install -c .ci/constraints.txt -e .[test]": "installs the project (the quick start's second step)",
    "python -m pip install -q -c .ci/constraints.txt torch==2.13.0": "installs a package; .ci/run runs this line",
    "python -m pip install -q -c .ci/constraints.txt -e .[test]": "installs the project; .ci/run runs this line",
    "python -m pytest -q": "the test suite itself; .ci/run runs this line",
    "pip install snella-diffusion": "installs the published package into ComfyUI's Python",
    "snella-comfyui install /path/to/ComfyUI": "writes into a ComfyUI checkout; tests/test_comfyui.py runs "
                                               "it on a stand-in folder",
    "pip install snella-diffusion[video]": "installs the video extra; the test extra holds PyAV too",
    "python benchmarks/memory_table.py": "builds six 4-32 B-parameter models on meta (minutes of CPU); "
                                         "tests/test_memory_table.py runs its accounting and measurement",
    "python -m snella_diffusion.lab.shipped materialize /tmp/labbase": "writes the lab base; tests/test_lab_base.py "
                                                                        "checks what materialize_base writes",
    "python benchmarks/bench_personalization.py --base /tmp/labbase --output_dir /tmp/lab26 --threads 1 --methods "
    "--sweep --sweep_methods snella --sweep_learning_rates 3e-3 1e-2 3e-2 1e-1 --sweep_steps 400 --seeds 0 --variant te "
    "--train_flags --train_text_encoder --target_sparsity 0.5 --pick_rule utility --pick_seed 0":
        "four DreamBooth runs of ~1.5 min plus ~2 min of evaluation each; tests/test_bench_personalization.py "
        "checks its names, pick rules and report tables",
}


pytestmark = pytest.mark.usefixtures("single_thread")


def page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def code_blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def page_blocks(language: str) -> list[tuple[str, str]]:
    """``(page name, block)`` for every ``language`` code block of every page."""
    return [(page_name(page), block) for page in PAGES for block in code_blocks(language, page.read_text())]


def command_lines(block: str) -> list[list[str]]:
    """The commands of a shell block as word lists: continuations joined, ``&&`` chains split,
    comments and empty lines dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for command in line.split("&&"):
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def shell_commands(script_name: str) -> list[tuple[str, list[str]]]:
    """``(page, arguments after the script)`` for the pages' commands that run ``script_name``;
    a command shown on several pages is listed once, under the first page."""
    found, seen = [], set()
    for page, block in page_blocks("bash"):
        for words in command_lines(block):
            scripts = [i for i, w in enumerate(words) if w.endswith(script_name)]
            if scripts and tuple(words) not in seen:
                seen.add(tuple(words))
                found.append((page, words[scripts[0] + 1:]))
    return found


def python_examples() -> list[tuple[str, str]]:
    """``(page, block)`` for every Python block of the pages, a block shown on several pages
    listed once, under the first page."""
    found, seen = [], set()
    for page, block in page_blocks("python"):
        if block not in seen:
            seen.add(block)
            found.append((page, block))
    return found


def test_every_shell_command_is_run_or_excused():
    shown = [" ".join(words) for _, block in page_blocks("bash") for words in command_lines(block)]
    unclassified = [c for c in shown if c not in NOT_RUN_HERE and not any(w.endswith(RUN_HERE) for w in c.split())]
    assert not unclassified, f"run these in a test here or list them in NOT_RUN_HERE: {unclassified}"
    assert set(NOT_RUN_HERE) <= set(shown), set(NOT_RUN_HERE) - set(shown)  # no stale excuses


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_code_block_is_a_shell_or_python_block(page):
    """The blocks these tests run are the ``bash`` and ``python`` ones: a block in any other
    language (or none) would go unrun, except the data files of the pages in
    ``DATA_FILE_BLOCKS`` (read by the test named there)."""
    languages = re.findall(r"^```(\w*)\n.*?^```", page.read_text(), flags=re.S | re.M)
    data_files = {"toml", "yaml", "json"} if page_name(page) in DATA_FILE_BLOCKS else set()
    assert set(languages) <= {"bash", "python"} | data_files, languages


def test_ci_runs_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme_lines = [line for block in code_blocks("bash", PAGES[0].read_text()) for line in block.splitlines()]
    assert ci_command in readme_lines and ci_command.endswith("python -m pytest -q")


DREAMBOOTH = shell_commands("train_dreambooth_snella.py")


def command_id(command: tuple[str, list[str]], flag: str) -> str:
    """``page:value of flag`` (``page:default`` when the command leaves the flag out)."""
    page, arguments = command
    return f"{Path(page).stem}:{flag_value(arguments, flag) or 'default'}"


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
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, **TINY_DIT_BUILDERS, **TINY_VIDEO_BUILDERS,
                **TINY_LTX2_BUILDERS}
    builders["ideogram4"] = tiny_ideogram4_pipeline
    builders["qwen-image-2.1"] = tiny_qwen21_pipeline
    builders.update(TINY_HUNYUAN_VIDEO_BUILDERS)
    for name in set(TINY_BASES.values()):
        builders[name](0).save_pretrained(root / name)
    transformer = FluxTransformer2DModel.from_pretrained(root / TINY_BASES["black-forest-labs/FLUX.1-dev"],
                                                         subfolder="transformer")
    write_q8_0_checkpoint(transformer.state_dict(), root / "transformer-Q8_0.gguf")  # --pretrained_denoiser_file
    images = write_images(synthetic_instance_images(count=2, size=48, seed=1), root / "dog", "dog")
    for index, image in enumerate(images):  # sidecar captions for the captioned-dataset recipe
        image.with_suffix(".txt").write_text(f"a toy, picture {index}")
    kohya = write_images(synthetic_instance_images(count=2, size=48, seed=2), root / "kohya" / "train" / "10_sks dog",
                         "dog")
    kohya[1].with_suffix(".txt").write_text("sks dog on grass")  # the caption file wins over the folder's prompt
    write_images(synthetic_instance_images(count=2, size=48, seed=3), root / "kohya" / "reg" / "1_dog", "dog")
    return root


def in_fresh_accelerate_state(run, *args):
    """``run(*args)`` with accelerate's process-wide state reset before and after (each page's
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


def test_pages_name_every_recipe_base():
    bases = [flag_value(arguments, "--pretrained_model_name_or_path") for _, arguments in DREAMBOOTH]
    assert None in bases  # the quick start's embedded model
    assert len(bases) >= 6 and all(base is None or base in TINY_BASES for base in bases), bases


@pytest.mark.slow
@pytest.mark.parametrize("command", DREAMBOOTH, ids=lambda c: command_id(c, "--pretrained_model_name_or_path"))
def test_dreambooth_recipe_runs_on_a_tiny_model(tiny_world, tmp_path, command):
    _, arguments = command
    base = flag_value(arguments, "--pretrained_model_name_or_path")
    instance_dir, class_dir = (flag_value(arguments, flag) for flag in ("--instance_data_dir", "--class_data_dir"))
    class_kohya = class_dir in TINY_KOHYA_LAYOUTS
    replace = {"--output_dir": str(tmp_path / "out"),
               "--instance_data_dir": str(tiny_world / TINY_KOHYA_LAYOUTS.get(instance_dir, "dog")),
               "--class_data_dir": str(tiny_world / TINY_KOHYA_LAYOUTS[class_dir]) if class_kohya
               else str(tmp_path / "class"), "--pretrained_denoiser_file": str(tiny_world / "transformer-Q8_0.gguf")}
    if base is not None:
        replace["--pretrained_model_name_or_path"] = str(tiny_world / TINY_BASES[base])
    tiny = tiny_arguments(arguments, replace)
    if base is None:
        tiny += ["--max_train_steps", "2"]
    if "--enable_bucket" in tiny and "--bucket_reso_steps" not in tiny:
        tiny += ["--bucket_reso_steps", "16"]  # the default, 64, exceeds the tiny resolution
    if "--with_prior_preservation" in tiny and "--num_class_images" not in tiny:
        tiny += ["--num_class_images", "2"]  # the default, 100, is a real run's size
    # a shift_terminal scheduler (Qwen-Image, LTX-2) samples NaN at one step: the script refuses it
    terminal = base is not None and read_scheduler_config(str(tiny_world / TINY_BASES[base])).get("shift_terminal")
    steps = ["--validation_inference_steps", "2"] if terminal else []
    adapter = run_dreambooth([*tiny, *TINY_EXTRA, *steps])
    assert adapter.is_file() and (tmp_path / "out" / "README.md").is_file()
    if "--with_prior_preservation" in tiny and not class_kohya:
        assert len(list((tmp_path / "class").glob("*.png"))) == 2
    if instance_dir in TINY_KOHYA_LAYOUTS:  # every <repeats>_<prompt> folder trained as a subset
        subsets = tomllib.loads((tmp_path / "out" / "config.toml").read_text())["dataset_subsets"]
        assert [(s["name"], s["repeats"], s["draws_per_epoch"], s["is_reg"]) for s in subsets] == (
            [("10_sks dog", 10, 20, False)] + ([("1_dog", 1, 2, True)] if class_kohya else []))


@pytest.fixture(scope="module")
def adapter_folders(tiny_world):
    """The adapter files the pages' Python examples load, saved from tiny pipelines."""
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


PYTHON_EXAMPLES = python_examples()


def test_python_examples_cover_every_task():
    joined = "\n".join(block for _, block in PYTHON_EXAMPLES)
    for call in ("apply_snella(", "load_snella_weights(", "fuse_snella(", "CUSTOM_PIPELINE"):
        assert call in joined, call


@pytest.mark.slow
@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=lambda e: f"{Path(e[0]).stem}:{e[1].splitlines()[-1][:40]}")
def test_python_example_runs_on_a_tiny_model(tiny_world, adapter_folders, monkeypatch, example):
    monkeypatch.chdir(adapter_folders)
    page, code = example
    for hub_id, tiny in TINY_BASES.items():
        code = code.replace(f'"{hub_id}"', repr(str(tiny_world / tiny)))
    code = code.replace("num_inference_steps=25", "num_inference_steps=2")
    exec(compile(code, page, "exec"), {"__name__": "readme_example"})


CLASSIFICATION = shell_commands("train_classification_snella.py")


@pytest.mark.slow
def test_classification_embedded_command_runs_with_tiny_sizes(tmp_path):
    embedded = [a for _, a in CLASSIFICATION if flag_value(a, "--pretrained_model_name_or_path") is None]
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

    paper = [a for _, a in CLASSIFICATION if flag_value(a, "--pretrained_model_name_or_path") is not None]
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
# --base in the pages' export commands -> tiny stand-in
EXPORT_BASES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "./sdxl-base": "sdxl", "./flux-dev": "flux"}
EXPORT_SIZES = {"--rank": "4", "--max_rank": "4"}


def test_export_commands_cover_every_format():
    assert {flag_value(arguments, "--to") for _, arguments in EXPORTS} == {"diff", "lora", "peft", "comfyui"}
    assert all(flag_value(arguments, "--base") in EXPORT_BASES for _, arguments in EXPORTS)


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
@pytest.mark.parametrize("command", EXPORTS, ids=lambda c: f"{command_id(c, '--to')}-{flag_value(c[1], '--base')}")
def test_export_command_runs_on_a_tiny_model(tiny_world, tmp_path, command):
    from snella_diffusion.export.cli import main as export_main

    _, arguments = command

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


BENCHMARKS = shell_commands("bench_train_step.py")


@pytest.mark.slow
@pytest.mark.parametrize("command", BENCHMARKS, ids=lambda c: command_id(c, "--model"))
def test_benchmark_command_runs_on_the_tiny_model(tmp_path, command):
    _, arguments = command
    tiny = tiny_arguments(arguments, {"--model": "tiny", "--repeats": "1", "--rounds": "1"})
    results = load_benchmark("bench_train_step").main(
        [*tiny, "--warmup", "0", "--device", "cpu", "--output_dir", str(tmp_path)])
    methods = arguments[arguments.index("--method") + 1:]
    methods = methods[:next((i for i, word in enumerate(methods) if word.startswith("--")), len(methods))]
    assert [result["settings"]["method"] for result in results] == methods
    assert all(result["step_seconds"][0] > 0 for result in results)
    assert (tmp_path / "train_step_tiny_32px_cpu.md").is_file()


# The page's shape: a front page, links that resolve, one copy of each number.

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
def without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces to ``-``, repeats numbered ``-1``, ``-2``..."""
    anchors: set[str] = set()
    for line in without_code_blocks(text).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            numbered, count = slug, 0
            while numbered in anchors:
                count += 1
                numbered = f"{slug}-{count}"
            anchors.add(numbered)
    return anchors


def relative_links(page: Path) -> list[str]:
    """The link and image targets of ``page`` outside code (neither web addresses nor mail)."""
    prose = re.sub(r"`[^`\n]*`", "", without_code_blocks(page.read_text()))
    return [target for target in LINK.findall(prose) if not re.match(r"[a-z]+:", target)]


def test_readme_stays_a_front_page():
    lines = PAGES[0].read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move a section to docs/"
    linked = {(REPO / target.split("#")[0]).resolve() for target in relative_links(PAGES[0])}
    assert set(PAGES[1:]) <= linked, sorted(page_name(p) for p in set(PAGES[1:]) - linked)


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(target)
    assert not broken, f"{page_name(page)}: {broken}"


def test_readme_numbers_are_the_topic_pages_numbers():
    section = PAGES[0].read_text().split("\n## Current numbers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    topic_lines = {line for page in PAGES[1:] for line in page.read_text().splitlines()}
    assert len(rows) >= 10 and [row for row in rows if row not in topic_lines] == []


"""The DreamBooth run's typed settings and the family table: library functions take typed
settings (never an argparse.Namespace), the settings are frozen, every flag fills exactly one
field, the resolved flags round-trip through a job file, and every family is in one table."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from snella_diffusion import families
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.training.job_config import render_toml
from snella_diffusion.training.run_settings import GROUPS, RunSettings, build_parser, parse_run_settings

PACKAGE = Path(__file__).resolve().parents[1] / "snella_diffusion"


def annotated_parameters(path: Path):
    """(function name, parameter name, annotation source or None) of every parameter in ``path``
    (``*args`` / ``**kwargs`` with their star), and (function name, "return", annotation) of
    every annotated return."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = node.args
            named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            starred = [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
            for argument in named + starred:
                annotation = None if argument.annotation is None else ast.unparse(argument.annotation)
                name = argument.arg if argument in named else "*" + argument.arg
                yield getattr(node, "name", "<lambda>"), name, annotation
            if getattr(node, "returns", None) is not None:
                yield node.name, "return", ast.unparse(node.returns)


def test_no_library_function_takes_an_argparse_namespace():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    offenders = [f"{path.relative_to(PACKAGE)}: {function}({name}: {annotation})"
                 for path in files for function, name, annotation in annotated_parameters(path)
                 if "Namespace" in (annotation or "") or (name == "args" and annotation is None)]
    assert offenders == []
    # the walk does see annotations: a known typed parameter is found
    found = list(annotated_parameters(PACKAGE / "training" / "run_setup.py"))
    assert ("build_dataset", "settings", "RunSettings") in found


def test_settings_are_frozen_at_every_level():
    settings = parse_run_settings(["--rank", "16", "--target_modules", "to_q", "to_k"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.training = settings.training
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.captions.caption_prefix = "sks"
    for name, group in GROUPS.items():
        assert group.__dataclass_params__.frozen, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(settings, name), dataclasses.fields(group)[0].name, None)
    assert settings.adapter.target_modules == ("to_q", "to_k")  # a tuple: not mutable in place


def test_every_flag_fills_exactly_one_field_of_one_group():
    parser = build_parser()
    dests = [action.dest for action in parser._actions if action.option_strings and action.dest not in ("help", "config")]
    fields = [field.name for group in GROUPS.values() for field in dataclasses.fields(group)]
    assert len(fields) == len(set(fields))  # no field in two groups
    assert sorted(dests) == sorted(fields)
    assert len(fields) == 125


def test_bare_caption_prefix_and_ema_decay_are_resolved_at_parsing():
    settings = parse_run_settings(["--caption_extension", ".txt", "--caption_prefix", "--instance_prompt", "sks dog",
                                   "--use_ema"])
    assert settings.captions.caption_prefix == "sks dog"
    assert settings.ema.ema_decay == 0.9999
    embedded = parse_run_settings([])
    assert (embedded.adapter.rank, embedded.adapter.target_sparsity, embedded.training.train_text_encoder) == (8, 0.5, True)
    real = parse_run_settings(["--pretrained_model_name_or_path", "some/model"])
    assert (real.adapter.rank, real.adapter.target_sparsity, real.training.train_text_encoder) == (32, 0.8, False)


def test_resolved_flags_round_trip_through_the_job_file(tmp_path):
    flags = ["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "images", "--rank", "12",
             "--target_modules", "to_q", "dit@double", "--no-train_text_encoder", "--learning_rate", "3e-4",
             "--caption_extension", ".txt", "--caption_prefix", "sks", "--use_ema", "--weighting_scheme", "mode",
             "--prodigy_decouple", "false", "--enable_bucket", "--noise_offset", "0.05"]
    settings = parse_run_settings(flags)
    path = tmp_path / "config.toml"
    path.write_text(render_toml(settings.flags()))
    repeated = parse_run_settings(["--config", str(path)])
    assert dataclasses.replace(repeated, config=None) == settings
    assert repeated.adapter.rank == 12 and repeated.optimizer.prodigy_decouple is False
    assert repeated.adapter.target_modules == ("to_q", "dit@double")


def test_settings_from_a_plain_mapping():
    flags = vars(build_parser().parse_args([]))
    settings = RunSettings.from_flags(flags)
    # the one flag whose default depends on another: SNELLA runs decay β unless --reference_beta
    from snella_diffusion.training.optimizers import DEFAULT_BETA_DECAY

    assert flags["beta_decay"] is None and settings.optimizer.beta_decay == DEFAULT_BETA_DECAY
    assert settings.flags() == {key: value for key, value in sorted({**flags, "beta_decay": DEFAULT_BETA_DECAY}.items())
                                if key != "config"}
    assert DiTFlags() == DiTFlags.from_flags(flags)  # the dataclass defaults are the flags' defaults
    with pytest.raises(KeyError):
        RunSettings.from_flags({key: value for key, value in flags.items() if key != "rank"})


def test_one_family_table_of_plain_modules():
    expected = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "PixArtAlphaPipeline": "pixart",
                "PixArtSigmaPipeline": "pixart", "QwenImagePipeline": "qwen_image",
                "ZImagePipeline": "z_image", "Flux2KleinPipeline": "flux2",
                "ChromaPipeline": "chroma", "Flux2Pipeline": "flux2", "Krea2Pipeline": "krea2",
                "WanPipeline": "wan", "Lumina2Pipeline": "lumina2", "SanaPipeline": "sana",
                "HiDreamImagePipeline": "hidream",
                "Ideogram4Pipeline": "ideogram4",
                "QwenImage21Pipeline": "qwen_image21"}
    expected["LTX2Pipeline"] = "ltx2"
    expected["HunyuanVideo15Pipeline"] = "hunyuan_video15"
    for class_name, module in expected.items():
        family = families.family_for_class(class_name)
        assert type(family).__module__ == f"snella_diffusion.families.{module}"
        assert families.FAMILIES[family.name] is family
    # one family per pipeline class but PixArt's two
    assert len(families.FAMILIES) == len(expected) - 1
    with pytest.raises(families.UnknownModelFamilyError, match="'NopePipeline' is not a supported model family"):
        families.family_for_class("NopePipeline")
    for path in (PACKAGE / "families").glob("*.py"):
        assert "import_module" not in path.read_text(encoding="utf-8") or path.name == "base.py", path
    # old paths are re-exports of the same objects
    from snella_diffusion.training import dit_families as old_dit
    from snella_diffusion.training import families as old

    assert old.detect_family is families.detect_family and old.FAMILIES is families.FAMILIES
    assert old_dit.FluxFamily is families.FluxFamily


def test_families_import_first_without_a_cycle():
    """Importing the family table first, in a fresh interpreter, needs no plugin hook."""
    code = ("import snella_diffusion.families as f, sys; "
            "assert 'snella_diffusion.training.dit_families' not in sys.modules; print(len(f.FAMILIES))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(len(families.FAMILIES))

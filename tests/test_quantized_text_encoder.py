"""``--quantize_text_encoder {fp8,int8}`` (issue 23): the tiny Flux pipeline's T5 encoder stored
quantized (float8 layerwise casting, torchao int8, optimum-quanto qint8) gives prompt
embeddings close to the unquantized ones, its linears hold quantized weights, CLIP is left
as it was, and the flag is refused where it cannot apply."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from script_runs import run_dreambooth, tiny_flux_flags
from snella_diffusion.families import detect_family
from snella_diffusion.families.base import FamilySettings
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline
from snella_diffusion.training import run_checks
from snella_diffusion.training.quantized_base import QuantizationSettings, quantize_text_encoders, quantized_text_encoders
from snella_diffusion.training.run_setup import load_components
from train_scripts.train_dreambooth_snella import parse_args

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a photo of sks dog", "a red cube on a table, studio light"]
# max|quantized − float| / max|float| of the T5 embeddings allowed: float8 e4m3 keeps 3 mantissa
# bits (2^-4 relative per weight); int8 with per-row scales max|row|/127 (under 1% per weight)
TOLERANCE = {"fp8": 0.1, "int8": 0.02}
# (--quantize_text_encoder, --quantize_backend) -> the stored weight the T5 linears hold
CASES = {("fp8", None): "float8_e4m3fn Parameter", ("int8", None): "Int8Tensor", ("int8", "quanto"): "WeightQBytesTensor"}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("te") / "flux"
    tiny_flux_pipeline(0).save_pretrained(folder)
    return folder


def _encoded(folder, settings: QuantizationSettings):
    family, index = detect_family(str(folder))
    components = family.load(str(folder), index)
    parser = argparse.ArgumentParser()
    DiTFlags.add_arguments(parser)
    flags = DiTFlags.from_flags(vars(parser.parse_args(["--max_sequence_length", "16"])))
    family.configure(components, FamilySettings(dit=flags, train_text_encoder=False, resolution=32))
    names = quantized_text_encoders(index, family.text_encoder_components)
    counts = quantize_text_encoders({name: components.modules[name] for name in names}, settings, torch.float32)
    with torch.no_grad():
        return components, counts, family.encode_prompt(components, PROMPTS, torch.device("cpu"))


def _stored_kind(weight: torch.Tensor) -> str:
    if type(weight) in (torch.Tensor, nn.Parameter):
        return f"{str(weight.dtype).removeprefix('torch.')} {type(weight).__name__}"
    return type(weight).__name__


@pytest.mark.parametrize("case", sorted(CASES, key=str), ids=lambda case: "-".join(filter(None, case)))
def test_quantized_t5_embeds_prompts_close_to_the_float_one(flux_folder, case):
    chosen, backend = case
    _, none, reference = _encoded(flux_folder, QuantizationSettings())
    assert none == {}
    components, counts, encoded = _encoded(flux_folder, QuantizationSettings(quantize_text_encoder=chosen,
                                                                             quantize_backend=backend))
    assert counts == {"text_encoder_2": 5}  # q, k, v, o and wi of the one T5 block; wo stays float32
    t5 = components.modules["text_encoder_2"]
    kinds = {name: _stored_kind(module.weight) for name, module in t5.named_modules() if isinstance(module, nn.Linear)}
    assert sorted(name for name, kind in kinds.items() if kind == CASES[case]) == [
        f"encoder.block.0.layer.{name}" for name in
        ("0.SelfAttention.k", "0.SelfAttention.o", "0.SelfAttention.q", "0.SelfAttention.v", "1.DenseReluDense.wi")]
    assert kinds["encoder.block.0.layer.1.DenseReluDense.wo"] == "float32 Parameter"
    clip = components.modules["text_encoder"]
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in clip.parameters())
    assert torch.equal(encoded["pooled_prompt_embeds"], reference["pooled_prompt_embeds"])  # CLIP untouched
    got, want = encoded["prompt_embeds"], reference["prompt_embeds"]
    assert got.dtype == want.dtype == torch.float32
    error = float((got - want).abs().max() / want.abs().max())
    assert 0 < error < TOLERANCE[chosen], error


def _checked(*flags: str) -> str:
    settings = parse_args(["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "images",
                           "--instance_prompt", "sks", *flags])
    with pytest.raises(run_checks.TrainingSetupError) as error:
        run_checks.check_text_encoder_quantization(settings.quantization, settings.training.train_text_encoder)
    return str(error.value)


def test_the_flag_is_refused_where_it_cannot_apply(tmp_path):
    assert _checked("--quantize_text_encoder", "fp8", "--train_text_encoder") == (
        "--quantize_text_encoder=fp8: the text encoders are trained (--train_text_encoder); only frozen encoders "
        "are stored quantized, drop one of the flags")
    assert _checked("--quantize_text_encoder", "int8", "--quantize_backend", "diffusers") == (
        "--quantize_backend=diffusers: cannot do --quantize_text_encoder=int8 (use torchao or quanto)")
    run_checks.check_text_encoder_quantization(QuantizationSettings(quantize_text_encoder="int8"), False)
    settings = QuantizationSettings(quantize_backend="quanto", quantize_text_encoder="int8")
    run_checks.check_quantization_settings(settings, True, False)  # the backend serves the text encoder flag
    # a family whose text encoders are all CLIP has nothing to quantize: refused before loading
    tiny_sd_pipeline(0).save_pretrained(tmp_path / "sd")
    family, index = detect_family(str(tmp_path / "sd"))
    settings = parse_args(["--pretrained_model_name_or_path", str(tmp_path / "sd"), "--instance_data_dir", "images",
                           "--instance_prompt", "sks", "--quantize_text_encoder", "fp8"])
    with pytest.raises(run_checks.TrainingSetupError, match=r"^--quantize_text_encoder=fp8: \S+'s text encoders "
                                                            r"\(text_encoder\) are CLIP models only"):
        load_components(settings, family, index, SimpleNamespace(mixed_precision="no"))


@pytest.mark.slow
def test_script_trains_with_a_quantized_t5(flux_folder, tmp_path, caplog):
    from snella_diffusion import read_snella_file
    from snella_diffusion.training.data import synthetic_instance_images, write_images

    images = tmp_path / "images"
    write_images(synthetic_instance_images(count=2, size=64, seed=0), images, "instance")
    with caplog.at_level("INFO"):
        adapter = run_dreambooth([*tiny_flux_flags(flux_folder, images, tmp_path / "out"),
                                  "--quantize_text_encoder", "fp8"])
    assert "text_encoder_2: 5 linears stored as fp8 (diffusers), computed in torch.float32" in caplog.text
    assert (tmp_path / "out" / "validation" / "step_2.png").is_file()
    assert len(read_snella_file(adapter).layers["transformer"]) == 17

"""Real-model readiness (issue 15): flags that fail before loading, targets that say what they
missed, resuming from an adapter file, quantized layers, the device choice, load dtype, class
image seeds, VAE input dtype, the inference ΔW cache and where fusing keeps W0."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from snella_diffusion import (
    SnellaConfig,
    SnellaError,
    UnfuseError,
    apply_snella,
    fuse_snella,
    load_snella,
    remove_snella,
    save_snella,
    snella_layers,
    unfuse_snella,
)
from snella_diffusion.delta_cache import delta_cache_bytes, without_delta_cache
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_vae
from snella_diffusion.training.data import generate_class_images, synthetic_instance_images, write_images
from snella_diffusion.training.families import detect_family
from snella_diffusion.training.vae_inputs import decode_in_vae_dtype

from snella_diffusion.training import embedded_run, run_setup
from snella_diffusion.training.run_checks import check_run_settings
from train_scripts import train_dreambooth_snella as script

REPO = Path(__file__).resolve().parents[1]
MISSING_MODEL = "/nonexistent/base-model"  # a check that ran after loading would fail on this path first


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readiness-sd") / "pipeline"
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readiness-instance")
    write_images(synthetic_instance_images(count=2, size=32, seed=1), folder, "toy")
    return folder


def real_base_flags(tmp_path, *flags):
    """Flags of a run on a real (here: missing) base with instance images."""
    return script.parse_args([
        "--pretrained_model_name_or_path", MISSING_MODEL, "--instance_data_dir", str(tmp_path),
        "--instance_prompt", "a photo of sks toy", "--output_dir", str(tmp_path / "out"), *flags,
    ])


def trained_unet(seed: int = 0, rank: int = 4):
    unet = tiny_sd_pipeline(seed=0).unet
    layers = apply_snella(unet, SnellaConfig(rank=rank, target_modules="unet", init_sparsity=0.3))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.out_factors.add_(torch.randn(layer.out_factors.shape, generator=generator))
    return unet, layers


# --- item 2: one --target_modules value -------------------------------------------------

def test_one_target_module_name_adapts_exactly_those_layers(sd_folder):
    args = script.parse_args(["--target_modules", "to_q"])
    family, _ = detect_family(str(sd_folder))
    config = args.adapter.snella_config(family.denoiser_preset, 10)
    unet = tiny_sd_pipeline(seed=0).unet
    expected = sorted(name for name, module in unet.named_modules() if name.endswith(".to_q"))
    layers = apply_snella(unet, config)
    assert sorted(layers) == expected and expected


def test_bad_target_regex_is_named_before_loading(tmp_path):
    with pytest.raises(SnellaError, match=r"SNELLA flags: target_modules entry 'to_\(q' is not a valid regex"):
        check_run_settings(real_base_flags(tmp_path, "--target_modules", "to_(q"))
    with pytest.raises(SnellaError, match="SNELLA flags: .*'dat' is not a preset"):
        check_run_settings(real_base_flags(tmp_path, "--target_modules", "dat@double"))


# --- item 4: entries that match no linear ---------------------------------------------------

def test_conv_shortcut_entry_is_refused_naming_the_conv2d():
    unet = tiny_sd_pipeline(seed=0).unet
    with pytest.raises(SnellaError, match=r"entry 'conv_shortcut' matches no nn.Linear .* only Conv2d"):
        apply_snella(unet, SnellaConfig(rank=4, target_modules=["unet", "conv_shortcut"]))
    with pytest.raises(SnellaError, match=r"entry 'to_qq' matches no module"):
        apply_snella(unet, SnellaConfig(rank=4, target_modules=["unet", "to_qq"]))
    assert not snella_layers(unet)  # refused before anything was wrapped


# --- item 3: apply_snella + load_snella resumes -------------------------------------------

def test_apply_then_load_overwrites_the_adapter_and_keeps_it_trainable(tmp_path):
    source, _ = trained_unet(seed=1)
    path = save_snella(source, tmp_path / "a.safetensors")
    resumed = tiny_sd_pipeline(seed=0).unet
    apply_snella(resumed, SnellaConfig(rank=4, target_modules="unet"))
    layers = load_snella(resumed, path)
    assert len(layers) == 60
    for name, layer in snella_layers(source).items():
        other = layers[name]
        assert torch.equal(other.out_factors, layer.out_factors) and other.out_factors.requires_grad
        assert other.adapters["default"].drop_count_host == layer.adapters["default"].drop_count_host
        assert torch.equal(other.delta_weight(), layer.delta_weight())
    trainable = [p for p in resumed.parameters() if p.requires_grad]
    assert len(trainable) == 60 * 5


def test_loading_into_an_adapter_of_another_rank_is_refused_unchanged(tmp_path):
    source, _ = trained_unet(seed=1)
    path = save_snella(source, tmp_path / "a.safetensors")
    other = tiny_sd_pipeline(seed=0).unet
    layers = apply_snella(other, SnellaConfig(rank=8, target_modules="unet"))
    before = {n: l.out_factors.detach().clone() for n, l in layers.items()}
    with pytest.raises(SnellaError, match="config rank=4 but the existing adapter 'default' .* rank=8"):
        load_snella(other, path)
    assert all(torch.equal(layers[n].out_factors, before[n]) for n in layers)


# --- item 8: quantized linears and the device choice ----------------------------------------

class Linear4bit(nn.Linear):
    """Stand-in for bitsandbytes.nn.Linear4bit: packed uint8 weight, nn.Linear subclass."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        packed = torch.zeros(in_features * out_features // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)


class Linear8bitLt(nn.Linear):
    """Stand-in for bitsandbytes.nn.Linear8bitLt (an int8 weight)."""


def test_quantized_linears_are_refused_naming_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), Linear4bit(8, 8))
    with pytest.raises(SnellaError, match=r"layer '1' is a quantized linear, Linear4bit"):
        apply_snella(model, SnellaConfig(rank=2, target_modules=[r"\d"]))
    assert isinstance(model[0], nn.Linear) and not snella_layers(model)
    int8 = Linear8bitLt(8, 8)
    with pytest.raises(SnellaError, match=r"layer '0' is a quantized linear, Linear8bitLt"):
        apply_snella(nn.Sequential(int8), SnellaConfig(rank=2, target_modules=["0"]))
    plain_int = nn.Linear(8, 8)
    plain_int.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SnellaError, match=r"layer '0' is a quantized linear, Linear \(weight dtype torch.int8\)"):
        apply_snella(nn.Sequential(plain_int), SnellaConfig(rank=2, target_modules=["0"]))


class AcceleratorBuilt(Exception):
    pass


def built_accelerator_kwargs(monkeypatch, args) -> dict:
    seen = {}

    def recorder(**kwargs):
        seen.update(kwargs)
        raise AcceleratorBuilt

    monkeypatch.setattr(run_setup, "Accelerator", recorder)
    monkeypatch.setattr(script, "prepare_embedded_inputs", lambda *a: None)
    with pytest.raises(AcceleratorBuilt):
        script.main(args)
    return seen


def test_accelerator_chooses_mps_or_xpu_and_cpu_flag_forces_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    args = script.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert built_accelerator_kwargs(monkeypatch, args)["cpu"] is False
    args = script.parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--cpu"])
    assert built_accelerator_kwargs(monkeypatch, args)["cpu"] is True
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # accelerate launch --cpu
    args = script.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert built_accelerator_kwargs(monkeypatch, args)["cpu"] is True
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert built_accelerator_kwargs(monkeypatch, args)["cpu"] is True  # nothing but the CPU


# --- item 7: late or silent failures, all before loading ---------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--target_sparsity", "1.5"], r"SNELLA flags: target_sparsity=1.5: must lie in \[0, 1\)"),
    (["--rank", "3"], "SNELLA flags: rank=3"),
    (["--resolution", "0"], "--resolution=0: must be a positive number of pixels"),
    (["--class_prompt", "a photo of a toy"], "--class_prompt given without --with_prior_preservation"),
    (["--class_data_dir", "x", "--class_prompt", "y"],
     "--class_data_dir and --class_prompt given without --with_prior_preservation"),
])
def test_bad_flags_fail_before_loading(tmp_path, flags, message):
    with pytest.raises(SnellaError, match=message):
        script.main(real_base_flags(tmp_path, *flags))


def test_resolution_off_the_vae_grid_is_named(tmp_path, sd_folder, instance_dir):
    args = script.parse_args(["--pretrained_model_name_or_path", str(sd_folder), "--instance_data_dir",
                              str(instance_dir), "--instance_prompt", "a toy", "--output_dir", str(tmp_path),
                              "--resolution", "31", "--report_to", "none"])
    with pytest.raises(SnellaError, match=f"--resolution=31: must be a multiple of 2 .*{sd_folder}"):
        script.main(args)


def test_real_base_without_instance_images_is_refused(tmp_path):
    args = script.parse_args(["--pretrained_model_name_or_path", MISSING_MODEL, "--output_dir", str(tmp_path)])
    with pytest.raises(SnellaError, match=f"--pretrained_model_name_or_path={MISSING_MODEL} needs --instance_data_dir"):
        script.main(args)


def test_lr_scheduler_typo_and_unknown_tracker_stop_at_parsing(capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--lr_scheduler", "cosine_with_restart"])
    assert "--lr_scheduler: invalid choice: 'cosine_with_restart'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--report_to", "wandbb"])
    assert "--report_to: invalid choice" in capsys.readouterr().err


def test_report_to_wandb_without_wandb_is_refused(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(SnellaError, match="--report_to=wandb: wandb is not installed"):
        script.main(real_base_flags(tmp_path, "--report_to", "wandb"))


def test_cli_shows_the_traceback_of_a_failed_from_pretrained(tmp_path, sd_folder, instance_dir, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit):
        script.cli(["--pretrained_model_name_or_path", str(broken), "--instance_data_dir", str(instance_dir),
                    "--instance_prompt", "a toy", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                    "--cpu"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: --pretrained_model_name_or_path={broken}: could not load component 'unet'")


# --- item 6: load in the training dtype -------------------------------------------------------

def test_components_load_directly_in_the_training_dtype(sd_folder, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    asked = {}
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            asked[klass.__name__] = kwargs.get("torch_dtype", kwargs.get("dtype"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    family, index = detect_family(str(sd_folder))
    components = family.load(str(sd_folder), index, dtype=torch.bfloat16)
    assert asked == {"UNet2DConditionModel": torch.bfloat16, "AutoencoderKL": torch.float32,
                     "CLIPTextModel": torch.bfloat16}
    assert next(components.denoiser.parameters()).dtype == torch.bfloat16
    assert next(components.vae.parameters()).dtype == torch.float32


# --- item 9: class images continue their seeds -----------------------------------------------

class SeedPainter:
    """A stand-in pipeline: image i is a 4×4 colour drawn from generator i."""

    def __call__(self, prompts, generator, output_type, **kwargs):
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        images = []
        for item in generators:
            colour = torch.randint(0, 256, (3,), generator=item).tolist()
            images.append(Image.new("RGB", (4, 4), tuple(colour)))
        return type("Output", (), {"images": images})()


def folder_digests(folder: Path) -> list[str]:
    return sorted(hashlib.sha1(Image.open(p).tobytes()).hexdigest() for p in folder.glob("*.png"))


def test_topping_up_class_images_continues_the_seeds(tmp_path):
    generate_class_images(SeedPainter(), "a toy", tmp_path / "once", 6, batch_size=4, seed=5, progress=False)
    generate_class_images(SeedPainter(), "a toy", tmp_path / "twice", 2, batch_size=4, seed=5, progress=False)
    made = generate_class_images(SeedPainter(), "a toy", tmp_path / "twice", 6, batch_size=3, seed=5, progress=False)
    assert made == 4
    assert folder_digests(tmp_path / "twice") == folder_digests(tmp_path / "once")
    assert len(set(folder_digests(tmp_path / "once"))) == 6


# --- item 1: half-precision latents reach a float32 VAE -----------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoder_casts_half_precision_latents_to_the_vae_dtype(dtype):
    vae = tiny_vae(seed=0).eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="should be the same"):
            vae.decode(latents)
        expected = vae.decode(latents.float()).sample
        with decode_in_vae_dtype(vae):
            decoded = vae.decode(latents).sample
        with pytest.raises(RuntimeError):  # the hooks are gone afterwards
            vae.decode(latents)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, expected)


# --- item 5: inference ΔW cache and the pristine copy of fusing ------------------------------

def test_without_delta_cache_builds_the_same_output_and_keeps_nothing():
    unet, layers = trained_unet(seed=2)
    unet.eval()
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = unet(sample, 10, encoder_hidden_states=text).sample
        adapted_bytes = sum(layer.out_features * layer.in_features * 4 for layer in layers.values())
        assert delta_cache_bytes(unet) == adapted_bytes
        with without_delta_cache(unet):
            assert delta_cache_bytes(unet) == 0
            uncached = unet(sample, 10, encoder_hidden_states=text).sample
            assert delta_cache_bytes(unet) == 0
    assert torch.equal(uncached, cached)
    assert all(layer.cache_inference_delta for layer in layers.values())


def model_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (what ``model.to(device)`` moves)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_keep_original_cpu_keeps_no_copy_among_the_models_tensors():
    unet, layers = trained_unet(seed=3)
    for layer in layers.values():
        layer.base_layer.to(torch.bfloat16)  # bf16 base weights, float32 adapters
    pristine = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    before = model_tensor_bytes(unet)
    adapted_bytes = sum(w.numel() * w.element_size() for w in pristine.values())

    fuse_snella(unet, keep_original="device")
    assert model_tensor_bytes(unet) == before + adapted_bytes  # the copy travels with the model
    unfuse_snella(unet)

    fuse_snella(unet)  # default: "cpu"
    assert model_tensor_bytes(unet) == before
    unet.to("meta")  # the model goes to another device; W0 stays in host memory
    assert all(l.unfused_weight is None and l.unfused_weight_cpu.device.type == "cpu" for l in layers.values())
    assert sum(l.unfused_weight_cpu.numel() * 2 for l in layers.values()) == adapted_bytes
    unet.to_empty(device="cpu")
    unfuse_snella(unet)
    assert all(torch.equal(layers[n].base_layer.weight, w) for n, w in pristine.items())


def test_keep_original_false_refuses_unfuse_and_merges_on_remove():
    unet, layers = trained_unet(seed=4)
    name, layer = next(iter(layers.items()))
    w0 = layer.base_layer.weight.detach().clone()
    expected = (w0.float() + layer.delta_weight()).to(w0.dtype)
    fuse_snella(unet, keep_original=False)
    assert all(l.unfused_weight is None and l.unfused_weight_cpu is None for l in layers.values())
    fused = layer.base_layer.weight.detach().clone()
    assert torch.equal(fused, expected)
    with pytest.raises(UnfuseError, match="keep_original=False.*cannot be restored"):
        unfuse_snella(unet)
    with pytest.raises(UnfuseError, match="cannot be taken out"):
        remove_snella(unet, "default")
    assert torch.equal(layer.base_layer.weight, fused)
    remove_snella(unet)
    assert not snella_layers(unet) and torch.equal(unet.get_submodule(name).weight, fused)
    with pytest.raises(SnellaError, match="keep_original='gpu'"):
        fuse_snella(trained_unet(seed=5)[0], keep_original="gpu")


def test_fuse_memory_accounting_on_meta_configs():
    bench = REPO / "benchmarks" / "bench_fuse_memory.py"
    spec = importlib.util.spec_from_file_location("bench_fuse_memory", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    adapted_weight_bytes = module.adapted_weight_bytes
    sizes = {model: adapted_weight_bytes(model) for model in ("sd15", "sdxl", "flux")}
    # Independent figure from the issue: the dit preset adapts 8.6 G entries of Flux.1-dev.
    assert 8.5e9 < sizes["flux"]["entries"] < 8.7e9
    assert sizes["flux"]["bf16_bytes"] == 2 * sizes["flux"]["entries"]
    assert sizes["sd15"]["layers"] == 160 and sizes["sdxl"]["layers"] == 700
    assert sizes["sd15"]["entries"] < sizes["sdxl"]["entries"] < sizes["flux"]["entries"]
    recorded = json.loads((REPO / "benchmarks" / "results" / "fuse_memory.json").read_text())
    assert recorded == {model: sizes[model] for model in recorded}


@pytest.mark.parametrize("flags, rank, text_encoder", [
    ([], embedded_run.EMBEDDED_RANK, True),  # the embedded model: the lab's best setting
    (["--no-train_text_encoder", "--rank", "16"], 16, False),
    (["--adapter", "lora"], embedded_run.EMBEDDED_RANK, True),  # the same A/B settings as SNELLA
    (["--adapter", "full"], embedded_run.EMBEDDED_RANK, False),  # full trains the denoiser only
    (["--pretrained_model_name_or_path", "some/model"], embedded_run.DEFAULT_RANK, False),
    (["--pretrained_model_name_or_path", "some/model", "--train_text_encoder"], embedded_run.DEFAULT_RANK, True),
])
def test_rank_and_text_encoder_defaults_depend_on_the_model(flags, rank, text_encoder):
    args = script.parse_args(flags)
    assert (args.adapter.rank, args.training.train_text_encoder) == (rank, text_encoder)
    assert (embedded_run.EMBEDDED_RANK, embedded_run.DEFAULT_RANK) == (8, 32)


@pytest.mark.parametrize("flags, sparsity", [
    ([], 0.5), (["--target_sparsity", "0.9"], 0.9), (["--pretrained_model_name_or_path", "some/model"], 0.8),
])
def test_target_sparsity_default_depends_on_the_model(flags, sparsity):
    assert script.parse_args(flags).adapter.target_sparsity == sparsity


def test_resolved_text_encoder_switch_round_trips_through_the_job_file(tmp_path):
    from snella_diffusion.training.job_config import write_resolved_config

    write_resolved_config(script.parse_args([]).flags(), tmp_path / "config.toml")
    repeated = script.parse_args(["--config", str(tmp_path / "config.toml")])
    assert (repeated.adapter.rank, repeated.training.train_text_encoder) == (embedded_run.EMBEDDED_RANK, True)
    write_resolved_config(script.parse_args(["--no-train_text_encoder"]).flags(), tmp_path / "off.toml")
    assert script.parse_args(["--config", str(tmp_path / "off.toml")]).training.train_text_encoder is False

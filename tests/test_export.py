"""snella-export: real clients (LyCORIS, diffusers load_lora_weights + fuse_lora) load what it
writes and reproduce the SNELLA-fused models; SVD energy against an independent residual;
Flux fused rows in diffusers' split order; every error case."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from snella_diffusion import SnellaConfig, SnellaError, apply_snella, save_snella
from snella_diffusion.export import export_snella, flux_fused_targets, parse_adapter_spec
from snella_diffusion.export.cli import main as export_main
from snella_diffusion.layer import snella_layers
from snella_diffusion.loaders import fuse_snella, load_snella_weights, set_snella_adapters
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "flux": tiny_flux_pipeline,
            "sd3": tiny_sd3_pipeline, "pixart": tiny_pixart_pipeline}
# diffusers' kohya Flux converter splits linear1 at Flux.1's widths (3072·3 + 12288), so the
# tiny Flux adapter exported as a kohya LoRA leaves the single-block q/k/v/MLP input out.
FLUX_WITHOUT_LINEAR1 = [r"transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                        r"transformer_blocks\.\d+\.(?:ff|ff_context)\.net\.(?:0\.proj|2)",
                        r"single_transformer_blocks\.\d+\.proj_out"]


pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed_adapter(pipe, components: dict[str, object], path: Path, seed: int) -> Path:
    """apply_snella on each named component (``{component: target_modules}``), random factors,
    save_snella: an adapter whose ΔW is far from zero in every layer."""
    generator = torch.Generator().manual_seed(seed)
    models = {}
    for component, targets in components.items():
        model = getattr(pipe, component)
        layers = apply_snella(model, SnellaConfig(rank=4, target_modules=targets, init_sparsity=0.4))
        with torch.no_grad():
            for layer in layers.values():
                for factors in (layer.in_factors, layer.out_factors):
                    factors.add_(torch.randn(factors.shape, generator=generator))
        models[component] = model
    return save_snella(models, path, base_model="tiny")


ADAPTED = {
    "sd": {"unet": "unet", "text_encoder": "text_encoder"},
    "sdxl": {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"},
    "flux": {"transformer": "dit"},
    "flux_kohya": {"transformer": FLUX_WITHOUT_LINEAR1},
    "sd3": {"transformer": "dit"},
    "pixart": {"transformer": "dit"},
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Per family, built once: the base folder (save_pretrained) and the adapter files."""
    root = tmp_path_factory.mktemp("export")
    cache: dict[str, tuple[Path, Path]] = {}

    def build(name: str, seed: int = 1) -> tuple[Path, Path]:
        key = f"{name}-{seed}"
        if key not in cache:
            family = name.split("_")[0]
            base = root / f"base-{family}"
            if not base.exists():
                BUILDERS[family](0).save_pretrained(base)
            adapter = perturbed_adapter(BUILDERS[family](0), ADAPTED[name], root / f"{key}.safetensors", seed)
            cache[key] = (base, adapter)
        return cache[key]

    return build


def fused_pipeline(family: str, adapters: list[tuple[Path, float]]):
    """The reference: a fresh tiny pipeline with the SNELLA adapters loaded, weighted and fused."""
    pipe = BUILDERS[family](0)
    names = [load_snella_weights(pipe, path) for path, _ in adapters]
    set_snella_adapters(pipe, names, [weight for _, weight in adapters])
    fuse_snella(pipe)
    return pipe


def denoiser_inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(7)
    if family == "flux":
        return {
            "hidden_states": torch.randn(1, 16, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, 5, 64, generator=generator),
            "pooled_projections": torch.randn(1, 32, generator=generator),
            "timestep": torch.tensor([0.6]), "guidance": torch.tensor([3.5]),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                  indexing="ij"), -1).reshape(16, 3),
            "txt_ids": torch.zeros(5, 3),
        }
    if family == "sd3":
        return {"hidden_states": torch.randn(1, 4, 16, 16, generator=generator),
                "encoder_hidden_states": torch.randn(1, 5, 64, generator=generator),
                "pooled_projections": torch.randn(1, 64, generator=generator), "timestep": torch.tensor([500.0])}
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=generator), "timestep": torch.tensor([500])}
    if family == "sd":
        inputs["encoder_hidden_states"] = torch.randn(1, 7, 32, generator=generator)
    else:
        inputs["encoder_hidden_states"] = torch.randn(1, 7, 64, generator=generator)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    return inputs


@torch.no_grad()
def outputs(pipe, family: str) -> dict[str, torch.Tensor]:
    """Denoiser output for fixed inputs, and each CLIP text encoder's hidden states."""
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    result = {"denoiser": denoiser(**denoiser_inputs(family), return_dict=False)[0]}
    tokens = torch.tensor([[0, 70, 71, 72, 1, 1, 1]])
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None and family in ("sd", "sdxl"):
            result[name] = encoder(tokens)[0]
    return result


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def lora_fused_pipeline(family: str, file: Path):
    pipe = BUILDERS[family](0)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


# --- diff, through LyCORIS ---------------------------------------------------------------

def lycoris_merged_unet(file: Path, family: str):
    """A fresh tiny UNet with the diff file merged by LyCORIS (create_lycoris_from_weights)."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    unet = BUILDERS[family](0).unet
    prefix = LycorisNetwork.LORA_PREFIX
    unet_only = {k: v for k, v in load_file(str(file)).items() if k.startswith("lora_unet_")}
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    try:
        network, _ = create_lycoris_from_weights(1.0, str(file), unet, weights_sd=unet_only)
        network.merge_to(1.0)
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": prefix})
    return unet, len(network.loras)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-7), ("fp16", 2.0 ** -11)])
def test_diff_merged_by_lycoris_equals_fuse_snella(case, tmp_path, family, dtype, tolerance):
    base, adapter = case(family)
    out = tmp_path / "diff.safetensors"
    export_snella([adapter], base, out, to="diff", dtype=dtype)
    merged, modules = lycoris_merged_unet(out, family)
    fused = fused_pipeline(family, [(adapter, 1.0)]).unet
    pristine = BUILDERS[family](0).unet
    fused_layers = snella_layers(fused)
    assert modules == len(fused_layers) > 0
    merged_params = dict(merged.named_parameters())
    for path, layer in fused_layers.items():
        delta_fused = layer.base_layer.weight - pristine.get_submodule(path).weight
        delta_lycoris = merged_params[f"{path}.weight"] - pristine.get_submodule(path).weight
        bound = tolerance * delta_fused.abs() + 1e-7
        assert delta_fused.abs().max() > 1e-3, path
        assert bool(((delta_lycoris - delta_fused).abs() <= bound).all()), path


def test_diff_keys_per_family(case, tmp_path):
    """Key names: kohya for SD/SDXL (UNet and both CLIPs), BFL for Flux, transformer.<path> for SD3/PixArt."""
    keys, headers = {}, {}
    for family in ("sdxl", "flux", "sd3", "pixart"):
        base, adapter = case(family)
        export_snella([adapter], base, tmp_path / f"{family}.safetensors", to="diff", dtype="fp32")
        with safe_open(str(tmp_path / f"{family}.safetensors"), "pt") as handle:
            keys[family], headers[family] = set(handle.keys()), handle.metadata()
    assert headers["sdxl"]["ss_network_module"] == "lycoris.kohya"
    assert json.loads(headers["sdxl"]["ss_network_args"]) == {"algo": "full"}
    assert headers["flux"]["ss_base_model_version"] == "flux1"
    assert headers["flux"]["modelspec.architecture"] == "flux-1-dev/lycoris"
    assert headers["sd3"]["modelspec.architecture"] == "stable-diffusion-3-medium/lycoris"
    assert headers["pixart"]["ss_base_model_version"] == "pixart_alpha"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.diff" in keys["sdxl"]
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.diff" in keys["sdxl"]
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.diff" in keys["sdxl"]
    assert {"lora_unet_double_blocks_0_img_attn_qkv.diff", "lora_unet_double_blocks_0_txt_attn_qkv.diff",
            "lora_unet_double_blocks_0_img_attn_proj.diff", "lora_unet_double_blocks_0_txt_attn_proj.diff",
            "lora_unet_double_blocks_0_img_mlp_0.diff", "lora_unet_double_blocks_0_img_mlp_2.diff",
            "lora_unet_double_blocks_0_txt_mlp_0.diff", "lora_unet_double_blocks_0_txt_mlp_2.diff",
            "lora_unet_single_blocks_0_linear1.diff", "lora_unet_single_blocks_0_linear2.diff"} == keys["flux"]
    assert "transformer.transformer_blocks.0.attn.add_q_proj.diff" in keys["sd3"]
    assert "transformer.transformer_blocks.1.attn2.to_k.diff" in keys["pixart"]
    assert all(key.startswith("transformer.") for key in keys["sd3"] | keys["pixart"])


# --- lora / peft through diffusers ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family, adapted, to", [
    ("sd", "sd", "lora"), ("sd", "sd", "peft"), ("sdxl", "sdxl", "lora"), ("sdxl", "sdxl", "peft"),
    ("flux", "flux_kohya", "lora"), ("flux", "flux", "peft"), ("sd3", "sd3", "peft"),
])
def test_full_rank_lora_reproduces_fused_outputs(case, tmp_path, family, adapted, to):
    base, adapter = case(adapted)
    out = tmp_path / f"{to}.safetensors"
    report = export_snella([adapter], base, out, to=to, energy=1.0, dtype="fp32")
    assert report.energy == pytest.approx(1.0, abs=1e-9)
    expected = outputs(fused_pipeline(family, [(adapter, 1.0)]), family)
    actual = outputs(lora_fused_pipeline(family, out), family)
    base_outputs = outputs(BUILDERS[family](0), family)
    for name, value in expected.items():
        # The adapter moves every output by a lot; the exported LoRA lands within float32 noise.
        assert relative_error(base_outputs[name], value) > 1e-2, name
        assert relative_error(actual[name], value) < 2e-5, name


def low_rank_product(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """ΔW_r as a kohya loader applies it: up @ down · alpha / r."""
    down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
    return up @ down * float(tensors[f"{key}.alpha"]) / down.shape[0]


@pytest.mark.slow
def test_output_error_falls_with_rank_and_energy_matches_residual(case, tmp_path):
    base, adapter = case("sd")
    reference = fused_pipeline("sd", [(adapter, 1.0)])
    expected = outputs(reference, "sd")["denoiser"]
    deltas = {f"unet.{path}": layer.delta_weight().float() for path, layer in snella_layers(reference.unet).items()}
    errors = []
    for rank in (1, 2, 4, 8, 16):
        out = tmp_path / f"rank{rank}.safetensors"
        report = export_snella([adapter], base, out, to="lora", rank=rank, dtype="fp32")
        tensors = load_file(str(out))
        stored = json.loads((tmp_path / f"rank{rank}.energy.json").read_text())
        kept = total = 0.0
        for key, record in stored["layers"].items():
            if not key.startswith("lora_unet_"):
                continue
            (part,) = record["parts"]
            delta = deltas[part]
            residual = (delta - low_rank_product(tensors, key)).norm()
            assert record["rank"] == rank
            assert record["residual_norm"] == pytest.approx(float(residual), rel=1e-4, abs=1e-6)
            assert record["energy"] == pytest.approx(1 - float(residual) ** 2 / float(delta.norm()) ** 2, abs=1e-5)
            kept += float(delta.norm()) ** 2 - float(residual) ** 2
            total += float(delta.norm()) ** 2
        assert report.energy == pytest.approx(stored["overall"]["energy"])
        assert kept / total <= stored["overall"]["energy"] + 1e-5
        errors.append(relative_error(outputs(lora_fused_pipeline("sd", out), "sd")["denoiser"], expected))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 3


@pytest.mark.parametrize("to", ["lora", "peft"])
def test_energy_ranks_differ_per_layer_and_load_exactly(case, tmp_path, to):
    """--energy picks a rank per layer; diffusers applies each layer's up @ down exactly."""
    base, adapter = case("sd")
    out = tmp_path / "energy.safetensors"
    report = export_snella([adapter], base, out, to=to, energy=0.9, max_rank=12, dtype="fp32")
    ranks = {record["rank"] for record in report.layers.values()}
    assert len(ranks) > 1 and max(ranks) <= 12
    assert all(record["energy"] >= 0.9 or record["rank"] == 12 for record in report.layers.values())
    tensors = load_file(str(out))
    loaded = lora_fused_pipeline("sd", out).unet
    pristine = BUILDERS["sd"](0).unet
    checked = 0
    for path, module in pristine.named_modules():
        kohya, peft = "lora_unet_" + path.replace(".", "_"), f"unet.{path}"
        if f"{kohya}.lora_down.weight" in tensors:
            product = low_rank_product(tensors, kohya)
        elif f"{peft}.lora_A.weight" in tensors:
            product = tensors[f"{peft}.lora_B.weight"] @ tensors[f"{peft}.lora_A.weight"]
        else:
            continue
        checked += 1
        torch.testing.assert_close(loaded.get_submodule(path).weight - module.weight, product, rtol=1e-4, atol=1e-6)
    assert checked == len(snella_layers(fused_pipeline("sd", [(adapter, 1.0)]).unet))


# --- Flux fused rows ------------------------------------------------------------------------

def test_flux_fused_rows_are_the_parts_in_diffusers_order(case, tmp_path):
    base, adapter = case("flux")
    out = tmp_path / "flux.safetensors"
    export_snella([adapter], base, out, to="diff", dtype="fp32")
    tensors = load_file(str(out))
    layers = snella_layers(fused_pipeline("flux", [(adapter, 1.0)]).transformer)

    def delta(path):
        return layers[path].delta_weight()

    double, single = "transformer_blocks.0.attn.", "single_transformer_blocks.0."
    torch.testing.assert_close(tensors["lora_unet_double_blocks_0_img_attn_qkv.diff"],
                               torch.cat([delta(double + p) for p in ("to_q", "to_k", "to_v")]), rtol=0, atol=0)
    torch.testing.assert_close(tensors["lora_unet_double_blocks_0_txt_attn_qkv.diff"],
                               torch.cat([delta(double + p) for p in ("add_q_proj", "add_k_proj", "add_v_proj")]),
                               rtol=0, atol=0)
    torch.testing.assert_close(tensors["lora_unet_single_blocks_0_linear1.diff"],
                               torch.cat([delta(single + p) for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]),
                               rtol=0, atol=0)


def test_flux_unadapted_part_exports_zero_rows(tmp_path, case):
    base, _ = case("flux")
    adapter = perturbed_adapter(tiny_flux_pipeline(0), {"transformer": [r"transformer_blocks\.0\.attn\.to_k"]},
                                tmp_path / "k_only.safetensors", 3)
    out = tmp_path / "k.safetensors"
    export_snella([adapter], base, out, to="diff", dtype="fp32")
    qkv = load_file(str(out))["lora_unet_double_blocks_0_img_attn_qkv.diff"]
    assert qkv.shape == (96, 32)
    assert bool((qkv[:32] == 0).all()) and bool((qkv[64:] == 0).all()) and qkv[32:64].abs().max() > 1e-3


def test_flux_linear1_order_matches_diffusers_split_at_flux1_widths():
    """diffusers' own kohya converter splits a Flux.1-sized linear1 / qkv back into modules: a
    rank-1 LoRA whose rows are marked with their part's index comes back marked in place."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    widths = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288,
              "attn.add_q_proj": 3072, "attn.add_k_proj": 3072, "attn.add_v_proj": 3072}
    paths = {"single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"}
    targets, covered = flux_fused_targets(paths)
    assert covered == paths
    state, expected = {}, {}
    for target in targets:
        if len(target.parts) == 1:
            continue
        markers = []
        for index, (_, path) in enumerate(target.parts):
            sub = path.split(".", 2)[2]
            markers.append(torch.full((widths[sub], 1), float(index + 1)))
            expected[f"transformer.{path}.lora_B.weight"] = float(index + 1)
        state[f"{target.key}.lora_up.weight"] = torch.cat(markers)
        state[f"{target.key}.lora_down.weight"] = torch.ones(1, 3072)
        state[f"{target.key}.alpha"] = torch.tensor(1.0)
    assert {t.key for t in targets if len(t.parts) > 1} == {"lora_unet_double_blocks_0_img_attn_qkv",
                                                             "lora_unet_single_blocks_0_linear1"}
    converted = _convert_kohya_flux_lora_to_diffusers(state)
    for key, marker in expected.items():
        assert bool((converted[key] == marker).all()), key


# --- merging, header, CLI --------------------------------------------------------------------

def test_merge_with_weights_is_the_set_snella_adapters_sum(case, tmp_path):
    base, first = case("sd", 1)
    _, second = case("sd", 2)
    out = tmp_path / "merged.safetensors"
    export_snella([f"{first}:0.5", (second, -1.25)], base, out, to="diff", dtype="fp32", adapter_weight=2.0)
    tensors = load_file(str(out))
    reference = BUILDERS["sd"](0)
    names = [load_snella_weights(reference, path) for path in (first, second)]
    set_snella_adapters(reference, names, [1.0, -2.5])
    for path, layer in snella_layers(reference.unet).items():
        torch.testing.assert_close(tensors["lora_unet_" + path.replace(".", "_") + ".diff"], layer.delta_weight(),
                                   rtol=1e-6, atol=1e-7)
    assert parse_adapter_spec("C:/x/a.safetensors:0.3") == ("C:/x/a.safetensors", 0.3)
    assert parse_adapter_spec("a.safetensors") == ("a.safetensors", 1.0)


def test_header_metadata_and_energy_report(case, tmp_path):
    base, adapter = case("sdxl")
    out = tmp_path / "xl.safetensors"
    export_snella([adapter], base, out, to="peft", rank=2, dtype="bf16")
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.bfloat16}
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.title"] == "xl" and metadata["modelspec.date"].startswith("20")
    source = json.loads(metadata["snella_sources"])[0]
    assert source["sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert json.loads(metadata["snella_config"])[0]["rank"] == 4
    peft_config = json.loads(metadata["lora_adapter_metadata"])
    assert peft_config["unet.r"] == 2 and peft_config["text_encoder_2.lora_alpha"] == 2
    report = json.loads((tmp_path / "xl.energy.json").read_text())
    assert set(report["layers"]) == {key.removesuffix(".lora_A.weight") for key in load_file(str(out))
                                     if key.endswith(".lora_A.weight")}
    assert 0 < report["overall"]["energy"] < 1


def test_cli_writes_and_reports(case, tmp_path, capsys):
    base, adapter = case("sd")
    out = tmp_path / "cli.safetensors"
    assert export_main([str(adapter), "--base", str(base), "--to", "lora", "--rank", "3", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall energy kept" in printed and "rank 3" in printed
    assert load_file(str(out))["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (3, 64)
    assert export_main([str(adapter), "--base", str(base), "--to", "lora", "--rank", "3", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --- errors -----------------------------------------------------------------------------------

def test_errors_name_the_flag_file_or_key(case, tmp_path):
    base, adapter = case("sd")
    xl_base, xl_adapter = case("sdxl")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SnellaError, match="text_encoder_2.*has no component"):
        export_snella([xl_adapter], base, out)
    with pytest.raises(SnellaError, match=r"layer unet\..*(in the file|does not exist)"):
        export_snella([adapter], xl_base, out)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(SnellaError, match="KandinskyPipeline.*not an exportable family"):
        export_snella([adapter], unknown, out)
    with pytest.raises(SnellaError, match=r"--rank 40: layer lora_te_text_model_encoder_layers_0_mlp_fc1 allows at most rank 32"):
        export_snella([adapter], base, out, to="lora", rank=40)
    for energy in (0.0, 1.5, -0.1):
        with pytest.raises(SnellaError, match=f"--energy {energy}: must lie in"):
            export_snella([adapter], base, out, to="peft", energy=energy)
    with pytest.raises(SnellaError, match="exactly one of --rank"):
        export_snella([adapter], base, out, to="lora")
    with pytest.raises(SnellaError, match="--to lora or peft, not diff"):
        export_snella([adapter], base, out, to="diff", rank=4)
    with pytest.raises(SnellaError, match="--dtype fp8"):
        export_snella([adapter], base, out, dtype="fp8")
    with pytest.raises(SnellaError, match="--to dense"):
        export_snella([adapter], base, out, to="dense")
    with pytest.raises(SnellaError, match="missing.safetensors: no such adapter file"):
        export_snella([tmp_path / "missing.safetensors"], base, out)
    assert not out.exists()


def test_existing_output_needs_overwrite_and_failures_leave_it_intact(case, tmp_path):
    base, adapter = case("sd")
    out = tmp_path / "out.safetensors"
    export_snella([adapter], base, out, to="lora", rank=2)
    before = out.read_bytes()
    with pytest.raises(SnellaError, match="exists; pass --overwrite"):
        export_snella([adapter], base, out, to="lora", rank=4)
    with pytest.raises(SnellaError, match="allows at most rank"):
        export_snella([adapter], base, out, to="lora", rank=40, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.energy.json", "out.safetensors"]
    export_snella([adapter], base, out, to="lora", rank=4, overwrite=True)
    assert load_file(str(out))["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4


@pytest.mark.slow
def test_python_dash_m_entry_point(case, tmp_path):
    base, adapter = case("sd")
    out = tmp_path / "m.safetensors"
    run = subprocess.run([sys.executable, "-m", "snella_diffusion.export", str(adapter), "--base", str(base),
                          "--to", "diff", "-o", str(out)], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and load_file(str(out))


def test_base_errors_name_the_folder_and_component(case, tmp_path):
    base, adapter = case("sd")
    out = tmp_path / "out.safetensors"
    with pytest.raises(SnellaError, match="model_index.json is missing"):
        export_snella([adapter], tmp_path, out)
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "model_index.json").write_text((base / "model_index.json").read_text())
    (broken / "unet" / "config.json").write_text((base / "unet" / "config.json").read_text())
    with pytest.raises(SnellaError, match="broken: text_encoder/config.json is missing"):
        export_snella([adapter], broken, out)
    assert not out.exists()

"""The ComfyUI weight adapter and ``snella-export --to comfyui``, against a stand-in of ComfyUI's
loader (tests/comfyui_standin.py; CI has no ComfyUI): every key claimed, patched weights equal
fuse_snella's (strength 1) and W0 + s·ΔW (strength s), Flux q/k/v slices land where ComfyUI's key
map puts them, the size bound, bypass h(), the installer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import comfyui_standin as standin
from snella_diffusion import SnellaConfig, SnellaError, SnellaFormatError, apply_snella, save_snella
from snella_diffusion.comfyui import weight_adapter as weight_adapter_module
from snella_diffusion.comfyui.install import NODE_FOLDER, install_node
from snella_diffusion.comfyui.install import main as install_main
from snella_diffusion.export import export_snella
from snella_diffusion.export.cli import main as export_main
from snella_diffusion.layer import snella_layers
from snella_diffusion.loaders import fuse_snella, load_snella_weights
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline, tiny_sd3_pipeline
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
FLUX_EXTRA = [r"x_embedder", r"context_embedder", r"transformer_blocks\.\d+\.norm1\.linear", r"norm_out\.linear",
              r"time_text_embed\.timestep_embedder\.linear_1"]
ADAPTED = {
    "sd": {"unet": "unet", "text_encoder": "text_encoder"},
    "sdxl": {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"},
    "sd3": {"transformer": "dit", "text_encoder": "text_encoder"},
    "flux": {"transformer": ["dit"] + FLUX_EXTRA, "text_encoder": "text_encoder"},
}
# The CLIP prefixes ComfyUI's model_lora_keys_clip maps per family and text encoder.
CLIP_PREFIXES = {
    "sd": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "sd3": {"text_encoder": "lora_te1_"},
    "flux": {"text_encoder": "lora_te1_"},
}
CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


@pytest.fixture
def comfy(monkeypatch):
    """The stand-in ``comfy`` package in sys.modules and the SNELLA class registered in it."""
    modules = standin.comfy_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(weight_adapter_module, "_ADAPTER_CLASS", None)
    weight_adapter_module.register()
    return modules["comfy.weight_adapter"]


def trained_adapter(family: str, path: Path) -> Path:
    """apply_snella on the family's components, a few Adam steps through the SNELLA forward
    (τ selected as in training), one layer emptied (sparsity 1: ΔW = 0), save_snella."""
    pipe = BUILDERS[family](0)
    generator = torch.Generator().manual_seed(3)
    models, layers = {}, []
    for component, targets in ADAPTED[family].items():
        model = getattr(pipe, component)
        config = SnellaConfig(rank=4, target_modules=targets, init_sparsity=0.5, target_sparsity=0.5)
        layers.extend(apply_snella(model, config).values())
        models[component] = model
    with torch.no_grad():
        for layer in layers:
            layer.in_factors.add_(torch.randn(layer.in_factors.shape, generator=generator))
    optimizer = torch.optim.Adam([p for layer in layers for p in layer.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = sum(((layer(x) - layer.base_layer(x) - 0.1) ** 2).mean()
                   for layer in layers for x in [torch.randn(3, layer.in_features, generator=generator)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers[1].adapters["default"].set_sparsity(1.0)
    return save_snella(models, path, base_model="tiny")


def reference(family: str, adapter: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per component and layer path: (W0, ΔW, fuse_snella's weight), float32, from the library."""
    pipe = BUILDERS[family](0)
    load_snella_weights(pipe, adapter)
    found = {}
    with torch.no_grad():
        for component in ADAPTED[family]:
            layers = snella_layers(getattr(pipe, component))
            found[component] = {path: (layer.base_layer.weight.detach().clone(), layer.delta_weight())
                                for path, layer in layers.items()}
    fuse_snella(pipe)
    for component in ADAPTED[family]:
        for path, layer in snella_layers(getattr(pipe, component)).items():
            w0, delta = found[component][path]
            found[component][path] = (w0, delta, layer.base_layer.weight.detach().clone())
    return found


def module_path(model: nn.Module, path: str) -> str:
    """``path`` as the model names it (transformers 5 CLIP has no ``text_model.`` level)."""
    names = dict(model.named_modules())
    return path if path in names else path.removeprefix("text_model.")


def unfused_key_map(family: str, pipe) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The stand-in of ComfyUI's key map for one-weight-per-layer names (UNet ``lora_unet_``,
    SD3 ``transformer.``, CLIP ``lora_te*_`` for the six layers ComfyUI maps per block) and the
    model state it points into (``component.path.weight``)."""
    key_map, state = {}, {}
    for component in ADAPTED[family]:
        model = getattr(pipe, component)
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        if component == "unet":
            prefixed = {f"lora_unet_{name.replace('.', '_')}": name for name in linears}
        elif component == "transformer":
            prefixed = {f"transformer.{name}": name for name in linears}
        else:
            prefix, prefixed = CLIP_PREFIXES[family][component], {}
            for block in range(model.config.num_hidden_layers):
                for layer in CLIP_LAYERS:
                    name = module_path(model, f"text_model.encoder.layers.{block}.{layer}")
                    prefixed[f"{prefix}text_model_encoder_layers_{block}_{layer.replace('.', '_')}"] = name
        for prefix, name in prefixed.items():
            key_map[prefix] = f"{component}.{name}.weight"
            state[f"{component}.{name}.weight"] = linears[name].weight.detach().clone()
    return key_map, state


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN holds (scale, shift) where diffusers holds (shift, scale)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_key_map(pipe) -> tuple[dict[str, object], dict[str, torch.Tensor], dict[str, tuple]]:
    """The stand-in of ComfyUI's Flux map (``comfy.utils.flux_to_diffusers``): ``transformer.<path>``
    → a BFL weight, a row slice ``(key, (0, start, rows))`` of a fused one, or ``(key, None,
    swap)``; the BFL state built from the diffusers weights; and per diffusers path where it
    landed ``(BFL key, start, rows, swapped)``."""
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    weights = {name: m.weight.detach().clone() for name, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    fused = {}
    for index in range(transformer.config.num_layers):
        block = f"transformer_blocks.{index}"
        fused[f"double_blocks.{index}.img_attn.qkv.weight"] = [
            (f"{block}.attn.to_q", 0, hidden), (f"{block}.attn.to_k", hidden, hidden),
            (f"{block}.attn.to_v", 2 * hidden, hidden)]
        fused[f"double_blocks.{index}.txt_attn.qkv.weight"] = [
            (f"{block}.attn.add_q_proj", 0, hidden), (f"{block}.attn.add_k_proj", hidden, hidden),
            (f"{block}.attn.add_v_proj", 2 * hidden, hidden)]
        for diffusers, bfl in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                               ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                               ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                               ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            fused[f"double_blocks.{index}.{bfl}.weight"] = [(f"{block}.{diffusers}", None, None)]
    for index in range(transformer.config.num_single_layers):
        block = f"single_transformer_blocks.{index}"
        fused[f"single_blocks.{index}.linear1.weight"] = [
            (f"{block}.attn.to_q", 0, hidden), (f"{block}.attn.to_k", hidden, hidden),
            (f"{block}.attn.to_v", 2 * hidden, hidden), (f"{block}.proj_mlp", 3 * hidden, 4 * hidden)]
        fused[f"single_blocks.{index}.linear2.weight"] = [(f"{block}.proj_out", None, None)]
        fused[f"single_blocks.{index}.modulation.lin.weight"] = [(f"{block}.norm.linear", None, None)]
    for diffusers, bfl in (("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
                           ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                           ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                           ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                           ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                           ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                           ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")):
        fused[f"{bfl}.weight"] = [(diffusers, None, None)]
    key_map, state, placed = {}, {}, {}
    for bfl_key, parts in fused.items():
        state[f"transformer.{bfl_key}"] = torch.cat([weights[path] for path, _, _ in parts], 0)
        for path, start, rows in parts:
            target = f"transformer.{bfl_key}"
            key_map[f"transformer.{path}"] = target if start is None else (target, (0, start, rows))
            placed[path] = (target, start or 0, weights[path].shape[0], False)
    adaln = "transformer.final_layer.adaLN_modulation.1.weight"
    state[adaln] = swap_halves(weights["norm_out.linear"])
    key_map["transformer.norm_out.linear"] = (adaln, None, swap_halves)
    placed["norm_out.linear"] = (adaln, 0, weights["norm_out.linear"].shape[0], True)
    clip_map, clip_state = unfused_key_map("flux", pipe)
    key_map.update({k: v for k, v in clip_map.items() if not k.startswith("transformer.")})
    state.update({k: v for k, v in clip_state.items() if k.startswith("text_encoder.")})
    return key_map, state, placed


def patched_state(patches, state: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """Every patched model weight, float32, as the stand-in patcher leaves it."""
    return {key: standin.calculate_weight(entries, state[key].clone(), key)
            for key, entries in standin.add_patches(patches, strength).items()}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, where: str, tolerance: float = 1e-6) -> None:
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= tolerance * scale, f"{where}: max error {error:.3e} vs max |W| {scale:.3e}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family, built once: the SNELLA file, its comfyui export and the library's reference."""
    root = tmp_path_factory.mktemp("comfyui")
    cache = {}

    def build(family: str):
        if family not in cache:
            adapter = trained_adapter(family, root / f"{family}.safetensors")
            output = root / f"{family}-comfyui.safetensors"
            export_snella([adapter], BUILDERS[family](0), output, to="comfyui")
            cache[family] = (adapter, output, reference(family, adapter))
        return cache[family]

    return build


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_unfused_families_patch_fuse_snella_weights(comfy, exported, family):
    adapter, output, expected = exported(family)
    lora = load_file(output)
    key_map, state = unfused_key_map(family, BUILDERS[family](0))
    patches, unclaimed = standin.load_lora(lora, key_map, comfy.adapters)
    assert unclaimed == set()
    assert all(type(a).__name__ == "SnellaWeightAdapter" for a in patches.values())
    adapted = sum(len(layers) for layers in expected.values())
    zero_layers = [(c, p) for c, layers in expected.items() for p, (_, delta, _) in layers.items()
                   if not bool(delta.any())]
    assert len(zero_layers) == 1 and len(patches) == adapted - 1
    for strength in (1.0, 0.5):
        patched = patched_state(patches, state, strength)
        for component, layers in expected.items():
            for path, (w0, delta, fused) in layers.items():
                key = f"{component}.{path}.weight"
                if not bool(delta.any()):
                    assert key not in patched
                    continue
                want = fused if strength == 1.0 else w0 + strength * delta
                assert_relative(patched[key], want, f"{family} {key} at strength {strength}")


def test_flux_slices_land_where_comfyui_maps_them(comfy, exported):
    adapter, output, expected = exported("flux")
    lora = load_file(output)
    key_map, state, placed = flux_key_map(tiny_flux_pipeline(0))
    patches, unclaimed = standin.load_lora(lora, key_map, comfy.adapters)
    assert unclaimed == set()
    offsets = [target for target in patches if not isinstance(target, str) and target[1] is not None]
    assert len(offsets) >= 10  # img/txt q, k, v and the single block's q, k, v, MLP input
    for strength in (1.0, 0.5):
        patched = patched_state(patches, state, strength)
        for component, layers in expected.items():
            for path, (w0, delta, fused) in layers.items():
                want = fused if strength == 1.0 else w0 + strength * delta
                if component == "text_encoder":
                    assert_relative(patched[f"text_encoder.{path}.weight"], want, f"flux {path}")
                    continue
                key, start, rows, swapped = placed[path]
                weight = patched.get(key, state[key])
                got = swap_halves(weight) if swapped else weight.narrow(0, start, rows)
                assert_relative(got, want, f"flux transformer.{path} in {key} rows {start}+{rows} at {strength}")
    # Rows of a fused weight that no adapted layer owns stay W0 exactly.
    patched = patched_state(patches, state, 1.0)
    for key, weight in patched.items():
        if not key.startswith("transformer."):
            continue
        owned = torch.zeros(weight.shape[0], dtype=torch.bool)
        for path, (target, start, rows, _) in placed.items():
            if target == key and f"transformer.{path}" in lora_prefixes(lora):
                owned[start:start + rows] = True
        assert torch.equal(weight[~owned], state[key][~owned]), key


def lora_prefixes(lora: dict[str, torch.Tensor]) -> set[str]:
    return {key.rpartition(".snella.")[0] for key in lora}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_export_size_within_bound_and_no_dense_delta(exported, family):
    adapter, output, expected = exported(family)
    assert output.stat().st_size <= 1.5 * adapter.stat().st_size
    with safe_open(str(output), framework="pt") as handle:
        metadata = handle.metadata()
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            assert tensor.dim() <= 1 or key.endswith(("in_factors", "out_factors")), key
            if key.endswith("_factors"):
                assert tensor.dtype == torch.float32
    assert metadata["snella_export_format"] == "comfyui" and "snella_config" in metadata
    assert len(json.loads(metadata["snella_comfyui_zero_layers"])) == 1


def test_bypass_h_adds_x_delta_transposed(comfy, exported):
    adapter, output, expected = exported("sd")
    lora = load_file(output)
    key_map, state = unfused_key_map("sd", tiny_sd_pipeline(0))
    patches, _ = standin.load_lora(lora, key_map, comfy.adapters)
    generator = torch.Generator().manual_seed(5)
    checked = 0
    for key, snella in patches.items():
        component, _, rest = key.partition(".")
        _, delta, _ = expected[component][rest.removesuffix(".weight")]
        x = torch.randn(2, 3, delta.shape[1], generator=generator)
        base_out = torch.randn(2, 3, delta.shape[0], generator=generator)
        snella.multiplier = 0.7
        torch.testing.assert_close(snella.h(x, base_out), 0.7 * x @ delta.T, rtol=1e-5, atol=1e-6)
        assert torch.equal(snella.g(base_out), base_out)
        checked += 1
    assert checked == len(patches) > 10
    with pytest.raises(SnellaError, match="fused q/k/v"):
        snella.h(x, torch.zeros(2, 3, delta.shape[0] * 3))


def test_calculate_weight_dtype_offset_and_mismatch(comfy, exported, caplog):
    adapter, output, expected = exported("sd")
    lora = load_file(output)
    prefix = sorted(lora_prefixes(lora))[0]
    snella = weight_adapter_module.adapter_class().load(prefix, lora, None, None, set())
    delta = snella.layer.delta_weight()
    w0 = torch.randn(delta.shape, generator=torch.Generator().manual_seed(2))
    # Half-precision patching (ComfyUI's low-VRAM path): ΔW built in float32, s·ΔW cast once.
    half = w0.to(torch.bfloat16)
    patched = snella.calculate_weight(half.clone(), prefix, 0.5, 1.0, None, None, torch.bfloat16)
    assert patched.dtype == torch.bfloat16
    assert torch.equal(patched, half + (0.5 * delta).to(torch.bfloat16))
    # A caller passing the whole fused weight with (dim, start, rows): only those rows move.
    fused = torch.cat([w0, w0, w0])
    rows = delta.shape[0]
    out = snella.calculate_weight(fused.clone(), prefix, 1.0, 1.0, (0, rows, rows), lambda t: t)
    assert torch.equal(out[:rows], w0) and torch.equal(out[2 * rows:], w0)
    assert_relative(out[rows:2 * rows], w0 + delta, "offset rows")
    # A weight of another shape is left alone and the error names the layer.
    other = torch.zeros(rows + 1, delta.shape[1])
    assert torch.equal(snella.calculate_weight(other.clone(), "k", 1.0, 1.0, None, None), other)
    assert prefix in caplog.text and "not merged" in caplog.text


def test_malformed_layer_names_the_key(comfy, exported, tmp_path):
    _, output, _ = exported("sd")
    lora = load_file(output)
    prefix = sorted(lora_prefixes(lora))[0]
    cls = weight_adapter_module.adapter_class()
    broken = dict(lora)
    del broken[f"{prefix}.snella.scalars"]
    with pytest.raises(SnellaFormatError, match=f"{prefix}.snella.scalars"):
        cls.load(prefix, broken, None, None, set())
    broken = dict(lora)
    broken[f"{prefix}.snella.spec"] = broken[f"{prefix}.snella.spec"].clone()
    broken[f"{prefix}.snella.spec"][0] = 99
    with pytest.raises(SnellaFormatError, match="layout version 99"):
        cls.load(prefix, broken, None, None, set())
    assert cls.load("lora_unet_not_there", lora, None, None, set()) is None


def test_export_refuses_what_comfyui_cannot_take(exported, tmp_path):
    adapter, _, _ = exported("sd")
    base = tmp_path / "base"
    tiny_sd_pipeline(0).save_pretrained(base)
    with pytest.raises(SnellaError, match="one ADAPTER"):
        export_snella([adapter, adapter], base, tmp_path / "two.safetensors", to="comfyui")
    with pytest.raises(SnellaError, match="--dtype fp16"):
        export_snella([adapter], base, tmp_path / "half.safetensors", to="comfyui", dtype="fp16")
    command = [str(adapter), "--base", str(base), "--to", "comfyui"]
    assert export_main([*command, "-o", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").is_file()
    assert export_main([*command, "--rank", "2", "-o", str(tmp_path / "r.safetensors")]) == 2


def test_adapter_weight_scales_delta(comfy, exported, tmp_path):
    adapter, _, expected = exported("sd")
    output = tmp_path / "weighted.safetensors"
    export_snella([f"{adapter}:0.5"], tiny_sd_pipeline(0), output, to="comfyui", adapter_weight=0.8)
    key_map, state = unfused_key_map("sd", tiny_sd_pipeline(0))
    patches, _ = standin.load_lora(load_file(output), key_map, comfy.adapters)
    patched = patched_state(patches, state, 1.0)
    for key, weight in patched.items():
        component, _, rest = key.partition(".")
        w0, delta, _ = expected[component][rest.removesuffix(".weight")]
        assert_relative(weight, w0 + 0.4 * delta, key)


def test_install_writes_node_and_refuses_other_folders(comfy, tmp_path, capsys):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    assert install_main(["install", str(root)]) == 0
    node = root / "custom_nodes" / NODE_FOLDER
    init = (node / "__init__.py").read_text()
    assert "register()" in init and "NODE_CLASS_MAPPINGS = {}" in init
    assert (node / "requirements.txt").read_text().strip() == "snella-diffusion"
    namespace: dict = {}
    comfy.adapters[:] = [standin.StandInLoRA]
    exec(compile(init, str(node / "__init__.py"), "exec"), namespace)
    assert namespace["NODE_CLASS_MAPPINGS"] == {}
    assert [cls.name for cls in comfy.adapters] == ["lora", "snella"]
    install_node(root)  # again: replaced in place, registration stays single
    assert sorted(p.name for p in (root / "custom_nodes").iterdir()) == [NODE_FOLDER]
    with pytest.raises(SnellaError, match="exists"):
        install_node(root, overwrite=False)
    other = tmp_path / "not-comfy"
    other.mkdir()
    assert install_main(["install", str(other)]) == 2
    assert "not a ComfyUI folder" in capsys.readouterr().err
    assert not (other / "custom_nodes").exists()


def test_no_comfy_import_at_package_import():
    code = ("import sys, snella_diffusion, snella_diffusion.comfyui, snella_diffusion.export; "
            "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_inside_comfyui_registers():
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import comfyui_standin; "
            "sys.modules.update(comfyui_standin.comfy_modules()); import snella_diffusion.comfyui; "
            "import comfy.weight_adapter as w; names = [c.name for c in w.adapters]; "
            "assert names == ['lora', 'snella'], names")
    subprocess.run([sys.executable, "-c", code], check=True)

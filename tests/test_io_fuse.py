import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from snella_diffusion import (
    SnellaConfig, SnellaError, SnellaLinear, apply_snella, fuse_snella, load_snella, save_snella, snella_layers,
    unfuse_snella,
)
from snella_diffusion.io import read_snella_file


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 10)).to(dtype)


def _trained_adapter(model, sparsity=0.4):
    config = SnellaConfig(rank=4, target_modules=["0", "2"], init_sparsity=sparsity)
    layers = apply_snella(model, config)
    with torch.no_grad():
        for layer in layers.values():
            layer.primary.in_factors.normal_(std=0.5)
            layer.primary.out_factors.normal_(std=0.5)
            layer.primary.alpha.fill_(0.8)
            layer.primary.beta.fill_(0.01)
    return layers


@pytest.fixture()
def saved(tmp_path):
    model = _model()
    _trained_adapter(model)
    path = save_snella(model, tmp_path / "adapter.safetensors", base_model="tiny-mlp")
    return model, path


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


def test_save_load_round_trip_gives_identical_outputs(saved):
    model, path = saved
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = model(x)
    fresh = _model()
    layers = load_snella(fresh, path)
    assert sorted(layers) == ["0", "2"]
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    for name, layer in snella_layers(fresh).items():
        original = snella_layers(model)[name]
        assert torch.equal(layer.delta_weight(), original.delta_weight())
        assert torch.equal(layer.sparsity, original.sparsity)


def test_a_file_whose_config_asks_for_compile_kernels_loads_and_gives_the_same_outputs(saved, tmp_path):
    """``compile_kernels`` chose the retired whole-matrix compiled path: a file that carries it
    set to true still loads, and runs the blocked path with identical outputs."""
    model, path = saved

    def ask_for_compiled_kernels(metadata):
        config = json.loads(metadata["config"])
        assert config["compile_kernels"] is False
        config["compile_kernels"] = True
        metadata["config"] = json.dumps(config)

    older = _rewrite(path, tmp_path, change_metadata=ask_for_compiled_kernels)
    assert read_snella_file(older).config.compile_kernels is True
    fresh = _model()
    load_snella(fresh, older)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    fresh(x).square().sum().backward()  # training on it works too
    assert all(torch.isfinite(layer.in_factors.grad).all() for layer in snella_layers(fresh).values())


def test_file_layout_and_header(saved):
    _, path = saved
    tensors = load_file(str(path))
    assert "model.0.snella.in_factors" in tensors and tensors["model.0.snella.in_factors"].shape == (2, 12, 2)
    assert {"alpha", "gamma", "beta", "sparsity", "threshold", "drop_count"} <= {k.rsplit(".", 1)[1] for k in tensors}
    snella_file = read_snella_file(path)
    assert snella_file.base_model == "tiny-mlp"
    assert snella_file.shapes == {"model.0": [24, 12], "model.2": [10, 24]}
    assert snella_file.config.rank == 4
    assert float(tensors["model.0.snella.threshold"]) > 0


def test_save_is_atomic_when_interrupted(saved, tmp_path, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    import snella_diffusion.io as io_module

    def killed(tensors, filename, metadata):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_snella(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def _rewrite(path, tmp_path, change_tensors=None, change_metadata=None):
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    if change_tensors:
        change_tensors(tensors)
    if change_metadata:
        change_metadata(metadata)
    bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    return bad


def _bad_cases(path, tmp_path):
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"\x00\x01 not a safetensors file")
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(4, 12), "unet.down.lora_B.weight": torch.zeros(12, 4)}, str(lora))
    lycoris = tmp_path / "lycoris.safetensors"
    save_file({"lora_unet_down.hada_w1_a": torch.zeros(4, 4)}, str(lycoris))
    return {
        "no such adapter file": tmp_path / "missing.safetensors",
        "not a safetensors file": not_safetensors,
        "a LoRA file": lora,
        "LyCORIS": lycoris,
        "format_version": _rewrite(path, tmp_path, change_metadata=lambda m: m.update(format_version="99")),
        "missing key model.2.snella.beta": _rewrite(path, tmp_path, change_tensors=lambda t: t.pop("model.2.snella.beta")),
        "unexpected key model.0.snella.extra": _rewrite(path, tmp_path, change_tensors=lambda t: t.update({"model.0.snella.extra": torch.zeros(1)})),
        "key model.0.snella.in_factors has shape": _rewrite(path, tmp_path, change_tensors=lambda t: t.update({"model.0.snella.in_factors": torch.zeros(2, 11, 2)})),
        "model.0.snella.alpha holds non-finite": _rewrite(path, tmp_path, change_tensors=lambda t: t.update({"model.0.snella.alpha": torch.tensor(float("nan"))})),
    }


def test_every_bad_file_raises_and_leaves_model_unchanged(saved, tmp_path):
    _, path = saved
    for message, bad in _bad_cases(path, tmp_path).items():
        fresh = _model(seed=3)
        snapshot = _snapshot(fresh)
        with pytest.raises(SnellaError, match=message) as error:
            load_snella(fresh, bad)
        assert str(bad.name) in str(error.value)
        _assert_unchanged(fresh, snapshot)
        assert snella_layers(fresh) == {}


def test_adapter_for_another_base_names_first_mismatching_layer(saved):
    _, path = saved
    other = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 11))
    snapshot = _snapshot(other)
    with pytest.raises(SnellaError, match=r"layer model\.2 is 11x24 in the model"):
        load_snella(other, path)
    _assert_unchanged(other, snapshot)


def test_failure_half_way_rolls_back(saved, monkeypatch):
    _, path = saved
    fresh = _model(seed=4)
    fresh[0].weight.requires_grad_(True)
    fresh[2].weight.requires_grad_(False)
    snapshot = _snapshot(fresh)
    import snella_diffusion.io as io_module

    calls = []

    def fail_second(adapter, params):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk went away")
        return original(adapter, params)

    original = io_module.copy_adapter_params
    monkeypatch.setattr(io_module, "copy_adapter_params", fail_second)
    with pytest.raises(RuntimeError):
        load_snella(fresh, path)
    _assert_unchanged(fresh, snapshot)
    assert isinstance(fresh[0], nn.Linear) and isinstance(fresh[2], nn.Linear)
    assert fresh[0].weight.requires_grad and not fresh[2].weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuse_matches_unfused_and_unfuse_is_bit_exact(dtype):
    model = _model(dtype=dtype)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    _trained_adapter(model)
    x = torch.randn(6, 12).to(dtype)
    with torch.no_grad():
        unfused = model(x)
        for _ in range(3):
            fuse_snella(model)
            fused = model(x)
            unfuse_snella(model)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(fused.float(), unfused.float(), atol=tolerance)
    for layer_index in (0, 2):
        assert torch.equal(model[layer_index].base_layer.weight, pristine[f"{layer_index}.weight"])
    with torch.no_grad():
        assert torch.equal(model(x), unfused)


def test_fused_weight_is_w0_plus_delta_in_float32():
    model = _model()
    layers = _trained_adapter(model)
    w0 = model[0].base_layer.weight.detach().clone()
    fuse_snella(model, scale=0.5)
    expected = w0 + 0.5 * layers["0"].delta_weight().detach()
    assert torch.equal(model[0].base_layer.weight, expected)
    unfuse_snella(model)
    assert torch.equal(model[0].base_layer.weight, w0)


def test_fusing_twice_fuses_once_and_removing_one_adapter_keeps_the_other_fused():
    model = _model()
    w0 = model[0].weight.detach().clone()
    _trained_adapter(model)
    apply_snella(model, SnellaConfig(rank=4, target_modules=["0", "2"]), adapter_name="second")
    layer = model[0]
    with torch.no_grad():
        layer.adapters["second"].out_factors.normal_(std=0.5)
    fuse_snella(model, adapter_names=["default"])
    once = layer.base_layer.weight.detach().clone()
    fuse_snella(model, adapter_names=["default"])
    assert torch.equal(layer.base_layer.weight, once)
    fuse_snella(model, adapter_names=["second"])
    from snella_diffusion import remove_snella

    remove_snella(model, "second")
    assert list(layer.adapters) == ["default"] and list(layer.fused_adapters) == ["default"]
    assert torch.equal(layer.base_layer.weight, once)
    unfuse_snella(model)
    assert torch.equal(layer.base_layer.weight, w0)


def test_pristine_copy_follows_dtype_casts():
    model = _model()
    w0 = model[0].weight.detach().clone()
    _trained_adapter(model)
    fuse_snella(model)
    model.to(torch.float16)
    unfuse_snella(model)
    assert model[0].base_layer.weight.dtype == torch.float16
    assert torch.equal(model[0].base_layer.weight, w0.to(torch.float16))
    assert "0.unfused_weight" not in model.state_dict()


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_one_pass_fuse_equals_the_whole_matrix_fuse_bit_for_bit(scale, monkeypatch):
    """A float32 weight of one adapter is fused by one blocked pass (SnellaLinear._fuse_one_float32);
    it writes exactly W0 + s·ΔW as the whole-matrix path (W0 copy + delta_weight()) does,
    here over two column blocks, with the same energy accounting."""

    def model_with_adapter() -> nn.Module:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(600, 1024))
        apply_snella(model, SnellaConfig(rank=8, target_modules=["0"], init_sparsity=0.6))
        with torch.no_grad():
            model[0].out_factors.normal_(std=0.3)
        return model

    one_pass, whole = model_with_adapter(), model_with_adapter()
    calls = []
    single = SnellaLinear._fuse_one_float32
    monkeypatch.setattr(SnellaLinear, "_fuse_one_float32", lambda *a: calls.append(1) or single(*a))
    fuse_snella(one_pass, scale=scale)
    monkeypatch.setattr(SnellaLinear, "_fuses_in_one_pass", lambda *a: False)
    fuse_snella(whole, scale=scale)
    assert calls == [1]
    assert torch.equal(one_pass[0].base_layer.weight, whole[0].base_layer.weight)
    assert one_pass[0].fused_delta_energy[0] == whole[0].fused_delta_energy[0] == 0.0
    assert one_pass[0].fused_delta_energy[1] == whole[0].fused_delta_energy[1] > 0.0
    unfuse_snella(one_pass)
    unfuse_snella(whole)
    assert torch.equal(one_pass[0].base_layer.weight, whole[0].base_layer.weight)

"""The load transaction and the checks behind it: config and header validation naming the
entry at fault, the |ΔW| bound, plan → apply → undo restoring a model exactly, the one
atomic-write helper and the one Hub-download helper."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from snella_diffusion import SnellaConfig, SnellaError, SnellaFormatError, apply_snella, load_snella, save_snella
from snella_diffusion.file_checks import DELTA_LIMIT, delta_bound
from snella_diffusion.files import atomic_path, replace_folder_atomically, write_text_atomically
from snella_diffusion.hub import HubDownloadError, download_hub_file
from snella_diffusion.io import copy_adapter_params, plan_load, read_snella_file
from snella_diffusion.layer import SnellaAdapter, SnellaLinear

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 10))


@pytest.fixture()
def saved(tmp_path) -> Path:
    model = _model()
    layers = apply_snella(model, SnellaConfig(rank=4, target_modules=["0", "2"], init_sparsity=0.4))
    with torch.no_grad():
        for layer in layers.values():
            layer.primary.in_factors.normal_(std=0.5)
            layer.primary.out_factors.normal_(std=0.5)
            layer.primary.alpha.fill_(0.8)
    return save_snella(model, tmp_path / "adapter.safetensors")


def _rewrite(path: Path, name: str, tensors=None, metadata=None) -> Path:
    with safe_open(str(path), "pt") as handle:
        header = dict(handle.metadata())
    stored = load_file(str(path))
    bad = path.with_name(name)
    save_file({**stored, **(tensors or {})}, str(bad), metadata={**header, **(metadata or {})})
    return bad


def _with_config(path: Path, name: str, **fields) -> Path:
    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    return _rewrite(path, name, metadata={"config": json.dumps({**config, **fields})})


def _state(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _same(model: nn.Module, state: tuple) -> bool:
    tensors, layout, flags = state
    current = model.state_dict()
    return (current.keys() == tensors.keys() and all(torch.equal(current[k], v) for k, v in tensors.items())
            and [(n, type(m)) for n, m in model.named_modules()] == layout
            and [(n, p.requires_grad) for n, p in model.named_parameters()] == flags)


# One wrong value per SnellaConfig field (type or range) and the words the error must hold.
BAD_FIELDS = [
    ("rank", "x", "must be an integer"), ("rank", 3, "positive multiple of num_heads"),
    ("num_heads", 2.0, "must be an integer"), ("num_heads", 0, "at least 1"),
    ("kernel", None, "must be a string"), ("kernel", "rbf", "expected one of"),
    ("kernel_scale", [], "must be a number"), ("kernel_scale", float("inf"), "finite"),
    ("sparsify", 1, "must be a string"), ("sparsify", "hard", "expected one of"),
    ("target_modules", None, "a preset name or a list of strings"), ("target_modules", [1], "list of strings"),
    ("target_modules", [], "empty"),
    ("init_sparsity", "0", "must be a number"), ("init_sparsity", 1.5, r"\[0, 1\)"),
    ("target_sparsity", True, "must be a number"), ("target_sparsity", -0.1, r"\[0, 1\)"),
    ("forward_mode", [], "must be a string"), ("forward_mode", "fused", "expected one of"),
    ("adapter_dropout", {}, "must be a number"), ("adapter_dropout", 1.0, r"\[0, 1\)"),
    ("drop_path", None, "must be a number"), ("drop_path", float("nan"), r"\[0, 1\)"),
    ("threshold_sample_size", 1.5, "must be an integer"), ("threshold_sample_size", -1, "0 \\(exact\\) or positive"),
    ("compile_kernels", 1, "true or false"),
    ("forward_cache_mb", 1e300, "must be an integer"), ("forward_cache_mb", -1, ">= 0"),
    ("importance_beta1", "x", "must be a number"), ("importance_beta1", 1.0, r"\[0, 1\)"),
    ("importance_beta2", None, "must be a number"), ("importance_beta2", -1, r"\[0, 1\)"),
    ("allocator_warmup_steps", 0.5, "must be an integer"), ("allocator_warmup_steps", -1, ">= 0"),
    ("allocator_final_steps", "1", "must be an integer"), ("allocator_final_steps", -2, ">= 0"),
    ("allocator_interval", None, "must be an integer"), ("allocator_interval", 0, ">= 1"),
    ("exclude_modules", None, "a list of strings"), ("exclude_modules", "0", "a list of strings"),
]


def test_every_config_field_is_checked_with_the_field_named(saved):
    covered = {field for field, _, _ in BAD_FIELDS}
    assert covered == set(SnellaConfig().to_dict())
    model = _model(seed=1)
    state = _state(model)
    for index, (field, value, words) in enumerate(BAD_FIELDS):
        bad = _with_config(saved, f"bad{index}.safetensors", **{field: value})
        pattern = rf"bad{index}\.safetensors: header 'config': (?:{field}=|.*{field}).*{words}"
        with pytest.raises(SnellaFormatError, match=pattern):
            load_snella(model, bad)
        assert _same(model, state), field


@pytest.mark.parametrize("entry, value, words", [
    ("shapes", "5", r"header 'shapes' must be a non-empty JSON object"),
    ("shapes", "{}", r"header 'shapes' must be a non-empty JSON object"),
    ("shapes", '{"model.0": [24, 12], "model.2": null}', r"header 'shapes' entry 'model\.2' is None"),
    ("shapes", '{"model.0": [24, 12], "model.2": [10, "24"]}', r"header 'shapes' entry 'model\.2' is \[10, '24'\]"),
    ("shapes", '{"model.0": [24, 12], "model.2": [0, 24]}', r"header 'shapes' entry 'model\.2' is \[0, 24\]"),
    ("shapes", '{"model.0": [24, 12], "model": [10, 24]}', r"header 'shapes' key 'model' is not '<component>\.<module path>'"),
    ("shapes", "{", r"header 'shapes' is not valid JSON"),
    ("config", "[1]", r"header 'config': config JSON must be an object"),
    ("format_version", "2", r"header 'format_version' is '2'"),
])
def test_header_entries_are_checked(saved, entry, value, words):
    bad = _rewrite(saved, "bad.safetensors", metadata={entry: value})
    model = _model(seed=1)
    state = _state(model)
    with pytest.raises(SnellaFormatError, match=rf"bad\.safetensors: {words}"):
        load_snella(model, bad)
    assert _same(model, state)


def test_missing_config_entry_is_named(saved):
    with safe_open(str(saved), "pt") as handle:
        header = {k: v for k, v in handle.metadata().items() if k != "config"}
    bad = saved.with_name("noconfig.safetensors")
    save_file(load_file(str(saved)), str(bad), metadata=header)
    with pytest.raises(SnellaFormatError, match=r"noconfig\.safetensors: header 'config' is missing"):
        read_snella_file(bad)


def test_tensor_dtypes_and_ranges_are_checked(saved):
    stored = load_file(str(saved))
    cases = {
        "model.0.snella.in_factors has dtype torch.int32": {"model.0.snella.in_factors": stored["model.0.snella.in_factors"].int()},
        "model.2.snella.drop_count has dtype torch.float32": {"model.2.snella.drop_count": torch.tensor(3.0)},
        "model.2.snella.gamma has dtype torch.bool": {"model.2.snella.gamma": torch.tensor(True)},
        r"model.0.snella.threshold = -0.5: τ is a magnitude": {"model.0.snella.threshold": torch.tensor(-0.5)},
        r"model.0.snella.beta holds non-finite values \(in float32\)": {"model.0.snella.beta": torch.tensor(1e300, dtype=torch.float64)},
    }
    model = _model(seed=1)
    state = _state(model)
    for index, (words, tensors) in enumerate(cases.items()):
        bad = _rewrite(saved, f"t{index}.safetensors", tensors=tensors)
        with pytest.raises(SnellaFormatError, match=rf"t{index}\.safetensors: key {words}"):
            load_snella(model, bad)
        assert _same(model, state), words


def test_half_precision_factors_load_as_their_float32_values(saved):
    stored = load_file(str(saved))
    halved = {k: v.half() for k, v in stored.items() if k.endswith("factors")}
    half_file = _rewrite(saved, "half.safetensors", tensors=halved)
    layers = load_snella(_model(seed=1), half_file)
    for key, value in halved.items():
        path = key.split(".")[1]
        param = key.rpartition(".")[2]
        assert torch.equal(getattr(layers[path].primary, param).detach(), value.float())


@pytest.mark.parametrize("kernel", ["mix", "piecewise_linear", "linear"])
@pytest.mark.parametrize("sparsify", ["official", "soft_threshold", "dense"])
def test_delta_bound_holds_on_random_adapters(kernel, sparsify):
    generator = torch.Generator().manual_seed(7)
    sparsity = 0.0 if sparsify == "dense" else 0.3
    config = SnellaConfig(rank=6 if kernel == "linear" else 4, num_heads=3 if kernel == "linear" else 2, kernel=kernel,
                          kernel_scale=0.7, sparsify=sparsify, init_sparsity=sparsity, target_sparsity=sparsity)
    for trial in range(6):
        adapter = SnellaAdapter(17, 23, config)
        scale = [0.01, 0.3, 1.0, 3.0, 10.0, 30.0][trial]
        with torch.no_grad():
            adapter.in_factors.copy_(torch.randn(adapter.in_factors.shape, generator=generator) * scale)
            adapter.out_factors.copy_(torch.randn(adapter.out_factors.shape, generator=generator) * scale)
            adapter.alpha.fill_(float(torch.randn((), generator=generator)) * scale)
            adapter.beta.fill_(float(torch.randn((), generator=generator)))
            adapter.gamma.fill_(abs(float(torch.randn((), generator=generator))))
        params = {name: tensor.detach() for name, tensor in adapter.state_dict().items()}
        with torch.no_grad():
            actual = float(adapter.delta_weight().abs().max())
        bound = delta_bound(config, params)
        assert actual <= bound * (1 + 1e-5), (scale, actual, bound)
        if sparsify != "soft_threshold":  # survivors include max |M|: the bound is not vacuous
            assert bound < 50 * actual, (scale, actual, bound)


def test_a_file_whose_delta_could_overflow_is_refused_naming_the_layer(saved):
    stored = load_file(str(saved))
    model = _model(seed=1)
    state = _state(model)
    blown = {"model.2.snella.out_factors": stored["model.2.snella.out_factors"] * 1e4}
    bad = _rewrite(saved, "blown.safetensors", tensors=blown)
    bound = delta_bound(read_snella_file(saved).config, {**{k.rpartition(".")[2]: v for k, v in stored.items()
                                                           if k.startswith("model.2.")},
                                                        "out_factors": blown["model.2.snella.out_factors"]})
    assert bound > DELTA_LIMIT
    with pytest.raises(SnellaFormatError, match=r"blown\.safetensors: key model\.2\.snella\.in_factors/out_factors/alpha/beta: \|ΔW\| of this layer may reach"):
        load_snella(model, bad)
    assert _same(model, state)
    # The same factors at 1/100 of that stay under the limit and load with a finite ΔW.
    fine = _rewrite(saved, "fine.safetensors", tensors={"model.2.snella.out_factors": stored["model.2.snella.out_factors"] * 1e2})
    layers = load_snella(model, fine)
    assert torch.isfinite(layers["2"].delta_weight()).all()


def test_plan_touches_nothing_and_undo_restores_exactly(saved):
    snella_file = read_snella_file(saved)
    model = _model(seed=1)
    model[0].weight.requires_grad_(False)
    state = _state(model)
    plan = plan_load(snella_file, {"model": model}, "a")
    assert [(layer.path, layer.overwrite) for layer in plan.layers] == [("0", False), ("2", False)]
    assert _same(model, state)
    applied = plan.apply(trainable=False)
    assert isinstance(model[0], SnellaLinear) and not _same(model, state)
    assert not model[0].adapters["a"].in_factors.requires_grad and model[2].base_layer.weight.requires_grad
    applied.undo()
    assert _same(model, state)

    # Into adapters that exist (resuming training): tensors overwritten, undo restores them.
    layers = apply_snella(model, SnellaConfig(rank=4, target_modules=["0", "2"]), "a")
    trained_state = _state(model)
    plan = plan_load(snella_file, {"model": model}, "a")
    assert all(layer.overwrite for layer in plan.layers)
    applied = plan.apply()
    stored = load_file(str(saved))
    assert torch.equal(layers["0"].adapters["a"].in_factors.detach(), stored["model.0.snella.in_factors"])
    applied.undo()
    assert _same(model, trained_state)


def test_partly_held_adapter_name_is_refused_before_anything_changes(saved):
    model = _model(seed=1)
    apply_snella(model, SnellaConfig(rank=4, target_modules=["0"]), "a")
    state = _state(model)
    with pytest.raises(SnellaFormatError, match=r"layer model\.0 already holds an adapter named 'a' but layer model\.2 does not"):
        load_snella(model, saved, adapter_name="a")
    assert _same(model, state)


def test_export_checks_use_the_same_plan(saved, tmp_path):
    from snella_diffusion.export.deltas import AdapterSource, check_against_base
    from snella_diffusion.export.base import BaseModel

    snella_file = read_snella_file(saved)
    other = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 11))
    base = BaseModel("tiny", "StableDiffusionPipeline", None, {"model": other})
    with pytest.raises(SnellaFormatError, match=r"layer model\.2 is 11x24 in the model but \[10, 24\]"):
        check_against_base([AdapterSource(saved, 1.0, snella_file, "")], base)


# ---------------------------------------------------------------------------- files and Hub


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out" / "report.json"
    write_text_atomically(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_replace_folder_atomically_swaps_whole_folders(tmp_path):
    folder = tmp_path / "pipeline"
    replace_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("1"))
    replace_folder_atomically(folder, lambda staging: (staging / "b.txt").write_text("2"))
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]

    def broken(staging: Path) -> None:
        (staging / "c.txt").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_folder_atomically(folder, broken)
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_hub_download_failure_names_repo_and_file():
    with pytest.raises(HubDownloadError, match=r"no-such-user/no-such-repo: 'model_index\.json' could not be fetched"):
        download_hub_file("no-such-user/no-such-repo", "model_index.json", local_files_only=True)
    with pytest.raises(SnellaError, match="unknown keyword argument"):
        download_hub_file("a/b", "c", tokenn="x")


def _python_files() -> list[Path]:
    return [p for folder in ("snella_diffusion", "benchmarks", "train_scripts") for p in (ROOT / folder).rglob("*.py")]


def test_one_hub_download_helper_and_one_atomic_writer():
    hub_calls = [p.relative_to(ROOT).as_posix() for p in _python_files()
                 if re.search(r"hf_hub_download|snapshot_download", p.read_text())]
    assert hub_calls == ["snella_diffusion/hub.py"]
    # checkpointing.py renames accelerate's multi-process staging folder on the main process only.
    writers = sorted(p.relative_to(ROOT).as_posix() for p in _python_files()
                     if re.search(r"os\.replace\(|tempfile\.mk|\.tmp\b", p.read_text()))
    assert writers == ["snella_diffusion/files.py", "snella_diffusion/training/checkpointing.py"]


def test_no_private_name_crosses_modules():
    """No module of the package imports an underscore name from another of its modules."""
    found = []
    for path in (ROOT / "snella_diffusion").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("snella_diffusion")):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_copy_adapter_params_reproduces_the_saved_delta(saved):
    snella_file = read_snella_file(saved)
    config = snella_file.config
    adapter = SnellaAdapter(24, 12, config)
    copy_adapter_params(adapter, snella_file.layers["model"]["0"])
    layers = load_snella(_model(seed=2), saved)
    assert torch.equal(adapter.delta_weight(), layers["0"].primary.delta_weight())

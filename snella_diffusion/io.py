"""SNELLA adapter files: safetensors with a validated header, written atomically.

Tensor keys are ``<component>.<module path>.snella.<param>``; the header (string metadata)
holds ``format = "snella"``, ``format_version``, ``config`` (SnellaConfig JSON),
``base_model`` and ``shapes`` (JSON ``{"<component>.<module path>": [m, n]}``). Every check
runs before the model is touched, and a load that fails half-way is rolled back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import SnellaConfig
from .errors import SnellaConfigError, SnellaFormatError
from .inject import apply_snella, set_submodule
from .layer import SnellaAdapter, SnellaLinear, snella_layers

FORMAT_NAME = "snella"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
PARAM_NAMES = ("in_factors", "out_factors", "alpha", "gamma", "beta", "sparsity", "threshold")
OPTIONAL_PARAM_NAMES = ("drop_count",)
KEY_INFIX = ".snella."

PathLike = Union[str, os.PathLike]
Components = Union[nn.Module, dict[str, nn.Module]]


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_component(model: nn.Module) -> str:
    """The file component a model is stored under: unet, transformer, text_encoder or model."""
    name = type(model).__name__
    if "UNet" in name:
        return "unet"
    if "Transformer" in name and ("2D" in name or "Flux" in name or "SD3" in name):
        return "transformer"
    if "TextModel" in name or "EncoderModel" in name:
        return "text_encoder"
    return "model"


def _as_components(models: Components, component: Optional[str]) -> dict[str, nn.Module]:
    if isinstance(models, dict):
        return dict(models)
    return {component or default_component(models): models}


def _adapter_of(layer: SnellaLinear, adapter_name: Optional[str]) -> SnellaAdapter:
    if adapter_name is None:
        return layer.primary
    if adapter_name not in layer.adapters:
        raise SnellaFormatError(f"no adapter named {adapter_name!r} to save")
    return layer.adapters[adapter_name]


@torch.no_grad()
def snella_state_dict(
    models: Components, adapter_name: Optional[str] = None, component: Optional[str] = None
) -> dict[str, Tensor]:
    """The adapter tensors in file layout (``<component>.<path>.snella.<param>``), on CPU.

    τ is refreshed for the current parameters first, so the file holds the τ that reproduces
    the model's ΔW_eff exactly.
    """
    tensors: dict[str, Tensor] = {}
    for prefix, model in _as_components(models, component).items():
        for path, layer in snella_layers(model).items():
            adapter = _adapter_of(layer, adapter_name)
            adapter.refresh_threshold()
            for param in PARAM_NAMES + OPTIONAL_PARAM_NAMES:
                value = getattr(adapter, param).detach()
                tensors[f"{prefix}.{path}{KEY_INFIX}{param}"] = value.to("cpu").contiguous()
    return tensors


def _config_of(models: dict[str, nn.Module], adapter_name: Optional[str]) -> SnellaConfig:
    for model in models.values():
        for layer in snella_layers(model).values():
            if adapter_name is not None:
                return layer.configs[adapter_name]
            return layer.configs[layer.active_adapters[0] if layer.active_adapters else next(iter(layer.adapters))]
    raise SnellaFormatError("nothing to save: the model has no SnellaLinear layer")


def save_snella(
    models: Components,
    path: PathLike,
    adapter_name: Optional[str] = None,
    component: Optional[str] = None,
    base_model: str = "",
) -> Path:
    """Write the adapter to ``path`` (a ``.safetensors`` file) atomically.

    Args:
        models: one model, or ``{component: model}`` (e.g. unet and text_encoder).
        path: destination file; its folder is created.
        adapter_name: which adapter to save (default: each layer's first active one).
        component: the component name for a single model (default from its class).
        base_model: hub id or folder the adapter was trained on (stored in the header).
    """
    components = _as_components(models, component)
    config = _config_of(components, adapter_name)
    tensors = snella_state_dict(components, adapter_name)
    shapes = {
        f"{prefix}.{name}": [layer.out_features, layer.in_features]
        for prefix, model in components.items()
        for name, layer in snella_layers(model).items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_json(),
        "base_model": str(base_model),
        "shapes": json.dumps(shapes),
    }
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return destination


def describe_foreign_keys(keys: list[str]) -> Optional[str]:
    """Name the adapter format of a non-SNELLA file from its keys, with what to use instead."""
    joined = " ".join(keys[:200])
    if any(t in joined for t in ("hada_w1", "lokr_w1", "lokr_", ".oft_", "lycoris")):
        return "a LyCORIS (LoHa/LoKr) file: load it with diffusers' load_lora_weights"
    if any(t in joined for t in ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")):
        return "a LoRA file: load it with pipe.load_lora_weights(...) instead"
    return None


@dataclasses.dataclass
class SnellaFile:
    """A validated adapter file: its tensors grouped by component and layer path."""

    path: Path
    config: SnellaConfig
    base_model: str
    shapes: dict[str, list[int]]
    layers: dict[str, dict[str, dict[str, Tensor]]]  # component -> path -> param -> tensor


def _check_layer_tensors(file: Path, key: str, params: dict[str, Tensor], shape: list[int], config: SnellaConfig) -> None:
    out_features, in_features = shape
    heads, width = config.num_heads, config.head_width
    expected = {
        "in_factors": (heads, in_features, width),
        "out_factors": (heads, out_features, width),
        "alpha": (), "gamma": (), "beta": (), "sparsity": (), "threshold": (), "drop_count": (),
    }
    missing = [p for p in PARAM_NAMES if p not in params]
    if missing:
        raise SnellaFormatError(f"{file}: missing key {key}{KEY_INFIX}{missing[0]}")
    for param, tensor in params.items():
        if tuple(tensor.shape) != expected[param]:
            raise SnellaFormatError(
                f"{file}: key {key}{KEY_INFIX}{param} has shape {tuple(tensor.shape)}, "
                f"expected {expected[param]} for a {out_features}x{in_features} layer at rank "
                f"{config.rank}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SnellaFormatError(f"{file}: key {key}{KEY_INFIX}{param} holds non-finite values")
    sparsity = float(params["sparsity"])
    if not 0.0 <= sparsity <= 1.0:
        raise SnellaFormatError(f"{file}: key {key}{KEY_INFIX}sparsity = {sparsity} is outside [0, 1]")
    if "drop_count" in params and not 0 <= int(params["drop_count"]) <= out_features * in_features:
        raise SnellaFormatError(
            f"{file}: key {key}{KEY_INFIX}drop_count = {int(params['drop_count'])} is outside "
            f"[0, {out_features * in_features}]"
        )


def read_snella_file(path: PathLike) -> SnellaFile:
    """Open and fully validate an adapter file without touching any model.

    Raises:
        SnellaFormatError naming the file and, where one is at fault, the key.
    """
    file = Path(path)
    if not file.is_file():
        raise SnellaFormatError(f"{file}: no such adapter file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys}
    except Exception as error:  # safetensors raises several types for a malformed header
        raise SnellaFormatError(f"{file}: not a safetensors file ({error})") from error
    if metadata.get("format") != FORMAT_NAME:
        foreign = describe_foreign_keys(keys)
        what = foreign or f"header 'format' is {metadata.get('format')!r}, expected 'snella'"
        raise SnellaFormatError(f"{file}: not a SNELLA adapter: {what}")
    version = metadata.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise SnellaFormatError(
            f"{file}: header 'format_version' is {version!r}; this snella-diffusion reads "
            f"{', '.join(SUPPORTED_VERSIONS)} (upgrade the package to read newer files)"
        )
    try:
        config = SnellaConfig.from_json(metadata.get("config", ""))
    except SnellaConfigError as error:
        raise SnellaFormatError(f"{file}: header 'config': {error}") from error
    try:
        shapes = json.loads(metadata.get("shapes", ""))
    except json.JSONDecodeError as error:
        raise SnellaFormatError(f"{file}: header 'shapes' is not valid JSON") from error
    layers: dict[str, dict[str, dict[str, Tensor]]] = {}
    for key, tensor in tensors.items():
        layer_key, infix, param = key.rpartition(KEY_INFIX)
        if not infix or layer_key not in shapes or param not in PARAM_NAMES + OPTIONAL_PARAM_NAMES:
            raise SnellaFormatError(f"{file}: unexpected key {key}")
        component, _, module_path = layer_key.partition(".")
        layers.setdefault(component, {}).setdefault(module_path, {})[param] = tensor
    for layer_key, shape in shapes.items():
        component, _, module_path = layer_key.partition(".")
        params = layers.get(component, {}).get(module_path, {})
        _check_layer_tensors(file, layer_key, params, shape, config)
    return SnellaFile(file, config, metadata.get("base_model", ""), shapes, layers)


def _check_against_model(snella_file: SnellaFile, component: str, model: nn.Module, adapter_name: str) -> None:
    modules = dict(model.named_modules())
    for module_path, params in snella_file.layers[component].items():
        where = f"{snella_file.path}: layer {component}.{module_path}"
        module = modules.get(module_path)
        if module is None:
            raise SnellaFormatError(f"{where} does not exist in {type(model).__name__} (adapter for another base?)")
        if not isinstance(module, (nn.Linear, SnellaLinear)):
            raise SnellaFormatError(f"{where} is a {type(module).__name__}, not a linear layer")
        shape = [module.out_features, module.in_features]
        if shape != snella_file.shapes[f"{component}.{module_path}"]:
            raise SnellaFormatError(
                f"{where} is {shape[0]}x{shape[1]} in the model but "
                f"{snella_file.shapes[f'{component}.{module_path}']} in the file: this adapter was "
                f"trained on another base model ({snella_file.base_model or 'unknown'})"
            )
    _check_existing_adapters(snella_file, component, modules, adapter_name)


# Fields that decide an adapter's tensors and ΔW: a file loads into an existing adapter only if
# they agree (the schedule and speed settings may differ).
STRUCTURAL_FIELDS = ("rank", "num_heads", "kernel", "kernel_scale", "sparsify")


def _check_existing_adapters(
    snella_file: SnellaFile, component: str, modules: dict[str, nn.Module], adapter_name: str
) -> None:
    """A file loads into an adapter ``adapter_name`` that the model already holds (resuming
    training after ``apply_snella``) only if every layer of the file holds it, with the same
    structure; a model holding it on some layers only is refused."""
    paths = list(snella_file.layers[component])
    holding = [p for p in paths if isinstance(modules[p], SnellaLinear) and adapter_name in modules[p].adapters]
    if not holding:
        return
    if len(holding) != len(paths):
        missing = next(p for p in paths if p not in holding)
        raise SnellaFormatError(
            f"{snella_file.path}: layer {component}.{holding[0]} already holds an adapter named "
            f"{adapter_name!r} but layer {component}.{missing} does not; load into a model where "
            "apply_snella adapted every layer of the file, or pass another adapter_name"
        )
    existing = modules[holding[0]].configs[adapter_name]
    for name in STRUCTURAL_FIELDS:
        if getattr(existing, name) != getattr(snella_file.config, name):
            raise SnellaFormatError(
                f"{snella_file.path}: config {name}={getattr(snella_file.config, name)!r} but the "
                f"existing adapter {adapter_name!r} on layer {component}.{holding[0]} has "
                f"{name}={getattr(existing, name)!r}"
            )


def _pick_component(snella_file: SnellaFile, model: nn.Module, component: Optional[str]) -> str:
    available = sorted(snella_file.layers)
    if component is None:
        component = available[0] if len(available) == 1 else default_component(model)
    if component not in snella_file.layers:
        raise SnellaFormatError(
            f"{snella_file.path}: no layers for component {component!r} (the file has {available})"
        )
    return component


@torch.no_grad()
def _copy_into(adapter: SnellaAdapter, params: dict[str, Tensor]) -> None:
    for name in ("in_factors", "out_factors", "alpha", "gamma", "beta"):
        getattr(adapter, name).copy_(params[name])
    drop = int(params["drop_count"]) if "drop_count" in params else None
    adapter.set_sparsity(float(params["sparsity"]), drop_count=drop)
    adapter.record_threshold(params["threshold"].to(adapter.threshold.device, torch.float32))


def load_snella(
    model: nn.Module,
    path: PathLike,
    adapter_name: str = "default",
    component: Optional[str] = None,
    snella_file: Optional[SnellaFile] = None,
) -> dict[str, SnellaLinear]:
    """Inject the adapter stored at ``path`` into ``model`` and load its tensors.

    Layers that already are SnellaLinear get a further adapter named ``adapter_name``; if every
    layer of the file already holds an adapter of that name with the same structure (rank,
    heads, kernel; e.g. after ``apply_snella`` to resume training), its tensors are overwritten
    and stay trainable. On any error the model is left exactly as it was (modules, weights and
    requires_grad flags).

    Returns:
        ``{module path: SnellaLinear}`` of the layers that received the adapter.
    """
    snella_file = snella_file or read_snella_file(path)
    component = _pick_component(snella_file, model, component)
    _check_against_model(snella_file, component, model, adapter_name)
    layer_params = snella_file.layers[component]
    existing = _layers_holding(model, layer_params, adapter_name)
    if existing:
        return _load_into_existing(existing, layer_params, adapter_name)
    config = dataclasses.replace(snella_file.config, target_modules=sorted(layer_params), exclude_modules=[])
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    originals = {path: model.get_submodule(path) for path in layer_params}
    try:
        layers = apply_snella(model, config, adapter_name)
        if set(layers) != set(layer_params):
            raise SnellaFormatError(f"{snella_file.path}: the layer names matched other modules too")
        for module_path, params in layer_params.items():
            _copy_into(layers[module_path].adapters[adapter_name], params)
    except BaseException:
        _roll_back(model, originals, adapter_name)
        for name, param in model.named_parameters():
            if name in grad_flags:
                param.requires_grad_(grad_flags[name])
        raise
    return layers


def _layers_holding(model: nn.Module, layer_params: dict[str, dict], adapter_name: str) -> dict[str, SnellaLinear]:
    """The file's layers that already hold ``adapter_name`` (all of them or none, as checked)."""
    layers = {path: model.get_submodule(path) for path in layer_params}
    return {p: l for p, l in layers.items() if isinstance(l, SnellaLinear) and adapter_name in l.adapters}


def _load_into_existing(
    layers: dict[str, SnellaLinear], layer_params: dict[str, dict[str, Tensor]], adapter_name: str
) -> dict[str, SnellaLinear]:
    """Overwrite the tensors of the existing adapters (their trainability is kept); restores
    every adapter's previous state if a copy fails."""
    saved = {path: {k: v.clone() for k, v in layer.adapters[adapter_name].state_dict().items()}
             for path, layer in layers.items()}
    try:
        for path, params in layer_params.items():
            _copy_into(layers[path].adapters[adapter_name], params)
    except BaseException:
        for path, state in saved.items():
            layers[path].adapters[adapter_name].load_state_dict(state)
        raise
    return layers


def _roll_back(model: nn.Module, originals: dict[str, nn.Module], adapter_name: str) -> None:
    """Undo a partial ``apply_snella``: new wrappers go, pre-existing ones lose the adapter."""
    for path, layer in snella_layers(model).items():
        original = originals.get(path)
        if original is None and path not in originals:
            continue
        if isinstance(original, SnellaLinear):
            if adapter_name in original.adapters:
                original.delete_adapter(adapter_name)
        elif original is not None:
            set_submodule(model, path, original)

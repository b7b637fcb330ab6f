"""SNELLA adapter files and the one load transaction: read and validate → plan → apply → undo.

Tensor keys are ``<component>.<module path>.snella.<param>``; the header (string metadata)
holds ``format = "snella"``, ``format_version``, ``config`` (SnellaConfig JSON),
``base_model`` and ``shapes`` (JSON ``{"<component>.<module path>": [m, n]}``).

Loading is one transaction shared by ``load_snella``, the pipeline loaders and the exporter:
``read_snella_file`` validates the whole file (``file_checks``), ``plan_load`` checks it
against the target models and decides what changes (touching nothing), ``LoadPlan.apply``
makes the changes and records them, and ``AppliedLoad.undo`` restores the models exactly
(modules, tensors, ``requires_grad`` flags); ``apply`` undoes its own partial work on error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import SnellaConfig
from .errors import SnellaConfigError, SnellaFormatError
from .file_checks import KEY_INFIX, OPTIONAL_PARAM_NAMES, PARAM_NAMES, check_layer_tensors, parse_shapes
from .files import write_atomically
from .inject import quantization_of, set_submodule
from .layer import SnellaAdapter, SnellaLinear, snella_layers

FORMAT_NAME = "snella"
FORMAT_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)

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
    return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


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


def read_snella_file(path: PathLike) -> SnellaFile:
    """Open and fully validate an adapter file without touching any model.

    Checked: the safetensors container, every header entry (``format``, ``format_version``,
    ``config`` with the type and range of each SnellaConfig field, ``shapes``), every key,
    each tensor's dtype, shape (against the config and ``shapes``), finiteness and range, and
    a bound on each layer's |ΔW| (``file_checks.delta_bound``).

    Raises:
        SnellaFormatError naming the file and the header entry or key at fault.
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
    for entry in ("config", "shapes"):
        if entry not in metadata:
            raise SnellaFormatError(f"{file}: header '{entry}' is missing (every SNELLA file has one)")
    try:
        config = SnellaConfig.from_json(metadata["config"])
    except SnellaConfigError as error:
        raise SnellaFormatError(f"{file}: header 'config': {error}") from error
    shapes = parse_shapes(file, metadata["shapes"])
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
        check_layer_tensors(file, layer_key, params, shape, config)
    return SnellaFile(file, config, metadata.get("base_model", ""), shapes, layers)


# Fields that decide an adapter's tensors and ΔW: a file loads into an existing adapter only if
# they agree (the schedule and speed settings may differ).
STRUCTURAL_FIELDS = ("rank", "num_heads", "kernel", "kernel_scale", "sparsify")


@dataclasses.dataclass
class LayerLoad:
    """One layer of a load plan: where it goes, what it receives and how.

    Attributes:
        component, path: the model (file component) and the module's qualified name.
        params: the file's tensors for this layer (``param name -> tensor``, CPU).
        module: the ``nn.Linear`` or ``SnellaLinear`` at ``path`` when the plan was made.
        overwrite: the module already holds the adapter (same structure): its tensors are
            overwritten in place and keep their ``requires_grad``; otherwise an adapter is
            added (a linear is wrapped in a new SnellaLinear).
    """

    component: str
    path: str
    params: dict[str, Tensor]
    module: nn.Module
    overwrite: bool


@dataclasses.dataclass
class LoadPlan:
    """What loading ``file`` as ``adapter_name`` into ``models`` changes, decided by
    ``plan_load`` after every check passed; nothing has changed yet."""

    file: SnellaFile
    adapter_name: str
    models: dict[str, nn.Module]
    layers: list[LayerLoad]

    def apply(self, trainable: bool = True) -> "AppliedLoad":
        """Make the planned changes; on any error undo them and re-raise.

        Args:
            trainable: True (``load_snella``, to resume training): like ``apply_snella``, a
                model receiving new adapters is frozen except for them. False (pipeline
                inference): every ``requires_grad`` flag stays as it was and the new
                adapters are frozen.
        Returns:
            The record of the changes, whose ``undo`` restores the models exactly.
        """
        applied = AppliedLoad(self, {p: p.requires_grad for m in self.models.values() for p in m.parameters()})
        try:
            for layer in self.layers:
                applied.load_layer(layer)
            applied.set_trainability(trainable)
        except BaseException:
            applied.undo()
            raise
        return applied


@dataclasses.dataclass
class AppliedLoad:
    """The changes ``LoadPlan.apply`` made, in order, so that ``undo`` reverts them.

    Attributes:
        plan: the plan applied.
        grad_flags: every parameter's ``requires_grad`` before the load.
        layers: ``{component: {path: SnellaLinear}}`` holding the loaded adapter.
        wrapped: ``(model, path, original linear)`` of each linear replaced by a SnellaLinear.
        added: the pre-existing SnellaLinear layers that received the adapter.
        overwritten: ``(adapter, its state before)`` of each adapter overwritten in place.
    """

    plan: LoadPlan
    grad_flags: dict[nn.Parameter, bool]
    layers: dict[str, dict[str, SnellaLinear]] = dataclasses.field(default_factory=dict)
    wrapped: list[tuple[nn.Module, str, nn.Module]] = dataclasses.field(default_factory=list)
    added: list[SnellaLinear] = dataclasses.field(default_factory=list)
    overwritten: list[tuple[SnellaAdapter, dict[str, Tensor]]] = dataclasses.field(default_factory=list)

    def load_layer(self, layer: LayerLoad) -> None:
        """Put the file's tensors for one layer into the model, recording the change first."""
        name = self.plan.adapter_name
        model = self.plan.models[layer.component]
        if layer.overwrite:
            adapter = layer.module.adapters[name]
            self.overwritten.append((adapter, {k: v.clone() for k, v in adapter.state_dict().items()}))
            target = layer.module
        else:
            config = _loaded_config(self.plan, layer.component)
            if isinstance(layer.module, SnellaLinear):
                layer.module.add_adapter(name, config)
                self.added.append(layer.module)
                target = layer.module
            else:
                target = SnellaLinear(layer.module, config, name)
                set_submodule(model, layer.path, target)
                self.wrapped.append((model, layer.path, layer.module))
        self.layers.setdefault(layer.component, {})[layer.path] = target
        copy_adapter_params(target.adapters[name], layer.params)

    def set_trainability(self, trainable: bool) -> None:
        """Set ``requires_grad`` after the layers are loaded (see ``LoadPlan.apply``)."""
        name = self.plan.adapter_name
        new = {layer.component for layer in self.plan.layers if not layer.overwrite}
        if not trainable:
            self.restore_grad_flags()
        for component in new:
            if trainable:
                self.plan.models[component].requires_grad_(False)
            for layer in self.layers.get(component, {}).values():
                layer.adapters[name].requires_grad_(trainable)

    def restore_grad_flags(self) -> None:
        for param, flag in self.grad_flags.items():
            param.requires_grad_(flag)

    def undo(self) -> None:
        """Restore the models as they were before ``apply``: wrapped linears back in place,
        added adapters deleted, overwritten adapters' tensors and every grad flag restored."""
        name = self.plan.adapter_name
        for model, path, original in reversed(self.wrapped):
            set_submodule(model, path, original)
        for layer in reversed(self.added):
            if name in layer.adapters:
                layer.delete_adapter(name)
        for adapter, state in reversed(self.overwritten):
            adapter.load_state_dict(state)
        self.restore_grad_flags()
        self.wrapped, self.added, self.overwritten, self.layers = [], [], [], {}


def _loaded_config(plan: LoadPlan, component: str) -> SnellaConfig:
    """The file's config with ``target_modules`` = the component's loaded layers."""
    paths = sorted(layer.path for layer in plan.layers if layer.component == component)
    return dataclasses.replace(plan.file.config, target_modules=paths, exclude_modules=[])


@torch.no_grad()
def copy_adapter_params(adapter: SnellaAdapter, params: dict[str, Tensor]) -> None:
    """Copy one layer's file tensors (validated by ``read_snella_file``) into ``adapter``:
    factors and scalars, sparsity with the exact drop count, and the stored τ."""
    for name in ("in_factors", "out_factors", "alpha", "gamma", "beta"):
        getattr(adapter, name).copy_(params[name])
    drop = int(params["drop_count"]) if "drop_count" in params else None
    adapter.set_sparsity(float(params["sparsity"]), drop_count=drop)
    adapter.record_threshold(params["threshold"].to(adapter.threshold.device, torch.float32))


def _enclosing_snella_layer(modules: dict[str, nn.Module], path: str) -> Optional[str]:
    """The SnellaLinear that ``path`` lies inside (its base layer or adapters), if any."""
    parts = path.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if isinstance(modules.get(prefix), SnellaLinear):
            return prefix
    return None


def _plan_component(snella_file: SnellaFile, component: str, model: nn.Module, adapter_name: str) -> list[LayerLoad]:
    """Check every layer of ``component`` against ``model``; the component's LayerLoads."""
    modules = dict(model.named_modules())
    for module_path in snella_file.layers[component]:
        key = f"{component}.{module_path}"
        where = f"{snella_file.path}: layer {key}"
        module = modules.get(module_path)
        if module is None:
            raise SnellaFormatError(f"{where} does not exist in {type(model).__name__} (adapter for another base?)")
        inside = _enclosing_snella_layer(modules, module_path)
        if inside is not None:
            raise SnellaFormatError(f"{where} lies inside the SNELLA layer {component}.{inside}, not on a base linear")
        if not isinstance(module, (nn.Linear, SnellaLinear)):
            raise SnellaFormatError(f"{where} is a {type(module).__name__}, not a linear layer")
        quantized = None if isinstance(module, SnellaLinear) else quantization_of(module)
        if quantized is not None:
            raise SnellaFormatError(f"{where} is a quantized linear, {quantized}: load the base unquantized")
        shape = [module.out_features, module.in_features]
        if shape != snella_file.shapes[key]:
            raise SnellaFormatError(
                f"{where} is {shape[0]}x{shape[1]} in the model but {snella_file.shapes[key]} in the "
                f"file: this adapter was trained on another base model ({snella_file.base_model or 'unknown'})"
            )
    layers = [
        LayerLoad(component, path, params, modules[path],
                  isinstance(modules[path], SnellaLinear) and adapter_name in modules[path].adapters)
        for path, params in snella_file.layers[component].items()
    ]
    _check_existing_adapters(snella_file, component, layers, adapter_name)
    return layers


def _check_existing_adapters(snella_file: SnellaFile, component: str, layers: list[LayerLoad], adapter_name: str) -> None:
    """A file loads into an adapter ``adapter_name`` that the model already holds (resuming
    training after ``apply_snella``) only if every layer of the file holds it, with the same
    structure; a model holding it on some layers only is refused."""
    holding = [layer for layer in layers if layer.overwrite]
    if not holding:
        return
    if len(holding) != len(layers):
        missing = next(layer.path for layer in layers if not layer.overwrite)
        raise SnellaFormatError(
            f"{snella_file.path}: layer {component}.{holding[0].path} already holds an adapter named "
            f"{adapter_name!r} but layer {component}.{missing} does not; load into a model where "
            "apply_snella adapted every layer of the file, or pass another adapter_name"
        )
    existing = holding[0].module.configs[adapter_name]
    for name in STRUCTURAL_FIELDS:
        if getattr(existing, name) != getattr(snella_file.config, name):
            raise SnellaFormatError(
                f"{snella_file.path}: config {name}={getattr(snella_file.config, name)!r} but the "
                f"existing adapter {adapter_name!r} on layer {component}.{holding[0].path} has "
                f"{name}={getattr(existing, name)!r}"
            )


def plan_load(snella_file: SnellaFile, models: dict[str, nn.Module], adapter_name: str) -> LoadPlan:
    """Check ``snella_file`` against ``models`` (``{component: model}``, each a component of
    the file) and plan the load, touching nothing. Works on ``meta``-device models.

    Raises:
        SnellaFormatError naming the file and the first layer at fault: a component the file
            lacks, a missing or non-linear module, a quantized linear, a shape mismatch, or an
            existing ``adapter_name`` held by some layers only or of another structure.
    """
    layers: list[LayerLoad] = []
    for component, model in models.items():
        if component not in snella_file.layers:
            raise SnellaFormatError(
                f"{snella_file.path}: no layers for component {component!r} (the file has {sorted(snella_file.layers)})"
            )
        layers += _plan_component(snella_file, component, model, adapter_name)
    return LoadPlan(snella_file, adapter_name, dict(models), layers)


def _pick_component(snella_file: SnellaFile, model: nn.Module, component: Optional[str]) -> str:
    available = sorted(snella_file.layers)
    if component is None:
        component = available[0] if len(available) == 1 else default_component(model)
    return component


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
    and stay trainable. Otherwise the model is frozen except for the new adapter (as
    ``apply_snella`` does). On any error the model is left exactly as it was (modules,
    weights and requires_grad flags).

    Returns:
        ``{module path: SnellaLinear}`` of the layers that received the adapter.
    """
    snella_file = snella_file or read_snella_file(path)
    component = _pick_component(snella_file, model, component)
    applied = plan_load(snella_file, {component: model}, adapter_name).apply(trainable=True)
    return applied.layers[component]

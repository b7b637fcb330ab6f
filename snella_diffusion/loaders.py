"""Put SNELLA adapters into diffusers pipelines: load, weight, fuse, unfuse, disable, unload.

The functions take any pipeline whose components are attributes named like the file's
components (``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``, ...);
``SnellaLoaderMixin`` offers them as pipeline methods. Several adapters may be resident at
once: each layer combines the active ones as Σ_k w_k·ΔW_k and, in no-grad inference, keeps
that sum cached until an adapter or a weight changes, so switching weights reads no file and
the denoising loop does not rebuild ΔW at every step.

Loading is all or nothing, one transaction over every component (``io.plan_load``): the
file is validated completely and checked against every component it names before any module
is touched, and a failure while applying undoes everything applied before it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from .errors import SnellaError, SnellaFormatError
from .fuse import DEFAULT_KEEP_ORIGINAL, KeepOriginal, check_fusable, fuse_layer, log_energy_kept
from .fuse import unfuse_snella as unfuse_model
from .hub import HubDownloadError, download_hub_file
from .inject import remove_snella
from .io import plan_load, read_snella_file
from .layer import SnellaLinear, snella_layers

DEFAULT_WEIGHT_NAME = "snella_weights.safetensors"
DEFAULT_ADAPTER_PREFIX = "default"
# A Hugging Face Hub repository id: "name" or "owner/name".
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

PathOrRepo = Union[str, os.PathLike]


def _components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's ``nn.Module`` components by attribute name (unet, text_encoder, ...)."""
    found = getattr(pipe, "components", None)
    if not isinstance(found, dict):
        found = {name: getattr(pipe, name, None) for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    return {name: module for name, module in found.items() if isinstance(module, nn.Module)}


def _pipeline_layers(pipe: Any) -> dict[str, SnellaLinear]:
    """Every SnellaLinear of the pipeline, keyed ``<component>.<module path>``."""
    return {
        f"{component}.{path}": layer
        for component, model in _components(pipe).items()
        for path, layer in snella_layers(model).items()
    }


def resolve_adapter_file(path_or_repo: PathOrRepo, weight_name: Optional[str] = None, **hub_kwargs: Any) -> Path:
    """Find the adapter file: a file path, a folder holding ``weight_name``, or a Hub repo id.

    A folder is searched for ``weight_name`` (default ``snella_weights.safetensors``). A string
    that is neither an existing path nor a ``.safetensors`` name but looks like ``owner/name``
    is downloaded with ``hub.download_hub_file`` (``revision``, ``subfolder``, ``cache_dir``,
    ``token``, ``local_files_only``, ``force_download``, ``proxies`` pass through).

    Raises:
        SnellaFormatError: the Hub download failed (offline, unknown repo or file); the
            message names the repo id and the file asked for.
    """
    name = weight_name or DEFAULT_WEIGHT_NAME
    candidate = Path(path_or_repo)
    if candidate.is_dir():
        return candidate / name
    text = str(path_or_repo)
    if candidate.exists() or text.endswith(".safetensors") or not HUB_REPO_ID.match(text):
        return candidate
    try:
        return download_hub_file(text, name, **hub_kwargs)
    except HubDownloadError as error:
        raise SnellaFormatError(
            f"{text}: not a local file or folder, and {error}; pass the path of a .safetensors "
            f"file or of a folder holding {name}"
        ) from error


def _new_adapter_name(pipe: Any) -> str:
    taken = {name for layer in _pipeline_layers(pipe).values() for name in layer.adapters}
    index = 0
    while f"{DEFAULT_ADAPTER_PREFIX}_{index}" in taken:
        index += 1
    return f"{DEFAULT_ADAPTER_PREFIX}_{index}"


def load_snella_weights(
    pipe: Any,
    path_or_dir: PathOrRepo,
    adapter_name: Optional[str] = None,
    weight_name: Optional[str] = None,
    **hub_kwargs: Any,
) -> str:
    """Load a SNELLA file into every pipeline component it holds layers for.

    The new adapter becomes active with weight 1.0 next to the adapters already active; its
    tensors are frozen (``requires_grad=False``) and the pipeline's own ``requires_grad``
    flags are left as they were. Use ``apply_snella`` + ``load_snella`` to resume training.

    Args:
        pipe: a diffusers pipeline (or any object with ``unet``/``transformer``/text encoders).
        path_or_dir: a ``.safetensors`` file, a folder holding ``weight_name``, or a Hub id.
        adapter_name: name of the new adapter; default ``default_<n>``, the first free one.
        weight_name: file name inside a folder or Hub repo (default
            ``snella_weights.safetensors``).
    Returns:
        The adapter name.
    Raises:
        SnellaFormatError: the file is missing, not safetensors, a LoRA/LyCORIS file, of an
            unknown version, has a header entry or config field of the wrong type or range,
            holds tensors of the wrong dtype or shape, non-finite values or factors whose ΔW
            could overflow, names a component the pipeline lacks or was trained on another
            base (the entry, key or first mismatching layer is named).
        SnellaError: ``adapter_name`` is already loaded. In every case the pipeline is left
            exactly as it was.
    """
    file = resolve_adapter_file(path_or_dir, weight_name, **hub_kwargs)
    snella_file = read_snella_file(file)
    components = _components(pipe)
    name = adapter_name if adapter_name is not None else _new_adapter_name(pipe)
    for key, layer in _pipeline_layers(pipe).items():
        if name in layer.adapters:
            raise SnellaError(
                f"{file}: adapter name {name!r} is already loaded (layer {key}); pass another "
                "adapter_name or unload it first"
            )
    for component, layers in snella_file.layers.items():
        if component not in components:
            first_key = f"{component}.{next(iter(layers))}"
            raise SnellaFormatError(
                f"{file}: key {first_key}: the pipeline ({type(pipe).__name__}) has no component "
                f"{component!r} (it has {sorted(components)})"
            )
    plan_load(snella_file, {c: components[c] for c in snella_file.layers}, name).apply(trainable=False)
    return name


def _as_list(names: Union[str, Sequence[str]]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _check_names(pipe: Any, names: Sequence[str], verb: str) -> None:
    resident = {name for layer in _pipeline_layers(pipe).values() for name in layer.adapters}
    for name in names:
        if name not in resident:
            raise SnellaError(f"cannot {verb} adapter {name!r}: not loaded (loaded: {sorted(resident)})")


def _fused_layer(pipe: Any) -> Optional[str]:
    return next((key for key, layer in _pipeline_layers(pipe).items() if layer.fused_adapters), None)


def set_snella_adapters(
    pipe: Any,
    names: Union[str, Sequence[str]],
    weights: Union[None, float, Sequence[float]] = None,
) -> None:
    """Activate ``names`` with per-adapter ``weights`` (default 1.0); others become inactive.

    Each layer then applies Σ_k w_k·ΔW_k over the named adapters it holds. Nothing is read
    from disk; the cost is one pass over the layers, independent of adapters deleted earlier.

    Raises:
        SnellaError: an unknown name, a weights list of another length, or a fused pipeline
            (unfuse first: the fused weights would no longer match).
    """
    names = _as_list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise SnellaError(f"weights has {len(weights)} entries for {len(names)} adapter names {names}")
    _check_names(pipe, names, "activate")
    fused = _fused_layer(pipe)
    if fused is not None:
        raise SnellaError(f"layer {fused} holds fused adapters: call unfuse_snella(pipe) before set_snella_adapters")
    for layer in _pipeline_layers(pipe).values():
        present = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
        layer.set_active([n for n, _ in present], [w for _, w in present])


def get_active_snella_adapters(pipe: Any) -> list[str]:
    """Names of the adapters active in at least one layer, in activation order."""
    active: list[str] = []
    for layer in _pipeline_layers(pipe).values():
        active.extend(name for name in layer.active_adapters if name not in active)
    return active


def get_snella_adapter_weights(pipe: Any) -> dict[str, float]:
    """``{name: weight}`` of the active adapters."""
    weights: dict[str, float] = {}
    for layer in _pipeline_layers(pipe).values():
        for name in layer.active_adapters:
            weights.setdefault(name, layer.adapter_weights[name])
    return weights


def fuse_snella(
    pipe: Any, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
    keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
) -> int:
    """Fuse scale·w_k·ΔW_k of the active (or named) adapters into the base weights.

    Fused inference runs the plain base layers (the base pipeline's speed). The pristine base
    weights are kept (``keep_original="cpu"``, the default: in host memory; ``"device"``:
    beside the weights) so ``unfuse_snella`` restores them bit for bit; ``False`` keeps
    nothing and ``unfuse_snella`` then raises ``UnfuseError``. Adapters already fused
    in a layer are skipped there (unfuse first to fuse at another scale), so fusing, loading
    another adapter and fusing again adds each ΔW once.

    Half-precision base weights round ΔW to their spacing: the fraction of ΔW energy kept
    is logged at INFO level (``fuse.fused_energy_kept(pipe.unet)`` returns it).

    Returns:
        The number of layers that fused at least one adapter.
    Raises:
        SnellaError: an unknown adapter name, adapters disabled with ``disable_snella``, or a
            layer over a quantized base weight (ΔW is never fused into packed weights).
    """
    if adapter_names is not None:
        adapter_names = _as_list(adapter_names)
        _check_names(pipe, adapter_names, "fuse")
    layers = _pipeline_layers(pipe)
    disabled = next((key for key, layer in layers.items() if layer.disabled), None)
    if disabled is not None:
        raise SnellaError(f"layer {disabled} is disabled: call enable_snella(pipe) before fuse_snella")
    check_fusable(layers)
    fused = 0
    for layer in layers.values():
        wanted = layer.active_adapters if adapter_names is None else adapter_names
        names = [n for n in wanted if n in layer.adapters and n not in layer.fused_adapters]
        if names:
            fuse_layer(layer, scale, names, keep_original)
            fused += 1
    log_energy_kept(layers.values())
    return fused


def unfuse_snella(pipe: Any) -> int:
    """Restore every fused base weight bit for bit; returns the number of layers restored."""
    return sum(unfuse_model(model) for model in _components(pipe).values())


def unload_snella_weights(pipe: Any, adapter_names: Union[None, str, Sequence[str]] = None) -> None:
    """Remove adapters (default: all); layers left without adapters get their linear back.

    Fused weights are restored bit for bit first, so the pipeline ends exactly as it was
    before loading. Nothing of a removed adapter is kept (tensors, weights, cache entries).
    """
    if adapter_names is not None:
        adapter_names = _as_list(adapter_names)
        _check_names(pipe, adapter_names, "unload")
    for model in _components(pipe).values():
        if adapter_names is None:
            remove_snella(model)
        else:
            for name in adapter_names:
                remove_snella(model, name)


def disable_snella(pipe: Any) -> None:
    """Run the base layers only; adapters stay loaded (``enable_snella`` turns them back on).

    Raises:
        SnellaError: the pipeline holds fused adapters (unfuse first).
    """
    fused = _fused_layer(pipe)
    if fused is not None:
        raise SnellaError(f"layer {fused} holds fused adapters: call unfuse_snella(pipe) before disable_snella")
    for layer in _pipeline_layers(pipe).values():
        layer.set_disabled(True)


def enable_snella(pipe: Any) -> None:
    """Undo ``disable_snella``."""
    for layer in _pipeline_layers(pipe).values():
        layer.set_disabled(False)


class SnellaLoaderMixin:
    """Pipeline methods for SNELLA adapters (mix into a ``DiffusionPipeline`` subclass)."""

    def load_snella_weights(
        self,
        path_or_dir: PathOrRepo,
        adapter_name: Optional[str] = None,
        weight_name: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> str:
        return load_snella_weights(self, path_or_dir, adapter_name, weight_name, **hub_kwargs)

    def set_snella_adapters(
        self, names: Union[str, Sequence[str]], weights: Union[None, float, Sequence[float]] = None
    ) -> None:
        set_snella_adapters(self, names, weights)

    def fuse_snella(
        self, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
        keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
    ) -> int:
        return fuse_snella(self, scale, adapter_names, keep_original)

    def unfuse_snella(self) -> int:
        return unfuse_snella(self)

    def unload_snella_weights(self, adapter_names: Union[None, str, Sequence[str]] = None) -> None:
        unload_snella_weights(self, adapter_names)

    def get_active_snella_adapters(self) -> list[str]:
        return get_active_snella_adapters(self)

    def get_snella_adapter_weights(self) -> dict[str, float]:
        return get_snella_adapter_weights(self)

    def disable_snella(self) -> None:
        disable_snella(self)

    def enable_snella(self) -> None:
        enable_snella(self)


for _name in (
    "load_snella_weights", "set_snella_adapters", "fuse_snella", "unfuse_snella",
    "unload_snella_weights", "get_active_snella_adapters", "get_snella_adapter_weights",
    "disable_snella", "enable_snella",
):
    getattr(SnellaLoaderMixin, _name).__doc__ = globals()[_name].__doc__
del _name

"""The base model an export is checked against: its family and its layer shapes.

A pipeline folder (or Hub id) is read from its configs only: every needed component is built
on the ``meta`` device, so no weight is loaded and checking an SDXL adapter costs no memory.
A pipeline object in memory is used as it is.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

import torch
from torch import nn

from ..errors import SnellaError
from ..hub import HubDownloadError, download_hub_file
from .families import ExportFamily, export_family

CONFIG_COMPONENTS = ("unet", "transformer", "transformer_2", "scheduler")


@dataclasses.dataclass
class BaseModel:
    """The base: where it came from, its family and its components (possibly on ``meta``)."""

    source: str
    pipeline_class: str
    family: ExportFamily
    components: dict[str, nn.Module]


def _config_file(source: str, relative: str) -> Path:
    local = Path(source) / relative
    if Path(source).is_dir():
        if not local.is_file():
            raise SnellaError(f"--base {source}: {relative} is missing (expected a diffusers pipeline folder)")
        return local
    try:
        return download_hub_file(source, relative)
    except HubDownloadError as error:
        raise SnellaError(f"--base {source}: not a local folder, and {error}") from error


def _read_json(source: str, relative: str) -> dict[str, Any]:
    path = _config_file(source, relative)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SnellaError(f"--base {source}: {relative} is not valid JSON ({error})") from error


def _skeleton(source: str, component: str, spec: Any) -> nn.Module:
    """Build one component from its config on the ``meta`` device (no weights read)."""
    if not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
        raise SnellaError(f"--base {source}: model_index.json has no loadable component {component!r}")
    library, class_name = spec
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as error:
        raise SnellaError(f"--base {source}: component {component!r} names {library}.{class_name}, "
                          f"which cannot be imported ({error})") from error
    if Path(source).is_dir():
        # transformers builds a default config when none exists: require the file.
        location, kwargs = str(_config_file(source, f"{component}/config.json").parent), {}
    else:
        location, kwargs = source, {"subfolder": component}
    if not (hasattr(cls, "load_config") or hasattr(cls, "config_class")):
        raise SnellaError(f"--base {source}: component {component!r} ({class_name}) is not a model")
    try:
        with torch.device("meta"):
            if hasattr(cls, "load_config"):
                return cls.from_config(cls.load_config(location, **kwargs))
            return cls(cls.config_class.from_pretrained(location, **kwargs))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SnellaError(f"--base {source}: the config of component {component!r} ({class_name}) "
                          f"cannot be read ({type(error).__name__}: {error})") from error


def _from_folder(source: str, needed: Iterable[str]) -> BaseModel:
    index = _read_json(source, "model_index.json")
    pipeline_class = index.get("_class_name", "")
    configs = {
        name: _read_json(source, f"{name}/config.json")
        for name in ("unet", "transformer", "transformer_2")
        if name in index and isinstance(index[name], (list, tuple)) and index[name][0] is not None
    }
    scheduler = Path(source) / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():  # only SD 2.x's name depends on it (v-prediction): optional
        configs["scheduler"] = _read_json(source, "scheduler/scheduler_config.json")
    family = export_family(pipeline_class, configs, f"--base {source}/model_index.json")
    components = {name: _skeleton(source, name, index[name]) for name in needed if name in index}
    return BaseModel(source, pipeline_class, family, components)


def _from_pipeline(pipe: Any, needed: Iterable[str]) -> BaseModel:
    found = getattr(pipe, "components", {}) or {}
    modules = {name: module for name, module in found.items() if isinstance(module, nn.Module)}
    configs = {name: dict(getattr(found.get(name), "config", {}) or {}) for name in CONFIG_COMPONENTS if name in found}
    pipeline_class = type(pipe).__name__
    family = export_family(pipeline_class, configs, f"--base {pipeline_class}")
    source = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or pipeline_class)
    return BaseModel(source, pipeline_class, family, {n: m for n, m in modules.items() if n in set(needed)})


def load_base(base: Union[str, os.PathLike, Any], needed: Iterable[str]) -> BaseModel:
    """The base model: a pipeline folder or Hub id (configs only), or a pipeline object.

    Args:
        base: folder with ``model_index.json``, a Hub id, or a diffusers pipeline.
        needed: the component names (``unet``, ``text_encoder``, ...) whose layers are checked.
    Raises:
        SnellaError: a missing or malformed ``model_index.json`` / config, or an unknown family.
    """
    needed = list(needed)
    if isinstance(base, (str, os.PathLike)):
        return _from_folder(str(base), needed)
    return _from_pipeline(base, needed)

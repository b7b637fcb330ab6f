"""Header metadata and atomic writes of the exported file and its energy report."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import SnellaError
from ..files import write_atomically, write_text_atomically
from .deltas import AdapterSource
from .families import ExportFamily

EXPORT_FORMATS = ("diff", "lora", "peft", "comfyui")
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NETWORK_MODULES = {"diff": "lycoris.kohya", "lora": "networks.lora", "peft": "networks.lora",
                   "comfyui": "snella_diffusion.comfyui"}


def energy_report_path(output: Path) -> Path:
    """The JSON beside ``output``: ``adapter.safetensors`` → ``adapter.energy.json``."""
    return output.with_name(f"{output.stem}.energy.json")


def check_outputs(output: Path, to: str, overwrite: bool) -> None:
    """Raises SnellaError if a file the export would write exists and ``overwrite`` is off."""
    paths = [output] + ([energy_report_path(output)] if to in ("lora", "peft") else [])
    for path in paths:
        if path.exists() and not overwrite:
            raise SnellaError(f"-o {output}: {path} exists; pass --overwrite to replace it")
    if output.suffix != ".safetensors":
        raise SnellaError(f"-o {output}: the output must be a .safetensors file")


def header_metadata(
    family: ExportFamily,
    to: str,
    adapters: list[AdapterSource],
    output: Path,
    adapter_weight: float,
    ranks: Optional[list[int]] = None,
    title: Optional[str] = None,
) -> dict[str, str]:
    """The string header the UIs read (kohya ``ss_*``, SAI ``modelspec.*``) plus the SNELLA
    provenance: every source file's config, SHA-256 and weight."""
    metadata = {
        "format": "pt",
        "ss_network_module": NETWORK_MODULES[to],
        "ss_base_model_version": family.base_model_version,
        "ss_output_name": output.stem,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.architecture}/{'lycoris' if to == 'diff' else 'lora'}",
        "modelspec.implementation": family.implementation,
        "modelspec.title": title or output.stem,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "snella_export_format": to,
        "snella_adapter_weight": repr(float(adapter_weight)),
        "snella_config": json.dumps([adapter.file.config.to_dict() for adapter in adapters]),
        "snella_sources": json.dumps([
            {"file": adapter.path.name, "sha256": adapter.sha256, "weight": adapter.weight,
             "base_model": adapter.file.base_model}
            for adapter in adapters
        ]),
    }
    if family.name in ("sd1", "sd2"):
        metadata["ss_v2"] = str(family.name == "sd2")
    if to == "diff":
        metadata["ss_network_args"] = json.dumps({"algo": "full"})
    elif ranks:
        uniform = len(set(ranks)) == 1
        metadata["ss_network_dim"] = str(ranks[0]) if uniform else "Dynamic"
        # kohya files carry one alpha (the largest rank); PEFT alphas follow each rank.
        metadata["ss_network_alpha"] = str(max(ranks)) if uniform or to == "lora" else "Dynamic"
    return metadata


def write_export(
    output: Path, tensors: dict[str, Tensor], metadata: dict[str, str], report: Optional[dict[str, Any]]
) -> None:
    """Write the safetensors file (and the energy JSON when ``report`` is given) atomically:
    each lands under its final name only once completely written."""
    if not tensors:
        raise SnellaError(f"-o {output}: nothing to write (every exported ΔW is zero)")
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    write_atomically(output, lambda path: save_file(contiguous, str(path), metadata=metadata))
    if report is not None:
        text = json.dumps(report, indent=2, sort_keys=True)
        write_text_atomically(energy_report_path(output), text + "\n")

"""``export_snella``: SNELLA files → a dense difference (``diff``), a kohya LoRA (``lora``) or a
diffusers/PEFT LoRA (``peft``) under the key names of the base model's family."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from .base import BaseModel, load_base
from .deltas import AdapterSource, adapted_layers, check_against_base, merged_delta, needed_components, read_adapters
from .families import ExportTarget, LayerKey, canonical_path
from .svd import LowRank, RankChoice, truncate
from .writer import EXPORT_DTYPES, EXPORT_FORMATS, check_outputs, energy_report_path, header_metadata, write_export

PathLike = Union[str, os.PathLike]
AdapterSpec = Union[PathLike, tuple[PathLike, float]]


@dataclasses.dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        output: the safetensors file.
        to: ``diff``, ``lora`` or ``peft``.
        family: the base's family (``sd1``, ``sdxl``, ``flux``, ...).
        tensors: number of tensors in the file.
        layers: for lora/peft, ``{name: {"rank", "energy", "norm", "residual_norm", "parts"}}``
            per factorised weight (energy: fraction of ‖ΔW‖²_F kept; norms: Frobenius).
        energy: for lora/peft, Σ kept / Σ ‖ΔW‖²_F over all layers.
        report_path: the energy JSON beside the file (lora/peft).
    """

    output: Path
    to: str
    family: str
    tensors: int
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    energy: Optional[float] = None
    report_path: Optional[Path] = None


def parse_adapter_spec(text: str) -> tuple[str, float]:
    """``"path.safetensors:0.7"`` → ``("path.safetensors", 0.7)``; no ``:w`` means weight 1."""
    head, separator, tail = text.rpartition(":")
    if separator and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _as_specs(adapters: Sequence[AdapterSpec]) -> list[tuple[PathLike, float]]:
    specs = []
    for item in adapters:
        if isinstance(item, tuple):
            specs.append((item[0], float(item[1])))
        else:
            specs.append(parse_adapter_spec(str(item)) if isinstance(item, str) else (item, 1.0))
    return specs


def _part_shape(base: BaseModel, sources: list[AdapterSource], layer: LayerKey) -> tuple[int, int]:
    component, path = layer
    key = f"{component}.{path}"
    for source in sources:
        if key in source.file.shapes:
            return tuple(int(d) for d in source.file.shapes[key])
    try:
        module = base.components[component].get_submodule(path)
    except (KeyError, AttributeError) as error:
        raise SnellaError(f"--base {base.source}: layer {key} (part of a fused weight) does not exist") from error
    if not isinstance(module, nn.Linear):
        raise SnellaError(f"--base {base.source}: layer {key} is a {type(module).__name__}, not a linear layer")
    return module.out_features, module.in_features


def _target_delta(base: BaseModel, sources: list[AdapterSource], target: ExportTarget,
                  adapted: set[LayerKey], scale: float) -> tuple[Tensor, list[tuple[LayerKey, int, int]]]:
    """The target's ΔW ``(Σ m_i, n)`` float32 (parts stacked by rows, unadapted parts zero)
    and each part's ``(layer, first row, rows)``."""
    blocks, rows, start = [], [], 0
    widths = set()
    for part in target.parts:
        out_features, in_features = _part_shape(base, sources, part)
        widths.add(in_features)
        if part in adapted:
            blocks.append(merged_delta(sources, part, scale))
        else:
            blocks.append(torch.zeros(out_features, in_features))
        rows.append((part, start, out_features))
        start += out_features
    if len(widths) > 1:
        raise SnellaError(f"{target.key}: its parts have different input widths {sorted(widths)}")
    return torch.cat(blocks, 0), rows


def _record(low: LowRank, parts: list[str]) -> dict[str, Any]:
    return {"rank": low.rank, "energy": low.energy, "norm": low.norm, "residual_norm": low.residual_norm,
            "parts": parts}


def _peft_metadata(ranks: dict[str, dict[str, int]]) -> str:
    """``lora_adapter_metadata``: a LoraConfig per component (``unet.r``, ``unet.rank_pattern``,
    ...) with alpha = rank in every module, so each layer applies exactly up @ down."""
    packed: dict[str, Any] = {}
    for component, module_ranks in ranks.items():
        common = collections.Counter(module_ranks.values()).most_common(1)[0][0]
        pattern = {path: rank for path, rank in module_ranks.items() if rank != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(module_ranks), "lora_dropout": 0.0, "bias": "none",
                  "use_dora": False, "use_rslora": False, "init_lora_weights": True}
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return json.dumps(packed, indent=2, sort_keys=True)


def _kohya_tensors(factors: dict[str, LowRank], dtype: torch.dtype) -> dict[str, Tensor]:
    """kohya ``lora_down`` / ``lora_up`` / ``alpha`` per key, each layer scaling by exactly 1.

    Loaders scale a layer by alpha / r. With one rank everywhere alpha = r. With ranks that
    differ (``--energy``), every layer gets the same alpha = the largest rank and its up
    factor absorbs r_i / alpha: diffusers turns per-layer alphas into an ``alpha_pattern``
    that misses the layers (measured: a 0.4 weight error), a single alpha it applies right.
    """
    alpha = max((low.rank for low in factors.values()), default=0)
    tensors: dict[str, Tensor] = {}
    for key, low in factors.items():
        if low.rank == 0:
            continue
        tensors[f"{key}.lora_down.weight"] = low.down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = (low.up * (low.rank / alpha)).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _metadata_path(path: str) -> str:
    """A module path that names the layer both in flattened (transformers 5) and wrapped CLIP
    text encoders: PEFT matches target names as suffixes."""
    return path.removeprefix("text_model.")


def export_snella(
    adapters: Sequence[AdapterSpec],
    base: Union[PathLike, Any],
    output: PathLike,
    to: str = "diff",
    dtype: str = "fp16",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    max_rank: Optional[int] = None,
    adapter_weight: float = 1.0,
    overwrite: bool = False,
    title: Optional[str] = None,
) -> ExportReport:
    """Export ``adapter_weight·Σ_k w_k·ΔW_k`` of SNELLA files for ComfyUI, Forge,
    AUTOMATIC1111 and diffusers.

    Args:
        adapters: SNELLA files, each a path, ``"path:w"`` or ``(path, w)``.
        base: the pipeline folder / Hub id the adapters were trained on, or a pipeline object.
        output: the ``.safetensors`` file to write.
        to: ``diff`` (ΔW per layer as ``<key>.diff``, exact up to ``dtype``), ``lora``
            (kohya ``lora_down``/``lora_up``/``alpha``) or ``peft`` (``<component>.<path>.lora_A``
            / ``lora_B`` with ``lora_adapter_metadata``).
        dtype: ``fp16``, ``bf16`` or ``fp32`` for the written tensors (ΔW and SVD in float32).
        rank, energy, max_rank: lora/peft rank: fixed, or the smallest keeping ``energy`` of
            ‖ΔW‖²_F (≤ ``max_rank``); ``energy=1.0`` is full rank.
        adapter_weight: a factor on the whole sum.
        overwrite: replace an existing output (and its energy JSON).
    Raises:
        SnellaError naming the flag, file or key at fault; flags and outputs are checked
        before any file is read, the adapters against the base before any ΔW is built.
    """
    output = Path(output)
    if to not in EXPORT_FORMATS:
        raise SnellaError(f"--to {to}: must be one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise SnellaError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    choice = RankChoice(rank, energy, max_rank)
    if to == "diff":
        if rank is not None or energy is not None or max_rank is not None:
            raise SnellaError("--rank / --energy / --max_rank apply to --to lora or peft, not diff")
    else:
        choice.validate()
    check_outputs(output, to, overwrite)

    sources = read_adapters(_as_specs(adapters))
    base_model = load_base(base, needed_components(sources))
    check_against_base(sources, base_model)
    layers = adapted_layers(sources)
    adapted = set(layers)

    def spelled(layer: LayerKey) -> str:
        return canonical_path(base_model.components[layer[0]], layer[1])

    targets = base_model.family.targets(layers, spelled)
    torch_dtype = EXPORT_DTYPES[dtype]
    tensors: dict[str, Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    peft_ranks: dict[str, dict[str, int]] = {}
    kohya_factors: dict[str, LowRank] = {}
    kept = total = 0.0
    for target in targets:
        delta, rows = _target_delta(base_model, sources, target, adapted, adapter_weight)
        if to == "diff":
            tensors[f"{target.key}.diff"] = delta.to(torch_dtype)
            continue
        low = truncate(delta, choice, target.key)
        total += low.norm ** 2
        kept += low.norm ** 2 - low.residual_norm ** 2
        part_names = [f"{c}.{spelled((c, p))}" for (c, p), _, _ in rows if (c, p) in adapted]
        name = target.key if to == "lora" or len(target.parts) > 1 else part_names[0]
        records[name] = _record(low, part_names)
        if low.rank == 0:
            continue
        if to == "lora":
            kohya_factors[target.key] = low
            continue
        for (component, path), start, count in rows:
            if (component, path) not in adapted:
                continue
            key = f"{component}.{spelled((component, path))}"
            tensors[f"{key}.lora_A.weight"] = low.down.to(torch_dtype)
            tensors[f"{key}.lora_B.weight"] = low.up[start:start + count].to(torch_dtype)
            peft_ranks.setdefault(component, {})[_metadata_path(spelled((component, path)))] = low.rank

    tensors.update(_kohya_tensors(kohya_factors, torch_dtype))
    ranks = [record["rank"] for record in records.values() if record["rank"] > 0]
    metadata = header_metadata(base_model.family, to, sources, output, adapter_weight, ranks, title)
    report = None
    overall = None
    if to != "diff":
        overall = kept / total if total > 0 else 1.0
        report = {
            "format": to, "rank": rank, "energy_target": energy, "max_rank": max_rank,
            "overall": {"energy": overall, "norm": total ** 0.5, "residual_norm": max(total - kept, 0.0) ** 0.5},
            "layers": records,
        }
        metadata["snella_energy"] = repr(overall)
        if to == "peft" and peft_ranks:
            metadata["lora_adapter_metadata"] = _peft_metadata(peft_ranks)
    write_export(output, tensors, metadata, report)
    return ExportReport(
        output, to, base_model.family.name, len(tensors), records, overall,
        energy_report_path(output) if report is not None else None,
    )

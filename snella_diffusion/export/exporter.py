"""``export_snella``: SNELLA files → a dense difference (``diff``), a kohya LoRA (``lora``) or a
diffusers/PEFT LoRA (``peft``) under the key names of the base model's family."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..combine import DEFAULT_COMBINE, DEFAULT_TIES_DENSITY, check_combine
from ..errors import SnellaError
from .base import BaseModel, load_base
from .comfyui import check_comfyui_flags, comfyui_metadata, comfyui_tensors
from .deltas import AdapterSource, adapted_layers, check_against_base, merged_delta, needed_components, read_adapters
from .families import ExportTarget, LayerKey, canonical_path, check_distinct_keys
from .svd import LowRank, RankChoice, truncate
from .writer import EXPORT_DTYPES, EXPORT_FORMATS, check_outputs, energy_report_path, header_metadata, write_export

PathLike = Union[str, os.PathLike]
AdapterSpec = Union[PathLike, tuple[PathLike, float]]


@dataclasses.dataclass
class ExportReport:
    """What an export wrote.

    Attributes:
        output: the safetensors file.
        to: ``diff``, ``lora``, ``peft`` or ``comfyui``.
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
                  adapted: set[LayerKey], scale: float, combine: str = DEFAULT_COMBINE,
                  ties_density: float = DEFAULT_TIES_DENSITY) -> tuple[Tensor, list[tuple[LayerKey, int, int]]]:
    """The target's ΔW ``(Σ m_i, n)`` float32 (parts stacked by rows, unadapted parts zero)
    and each part's ``(layer, first row, rows)``."""
    blocks, rows, start = [], [], 0
    widths = set()
    for part in target.parts:
        out_features, in_features = _part_shape(base, sources, part)
        widths.add(in_features)
        if part in adapted:
            blocks.append(merged_delta(sources, part, scale, combine, ties_density))
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


def _peft_metadata(factors: dict[tuple[str, str], tuple[Tensor, Tensor, int]]) -> str:
    """``lora_adapter_metadata``: a LoraConfig per component (``unet.r``, ``unet.rank_pattern``,
    ...) with alpha = rank in every module, so each layer applies exactly up @ down."""
    ranks: dict[str, dict[str, int]] = {}
    for (component, path), (_, _, rank) in factors.items():
        ranks.setdefault(component, {})[_metadata_path(path)] = rank
    packed: dict[str, Any] = {}
    for component, module_ranks in ranks.items():
        common = collections.Counter(module_ranks.values()).most_common(1)[0][0]
        pattern = {path: rank for path, rank in module_ranks.items() if rank != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(module_ranks), "lora_dropout": 0.0, "bias": "none",
                  "use_dora": False, "use_rslora": False, "init_lora_weights": True}
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return json.dumps(packed, indent=2, sort_keys=True)


def _kohya_tensors(factors: dict[str, LowRank], dtype: torch.dtype, lora_ab: bool = False) -> dict[str, Tensor]:
    """kohya ``lora_down`` / ``lora_up`` / ``alpha`` per key, each layer scaling by exactly 1;
    with ``lora_ab``, ``lora_A`` / ``lora_B`` and no alpha (loaders then scale by 1).

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
        if lora_ab:
            tensors[f"{key}.lora_A.weight"] = low.down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = low.up.to(dtype)
            continue
        tensors[f"{key}.lora_down.weight"] = low.down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = (low.up * (low.rank / alpha)).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _metadata_path(path: str) -> str:
    """A module path that names the layer both in flattened (transformers 5) and wrapped CLIP
    text encoders: PEFT matches target names as suffixes."""
    return path.removeprefix("text_model.")


def _check_flags(to: str, dtype: str, choice: RankChoice) -> None:
    """Raises SnellaError naming the flag at fault."""
    if to not in EXPORT_FORMATS:
        raise SnellaError(f"--to {to}: must be one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise SnellaError(f"--dtype {dtype}: must be one of {', '.join(EXPORT_DTYPES)}")
    if to != "diff":
        choice.validate()
    elif (choice.rank, choice.energy, choice.max_rank) != (None, None, None):
        raise SnellaError("--rank / --energy / --max_rank apply to --to lora or peft, not diff")


@dataclasses.dataclass
class _Factorised:
    """The truncated SVDs of an export: kohya factors by key, PEFT factors by
    ``(component, exported path)`` (a fused weight's parts share ``down`` and split ``up``
    by rows), the per-weight records and Σ kept / Σ total ‖ΔW‖²_F."""

    kohya: dict[str, LowRank] = dataclasses.field(default_factory=dict)
    peft: dict[tuple[str, str], tuple[Tensor, Tensor, int]] = dataclasses.field(default_factory=dict)
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    kept: float = 0.0
    total: float = 0.0


DeltaBuilder = Callable[[ExportTarget], tuple[Tensor, list[tuple[LayerKey, int, int]]]]


def _factorise(targets: list[ExportTarget], target_delta: DeltaBuilder, choice: RankChoice, to: str,
               adapted: set[LayerKey], spelled: Callable[[LayerKey], str]) -> _Factorised:
    """Truncate every target's ΔW; records are keyed by the kohya key (lora, fused weights) or
    by ``<component>.<path>`` (peft)."""
    result = _Factorised()
    for target in targets:
        delta, rows = target_delta(target)
        low = truncate(delta, choice, target.key)
        result.total += low.norm ** 2
        result.kept += low.norm ** 2 - low.residual_norm ** 2
        part_names = [f"{c}.{spelled((c, p))}" for (c, p), _, _ in rows if (c, p) in adapted]
        name = target.key if to == "lora" or len(target.parts) > 1 else part_names[0]
        result.records[name] = _record(low, part_names)
        if low.rank == 0:
            continue
        result.kohya[target.key] = low
        for (component, path), start, count in rows:
            if (component, path) in adapted:
                result.peft[(component, spelled((component, path)))] = (
                    low.down, low.up[start:start + count], low.rank)
    return result


def _peft_tensors(factors: dict[tuple[str, str], tuple[Tensor, Tensor, int]], dtype: torch.dtype) -> dict[str, Tensor]:
    """``<component>.<path>.lora_A.weight`` = down ``(r, n)``, ``lora_B.weight`` = up ``(m, r)``."""
    tensors: dict[str, Tensor] = {}
    for (component, path), (down, up, _) in factors.items():
        tensors[f"{component}.{path}.lora_A.weight"] = down.to(dtype)
        tensors[f"{component}.{path}.lora_B.weight"] = up.to(dtype)
    return tensors


def _combine_metadata(combine: str, ties_density: float) -> dict[str, str]:
    """Header entries naming a combine mode other than the plain sum (none for the sum)."""
    if combine == DEFAULT_COMBINE:
        return {}
    entries = {"snella_combine": combine}
    if combine == "ties":
        entries["snella_ties_density"] = repr(float(ties_density))
    return entries


def export_snella(
    adapters: Sequence[AdapterSpec],
    base: Union[PathLike, Any],
    output: PathLike,
    to: str = "diff",
    dtype: Optional[str] = None,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    max_rank: Optional[int] = None,
    adapter_weight: float = 1.0,
    overwrite: bool = False,
    title: Optional[str] = None,
    combine: str = DEFAULT_COMBINE,
    ties_density: float = DEFAULT_TIES_DENSITY,
    component: Optional[str] = None,
) -> ExportReport:
    """Export ``adapter_weight·Σ_k w_k·ΔW_k`` of SNELLA files for ComfyUI, Forge,
    AUTOMATIC1111 and diffusers.

    Args:
        adapters: SNELLA files, each a path, ``"path:w"`` or ``(path, w)``.
        base: the pipeline folder / Hub id the adapters were trained on, or a pipeline object.
        output: the ``.safetensors`` file to write.
        to: ``diff`` (ΔW per layer as ``<key>.diff``, exact up to ``dtype``), ``lora``
            (kohya ``lora_down``/``lora_up``/``alpha``) or ``peft`` (``<component>.<path>.lora_A``
            / ``lora_B`` with ``lora_adapter_metadata``) or ``comfyui`` (one file's SNELLA
            factors per layer under ComfyUI's names, for ``snella_diffusion.comfyui``).
        dtype: ``fp16`` (default), ``bf16`` or ``fp32`` for the written tensors (ΔW and SVD in
            float32); ``comfyui`` is always float32.
        rank, energy, max_rank: lora/peft rank: fixed, or the smallest keeping ``energy`` of
            ‖ΔW‖²_F (≤ ``max_rank``); ``energy=1.0`` is full rank.
        adapter_weight: a factor on the whole sum.
        overwrite: replace an existing output (and its energy JSON).
        combine, ties_density: how several files' ΔW combine per layer (``combine.py``:
            ``"sum"``, ``"ties"``, ``"no_offset"``), as ``set_snella_adapters`` does; a mode
            other than ``"sum"`` is written as ``snella_combine`` in the header and is not
            possible with ``to="comfyui"`` (which writes each file's factors).
        component: export only this pipeline component's layers (e.g. ``transformer_2``, Wan
            2.2 A14B's low-noise expert, which ComfyUI loads as a model of its own).
    Raises:
        SnellaError naming the flag, file or key at fault; flags and outputs are checked
        before any file is read, the adapters against the base before any ΔW is built.
    """
    output = Path(output)
    choice = RankChoice(rank, energy, max_rank)
    check_combine(combine, ties_density)
    if to == "comfyui" and combine != DEFAULT_COMBINE:
        raise SnellaError(f"--combine {combine}: the comfyui format writes each file's factors and "
                          "ComfyUI sums them; use --to diff/lora/peft for another combine mode")
    if to == "comfyui":
        check_comfyui_flags(dtype, (rank, energy, max_rank))
    else:
        dtype = dtype or "fp16"
        _check_flags(to, dtype, choice)
    check_outputs(output, to, overwrite)

    sources = read_adapters(_as_specs(adapters))
    components = needed_components(sources)
    if component is not None and component not in components:
        raise SnellaError(f"--component {component}: the adapters hold no layer of it "
                          f"(their components: {', '.join(components)})")
    base_model = load_base(base, components)
    check_against_base(sources, base_model)
    layers = [layer for layer in adapted_layers(sources) if component in (None, layer[0])]
    adapted = set(layers)

    def spelled(layer: LayerKey) -> str:
        return canonical_path(base_model.components[layer[0]], layer[1])

    def target_delta(target: ExportTarget) -> tuple[Tensor, list[tuple[LayerKey, int, int]]]:
        return _target_delta(base_model, sources, target, adapted, adapter_weight, combine, ties_density)

    if to == "comfyui":
        tensors, prefixes, zero = comfyui_tensors(sources, base_model, adapter_weight, spelled, layers)
        metadata = header_metadata(base_model.family, to, sources, output, adapter_weight, title=title)
        metadata.update(comfyui_metadata(prefixes, zero))
        write_export(output, tensors, metadata, None)
        return ExportReport(output, to, base_model.family.name, len(tensors))
    targets = base_model.family.targets(layers, spelled, peft=to == "peft")
    if to != "peft":
        check_distinct_keys(targets)
    torch_dtype = EXPORT_DTYPES[dtype]
    if to == "diff":
        tensors = {f"{t.key}.diff": target_delta(t)[0].to(torch_dtype) for t in targets}
        metadata = header_metadata(base_model.family, to, sources, output, adapter_weight, title=title)
        metadata.update(_combine_metadata(combine, ties_density))
        write_export(output, tensors, metadata, None)
        return ExportReport(output, to, base_model.family.name, len(tensors))

    factorised = _factorise(targets, target_delta, choice, to, adapted, spelled)
    if to == "lora":
        tensors = _kohya_tensors(factorised.kohya, torch_dtype, base_model.family.lora_ab)
    else:
        tensors = _peft_tensors(factorised.peft, torch_dtype)
    ranks = [record["rank"] for record in factorised.records.values() if record["rank"] > 0]
    metadata = header_metadata(base_model.family, to, sources, output, adapter_weight, ranks, title)
    overall = factorised.kept / factorised.total if factorised.total > 0 else 1.0
    report = {
        "format": to, "rank": rank, "energy_target": energy, "max_rank": max_rank,
        "overall": {"energy": overall, "norm": factorised.total ** 0.5,
                    "residual_norm": max(factorised.total - factorised.kept, 0.0) ** 0.5},
        "layers": factorised.records,
    }
    metadata["snella_energy"] = repr(overall)
    metadata.update(_combine_metadata(combine, ties_density))
    if to == "peft" and factorised.peft:
        metadata["lora_adapter_metadata"] = _peft_metadata(factorised.peft)
    write_export(output, tensors, metadata, report)
    return ExportReport(output, to, base_model.family.name, len(tensors), factorised.records, overall,
                        energy_report_path(output))

"""What the per-family export tests (``test_comfyui_family_keys.py``,
``test_export_new_families.py``) do the same way:

- :class:`ExportCase`: a family's tiny pipeline builder and the ComfyUI names of its layers,
  written by hand from ComfyUI's code in the test that builds it;
- :func:`adapt_layers`: SNELLA on exactly the listed layers with random factors, saved, and the
  reference ΔW of each layer (the weight ``fuse_snella`` writes minus the pristine one), kept
  with the pipeline's folder in an :class:`AdaptedPipeline`;
- :func:`expected_deltas`: ``{exported key: ΔW}``, fused weights stacked by rows;
- :func:`check_diff_export` / :func:`check_full_rank_lora_export`: ``snella-export --to diff`` /
  ``--to lora --energy 1`` keys equal to the expected names and values equal to ΔW.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from snella_diffusion import SnellaConfig, apply_snella, save_snella
from snella_diffusion.export import export_snella
from snella_diffusion.fuse import fuse_snella


@dataclasses.dataclass(frozen=True)
class ExportCase:
    """One family: its tiny pipeline, ``{diffusers layer: exported key}`` for the layers kept one
    to one, ``{exported key: diffusers layers in row order}`` for ComfyUI's fused weights, the
    header's ``(ss_base_model_version, modelspec.architecture)`` where the test checks it, and
    the ``--to comfyui`` prefix of each fused part where ComfyUI maps one (row slices)."""

    builder: Callable[[int], Any]
    single: dict[str, str]
    fused: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    header: tuple[str, str] = ("", "")
    comfyui_parts: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return sorted([*self.single, *(part for parts in self.fused.values() for part in parts)])


@dataclasses.dataclass(frozen=True)
class AdaptedPipeline:
    """A saved tiny pipeline (``folder``), a SNELLA file on listed layers (``adapter``) and the
    reference ΔW per ``(component, layer)`` (``deltas``)."""

    folder: Path
    adapter: Path
    deltas: dict[tuple[str, str], torch.Tensor]


def adapt_layers(pipe: Any, components: tuple[str, ...], layers: list[str], path: Path,
                 seed: int) -> tuple[Path, dict[tuple[str, str], torch.Tensor]]:
    """SNELLA (rank 4, init sparsity 0.4) on exactly ``layers`` of each of ``components``, its
    factors moved by N(0, 1) draws (``seed``), saved as ``path.safetensors``; then fused in memory.
    Returns the file and the float32 ΔW per ``(component, layer)``, each asserted non-zero."""
    generator = torch.Generator().manual_seed(seed)
    models, pristine = {}, {}
    for component in components:
        model = getattr(pipe, component)
        pristine[component] = {name: model.get_submodule(name).weight.detach().clone() for name in layers}
        adapted = apply_snella(model, SnellaConfig(rank=4, target_modules=[re.escape(name) + "$" for name in layers],
                                                   init_sparsity=0.4))
        assert sorted(adapted) == sorted(layers)
        with torch.no_grad():
            for layer in adapted.values():
                for factors in (layer.in_factors, layer.out_factors):
                    factors.add_(torch.randn(factors.shape, generator=generator))
        models[component] = model
    adapter = save_snella(models, path.with_suffix(".safetensors"), base_model="tiny")
    deltas = {}
    for component, model in models.items():
        fuse_snella(model)
        for name in layers:
            delta = model.get_submodule(name).base_layer.weight.detach() - pristine[component][name]
            assert delta.abs().max() > 1e-3, name
            deltas[(component, name)] = delta.float()
    return adapter, deltas


def expected_deltas(case: ExportCase, deltas: dict[tuple[str, str], torch.Tensor],
                    component: str = "transformer") -> dict[str, torch.Tensor]:
    """``{exported key: ΔW}``: one layer's, or the parts' stacked by rows for a fused weight."""
    expected = {key: deltas[(component, path)] for path, key in case.single.items()}
    expected.update({key: torch.cat([deltas[(component, p)] for p in parts]) for key, parts in case.fused.items()})
    return expected


def check_diff_export(adapter: Path, folder: Path, expected: dict[str, torch.Tensor],
                      output_dir: Path) -> dict[str, str]:
    """``--to diff`` (float32): exactly the expected keys, each ΔW within rtol 1e-5 / atol 1e-6.
    Returns the file's header."""
    output = output_dir / "diff.safetensors"
    export_snella([adapter], folder, output, to="diff", dtype="fp32")
    written = load_file(str(output))
    assert {key.removesuffix(".diff") for key in written} == set(expected)
    assert len(written) == len(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(written[f"{key}.diff"], delta, rtol=1e-5, atol=1e-6, msg=key)
    with safe_open(str(output), "pt") as handle:
        return handle.metadata()


def check_full_rank_lora_export(adapter: Path, folder: Path, expected: dict[str, torch.Tensor], output_dir: Path,
                                lora_ab: bool) -> Path:
    """``--to lora --energy 1`` (float32): the expected keys with kohya's ``lora_down`` /
    ``lora_up`` / ``alpha`` (or, ``lora_ab``, ``lora_A`` / ``lora_B`` and no alpha), and
    up·down·alpha/r within 1e-5 relative of each ΔW. Returns the file."""
    output = output_dir / "lora.safetensors"
    export_snella([adapter], folder, output, to="lora", dtype="fp32", energy=1.0)
    written = load_file(str(output))
    down_suffix, up_suffix = (".lora_A.weight", ".lora_B.weight") if lora_ab else (".lora_down.weight",
                                                                                   ".lora_up.weight")
    assert {key.removesuffix(down_suffix) for key in written if key.endswith(down_suffix)} == set(expected)
    assert len(written) == len(expected) * (2 if lora_ab else 3)
    for key, delta in expected.items():
        down, up = written[key + down_suffix], written[key + up_suffix]
        scale = 1.0 if lora_ab else written[f"{key}.alpha"].item() / down.shape[0]
        assert float((up @ down * scale - delta).norm() / delta.norm()) < 1e-5, key
    return output

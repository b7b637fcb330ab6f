"""``snella-export``: the command line of :func:`~snella_diffusion.export.export_snella`."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..combine import COMBINE_MODES, DEFAULT_COMBINE, DEFAULT_TIES_DENSITY
from ..errors import SnellaError
from .exporter import ExportReport, export_snella
from .writer import EXPORT_DTYPES, EXPORT_FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snella-export",
        description="Export SNELLA adapters as a dense difference (diff), a LoRA (lora: kohya names "
                    "for ComfyUI / Forge / AUTOMATIC1111; peft: diffusers names) or SNELLA factors for "
                    "ComfyUI's SNELLA node (comfyui) of the base's family.",
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER[:w]",
                        help="SNELLA .safetensors files; several are merged as Σ w_k·ΔW_k (w defaults to 1) "
                             "or by --combine")
    parser.add_argument("--base", required=True, metavar="PIPELINE_OR_FOLDER",
                        help="the diffusers pipeline folder (or Hub id) the adapters were trained on; "
                             "only its configs are read")
    parser.add_argument("--to", required=True, choices=EXPORT_FORMATS,
                        help="diff: exact ΔW per layer (large); lora: kohya LoRA by truncated SVD; "
                             "peft: the same factors under diffusers/PEFT names; comfyui: the SNELLA "
                             "factors for ComfyUI's Load LoRA node with the snella-comfyui node (exact, compact)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    parser.add_argument("--dtype", default=None, choices=list(EXPORT_DTYPES),
                        help="dtype of the written tensors (default fp16; comfyui: always fp32)")
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, default=None, help="lora/peft: the same rank for every layer")
    rank.add_argument("--energy", type=float, default=None,
                      help="lora/peft: per layer, the smallest rank keeping this fraction of ||ΔW||_F^2 "
                           "(1.0 = full rank)")
    parser.add_argument("--max_rank", type=int, default=None, help="with --energy: the largest rank allowed")
    parser.add_argument("--adapter_weight", type=float, default=1.0, help="a factor on the whole sum (default 1)")
    parser.add_argument("--combine", default=DEFAULT_COMBINE, choices=COMBINE_MODES,
                        help="how several adapters' ΔW merge per layer: sum (Σ w_k·ΔW_k, default); "
                             "no_offset (each ΔW_k minus its constant component mean(ΔW_k)·11ᵀ, then "
                             "the sum); ties (keep each w_k·ΔW_k's --ties_density largest entries, elect "
                             "each entry's sign by summed magnitude, average the agreeing entries)")
    parser.add_argument("--ties_density", type=float, default=DEFAULT_TIES_DENSITY,
                        help=f"with --combine ties: the fraction of entries kept per adapter "
                             f"(default {DEFAULT_TIES_DENSITY})")
    parser.add_argument("--component", default=None, metavar="NAME",
                        help="export only this pipeline component's layers, e.g. transformer or transformer_2 "
                             "(Wan 2.2 A14B's high- and low-noise experts are two models in ComfyUI: one file each)")
    parser.add_argument("--title", default=None, help="modelspec.title (default: the output's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def print_report(report: ExportReport) -> None:
    """Per-layer rank and energy, then the overall energy (lora/peft), or the tensor count."""
    for name, record in report.layers.items():
        print(f"{name}: rank {record['rank']}, energy {record['energy']:.6f}")
    if report.energy is not None:
        print(f"overall energy kept: {report.energy:.6f} over {len(report.layers)} layers "
              f"(report: {report.report_path})")
    print(f"wrote {report.output} ({report.to}, family {report.family}, {report.tensors} tensors)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = export_snella(
            args.adapters, args.base, args.output, to=args.to, dtype=args.dtype, rank=args.rank,
            energy=args.energy, max_rank=args.max_rank, adapter_weight=args.adapter_weight,
            overwrite=args.overwrite, title=args.title, combine=args.combine,
            ties_density=args.ties_density, component=args.component,
        )
    except SnellaError as error:
        print(f"snella-export: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


def cli() -> None:
    sys.exit(main())

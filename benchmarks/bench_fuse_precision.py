"""How much of a trained-size ΔW survives fusing SD1.5-shaped adapters into fp16 and bf16 weights.

For every linear layer SNELLA adapts in the SD1.5 UNet (the real config, ``reference_configs``,
160 layers), a float32 ``nn.Linear`` of that shape with random weights (PyTorch's default init,
which is what a freshly built diffusers UNet has, or W0 ~ N(0, 0.02²) with ``--w0 normal``)
gets an adapter (rank 32, sparsity 0.8). Its factors are scaled until the median non-zero
|ΔW| of the layer reaches each target size (1e-4, 3e-4, 1e-3: trained ΔW are in that range,
fresh ones near 1e-6). Then ``fuse_snella`` fuses it into the weight cast to fp16 and to bf16,
and the script prints, over all layers, the fraction of ΔW energy kept
(``fused_energy_kept``) and the fraction of non-zero ΔW entries that vanish
(fused weight == W0).

    python benchmarks/bench_fuse_precision.py [--w0 default|normal] [--sizes 1e-4 3e-4 1e-3] [--out FILE.md]

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from snella_diffusion import SnellaConfig, SnellaLinear, fuse_snella, unfuse_snella
from snella_diffusion.testing.benchmarking import target_module_names
from snella_diffusion.testing.reference_configs import build_reference_model

DELTA_SIZES = (1e-4, 3e-4, 1e-3)
DTYPES = (torch.float16, torch.bfloat16)
SPARSITY = 0.8


def layer_shapes() -> list[tuple[int, int]]:
    """(out_features, in_features) of the SD1.5 UNet linears the "unet" preset adapts."""
    unet = build_reference_model("sd15", device="meta")
    modules = dict(unet.named_modules())
    return [(modules[name].out_features, modules[name].in_features) for name in target_module_names(unet, "unet")]


def median_survivor(layer: SnellaLinear) -> float:
    delta = layer.delta_weight()
    return float(delta[delta != 0].abs().median())


def scale_to_size(layer: SnellaLinear, size: float, rounds: int = 4) -> float:
    """Scale the factors until the median non-zero |ΔW| is about ``size`` (ΔW grows like the
    square of the factors' scale once the distance term dominates); returns the median."""
    median = median_survivor(layer)
    for _ in range(rounds):
        step = math.sqrt(size / median)
        with torch.no_grad():
            layer.primary.in_factors.mul_(step)
            layer.primary.out_factors.mul_(step)
        median = median_survivor(layer)
    return median


def measure(size: float, w0_kind: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Energy kept and vanished-entry fraction per dtype, summed over the SD1.5 layers."""
    totals = {dtype: {"rounding": 0.0, "energy": 0.0, "vanished": 0, "nonzero": 0} for dtype in DTYPES}
    medians = []
    for index, (out_features, in_features) in enumerate(layer_shapes()):
        torch.manual_seed(seed + index)
        base = nn.Linear(in_features, out_features)
        if w0_kind == "normal":
            with torch.no_grad():
                base.weight.normal_(0.0, 0.02)
        pristine = base.weight.detach().clone()
        layer = SnellaLinear(base, SnellaConfig(rank=32, target_modules=["x"], init_sparsity=SPARSITY))
        layer.requires_grad_(False)
        medians.append(scale_to_size(layer, size))
        nonzero = layer.delta_weight() != 0
        for dtype in DTYPES:
            with torch.no_grad():
                layer.base_layer.weight.data = pristine.to(dtype)
            fuse_snella(layer)
            rounding, energy = layer.fused_delta_energy
            vanished = (layer.base_layer.weight == pristine.to(dtype)) & nonzero
            unfuse_snella(layer)
            totals[dtype]["rounding"] += rounding
            totals[dtype]["energy"] += energy
            totals[dtype]["vanished"] += int(vanished.sum())
            totals[dtype]["nonzero"] += int(nonzero.sum())
    results = {}
    for dtype, total in totals.items():
        results[str(dtype).removeprefix("torch.")] = {
            "energy_kept": 1.0 - total["rounding"] / total["energy"],
            "vanished": total["vanished"] / total["nonzero"],
        }
    results["median_delta"] = {"min": min(medians), "max": max(medians)}
    return results


def format_table(rows: dict[float, dict[str, dict[str, float]]], w0_kind: str) -> str:
    w0 = "PyTorch default init (U(±1/√n))" if w0_kind == "default" else "N(0, 0.02²)"
    lines = [
        f"SD1.5 UNet, 160 adapted linears, W0 {w0}, rank 32, sparsity {SPARSITY}",
        "",
        "| median non-zero ΔW magnitude | fp16: ΔW energy kept | fp16: entries lost | bf16: ΔW energy kept | bf16: entries lost |",
        "|---|---|---|---|---|",
    ]
    for size, result in rows.items():
        lines.append(
            f"| {size:.0e} | {100 * result['float16']['energy_kept']:.2f} % | {100 * result['float16']['vanished']:.1f} % "
            f"| {100 * result['bfloat16']['energy_kept']:.2f} % | {100 * result['bfloat16']['vanished']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--w0", choices=("default", "normal"), default="default",
                        help="base weights: PyTorch's default init, or N(0, 0.02²)")
    parser.add_argument("--sizes", nargs="+", type=float, default=list(DELTA_SIZES),
                        help="median non-zero |ΔW| targets (default 1e-4 3e-4 1e-3)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    rows = {size: measure(size, args.w0) for size in args.sizes}
    table = format_table(rows, args.w0)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()

"""Adapted layers of a target preset on the published configs, counted on the ``meta`` device
(nothing allocated): layer count, the weights those layers hold, the adapter's trainable
parameters at a rank, the whole denoiser's parameters and its bf16 size with the adapter.

    python benchmarks/count_adapted_layers.py                         # every DiT reference
    python benchmarks/count_adapted_layers.py --model qwen-image --rank 8 --json out.json
    python benchmarks/count_adapted_layers.py --video                 # the Wan transformers
    python benchmarks/count_adapted_layers.py --model hunyuan-video1.5  # HunyuanVideo 1.5
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.files import write_json_atomically
from snella_diffusion.testing.reference_configs import REFERENCE_CONFIGS, build_reference_model

DIT_MODELS = ("sd3", "flux", "qwen-image", "z-image", "flux2-klein", "chroma", "flux2", "krea2", "lumina2", "sana", "hidream")
VIDEO_MODELS = ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b")
GIB = 1024 ** 3


@dataclass(frozen=True)
class AdaptedCount:
    """One model's counts; sizes in GiB of bf16 (2 bytes per parameter, float32 adapter)."""

    model: str
    preset: str
    rank: int
    adapted_layers: int
    adapted_weights: int
    adapter_parameters: int
    denoiser_parameters: int
    base_bf16_gib: float
    adapter_fp32_gib: float


def count_adapted(model: str, preset: str = "dit", rank: int = 8) -> AdaptedCount:
    """Build ``model`` on ``meta``, apply SNELLA with ``preset`` at ``rank`` and count."""
    denoiser = build_reference_model(model, device="meta")
    base_parameters = sum(parameter.numel() for parameter in denoiser.parameters())
    layers = apply_snella(denoiser, SnellaConfig(rank=rank, target_modules=preset))
    adapted_weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    adapter_parameters = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    return AdaptedCount(
        model=model, preset=preset, rank=rank, adapted_layers=len(layers), adapted_weights=adapted_weights,
        adapter_parameters=adapter_parameters, denoiser_parameters=base_parameters,
        base_bf16_gib=round(2 * base_parameters / GIB, 2), adapter_fp32_gib=round(4 * adapter_parameters / GIB, 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(REFERENCE_CONFIGS), action="append",
                        help="Reference model(s) to count (default: the DiTs, or the video models with --video).")
    parser.add_argument("--video", action="store_true", help="Count the video transformers (Wan) instead of the DiTs.")
    parser.add_argument("--preset", default="dit")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="Also write the counts here.")
    args = parser.parse_args(argv)
    counts = [count_adapted(model, args.preset, args.rank) for model in args.model or (VIDEO_MODELS if args.video else DIT_MODELS)]
    print("| model | adapted layers | adapted weights | adapter params (rank {}) | denoiser params | bf16 base GiB |".format(args.rank))
    print("|---|---:|---:|---:|---:|---:|")
    for count in counts:
        print(f"| {count.model} | {count.adapted_layers} | {count.adapted_weights / 1e9:.2f} G | "
              f"{count.adapter_parameters / 1e6:.1f} M | {count.denoiser_parameters / 1e9:.2f} G | {count.base_bf16_gib} |")
    if args.json is not None:
        write_json_atomically(args.json, [asdict(count) for count in counts])
    return 0


if __name__ == "__main__":
    sys.exit(main())

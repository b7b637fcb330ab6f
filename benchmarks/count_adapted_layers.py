"""Adapted layers of a target preset on the published configs, counted on the ``meta`` device
(nothing allocated): layer count, the weights those layers hold, the adapter's trainable
parameters at a rank, the whole denoiser's parameters and its bf16 size with the adapter.

    python benchmarks/count_adapted_layers.py                         # every DiT reference
    python benchmarks/count_adapted_layers.py --model qwen-image --rank 8 --json out.json
    python benchmarks/count_adapted_layers.py --video                 # the Wan transformers
    python benchmarks/count_adapted_layers.py --model ltx2            # LTX-2 (video and audio streams)
    python benchmarks/count_adapted_layers.py --model hunyuan-video1.5  # HunyuanVideo 1.5
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from snella_diffusion.files import write_json_atomically
from snella_diffusion.testing.adapted_counts import count_adapted
from snella_diffusion.testing.reference_configs import REFERENCE_CONFIGS

DIT_MODELS = ("sd3", "flux", "qwen-image", "z-image", "flux2-klein", "chroma", "flux2", "krea2", "lumina2", "sana", "hidream", "ideogram4", "qwen-image-2.1")
VIDEO_MODELS = ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b")


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

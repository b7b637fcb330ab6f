"""Memory of a second copy of the adapted weights, by parameter accounting on ``meta``.

That copy is what ``fuse_snella(keep_original="device")`` keeps beside the weights and what
the unfused inference ΔW cache holds (one ``(m, n)`` matrix per adapted layer in the base
dtype). The published denoiser configs are built on the ``meta`` device (nothing allocated)
and the default preset's targets are counted.

    python benchmarks/bench_fuse_memory.py   # writes benchmarks/results/fuse_memory.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

from snella_diffusion import SnellaConfig
from snella_diffusion.inject import find_target_linears
from snella_diffusion.testing.reference_configs import build_reference_model

MODELS = {"sd15": "unet", "sdxl": "unet", "flux": "dit"}
LABELS = {"sd15": "SD 1.5 UNet", "sdxl": "SDXL UNet", "flux": "Flux.1-dev transformer"}
RESULTS = Path(__file__).resolve().parent / "results"


def adapted_weight_bytes(model: str) -> dict[str, int]:
    """Adapted layers, their weight entries Σ m·n, and those entries' bytes in bf16/fp16 and
    float32, for the default preset of ``model`` (``sd15``, ``sdxl``, ``flux``)."""
    network = build_reference_model(model, device="meta")
    targets = find_target_linears(network, SnellaConfig(rank=32, target_modules=MODELS[model]))
    entries = sum(layer.out_features * layer.in_features for layer in targets.values())
    return {"layers": len(targets), "entries": entries, "bf16_bytes": 2 * entries, "fp32_bytes": 4 * entries}


def render_markdown(sizes: dict[str, dict[str, int]]) -> str:
    lines = [
        "| model (preset) | adapted layers | adapted entries | copy in bf16/fp16 | copy in float32 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for model, size in sizes.items():
        lines.append(
            f"| {LABELS[model]} (`{MODELS[model]}`) | {size['layers']} | {size['entries'] / 1e9:.3f} G | "
            f"{size['bf16_bytes'] / 1e9:.2f} GB | {size['fp32_bytes'] / 1e9:.2f} GB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    sizes = {model: adapted_weight_bytes(model) for model in MODELS}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuse_memory.json").write_text(json.dumps(sizes, indent=2) + "\n")
    table = render_markdown(sizes)
    (RESULTS / "fuse_memory.md").write_text(
        "# Memory of one more copy of the adapted weights (parameter accounting on meta)\n\n" + table
    )
    print(table, end="")


if __name__ == "__main__":
    main()

"""Training memory of the Wan transformers by accounting (no GPU run): bf16 weights, the SNELLA
adapter with its gradient and AdamW moments in float32, and activations with gradient
checkpointing, for frames × resolution.

    python benchmarks/wan_memory.py                 # the table of docs/video.md
    python benchmarks/wan_memory.py --rank 16 --json wan-memory.json

Accounting (an estimate, stated so it can be checked; no allocator overhead, no CUDA context):

- tokens T = ((F - 1)/4 + 1) · (H / (s·2)) · (W / (s·2)): latent frames × patches, VAE spatial
  factor s (8 for Wan 2.1/A14B, 16 for TI2V-5B), patches 2×2;
- weights: parameters × 2 bytes (bf16), counted on the published config on ``meta``;
- adapter: SNELLA trainable parameters at ``--rank`` × 16 bytes (float32 value, gradient, Adam m, v);
- activations with ``--gradient_checkpointing``: every block's input kept, L·T·d·2 bytes, plus
  one block recomputed in backward, T·(14·d + 2·f)·2 bytes (norms, q/k/v/out of both attentions,
  modulations, the GELU MLP's input, hidden and output; attention itself through SDPA without
  the T² matrix).

The UMT5-XXL encoder (5.7 B parameters, 10.6 GiB bf16) is freed after the prompts are cached
(the default) and the VAE encodes once with ``--cache_latents``: neither is counted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from snella_diffusion.files import write_json_atomically
from snella_diffusion.testing.adapted_counts import GIB, count_adapted
from snella_diffusion.testing.reference_configs import REFERENCE_CONFIGS
# model -> (VAE spatial factor, [(frames, height, width)])
SHAPES = {
    "wan2.1-14b": (8, [(17, 480, 832), (33, 480, 832), (49, 480, 832), (81, 480, 832), (33, 720, 1280),
                       (81, 720, 1280)]),
    "wan2.2-5b": (16, [(33, 704, 1280), (49, 704, 1280), (81, 704, 1280), (121, 704, 1280), (121, 480, 832)]),
}


@dataclass(frozen=True)
class MemoryRow:
    """One model × clip shape; sizes in GiB."""

    model: str
    frames: int
    height: int
    width: int
    tokens: int
    weights_gib: float
    adapter_gib: float
    activations_gib: float
    total_gib: float


def tokens_of(frames: int, height: int, width: int, spatial_factor: int) -> int:
    """Transformer tokens of one clip: latent frames × (H/(s·2)) × (W/(s·2))."""
    return ((frames - 1) // 4 + 1) * (height // (spatial_factor * 2)) * (width // (spatial_factor * 2))


def memory_rows(model: str, rank: int = 32) -> list[MemoryRow]:
    """The accounting above for every clip shape of ``model`` in :data:`SHAPES`."""
    config = REFERENCE_CONFIGS[model]
    counted = count_adapted(model, "dit", rank)
    parameters, adapter = counted.denoiser_parameters, counted.adapter_parameters
    width = config["num_attention_heads"] * config["attention_head_dim"]
    blocks, ffn = config["num_layers"], config["ffn_dim"]
    spatial, shapes = SHAPES[model]
    rows = []
    for frames, height, width_px in shapes:
        tokens = tokens_of(frames, height, width_px, spatial)
        activations = (blocks * tokens * width + tokens * (14 * width + 2 * ffn)) * 2 / GIB
        weights, adapter_gib = 2 * parameters / GIB, 16 * adapter / GIB
        rows.append(MemoryRow(model, frames, height, width_px, tokens, round(weights, 1), round(adapter_gib, 2),
                              round(activations, 1), round(weights + adapter_gib + activations, 1)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32, help="SNELLA rank (the training script's default: 32).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args(argv)
    rows = [row for model in SHAPES for row in memory_rows(model, args.rank)]
    print("| model | frames × H × W | tokens | weights (bf16) | adapter + AdamW | activations (checkpointed) | total GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.model} | {row.frames} × {row.height} × {row.width} | {row.tokens} | {row.weights_gib} | "
              f"{row.adapter_gib} | {row.activations_gib} | **{row.total_gib}** |")
    if args.json is not None:
        write_json_atomically(args.json, [asdict(row) for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())

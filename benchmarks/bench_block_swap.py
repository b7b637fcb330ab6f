"""Step-time overhead of ``--blocks_to_swap``: one SNELLA training step (forward, backward, AdamW)
of a Flux transformer with N of its blocks swapped, against the same step with none.

Each configuration runs in a fresh Python process and the processes alternate (none, swapped,
none, swapped, ...), so drift of a shared machine hits both alike; the table gives each
configuration's median step time and its ratio to no swapping. On the CPU a block's "visit" is a
copy within host memory, so the ratio is the cost of the copies and the hooks; on CUDA it is the
host-to-device traffic left after the side-stream overlap.

    python benchmarks/bench_block_swap.py --swap 4 --rounds 3   # writes benchmarks/results/block_swap_<device>[_checkpointed].md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# A Flux.1-dev-shaped transformer narrowed to run on a CPU: 2 double- and 4 single-stream blocks
# of 4 heads of 64 (width 256), 256 image tokens (a 256 px image) and 64 text tokens.
BENCH_FLUX = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
              "joint_attention_dim": 256, "pooled_projection_dim": 768, "axes_dims_rope": [8, 28, 28]}
TINY_FLUX = {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swap", type=int, default=4, help="blocks swapped in the swapped configuration")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process pairs (none, swapped)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one untimed)")
    parser.add_argument("--image_tokens", type=int, default=256)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (torch.set_num_threads)")
    parser.add_argument("--tiny", action="store_true", help="a 3-block model of width 32 (tests)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def time_steps(args: argparse.Namespace, swap: int) -> list[float]:
    """Seconds of each timed training step with ``swap`` blocks swapped (0: none)."""
    from snella_diffusion import SnellaConfig, apply_snella
    from snella_diffusion.block_swap import BlockSwap
    from snella_diffusion.families import FAMILIES
    from snella_diffusion.testing.reference_configs import build_reference_model

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TINY_FLUX if args.tiny else BENCH_FLUX
    model = build_reference_model("flux", device="cpu", **config)
    apply_snella(model, SnellaConfig(rank=8, target_modules=["dit"]))
    blocks = FAMILIES["flux"].swappable_blocks(model)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    if swap:
        BlockSwap(model, blocks, swap, device).attach()
    tokens, text_tokens = args.image_tokens, 64
    side = int(tokens ** 0.5)
    inputs = {
        "hidden_states": torch.randn(1, tokens, 64, device=device),
        "encoder_hidden_states": torch.randn(1, text_tokens, config["joint_attention_dim"], device=device),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device=device),
        "timestep": torch.tensor([0.5], device=device), "guidance": torch.tensor([3.5], device=device),
        "img_ids": torch.stack([torch.zeros(tokens), torch.arange(tokens) // side, torch.arange(tokens) % side], 1).to(device),
        "txt_ids": torch.zeros(text_tokens, 3, device=device),
    }
    target = torch.randn(1, tokens, 64, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = (model(**inputs).sample - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - started)
    return times


def run_worker(args: argparse.Namespace, swap: int) -> list[float]:
    """``time_steps`` in a fresh Python process."""
    flags = [sys.executable, __file__, "--worker", str(swap), "--steps", str(args.steps), "--device", args.device,
             "--image_tokens", str(args.image_tokens), "--threads", str(args.threads)]
    flags += ["--gradient_checkpointing"] * args.gradient_checkpointing + ["--tiny"] * args.tiny
    done = subprocess.run(flags, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker with {swap} swapped blocks failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render_table(times: dict[int, list[float]], args: argparse.Namespace) -> str:
    baseline = statistics.median(times[0])
    lines = [f"Flux-shaped transformer ({'tiny' if args.tiny else 'width 256, 2 + 4 blocks'}), "
             f"{args.image_tokens} image tokens, {args.device} ({args.threads} thread(s)), gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}; {args.rounds} fresh-process rounds × {args.steps} steps",
             "", "| blocks swapped | median step (s) | ratio to none |", "| ---: | ---: | ---: |"]
    for swap, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {swap} | {median:.4f} | {median / baseline:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(time_steps(args, args.worker)))
        return {}
    times: dict[int, list[float]] = {0: [], args.swap: []}
    for _ in range(args.rounds):
        for swap in times:
            times[swap].extend(run_worker(args, swap))
    table = render_table(times, args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from snella_diffusion.files import write_text_atomically

    suffix = "_checkpointed" if args.gradient_checkpointing else ""
    write_text_atomically(args.output_dir / f"block_swap_{torch.device(args.device).type}{suffix}.md", table)
    print(table, end="")
    return {"times": times, "table": table}


if __name__ == "__main__":
    main()

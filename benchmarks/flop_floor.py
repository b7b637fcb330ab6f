"""The lowest step-time ratio any exact SNELLA can reach against LoRA, from matrix FLOPs alone.

Both methods run the frozen model's forward and its input-gradient backward; with gradient
checkpointing the forward runs twice. On top of that, every SNELLA layer needs the dense
gradient of its merged weight, ∂L/∂(W0+ΔW) = gᵀx (an m×n result of inner size = tokens): the
kernel's factor gradients depend on every entry of it through the distances, so it is one
more GEMM per layer of the cost of that layer's forward GEMM. LoRA's factor gradients are
rank-r products (negligible). So, counting matrix-multiply and convolution FLOPs only,

    floor = (k·F + B + E) / (k·F + B)      k = 2 with gradient checkpointing, else 1

with F the forward FLOPs, B the backward FLOPs of the frozen model (input gradients only),
E = Σ over adapted linears of 2·tokens·m·n. Everything SNELLA does besides (building M, τ,
the kernel's backward) comes on top of this floor, so a target below it cannot be met by any
exact implementation, and the gap between the floor and the target is the whole budget for
that elementwise work.

The model is built on the meta device (no memory, no time); FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode``.

    python benchmarks/flop_floor.py --model sd15 --resolution 512 --gradient_checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snella_diffusion.testing.benchmarking import (  # noqa: E402
    MODEL_SPECS,
    build_benchmark_model,
    make_training_batch,
    target_module_names,
)


def flop_floor(model: nn.Module, inputs: dict[str, Any], target: torch.Tensor, adapted: Sequence[str],
               recompute_forward: bool) -> dict[str, float]:
    """FLOP counts (forward, backward, SNELLA's extra weight-gradient GEMMs) of one step of
    ``model`` on ``inputs`` (already on the model's device) and the floor ratio.

    Returns a dict with ``forward_flops``, ``backward_flops``, ``extra_flops`` (E),
    ``adapted_entries`` (Σ m·n) and ``floor`` (dimensionless, ≥ 1).
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    first = next(key for key in ("sample", "hidden_states") if key in inputs)
    inputs = {**inputs, first: inputs[first].detach().requires_grad_(True)}
    modules = dict(model.named_modules())
    tokens: dict[str, int] = {}
    hooks = [modules[name].register_forward_hook(
        lambda module, args, output, name=name: tokens.__setitem__(name, args[0].numel() // args[0].shape[-1]))
        for name in adapted]
    try:
        with FlopCounterMode(display=False) as forward_counter:
            output = model(**inputs)[0]
        with FlopCounterMode(display=False) as backward_counter:
            ((output.float() - target.float()) ** 2).mean().backward()
    finally:
        for hook in hooks:
            hook.remove()
    forward, backward = float(forward_counter.get_total_flops()), float(backward_counter.get_total_flops())
    extra = float(sum(2 * tokens[name] * modules[name].in_features * modules[name].out_features for name in adapted))
    passes = 2 if recompute_forward else 1
    return {
        "forward_flops": forward,
        "backward_flops": backward,
        "extra_flops": extra,
        "adapted_entries": float(sum(modules[name].in_features * modules[name].out_features for name in adapted)),
        "floor": (passes * forward + backward + extra) / (passes * forward + backward),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_SPECS), default="sd15")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: /8)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="count the forward twice (the checkpoint recompute)")
    parser.add_argument("--output", type=Path, default=None, help="also write the numbers as JSON here")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    args = parse_args(argv)
    model = build_benchmark_model(args.model, device="meta")
    batch = make_training_batch(model, args.model, args.batch_size, args.resolution, torch.Generator().manual_seed(0))
    inputs = {key: value.to("meta") if torch.is_tensor(value) else value for key, value in batch.model_inputs.items()}
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"] = {key: value.to("meta") for key, value in inputs["added_cond_kwargs"].items()}
    adapted = target_module_names(model, MODEL_SPECS[args.model].target_preset)
    numbers = flop_floor(model, inputs, batch.target.to("meta"), adapted, args.gradient_checkpointing)
    numbers.update(model=args.model, resolution=args.resolution, batch_size=args.batch_size,
                   gradient_checkpointing=args.gradient_checkpointing, adapted_layers=len(adapted))
    print(f"{args.model} {args.resolution}px batch {args.batch_size}, {len(adapted)} adapted linears "
          f"({numbers['adapted_entries'] / 1e6:.1f} M weight entries), "
          f"{'with' if args.gradient_checkpointing else 'without'} gradient checkpointing")
    print("| forward | backward (input grads) | SNELLA's extra gᵀx | floor: SNELLA / LoRA step |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {numbers['forward_flops'] / 1e12:.3f} TFLOP | {numbers['backward_flops'] / 1e12:.3f} TFLOP | "
          f"{numbers['extra_flops'] / 1e12:.3f} TFLOP | {numbers['floor']:.3f}× |")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers


if __name__ == "__main__":
    main()

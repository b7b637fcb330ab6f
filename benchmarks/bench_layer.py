"""One adapted linear layer, forward + backward: SNELLA (merged, parallel) vs PEFT LoRA of the
same rank vs the frozen layer alone.

Each method runs in a fresh subprocess so its peak memory is its own: on CPU the increase of
peak RSS over the process's peak after building the layer and its input, on CUDA
``torch.cuda.max_memory_allocated`` above the memory held then (all steps included). Times are medians over ``--repeats`` after ``--warmup``.

    python benchmarks/bench_layer.py                       # 1280x5120 and 15360x3072, 4096 tokens
    python benchmarks/bench_layer.py --shapes 1280x5120 --tokens 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("frozen", "lora", "snella-merged", "snella-parallel")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(method: str, in_features: int, out_features: int, tokens: int, rank: int,
            repeats: int, warmup: int, device: str, sample_size: int) -> dict:
    """Time forward+backward of one layer with ``method``; returns times (s) and peak memory (MB)."""
    import torch
    from torch import nn

    from snella_diffusion import SnellaConfig, apply_snella
    from snella_diffusion.baselines import apply_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).to(device)
    if method == "frozen":
        model.requires_grad_(False)
    elif method == "lora":
        apply_lora(model, ["0"], rank=rank)
    else:
        mode = method.split("-")[1]
        config = SnellaConfig(rank=rank, target_modules=["0"], init_sparsity=0.5,
                              forward_mode=mode, threshold_sample_size=sample_size)
        apply_snella(model, config)
    x = torch.randn(tokens, in_features, device=device, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6) if params else None

    def step() -> None:
        output = model(x)
        output.square().mean().backward()
        if optimizer is not None:
            optimizer.step()  # new parameter versions: τ is selected again, as in training
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    # Memory is measured from here, so the first step (allocator warm-up, optimizer state)
    # counts too: the high-water mark of later steps alone would hide what they reuse.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated() / 2**20
    else:
        base_memory = _peak_rss_mb()
    step()
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_memory
    else:
        peak = _peak_rss_mb() - base_memory
    return {"method": method, "median_s": statistics.median(times), "peak_mb": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1280x5120", "15360x3072"],
                        help="in_features x out_features of the layer(s) (default: SD1.5 FF and Flux proj_out)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--threshold_sample_size", type=int, default=0,
                        help="SnellaConfig.threshold_sample_size (0 = exact kthvalue)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape = args.shapes[0]
        in_features, out_features = (int(v) for v in shape.split("x"))
        result = run_one(args.child, in_features, out_features, args.tokens, args.rank,
                         args.repeats, args.warmup, args.device, args.threshold_sample_size)
        print("RESULT " + json.dumps(result))
        return [result]

    rows = []
    for shape in args.shapes:
        results = {}
        for method in args.methods:
            command = [sys.executable, __file__, "--child", method, "--shapes", shape,
                       "--tokens", str(args.tokens), "--rank", str(args.rank),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                       "--device", args.device, "--threshold_sample_size", str(args.threshold_sample_size)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            line = next(l for l in output.splitlines() if l.startswith("RESULT "))
            results[method] = json.loads(line[len("RESULT "):])
        lora = results.get("lora")
        print(f"\nlayer {shape} (in x out), {args.tokens} tokens, rank {args.rank}, device {args.device}, "
              f"threshold_sample_size {args.threshold_sample_size}")
        print(f"{'method':<17}{'median s':>10}{'peak MB':>10}{'time/LoRA':>11}{'mem/LoRA':>10}")
        for method, result in results.items():
            time_ratio = result["median_s"] / lora["median_s"] if lora else float("nan")
            memory_ratio = result["peak_mb"] / lora["peak_mb"] if lora and lora["peak_mb"] > 0 else float("nan")
            print(f"{method:<17}{result['median_s']:>10.3f}{result['peak_mb']:>10.0f}"
                  f"{time_ratio:>11.2f}{memory_ratio:>10.2f}")
            rows.append({"shape": shape, **result, "time_vs_lora": time_ratio, "memory_vs_lora": memory_ratio})
    return rows


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

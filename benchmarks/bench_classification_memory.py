"""Peak training memory on ViT-B/16 (random weights, 224 px, batch 8, CPU): full, masked_sparse, lora, snella.

Each method runs in a fresh Python process (so its peak resident set size is its own): build
the ViT-B/16 config with random weights, set the method up, and take two AdamW training steps
(the second one holds the optimizer state, gradients and activations at once). The reported
memory is the peak RSS minus the RSS right after the imports, i.e. weights + gradients +
optimizer state + activations + method state, the quantity the paper's GPU numbers measure.
Printed as ratios to masked_sparse (the paper's GPS) and to LoRA-8.

Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless set already): glibc then serves every
large tensor from its own mapping and returns it on free, so peak RSS follows the live tensors
instead of heap fragmentation (without it, runs of the same method differ by hundreds of MB).

Paper (MB, batch 8, ViT-B/16): GPS 2428, SNELL-32 1673 (0.69× of GPS), LoRA-8 1546 (SNELL-32 is
1.08× of LoRA-8).

    python benchmarks/bench_classification_memory.py [--steps 2] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("masked_sparse", "lora", "snella", "full")
PAPER_MB = {"masked_sparse": 2428, "snella": 1673, "lora": 1546}


def _rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        pages = int(stream.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, batch_size: int, steps: int, image_size: int) -> dict:
    """One method's training steps in this process; returns memory and time figures."""
    import torch

    from snella_diffusion import SnellaConfig, apply_snella
    from snella_diffusion.allocator import BiLevelAllocator
    from snella_diffusion.baselines import GradientMaskedSparse, apply_lora
    from snella_diffusion.testing.reference_configs import build_reference_model

    after_imports = _rss_mb()
    torch.manual_seed(0)
    model = build_reference_model("vit-b16", device="cpu", image_size=image_size)
    model.train()
    pixels = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, model.config.num_labels, (batch_size,))

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)

    allocator = None
    if method == "full":
        params = list(model.parameters())
    elif method == "lora":
        apply_lora(model, "vit", rank=8)
        model.classifier.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "snella":
        config = SnellaConfig(rank=32, target_modules="vit", init_sparsity=0.3, target_sparsity=0.3)
        layers = apply_snella(model, config)
        model.classifier.requires_grad_(True)
        allocator = BiLevelAllocator(layers, config, total_steps=steps)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        masked = GradientMaskedSparse(model, "vit", density=0.1)
        model.classifier.requires_grad_(True)
        masked.calibrate(loss, num_batches=1)
        params = [*masked.optimizer_param_groups(), {"params": list(model.classifier.parameters())}]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step_times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss().backward()
        optimizer.step()
        if allocator is not None:
            allocator.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - started)
    return {
        "method": method,
        "peak_mb": _peak_rss_mb() - after_imports,
        "peak_rss_mb": _peak_rss_mb(),
        "after_imports_mb": after_imports,
        "seconds_per_step": min(step_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.steps, args.image_size)))
        return

    worker_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method, "--batch_size", str(args.batch_size),
                   "--steps", str(args.steps), "--image_size", str(args.image_size)]
        completed = subprocess.run(command, capture_output=True, text=True, env=worker_env)
        if completed.returncode:
            sys.exit(f"{method} worker failed:\n{completed.stderr[-2000:]}")
        results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{method:>14}: {results[method]['peak_mb']:8.0f} MB over imports "
              f"(peak RSS {results[method]['peak_rss_mb']:.0f} MB), "
              f"{results[method]['seconds_per_step']:.2f} s/step", flush=True)

    print(f"\nViT-B/16, {args.image_size} px, batch {args.batch_size}, CPU, peak RSS over imports:")
    print("| method | MB | × masked_sparse | × lora | paper MB | paper × GPS | paper × LoRA-8 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, result in results.items():
        ratios = [
            f"{result['peak_mb'] / results[base]['peak_mb']:.2f}" if base in results else "—"
            for base in ("masked_sparse", "lora")
        ]
        paper = PAPER_MB.get(method)
        paper_cells = (
            [str(paper), f"{paper / PAPER_MB['masked_sparse']:.2f}", f"{paper / PAPER_MB['lora']:.2f}"]
            if paper else ["—", "—", "—"]
        )
        print(f"| {method} | {result['peak_mb']:.0f} | {ratios[0]} | {ratios[1]} | " + " | ".join(paper_cells) + " |")


if __name__ == "__main__":
    main()

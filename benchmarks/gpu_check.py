"""One command that checks SNELLA on a CUDA GPU and prints one table (under 5 minutes on an H200).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.md]

Rows:
1. kernels: one trained-size SD1.5-shaped layer (1280 × 5120, rank 32, sparsity 0.5) on CUDA
   in float32, the blocked path with its default blocks and with small blocks (many blocks
   per matrix), against a float64 whole-matrix reference on the same device with the
   same surviving entries: relative error of ΔW, of the adapter's output contribution and of
   the factor and scalar gradients.
2. precision: a tiny SD-style UNet trained 20 steps with frozen weights in float32, bf16
   and fp16 (autocast, float32 factors, as ``accelerate --mixed_precision`` does): the
   final loss of each half-precision run against float32's, measured against how far training
   moved float32's loss.
3. step: the SD1.5 UNet (real config, random weights) at 512 px, batch 1, bf16: median step
   time and ``torch.cuda.max_memory_allocated`` of SNELLA-32,
   PEFT LoRA-32 on the same layers, the frozen model (forward and backward to the input, no
   trainable weights), and SNELLA with xformers attention when xformers is installed.

On a machine without CUDA it exits at once with status 2. A failed check exits with status 1
after printing the whole table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

NO_CUDA_STATUS = 2


def require_cuda() -> None:
    """Exit with status 2 and a one-line reason unless a CUDA device is usable."""
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        sys.stderr.write(
            f"gpu_check: needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with {built}). Run it on a CUDA machine.\n"
        )
        raise SystemExit(NO_CUDA_STATUS)


# The package is imported after the CUDA check so that a machine without CUDA fails at once.
def _snella():
    import snella_diffusion

    return snella_diffusion


@dataclass
class Row:
    """One line of the table; ``passed`` is None for measurements without a pass mark."""

    check: str
    setting: str
    value: str
    limit: str = ""
    passed: Optional[bool] = None


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual − expected|| / ||expected|| in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


# 1. kernels ----------------------------------------------------------------------------------

KERNEL_SHAPE = (1280, 5120)  # (out, in) of SD1.5's mid-level ff.net.2
KERNEL_TOLERANCE = {"delta": 1e-4, "output": 1e-4, "gradients": 1e-3}
SMALL_BLOCK_ENTRIES = 1 << 16


def trained_size_layer(out_features: int, in_features: int, device: str, seed: int = 0,
                       factor_scale: float = 3.0):
    """A float32 SnellaLinear with W0 ~ N(0, 0.02²) and factors scaled to a trained-size ΔW."""
    snella = _snella()
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
        base.bias.copy_(torch.randn(out_features, generator=generator) * 0.02)
    torch.manual_seed(seed)
    config = snella.SnellaConfig(rank=32, target_modules=["x"], init_sparsity=0.5)
    layer = snella.SnellaLinear(base, config).to(device)
    with torch.no_grad():
        layer.primary.in_factors.mul_(factor_scale)
        layer.primary.out_factors.mul_(factor_scale)
    return layer


PARAM_NAMES = ("in_factors", "out_factors", "alpha", "gamma", "beta")


def float64_reference(layer, x: torch.Tensor, grad_output: torch.Tensor, survivors: torch.Tensor):
    """ΔW, x·ΔWᵀ and the parameter gradients of ⟨y, g⟩ in float64 through the whole-matrix
    kernel with autograd, keeping the entries in ``survivors`` (ΔW = M·|M| there, 0 elsewhere)."""
    from snella_diffusion.kernels import kernel_matrix
    from snella_diffusion.adapter import GAMMA_FLOOR

    adapter = layer.primary
    if adapter.sparsify_mode != "official":
        raise ValueError("the reference implements sparsify='official'")
    params = [getattr(adapter, name).detach().double().requires_grad_(True) for name in PARAM_NAMES]
    in_factors, out_factors, alpha, gamma, beta = params
    merged = kernel_matrix(adapter.kernel, in_factors, out_factors, alpha, gamma.clamp_min(GAMMA_FLOOR), beta,
                           adapter.kernel_scale)[0]
    delta = merged * merged.abs().detach() * survivors
    x64 = x.double()
    contribution = x64 @ delta.T
    weight = layer.base_layer.weight.double()
    output = F.linear(x64, weight, layer.base_layer.bias.double()) + contribution
    grads = torch.autograd.grad((output * grad_output.double()).sum(), params)
    return delta.detach(), contribution.detach(), dict(zip(PARAM_NAMES, grads))


def _gradient_error(ours: dict, reference: dict) -> tuple[float, str]:
    errors = {name: relative_error(ours[name], reference[name]) for name in PARAM_NAMES}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def kernel_rows(device: str, shape: tuple[int, int] = KERNEL_SHAPE, batch: int = 64) -> list[Row]:
    """The blocked kernels (default and small blocks) on ``device`` vs float64."""
    from snella_diffusion.blocked import Factors, backward_blocked, effective_blocked

    rows = []
    generator = torch.Generator().manual_seed(1)
    out_features, in_features = shape
    x = torch.randn(batch, in_features, generator=generator).to(device)
    grad_output = torch.randn(batch, out_features, generator=generator).to(device)
    for variant in ("eager blocked", "blocked, 64 Ki-entry blocks"):
        layer = trained_size_layer(out_features, in_features, device)
        adapter = layer.primary
        delta = layer.delta_weight().detach()
        survivors = (delta != 0).double()
        reference_delta, reference_contribution, reference_grads = float64_reference(layer, x, grad_output, survivors)
        if variant == "blocked, 64 Ki-entry blocks":
            factors = Factors(*(t.detach() for t in adapter.factors().tensors())).in_compute_dtype()
            threshold = adapter.refresh_threshold()
            delta = effective_blocked(adapter.spec, factors, threshold, 1.0, None, torch.float32,
                                      block_entries=SMALL_BLOCK_ENTRIES)
            contribution = x @ delta.T
            grads, _ = backward_blocked(adapter.spec, factors, threshold, 1.0, grad_output.T @ x, None, None,
                                        block_entries=SMALL_BLOCK_ENTRIES)
            ours = {name: getattr(grads, name) for name in PARAM_NAMES}
        else:
            output = layer(x)
            (output * grad_output).sum().backward()
            contribution = output.detach() - layer.base_layer(x).detach()
            ours = {name: getattr(adapter, name).grad for name in PARAM_NAMES}
        gradient_error, worst = _gradient_error(ours, reference_grads)
        measured = {
            "delta": relative_error(delta, reference_delta),
            "output": relative_error(contribution, reference_contribution),
            "gradients": gradient_error,
        }
        passed = all(measured[key] < KERNEL_TOLERANCE[key] for key in measured)
        rows.append(Row(
            "kernels vs float64", f"{variant}, {out_features}×{in_features}, {device}",
            f"ΔW {measured['delta']:.1e}, x·ΔWᵀ {measured['output']:.1e}, grads {gradient_error:.1e} ({worst})",
            f"< {KERNEL_TOLERANCE['delta']:.0e} / {KERNEL_TOLERANCE['output']:.0e} / {KERNEL_TOLERANCE['gradients']:.0e}",
            passed,
        ))
    return rows


# 2. precision --------------------------------------------------------------------------------

PRECISION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECISION_LIMIT = 0.25  # |L_half − L_float32| after training < 0.25 × (L_float32 at start − after)


def train_tiny(device: str, dtype: torch.dtype, steps: int = 20, learning_rate: float = 1e-2,
               seed: int = 0) -> tuple[float, float]:
    """(loss before, loss after ``steps`` AdamW steps) of SNELLA on the tiny UNet with frozen
    weights in ``dtype`` and autocast to ``dtype`` (float32 factors); the loss is on a fixed
    set of 4 batches, evaluated the same way as it trains."""
    snella = _snella()
    from snella_diffusion.testing.benchmarking import build_benchmark_model, diffusion_loss, make_training_batch

    model = build_benchmark_model("tiny", "cpu", torch.float32, seed).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    snella.apply_snella(model, snella.SnellaConfig(rank=8, target_modules="unet", init_sparsity=0.5))
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [make_training_batch(model, "tiny", 2, 64, generator, dtype, device) for _ in range(4)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in trainable):
        raise RuntimeError(f"{dtype}: trainable parameters are not float32")
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def mean_loss() -> float:
        with torch.no_grad(), autocast:
            return statistics.fmean(float(diffusion_loss(model, batch)) for batch in batches)

    before = mean_loss()
    for step in range(steps):
        with autocast:
            loss = diffusion_loss(model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, mean_loss()


def precision_rows(device: str, steps: int = 20) -> list[Row]:
    losses = {dtype: train_tiny(device, dtype, steps) for dtype in PRECISION_DTYPES}
    start, end = losses[torch.float32]
    moved = start - end
    rows = [Row("precision", f"tiny UNet, {steps} steps, float32", f"loss {start:.4f} → {end:.4f}",
                "loss falls", moved > 0)]
    for dtype in PRECISION_DTYPES[1:]:
        half_start, half_end = losses[dtype]
        gap = abs(half_end - end)
        rows.append(Row(
            "precision", f"tiny UNet, {steps} steps, {str(dtype).removeprefix('torch.')} vs float32",
            f"loss {half_start:.4f} → {half_end:.4f}, gap to float32 {gap:.4f} = {gap / max(moved, 1e-12):.2f} × fall",
            f"< {PRECISION_LIMIT} × fall", moved > 0 and gap < PRECISION_LIMIT * moved,
        ))
    return rows


# 3. step time and memory -------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_bytes(device: str) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else None


def time_steps(step: Callable[[], None], device: str, warmup: int, repeats: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, median seconds of the timed steps)."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _synchronize(device)
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return warmup_seconds, statistics.median(times)


def _method_setup(model: str, method: str, resolution: int, device: str, snella_options: dict,
                  xformers: bool):
    from snella_diffusion.testing.benchmarking import BenchmarkSettings, build_training_setup

    settings = BenchmarkSettings(model=model, method=method, resolution=resolution, dtype="bfloat16",
                                 device=device, snella_options=snella_options)
    setup = build_training_setup(settings)
    if xformers:
        setup.model.enable_xformers_memory_efficient_attention()
    return setup


def _frozen_step(model: str, resolution: int, device: str) -> Callable[[], None]:
    """Forward and backward of the frozen bf16 model to its input latents (no weights train)."""
    from snella_diffusion.testing.benchmarking import build_benchmark_model, diffusion_loss, make_training_batch

    network = build_benchmark_model(model, device, torch.bfloat16)
    network.requires_grad_(False)
    network.train()
    generator = torch.Generator().manual_seed(1)

    def step() -> None:
        batch = make_training_batch(network, model, 1, resolution, generator, torch.bfloat16, device)
        batch.model_inputs["sample"].requires_grad_(True)
        diffusion_loss(network, batch).backward()

    return step


def xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def step_rows(device: str, model: str = "sd15", resolution: int = 512, warmup: int = 2,
              repeats: int = 5) -> list[Row]:
    """Step time and peak memory per method, each measured from a freshly built model."""
    from snella_diffusion.testing.benchmarking import training_step

    variants: list[tuple[str, Optional[str], dict, bool]] = [
        ("frozen model", None, {}, False),
        ("PEFT LoRA-32", "lora", {}, False),
        ("SNELLA-32 eager", "snella", {}, False),
    ]
    if xformers_installed():
        variants.append(("SNELLA-32 eager, xformers", "snella", {}, True))
    measured = []
    for label, method, options, xformers in variants:
        _release(device)
        if method is None:
            step = _frozen_step(model, resolution, device)
        else:
            setup = _method_setup(model, method, resolution, device, options, xformers)
            step = lambda setup=setup: training_step(setup)  # noqa: E731
        warmup_seconds, seconds = time_steps(step, device, warmup, repeats)
        measured.append((label, seconds, _peak_bytes(device), warmup_seconds))
        del step
        setup = None
    lora = next(entry for entry in measured if entry[0] == "PEFT LoRA-32")
    rows = []
    for label, seconds, peak, warmup_seconds in measured:
        memory = "n/a (not CUDA)" if peak is None else f"{peak / 2**30:.2f} GiB"
        ratio = "" if lora[2] is None or peak is None else f", {seconds / lora[1]:.2f}× / {peak / lora[2]:.2f}× LoRA"
        rows.append(Row("step", f"{model} {resolution} px bf16 batch 1: {label}",
                        f"{1000 * seconds:.0f} ms, {memory}{ratio}", f"warm-up {warmup_seconds:.1f} s"))
    if not xformers_installed():
        rows.append(Row("step", f"{model} {resolution} px: xformers attention", "not installed"))
    return rows


# table ----------------------------------------------------------------------------------------

def format_table(rows: list[Row], header: str) -> str:
    marks = {True: "pass", False: "FAIL", None: ""}
    lines = [header, "", "| check | setting | measured | limit / note | result |", "|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.setting} | {r.value} | {r.limit} | {marks[r.passed]} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    require_cuda()
    device = "cuda"
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 means float32 in the kernel check
    start = time.perf_counter()
    rows = kernel_rows(device) + precision_rows(device) + step_rows(device)
    name = torch.cuda.get_device_name()
    header = (f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}: "
              f"{time.perf_counter() - start:.0f} s")
    table = format_table(rows, header)
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 1 if any(row.passed is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a SNELLA training step spends its time: per-phase seconds of the adapted layers.

Builds the same model and method as ``bench_train_step.py`` (``benchmarking.build_training_setup``),
wraps the layer's phases with wall-clock timers and prints, per timed step, the seconds spent in
each phase summed over all adapted layers, and their share of the step:

- ``build M (τ unknown)``: ``merged_blocked`` in the first forward after an optimizer step;
- ``select τ``: the threshold selection (``SnellaAdapter.select_threshold_on``);
- ``W0+ΔW from M``: ``effective_blocked`` reading a built M;
- ``W0+ΔW from factors``: ``effective_blocked`` rebuilding M (recompute, or τ already known);
- ``backward pass``: ``backward_blocked`` (M again, factor gradients, W0+ΔW for ∂L/∂x);
- ``layer forward``/``layer backward``: the whole autograd function (GEMMs included).

    python benchmarks/profile_train_step.py --model sd15 --resolution 512 --gradient_checkpointing
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from snella_diffusion import adapter, autograd
from snella_diffusion.testing.benchmarking import MODEL_SPECS, BenchmarkSettings, build_training_setup, training_step

PHASES = ("build M (τ unknown)", "select τ", "W0+ΔW from M", "W0+ΔW from factors", "backward pass",
          "layer forward", "layer backward")


class PhaseClock:
    """Seconds per phase, accumulated until ``reset``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(clock: PhaseClock) -> Callable[[], None]:
    """Wrap the autograd module's phase functions with ``clock``; returns the function that puts
    the originals back."""
    function = autograd._SnellaLinearFunction
    originals = [(autograd, name, getattr(autograd, name))
                 for name in ("merged_blocked", "effective_blocked", "backward_blocked")]
    originals += [(adapter.SnellaAdapter, "select_threshold_on", adapter.SnellaAdapter.select_threshold_on)]
    originals += [(function, name, function.__dict__[name]) for name in ("forward", "backward")]

    def restore() -> None:
        for owner, name, original in originals:
            setattr(owner, name, original)

    def wrapped(function: Callable, name: Callable[[dict[str, Any]], str]) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.timing(name(kwargs)):
                return function(*args, **kwargs)
        return timed

    autograd.merged_blocked = wrapped(autograd.merged_blocked, lambda kw: "build M (τ unknown)")
    autograd.effective_blocked = wrapped(
        autograd.effective_blocked, lambda kw: "W0+ΔW from M" if kw.get("merged") is not None else "W0+ΔW from factors")
    autograd.backward_blocked = wrapped(autograd.backward_blocked, lambda kw: "backward pass")
    select = adapter.SnellaAdapter.select_threshold_on
    adapter.SnellaAdapter.select_threshold_on = (
        lambda self, *a, **kw: _timed_call(clock, "select τ", select, self, *a, **kw))
    forward, backward = function.forward, function.backward
    function.forward = staticmethod(lambda ctx, *a: _timed_call(clock, "layer forward", forward, ctx, *a))
    function.backward = staticmethod(lambda ctx, *a: _timed_call(clock, "layer backward", backward, ctx, *a))
    return restore


def _timed_call(clock: PhaseClock, phase: str, function: Callable, *args: Any, **kwargs: Any) -> Any:
    with clock.timing(phase):
        return function(*args, **kwargs)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_SPECS), default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--snella_option", action="append", default=[], metavar="KEY=JSON")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Profile and print the table; returns the median seconds per phase (and ``step``)."""
    import json

    args = parse_args(argv)
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.snella_option)}
    settings = BenchmarkSettings(
        model=args.model, method="snella", resolution=args.resolution, batch_size=args.batch_size,
        rank=args.rank, sparsity=args.sparsity, repeats=args.steps, warmup=1,
        gradient_checkpointing=args.gradient_checkpointing, num_threads=args.num_threads, snella_options=options,
    )
    clock = PhaseClock()
    restore = instrument(clock)
    per_step: list[tuple[float, dict[str, float], dict[str, int]]] = []
    try:
        setup = build_training_setup(settings)
        training_step(setup)
        for _ in range(args.steps):
            clock.reset()
            timing = training_step(setup)
            per_step.append((timing.step_seconds, dict(clock.seconds), dict(clock.calls)))
    finally:
        restore()
    step = statistics.median(s for s, _, _ in per_step)
    medians = {phase: statistics.median(p.get(phase, 0.0) for _, p, _ in per_step) for phase in PHASES}
    print(f"{args.model} {args.resolution}px snella r{args.rank} s{args.sparsity} "
          f"{'grad-ckpt ' if args.gradient_checkpointing else ''}options={options}: "
          f"median step {step:.2f} s over {args.steps} steps")
    print("| phase | calls per step | seconds per step | share of step |")
    print("| --- | ---: | ---: | ---: |")
    for phase in PHASES:
        calls = per_step[-1][2].get(phase, 0)
        print(f"| {phase} | {calls} | {medians[phase]:.2f} | {100 * medians[phase] / step:.1f} % |")
    medians["step"] = step
    return medians


if __name__ == "__main__":
    main()

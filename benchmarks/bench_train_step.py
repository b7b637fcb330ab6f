"""Training cost of one DreamBooth-style step at real model scale, per method.

Compares SNELLA, PEFT LoRA (same target layers, same rank), gradient-masked sparse tuning and
full fine-tuning on a published architecture with random weights (no hub). Each method runs in
a fresh Python process, so its peak memory (CPU: peak RSS; CUDA: max allocated) is its own.
Prints a Markdown table with absolute numbers and ratios to LoRA, and writes
``<output_dir>/train_step_<model>_<resolution>px_<device>.{json,md,png}``.

Example (the README's Performance table):

    python benchmarks/bench_train_step.py --model sd15 --resolution 512 --batch_size 1 \
        --gradient_checkpointing --repeats 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from snella_diffusion.testing.benchmarking import (
    DTYPES,
    METHODS,
    MODEL_SPECS,
    BenchmarkSettings,
    chart_values,
    format_results_table,
    merge_rounds,
    run_train_step_benchmark,
)
from snella_diffusion.errors import SnellaError
from snella_diffusion.files import write_text_atomically
from snella_diffusion.viz import save_bar_chart

logger = logging.getLogger("bench_train_step")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_SPECS), default="sd15",
                        help="architecture (real config, random weights); flux-block = 1 double + 2 single Flux.1-dev blocks")
    parser.add_argument("--method", choices=METHODS, nargs="+", default=list(METHODS),
                        help="methods to run, each in a fresh process (default: all)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: /8)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank = SNELLA total factor width r")
    parser.add_argument("--sparsity", type=float, default=0.8,
                        help="SNELLA sparsity (fraction of ΔW entries zeroed); masked_sparse trains density 1 - sparsity")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the methods this many times, interleaved (snella, lora, snella, lora, ...), "
                             "each in a fresh process, and pool their timed steps: on a shared machine a slow "
                             "spell then does not land on one method only")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="base model dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=0,
                        help="torch intra-op threads per method process (0: torch's default); 1 is steadier on shared cores")
    parser.add_argument("--allocator_interval", type=int, default=10,
                        help="SNELLA reallocates every this many steps (SnellaConfig's default 10; 1: every "
                             "step, its most expensive schedule, where τ is always selected cold)")
    parser.add_argument("--config_override", action="append", default=[], metavar="KEY=JSON",
                        help="change a model config key, e.g. num_single_layers=4 (repeatable)")
    parser.add_argument("--snella_option", action="append", default=[], metavar="KEY=JSON",
                        help="a further SnellaConfig field for the snella method, e.g. forward_cache_mb=640 (repeatable)")
    parser.add_argument("--output_dir", default="benchmarks/results", help="where the JSON, table and PNG go")
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: rewrite the table and chart of a saved result JSON beside it")
    parser.add_argument("--worker_settings", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_overrides(items: list[str], flag: str = "--config_override") -> dict[str, Any]:
    """``["key=json", ...]`` to a dict; a value that is not JSON stays a string."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key:
            raise SnellaError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def settings_for(args: argparse.Namespace, method: str) -> BenchmarkSettings:
    settings = BenchmarkSettings(
        model=args.model, method=method, resolution=args.resolution, batch_size=args.batch_size,
        rank=args.rank, sparsity=args.sparsity, repeats=args.repeats, warmup=args.warmup,
        dtype=args.dtype, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, num_threads=args.num_threads, config_overrides=parse_overrides(args.config_override),
        allocator_interval=args.allocator_interval,
        snella_options=parse_overrides(args.snella_option, "--snella_option"),
    )
    settings.validate()
    return settings


def run_worker(settings_json: str, result_path: str) -> None:
    """Child process: measure one method, write its result JSON."""
    settings = BenchmarkSettings(**json.loads(settings_json))

    def progress(done: int, total: int) -> None:
        logger.info("%s: step %d/%d", settings.method, done, total)

    result = run_train_step_benchmark(settings, progress)
    Path(result_path).write_text(json.dumps(result))


def run_in_fresh_process(settings: BenchmarkSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        command = [
            sys.executable, os.path.abspath(__file__),
            "--worker_settings", json.dumps(settings.to_dict()), "--worker_result", result_path,
        ]
        completed = subprocess.run(command)
        if completed.returncode != 0:
            raise SnellaError(f"--method {settings.method}: benchmark process exited with {completed.returncode}")
        return json.loads(Path(result_path).read_text())


def machine_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def write_report(results: list[dict[str, Any]], summary: str, title: str, json_path: Path) -> str:
    """Write ``<stem>.json``, the Markdown table ``<stem>.md`` and the chart ``<stem>.png``."""
    table = format_results_table(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(json_path, json.dumps({"summary": summary, "title": title, "results": results}, indent=1))
    write_text_atomically(json_path.with_suffix(".md"), f"{summary}\n\n{table}\n")
    save_bar_chart(chart_values(results), json_path.with_suffix(".png"), title)
    logger.info("wrote %s and its .md and .png", json_path)
    return table


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.worker_settings:
        run_worker(args.worker_settings, args.worker_result)
        return []
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(saved["summary"])
        print(write_report(saved["results"], saved["summary"], saved.get("title", ""), Path(args.report)))
        return saved["results"]
    all_settings = [settings_for(args, method) for method in args.method]
    load_before = os.getloadavg()[0]
    if args.rounds < 1:
        raise SnellaError(f"--rounds={args.rounds}: must be at least 1")
    per_method: list[list[dict[str, Any]]] = [[] for _ in all_settings]
    for round_index in range(1, args.rounds + 1):
        for index, settings in enumerate(all_settings):
            logger.info("round %d/%d, method %d/%d: %s (fresh process)", round_index, args.rounds, index + 1,
                        len(all_settings), settings.method)
            per_method[index].append(run_in_fresh_process(settings))
    results = [merge_rounds(rounds) for rounds in per_method]
    first = all_settings[0]
    title = (
        f"{args.model} {args.resolution}px bs{args.batch_size} r{args.rank} {args.dtype} "
        f"{args.device}{' grad-ckpt' if args.gradient_checkpointing else ''}"
    )
    summary = (
        f"{title}; median of {first.repeats * args.rounds} steps ({args.rounds} interleaved round(s) of "
        f"{first.repeats} after {first.warmup} warm-up, each a fresh process); "
        f"{results[0]['target_layers']} target layers; {machine_description(args.device)}, "
        f"{results[0]['torch_threads']} torch thread(s) per method; "
        f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    stem = f"train_step_{args.model}_{args.resolution}px_{torch.device(args.device).type}"
    table = write_report(results, summary, title, Path(args.output_dir) / f"{stem}.json")
    print(summary)
    print(table)
    return results


if __name__ == "__main__":
    main()

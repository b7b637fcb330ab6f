"""The personalization lab (issue 16): DreamBooth of ``sks`` on the lab base through the real
training script, for SNELLA, SNELL, LoRA and full fine-tuning, scored with the exact decoders.

    python benchmarks/bench_personalization.py --base snella_diffusion/lab/weights \\
        --output_dir benchmarks/results/personalization --methods snella lora --seeds 0 1 2

Methods (same target layers, rank, data, steps, batch, prior preservation, seeds):
- ``snella``: ``--adapter snella --kernel mix`` with the bi-level allocator (script defaults);
- ``snell``: ``--kernel piecewise_linear`` at a fixed, uniform sparsity (no reallocation);
- ``lora``: ``--adapter lora`` (PEFT LoRA, rank = --rank: the same trainable-parameter count);
- ``full``: ``--adapter full`` (every UNet parameter).

A run is named ``<method>-lr<lr>-s<steps>-seed<seed>`` (``<method>[<variant>]-...`` with
``--variant``: extra training flags from ``--train_flags``, e.g. ``--variant te --train_flags
"--train_text_encoder"``, reported as a method of their own); finished runs are kept in
``results.json`` and skipped when the command is repeated (so a sweep can be resumed or
extended). ``--sweep`` adds, for ``--sweep_methods``, every (learning rate, steps) pair of
``--sweep_learning_rates`` × ``--sweep_steps`` at the first seed. The report (``results.md``,
``fidelity_vs_drift.png``, one sample grid per method at its best setting) is rewritten from
all finished runs after each run.

Best setting of a method: the highest mean fidelity (strict + loose) among its settings whose
all-attribute accuracy on ordinary prompts drops by at most ``--drift_cap`` (default 0.10) from
the base's; ties go to fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snella_diffusion.lab import world  # noqa: E402
from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS  # noqa: E402
from snella_diffusion.lab.personalization import drift_from, evaluate_pipeline  # noqa: E402
from snella_diffusion.lab.plots import save_lab_grid, save_scatter  # noqa: E402

METHODS = ("snella", "snell", "lora", "full")
METRIC_COLUMNS = (
    "fidelity_strict", "fidelity_loose", "edit_size_accuracy", "leak_loose", "leak_strict",
    "drift_color", "drift_all", "drift_concept_loose", "train_seconds", "peak_rss_mb", "adapter_bytes",
)


def method_flags(method: str, snell_sparsity: float) -> list[str]:
    if method == "snella":
        return ["--adapter", "snella", "--kernel", "mix"]
    if method == "snell":
        return ["--adapter", "snella", "--kernel", "piecewise_linear", "--init_sparsity", str(snell_sparsity),
                "--target_sparsity", str(snell_sparsity), "--allocator_interval", str(10**9)]
    if method == "lora":
        return ["--adapter", "lora"]
    if method == "full":
        return ["--adapter", "full"]
    raise SystemExit(f"--methods: unknown method {method!r}; expected one of {METHODS}")


class PeakRss:
    """Samples this process's resident set size every 50 ms while active (MiB)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page / 2**20)
            self._stop.wait(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_instance_images(folder: Path, count: int, seed: int) -> None:
    """``count`` concept images at 16 px (world downsampled by 2, area), as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = world.instance_images(count, seed)
    for index, image in enumerate(world.downsample(images)):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"sks_{index}.png")


def train_run(args: argparse.Namespace, method: str, learning_rate: float, steps: int, seed: int,
              run_dir: Path) -> dict[str, Any]:
    from train_scripts.train_dreambooth_snella import main, parse_args

    argv = [
        "--pretrained_model_name_or_path", str(args.base), "--instance_data_dir", str(args.output_dir / "instance"),
        "--instance_prompt", world.INSTANCE_PROMPT, "--with_prior_preservation",
        "--class_data_dir", str(args.class_dir or args.output_dir / "class"), "--class_prompt", world.CLASS_PROMPT,
        "--num_class_images", str(args.num_class_images), "--sample_batch_size", "25",
        "--resolution", "16", "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(steps), "--learning_rate", str(learning_rate), "--seed", str(seed),
        "--rank", str(args.rank), "--validation_guidance_scale", str(BASE_GUIDANCE_SCALE), "--mixed_precision", "no",
        "--checkpointing_steps", str(10**9), "--report_to", "none", "--output_dir", str(run_dir),
        *method_flags(method, args.snell_sparsity), *shlex.split(args.train_flags),
    ]
    started = time.monotonic()
    with PeakRss() as rss:
        adapter = main(parse_args(argv))
    return {"train_seconds": time.monotonic() - started, "peak_rss_mb": rss.peak,
            "adapter_bytes": adapter.stat().st_size, "adapter_file": str(adapter), "argv": argv}


def load_pipeline(base: Path, method: Optional[str] = None, adapter_file: Optional[str] = None) -> Any:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from snella_diffusion.loaders import load_snella_weights

    pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    if method in ("snella", "snell"):
        load_snella_weights(pipeline, adapter_file)
    elif method == "lora":
        pipeline.load_lora_weights(str(Path(adapter_file).parent))
    elif method == "full":
        pipeline.unet = UNet2DConditionModel.from_pretrained(Path(adapter_file).parent)
    return pipeline


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def run_label(method: str, variant: str = "") -> str:
    """The method as reported and in run names: ``snella``, or ``snella[te]`` for variant ``te``."""
    return f"{method}[{variant}]" if variant else method


def settings_table(runs: dict[str, dict[str, Any]]) -> dict[tuple[str, float, int], list[dict[str, Any]]]:
    grouped: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for run in runs.values():
        grouped.setdefault((run_label(run["method"], run.get("variant", "")), run["learning_rate"], run["steps"]),
                           []).append(run)
    return dict(sorted(grouped.items()))


def best_settings(grouped: dict, drift_cap: float) -> dict[str, tuple[str, float, int]]:
    best: dict[str, tuple[float, int, tuple]] = {}
    for key, runs in grouped.items():
        if np.mean([r["drift_all"] for r in runs]) < -drift_cap:
            continue
        score = np.mean([r["fidelity_strict"] + r["fidelity_loose"] for r in runs])
        if key[0] not in best or (score, -key[2]) > (best[key[0]][0], -best[key[0]][1]):
            best[key[0]] = (score, key[2], key)
    return {method: entry[2] for method, entry in best.items()}


def write_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    grouped = settings_table(results["runs"])
    best = best_settings(grouped, args.drift_cap)
    lines = [
        "# Personalization lab results", "",
        f"Base: `{results['base_path']}`; sampling: {results['inference_steps']} steps, guidance "
        f"{BASE_GUIDANCE_SCALE}, fixed seeds. DreamBooth of `sks` from {args.instance_count} instance images, "
        f"prior preservation ({args.num_class_images} class images of \"a square\"), batch "
        f"{args.train_batch_size}, rank {args.rank}, 16 px. Mean ± std over seeds (n = seeds).", "",
        "Base model: " + ", ".join(f"{k} {v:.3f}" for k, v in results["base"].items()), "",
        "| method | lr | steps | n | " + " | ".join(METRIC_COLUMNS) + " |",
        "|" + "---|" * (4 + len(METRIC_COLUMNS)),
    ]
    for (method, lr, steps), runs in grouped.items():
        mark = " **best**" if best.get(method) == (method, lr, steps) else ""
        cells = [summarise([r[c] for r in runs]) for c in METRIC_COLUMNS]
        lines.append(f"| {method}{mark} | {lr:g} | {steps} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", f"Best setting rule: highest mean fidelity_strict + fidelity_loose among settings with mean "
              f"drift_all ≥ −{args.drift_cap}; ties → fewer steps.", ""]
    (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    points = {}
    for (method, lr, steps), runs in grouped.items():
        points.setdefault(method, []).append((float(np.mean([r["drift_all"] for r in runs])),
                                              float(np.mean([r["fidelity_loose"] for r in runs]))))
    save_scatter(points, args.output_dir / "fidelity_vs_drift.png",
                 title="fidelity (loose) vs drift (all-attribute accuracy change), one point per setting",
                 x_label="drift_all", y_label="fidelity_loose")
    for method, key in best.items():
        run = min(grouped[key], key=lambda r: r["seed"])
        sample_file = args.output_dir / "samples" / f"{run['name']}.npz"
        if not sample_file.exists():
            print(f"no samples of {run['name']} in {sample_file.parent}: its grid is not rewritten", flush=True)
            continue
        grid = np.load(sample_file)
        file_label = method.replace("[", "_").replace("]", "")
        save_lab_grid({name: grid[name] for name in grid.files},
                      args.output_dir / f"grid_{file_label}.png")


def grid_rows(images: dict[str, np.ndarray], columns: int = 8) -> dict[str, np.ndarray]:
    """Rows of the sample grid: the first ``columns`` images of each prompt group."""
    half = len(images["edit"]) // 2
    drift = images["drift"]
    return {
        world.INSTANCE_PROMPT: images["fidelity"][:columns],
        world.SIZED_INSTANCE_PROMPTS[0]: images["edit"][:columns],
        world.SIZED_INSTANCE_PROMPTS[1]: images["edit"][half:half + columns],
        world.CLASS_PROMPT: images["leak"][:columns],
        "base prompts": drift[::max(1, len(drift) // columns)][:columns],
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="Folder of the lab base pipeline.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", default=[], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="Training steps of the --methods runs.")
    parser.add_argument("--learning_rate", nargs="*", default=[],
                        help="Per-method learning rates as method=value (default 1e-3).")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep_methods", nargs="+", default=["snella", "lora"], choices=METHODS)
    parser.add_argument("--sweep_learning_rates", nargs="+", type=float, default=[1e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--sweep_steps", nargs="+", type=int, default=[100, 200, 400])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--variant", default="",
                        help="Name of a variant of the --methods and --sweep runs (part of each run's name).")
    parser.add_argument("--train_flags", default="",
                        help="Extra training-script flags of the variant, one string (e.g. \"--train_text_encoder "
                             "--target_sparsity 0.5\"); they come after the method's own flags, so they win.")
    parser.add_argument("--snell_sparsity", type=float, default=0.8)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--num_class_images", type=int, default=50)
    parser.add_argument("--instance_count", type=int, default=5)
    parser.add_argument("--inference_steps", type=int, default=BASE_INFERENCE_STEPS)
    parser.add_argument("--eval_scale", type=float, default=1.0,
                        help="Shrink every evaluation group by this factor (smoke tests only).")
    parser.add_argument("--drift_cap", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--class_dir", type=Path, default=None,
                        help="Class-image folder shared between lab processes (default <output_dir>/class).")
    parser.add_argument("--merge_from", nargs="*", type=Path, default=[],
                        help="Other lab output folders (same base) whose finished runs join this report.")
    return parser.parse_args(argv)


def planned_runs(args: argparse.Namespace) -> list[tuple[str, float, int, int]]:
    rates = {m: 1e-3 for m in METHODS}
    for item in args.learning_rate:
        method, _, value = item.partition("=")
        rates[method] = float(value)
    plan = [(m, rates[m], args.steps, s) for m in args.methods for s in args.seeds]
    if args.sweep:
        plan += [(m, lr, st, args.seeds[0]) for m in args.sweep_methods for lr in args.sweep_learning_rates
                 for st in args.sweep_steps]
    return plan


def main(argv: Optional[Sequence[str]] = None) -> None:
    import torch

    args = parse_args(argv)
    if bool(args.variant) != bool(args.train_flags):
        raise SystemExit("--variant and --train_flags go together: name the variant of the extra flags")
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "samples").mkdir(exist_ok=True)
    results_file = args.output_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results.get("base_path") != str(args.base) or results.get("inference_steps") != args.inference_steps:
        base_metrics, _ = evaluate_pipeline(load_pipeline(args.base), scale=args.eval_scale,
                                          steps=args.inference_steps)
        results = {"base_path": str(args.base), "inference_steps": args.inference_steps, "base": base_metrics,
                   "runs": {}}
        results_file.write_text(json.dumps(results, indent=1))
    for other in args.merge_from:
        other_results = json.loads((other / "results.json").read_text())
        if other_results["base_path"] != results["base_path"]:
            raise SystemExit(f"--merge_from={other}: its base {other_results['base_path']} differs")
        for name, run in other_results["runs"].items():
            if name not in results["runs"]:
                results["runs"][name] = run
                sample_file = other / "samples" / f"{name}.npz"
                (args.output_dir / "samples" / sample_file.name).write_bytes(sample_file.read_bytes())
    results_file.write_text(json.dumps(results, indent=1))
    write_instance_images(args.output_dir / "instance", args.instance_count, seed=12345)
    for method, learning_rate, steps, seed in planned_runs(args):
        name = f"{run_label(method, args.variant)}-lr{learning_rate:g}-s{steps}-seed{seed}"
        if name in results["runs"]:
            continue
        print(f"run {name}", flush=True)
        run_dir = args.output_dir / "runs" / name
        record: dict[str, Any] = {"name": name, "method": method, "variant": args.variant,
                                  "learning_rate": learning_rate, "steps": steps, "seed": seed}
        record.update(train_run(args, method, learning_rate, steps, seed, run_dir))
        metrics, images = evaluate_pipeline(load_pipeline(args.base, method, record["adapter_file"]),
                                            scale=args.eval_scale, steps=args.inference_steps)
        record.update(metrics)
        record.update(drift_from(metrics, results["base"]))
        np.savez_compressed(args.output_dir / "samples" / f"{name}.npz", **grid_rows(images))
        results["runs"][name] = record
        results_file.write_text(json.dumps(results, indent=1))
        print(f"done {name}: " + ", ".join(f"{c} {record[c]:.3f}" for c in METRIC_COLUMNS), flush=True)
        write_report(args, results)
    if results["runs"]:
        write_report(args, results)


if __name__ == "__main__":
    main()

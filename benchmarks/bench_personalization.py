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
the base's; ties go to fewer steps. ``--pick_rule utility`` picks the highest mean fidelity +
drift_all instead (a point on the fidelity/drift frontier), and ``--pick_seed S`` picks on seed
S's runs only and adds a held-out table: each method at its pick, over the other seeds.

Since issue 26 a plain ``snella`` run trains with the script's defaults, which decay β
(``--beta_decay 10``); the issue's runs named ``snella[te]`` were made before and are the
reference (add ``--reference_beta`` to the variant's flags to repeat them).

Issue 26 options:
- ``--concept zxc`` trains the second concept (a teal-over-white circle, "a zxc circle", class
  "a circle") instead of ``sks``; run names then start with ``zxc-``.
- ``--sized_prompts`` trains on each instance image twice, captioned with the instance prompt
  and with its sized prompt ("a small sks square" / "a large sks square"); run names get
  ``+sized``.
- Every run records its specificity (the concept's rate on the other classes' prompts and the
  other concept's prompt), ΔW diagnostics (``lab/diagnostics.py``: constant-component share,
  ‖ΔW‖/‖W0‖, kept-fraction histogram) and the torch thread count.
- ``--stack A B`` (two finished run names, same method, e.g. an sks and a zxc run) loads both
  at each of ``--stack_weights`` (default 1 and 0.75) with each ``--combine`` mode (sum, ties,
  no_offset; LoRA's ΔW is combined by the same functions and written into W0) and records each
  concept's fidelity, leak, specificity, retention against the run alone, the drift, and the
  two adapters' mask overlap and cosine, under ``results.json["stacks"]`` and in the report.
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

from snella_diffusion.combine import COMBINE_MODES  # noqa: E402
from snella_diffusion.lab import world  # noqa: E402
from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS  # noqa: E402
from snella_diffusion.lab.diagnostics import (  # noqa: E402
    adapter_diagnostics,
    lora_deltas,
    pair_diagnostics,
    snella_deltas,
)
from snella_diffusion.lab.personalization import GROUPS, drift_from, evaluate_pipeline, retention  # noqa: E402
from snella_diffusion.lab.stacking import add_to_base_weights, combine_layer_deltas  # noqa: E402
from snella_diffusion.lab.plots import save_lab_grid, save_scatter  # noqa: E402

METHODS = ("snella", "snell", "lora", "full")
METRIC_COLUMNS = (
    "fidelity_strict", "fidelity_loose", "edit_size_accuracy", "leak_loose", "leak_strict",
    "drift_color", "drift_all", "drift_concept_loose", "specificity_loose", "constant_share", "relative_norm",
    "train_seconds", "peak_rss_mb", "adapter_bytes",
)
STACK_COLUMNS = ("fidelity_strict", "fidelity_loose", "retention_strict", "retention_loose", "leak_loose",
                 "specificity_loose")


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


def write_instance_images(folder: Path, count: int, seed: int, concept: str = world.CONCEPT_TOKEN,
                          sized_prompts: bool = False) -> None:
    """``count`` images of ``concept`` at 16 px (world downsampled by 2, area), as PNG; with
    ``sized_prompts`` each image twice, with ``.txt`` captions: the instance prompt and the
    sized prompt of the image's size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    chosen = world.CONCEPTS[concept]
    images, scenes = world.instance_images(count, seed, token=concept)
    sized = dict(zip(world.SIZE_SIDES, chosen.sized_prompts))
    for index, (image, scene) in enumerate(zip(world.downsample(images), scenes)):
        picture = Image.fromarray(np.round(image * 255).astype(np.uint8))
        picture.save(folder / f"{concept}_{index}.png")
        if sized_prompts:
            picture.save(folder / f"{concept}_{index}_sized.png")
            (folder / f"{concept}_{index}.txt").write_text(chosen.instance_prompt)
            (folder / f"{concept}_{index}_sized.txt").write_text(sized[scene.size])


def instance_folder(args: argparse.Namespace) -> Path:
    """Where the run's instance images are (one folder per concept and captioning)."""
    if args.concept == world.CONCEPT_TOKEN and not args.sized_prompts:
        return args.output_dir / "instance"
    return args.output_dir / f"instance-{args.concept}{'-sized' if args.sized_prompts else ''}"


def train_run(args: argparse.Namespace, method: str, learning_rate: float, steps: int, seed: int,
              run_dir: Path) -> dict[str, Any]:
    from train_scripts.train_dreambooth_snella import main, parse_args

    concept = world.CONCEPTS[args.concept]
    class_dir = args.class_dir or args.output_dir / ("class" if args.concept == world.CONCEPT_TOKEN else f"class-{args.concept}")
    captions = ["--caption_extension", ".txt"] if args.sized_prompts else []
    argv = [
        "--pretrained_model_name_or_path", str(args.base), "--instance_data_dir", str(instance_folder(args)),
        "--instance_prompt", concept.instance_prompt, *captions, "--with_prior_preservation",
        "--class_data_dir", str(class_dir), "--class_prompt", concept.class_prompt,
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


def adapter_deltas(pipeline: Any, method: str) -> Optional[tuple[dict, dict]]:
    """(``{layer: ΔW}``, ``{layer: W0}``) of the pipeline's adapter, None for full fine-tuning."""
    if method in ("snella", "snell"):
        return snella_deltas(pipeline)
    if method == "lora":
        return lora_deltas(pipeline)
    return None


def stacked_pipeline(base: Path, runs: Sequence[dict[str, Any]], weights: Sequence[float], combine: str) -> Any:
    """The base with the runs' adapters combined by ``combine`` at ``weights``: SNELLA inside
    the pipeline (``set_snella_adapters``), LoRA by reading each ΔW and writing the
    combination into W0."""
    from snella_diffusion.loaders import load_snella_weights, set_snella_adapters

    methods = {run["method"] for run in runs}
    if len(methods) != 1 or methods & {"full"}:
        raise SystemExit(f"--stack: runs of one adapter method are stacked, got {sorted(methods)}")
    method = methods.pop()
    pipeline = load_pipeline(base)
    if method in ("snella", "snell"):
        names = [load_snella_weights(pipeline, run["adapter_file"], adapter_name=f"stack_{i}")
                 for i, run in enumerate(runs)]
        set_snella_adapters(pipeline, names, list(weights), combine=combine)
        return pipeline
    deltas = [lora_deltas(load_pipeline(base, method, run["adapter_file"]))[0] for run in runs]
    add_to_base_weights(pipeline, combine_layer_deltas(deltas, list(weights), combine))
    return pipeline


def evaluate_stack(args: argparse.Namespace, results: dict[str, Any], names: Sequence[str], weight: float,
                   combine: str) -> dict[str, Any]:
    """Each stacked concept's metrics and retention, the drift, and the pair diagnostics."""
    runs = [results["runs"][name] for name in names]
    pipeline = stacked_pipeline(args.base, runs, [weight] * len(runs), combine)
    record: dict[str, Any] = {"runs": list(names), "weight": weight, "combine": combine,
                              "threads": args.threads}
    for run in runs:
        concept = run.get("concept", world.CONCEPT_TOKEN)
        metrics, _ = evaluate_pipeline(pipeline, scale=args.eval_scale, steps=args.inference_steps, concept=concept,
                                       groups=[g for g in GROUPS if g != "drift"])
        record[run["name"]] = {**metrics, **retention(metrics, run)}
    drift, _ = evaluate_pipeline(pipeline, scale=args.eval_scale, steps=args.inference_steps, groups=["drift"])
    record.update(drift_from(drift, results["base"]))
    deltas = [adapter_deltas(load_pipeline(args.base, run["method"], run["adapter_file"]), run["method"])
              for run in runs]
    record["pair"] = pair_diagnostics(deltas[0][0], deltas[1][0])
    return record


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def run_label(method: str, variant: str = "", concept: str = world.CONCEPT_TOKEN, sized: bool = False) -> str:
    """The method as reported and in run names: ``snella``, ``snella[te]`` for variant ``te``,
    ``zxc-snella`` for the concept zxc, ``snella+sized`` with sized prompts."""
    label = f"{method}[{variant}]" if variant else method
    if concept != world.CONCEPT_TOKEN:
        label = f"{concept}-{label}"
    return label + ("+sized" if sized else "")


def settings_table(runs: dict[str, dict[str, Any]]) -> dict[tuple[str, float, int], list[dict[str, Any]]]:
    grouped: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for run in runs.values():
        label = run_label(run["method"], run.get("variant", ""), run.get("concept", world.CONCEPT_TOKEN),
                          run.get("sized_prompts", False))
        grouped.setdefault((label, run["learning_rate"], run["steps"]), []).append(run)
    return dict(sorted(grouped.items()))


PICK_RULES = ("drift_cap", "utility")


def setting_score(runs: list[dict[str, Any]], rule: str, drift_cap: float) -> Optional[float]:
    """The score a setting is picked by, None when the rule excludes it.

    ``drift_cap``: mean fidelity_strict + fidelity_loose, excluded when the mean drift_all is
    below −drift_cap. ``utility``: mean fidelity_strict + fidelity_loose + drift_all, so a
    point of all-attribute accuracy lost on ordinary prompts costs as much as a point of
    fidelity (drift_all ≤ 0 is a drop): the pick lies on the fidelity/drift frontier.
    """
    fidelity = float(np.mean([r["fidelity_strict"] + r["fidelity_loose"] for r in runs]))
    drift = float(np.mean([r["drift_all"] for r in runs]))
    if rule == "utility":
        return fidelity + drift
    return None if drift < -drift_cap else fidelity


def best_settings(grouped: dict, drift_cap: float, rule: str = "drift_cap",
                  pick_seed: Optional[int] = None) -> dict[str, tuple[str, float, int]]:
    """Each method's best (label, lr, steps) by ``rule``; with ``pick_seed`` only that seed's runs
    are looked at (the other seeds stay held out for the report); ties go to fewer steps."""
    best: dict[str, tuple[float, int, tuple]] = {}
    for key, runs in grouped.items():
        if pick_seed is not None:
            runs = [r for r in runs if r["seed"] == pick_seed]
            if not runs:
                continue
        score = setting_score(runs, rule, drift_cap)
        if score is None:
            continue
        if key[0] not in best or (score, -key[2]) > (best[key[0]][0], -best[key[0]][1]):
            best[key[0]] = (score, key[2], key)
    return {method: entry[2] for method, entry in best.items()}


def held_out_lines(grouped: dict, best: dict[str, tuple[str, float, int]], pick_seed: int) -> list[str]:
    """The report's held-out table: each method at the setting picked on ``pick_seed``, mean ± std
    over its other seeds (the runs the pick never saw)."""
    lines = [f"## Held out: each method at the setting picked on seed {pick_seed}, over the other seeds", "",
             "| method | lr | steps | seeds | " + " | ".join(METRIC_COLUMNS) + " |",
             "|" + "---|" * (4 + len(METRIC_COLUMNS))]
    for method, key in sorted(best.items()):
        runs = sorted((r for r in grouped[key] if r["seed"] != pick_seed), key=lambda r: r["seed"])
        if not runs:
            continue
        cells = [summarise([r[c] for r in runs]) if all(c in r for r in runs) else "–" for c in METRIC_COLUMNS]
        seeds = " ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {method} | {key[1]:g} | {key[2]} | {seeds} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    grouped = settings_table(results["runs"])
    best = best_settings(grouped, args.drift_cap, args.pick_rule, args.pick_seed)
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
        cells = [summarise([r[c] for r in runs]) if all(c in r for r in runs) else "–" for c in METRIC_COLUMNS]
        lines.append(f"| {method}{mark} | {lr:g} | {steps} | {len(runs)} | " + " | ".join(cells) + " |")
    rule = (f"highest mean fidelity_strict + fidelity_loose among settings with mean drift_all ≥ "
            f"−{args.drift_cap}" if args.pick_rule == "drift_cap" else
            "highest mean fidelity_strict + fidelity_loose + drift_all (drift_all ≤ 0: a point of "
            "all-attribute accuracy lost costs a point of fidelity)")
    seeds = "" if args.pick_seed is None else f", looking only at seed {args.pick_seed}"
    lines += ["", f"Best setting rule: {rule}{seeds}; ties → fewer steps.", ""]
    if args.pick_seed is not None:
        lines += held_out_lines(grouped, best, args.pick_seed)
    lines += stack_summary_lines(results.get("stacks", {}), results["runs"])
    lines += stack_lines(results.get("stacks", {}))
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


def stack_summary_lines(stacks: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[str]:
    """The report's stacking summary: per (first adapter's method, combine, weight), mean ± std over
    the stacked pairs of each concept's loose fidelity and retention (first adapter = A, second =
    B), the stack's drift_all beside the worse of the two adapters' own drift, and the pair's
    cosine."""
    grouped: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for record in stacks.values():
        first = runs.get(record["runs"][0])
        if first is None:
            continue
        label = run_label(first["method"], first.get("variant", ""))
        grouped.setdefault((label, record["combine"], record["weight"]), []).append(record)
    if not grouped:
        return []
    lines = ["## Stacking summary (A = first adapter, B = second; mean ± std over pairs)", "",
             "| method | combine | weight | pairs | A loose | A retention loose | B loose | B retention loose "
             "| A retention strict | B retention strict | drift_all | worse single drift_all | cosine |",
             "|" + "---|" * 13]
    for (label, combine, weight), records in sorted(grouped.items()):
        def column(pick: Any) -> str:
            return summarise([float(pick(r)) for r in records])

        lines.append(
            f"| {label} | {combine} | {weight:g} | {len(records)} | "
            + " | ".join(column(pick) for pick in (
                lambda r: r[r["runs"][0]]["fidelity_loose"], lambda r: r[r["runs"][0]]["retention_loose"],
                lambda r: r[r["runs"][1]]["fidelity_loose"], lambda r: r[r["runs"][1]]["retention_loose"],
                lambda r: r[r["runs"][0]]["retention_strict"], lambda r: r[r["runs"][1]]["retention_strict"],
                lambda r: r["drift_all"],
                lambda r: min(runs[name]["drift_all"] for name in r["runs"] if name in runs),
                lambda r: r["pair"]["cosine"]))
            + " |")
    return lines + [""]


def stack_lines(stacks: dict[str, Any]) -> list[str]:
    """The report's stacking table: one row per stacked run and (combine, weight)."""
    if not stacks:
        return []
    lines = ["## Stacking", "", "| runs | combine | weight | run | " + " | ".join(STACK_COLUMNS)
             + " | drift_all | mask overlap (chance) | cosine |", "|" + "---|" * (7 + len(STACK_COLUMNS))]
    for record in stacks.values():
        pair = record["pair"]
        for name in record["runs"]:
            cells = [f"{record[name][c]:.3f}" for c in STACK_COLUMNS]
            lines.append(f"| {' + '.join(record['runs'])} | {record['combine']} | {record['weight']:g} | {name} | "
                         + " | ".join(cells) + f" | {record['drift_all']:.3f} | {pair['mask_overlap']:.3f} "
                         f"({pair['mask_overlap_chance']:.3f}) | {pair['cosine']:.3f} |")
    return lines + [""]


def grid_rows(images: dict[str, np.ndarray], columns: int = 8,
              concept: str = world.CONCEPT_TOKEN) -> dict[str, np.ndarray]:
    """Rows of the sample grid: the first ``columns`` images of each prompt group."""
    half = len(images["edit"]) // 2
    drift = images["drift"]
    chosen = world.CONCEPTS[concept]
    return {
        chosen.instance_prompt: images["fidelity"][:columns],
        chosen.sized_prompts[0]: images["edit"][:columns],
        chosen.sized_prompts[1]: images["edit"][half:half + columns],
        chosen.class_prompt: images["leak"][:columns],
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
    parser.add_argument("--pick_rule", choices=PICK_RULES, default="drift_cap",
                        help="How a method's best setting is picked: drift_cap (highest fidelity within "
                             "--drift_cap) or utility (highest fidelity + drift_all).")
    parser.add_argument("--pick_seed", type=int, default=None,
                        help="Pick each method's best setting on this seed's runs only, and report the "
                             "picked settings over the other seeds in a held-out table.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--class_dir", type=Path, default=None,
                        help="Class-image folder shared between lab processes (default <output_dir>/class).")
    parser.add_argument("--merge_from", nargs="*", type=Path, default=[],
                        help="Other lab output folders (same base) whose finished runs and stacks join "
                             "this report.")
    parser.add_argument("--concept", default=world.CONCEPT_TOKEN, choices=list(world.CONCEPTS),
                        help="The concept the --methods and --sweep runs learn (sks: the checkerboard square; "
                             "zxc: the teal-over-white circle).")
    parser.add_argument("--sized_prompts", action="store_true",
                        help="Train on each instance image also captioned with its sized prompt "
                             "(\"a small/large sks square\").")
    parser.add_argument("--stack", nargs="*", default=[], metavar="RUN",
                        help="Two finished run names to load together (after this command's runs).")
    parser.add_argument("--combine", nargs="+", default=["sum"], choices=COMBINE_MODES,
                        help="Stacking modes of --stack.")
    parser.add_argument("--stack_weights", nargs="+", type=float, default=[1.0, 0.75],
                        help="The weight of each stacked adapter (both the same).")
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
    if args.stack and len(args.stack) != 2:
        raise SystemExit(f"--stack takes two finished run names, got {len(args.stack)}")
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
        for key, stack in other_results.get("stacks", {}).items():
            results.setdefault("stacks", {}).setdefault(key, stack)
    results_file.write_text(json.dumps(results, indent=1))
    write_instance_images(instance_folder(args), args.instance_count, seed=12345, concept=args.concept,
                          sized_prompts=args.sized_prompts)
    for method, learning_rate, steps, seed in planned_runs(args):
        name = (f"{run_label(method, args.variant, args.concept, args.sized_prompts)}-lr{learning_rate:g}"
                f"-s{steps}-seed{seed}")
        if name in results["runs"]:
            continue
        print(f"run {name}", flush=True)
        run_dir = args.output_dir / "runs" / name
        record: dict[str, Any] = {"name": name, "method": method, "variant": args.variant,
                                  "concept": args.concept, "sized_prompts": args.sized_prompts,
                                  "learning_rate": learning_rate, "steps": steps, "seed": seed,
                                  "threads": args.threads}
        record.update(train_run(args, method, learning_rate, steps, seed, run_dir))
        pipeline = load_pipeline(args.base, method, record["adapter_file"])
        metrics, images = evaluate_pipeline(pipeline, scale=args.eval_scale, steps=args.inference_steps,
                                            concept=args.concept)
        record.update(metrics)
        record.update(drift_from(metrics, results["base"]))
        deltas = adapter_deltas(pipeline, method)
        if deltas is not None:
            record["diagnostics"] = adapter_diagnostics(*deltas)
            record["constant_share"] = record["diagnostics"]["constant_share"]
            record["relative_norm"] = record["diagnostics"]["relative_norm"]
        np.savez_compressed(args.output_dir / "samples" / f"{name}.npz", **grid_rows(images, concept=args.concept))
        results["runs"][name] = record
        results_file.write_text(json.dumps(results, indent=1))
        print(f"done {name}: " + ", ".join(f"{c} {record[c]:.3f}" for c in METRIC_COLUMNS), flush=True)
        write_report(args, results)
    if args.stack:
        missing = [name for name in args.stack if name not in results["runs"]]
        if len(args.stack) != 2 or missing:
            raise SystemExit(f"--stack takes two finished run names; not in {results_file}: {missing}")
        stacks = results.setdefault("stacks", {})
        for combine in args.combine:
            for weight in args.stack_weights:
                key = f"{'+'.join(args.stack)}-{combine}-w{weight:g}"
                if key in stacks:
                    continue
                print(f"stack {key}", flush=True)
                stacks[key] = evaluate_stack(args, results, args.stack, weight, combine)
                results_file.write_text(json.dumps(results, indent=1))
    if results["runs"]:
        write_report(args, results)


if __name__ == "__main__":
    main()

"""Per-method rows (mean ± std over seeds), results.json and the markdown comparison table."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from ..files import write_json_atomically, write_text_atomically
from .paper import FGVC_MEAN_RESULTS, PAPER_ACCURACY_KIND


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_method(method: str, runs: list[dict[str, Any]], paper: dict[str, float]) -> dict[str, Any]:
    """One table row from the per-seed run dicts (accuracies in %, memory in MB, time in s)."""
    best_mean, best_std = _mean_std([r["top1_best"] for r in runs])
    final_mean, final_std = _mean_std([r["top1_final"] for r in runs])
    row = {
        "method": method,
        "seeds": [r["seed"] for r in runs],
        "top1_best_mean": best_mean,
        "top1_best_std": best_std,
        "top1_final_mean": final_mean,
        "top1_final_std": final_std,
        "trainable_params": runs[0]["trainable_params"],
        "peak_memory_mb": statistics.fmean(r["peak_memory_mb"] for r in runs),
        "memory_source": runs[0]["memory_source"],
        "time_per_step_s": statistics.fmean(r["time_per_step_s"] for r in runs),
        "paper_top1": paper.get(method),
        "learning_rate": runs[0]["learning_rate"],
        "runs": runs,
    }
    if all("top1_best_ema" in r for r in runs):
        row["top1_best_ema_mean"], row["top1_best_ema_std"] = _mean_std([r["top1_best_ema"] for r in runs])
    return row


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def markdown_table(rows: list[dict[str, Any]], dataset: str, paper_known: bool) -> str:
    """The comparison table, with the paper's column and a note on which accuracy it reports."""
    lines = [
        f"Dataset: {dataset}",
        "",
        "| method | top-1 best epoch (%) | top-1 final epoch (%) | paper top-1 (%) | lr | trainable params "
        "| peak memory (MB) | time/step (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        seeds = len(row["seeds"])
        paper = "—" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        lr = f"{row['learning_rate']:g}" + (" (val)" if "lr_sweep" in row else "")
        lines.append(
            f"| {row['method']} | {_cell(row['top1_best_mean'], row['top1_best_std'], seeds)} "
            f"| {_cell(row['top1_final_mean'], row['top1_final_std'], seeds)} | {paper} | {lr} "
            f"| {row['trainable_params']:,} | {row['peak_memory_mb']:.1f} | {row['time_per_step_s']:.4f} |"
        )
    swept = [row for row in rows if "lr_sweep" in row]
    if swept:
        seeds = ", ".join(str(seed) for seed in swept[0]["lr_sweep"]["seeds"])
        lines += ["", f"lr (val): chosen per method by final-epoch top-1 on a validation split carved from the "
                      f"training shots (seed(s) {seeds}); the test split is not used for the choice:", ""]
        lines += [f"- {row['method']}: " + ", ".join(f"{lr:g} → {top1:.1f} %"
                                                     for lr, top1 in row["lr_sweep"]["validation_top1"].items())
                  for row in swept]
    with_ema = [row for row in rows if "top1_best_ema_mean" in row]
    if with_ema:
        lines += ["", "Model EMA (the reference reports the better of model and EMA):", ""]
        lines += [f"- {row['method']}: EMA best epoch "
                  f"{_cell(row['top1_best_ema_mean'], row['top1_best_ema_std'], len(row['seeds']))} %"
                  for row in with_ema]
    lines.append("")
    seeds = len(rows[0]["seeds"]) if rows else 0
    lines.append(f"Mean ± std over {seeds} seed(s). Memory: {rows[0]['memory_source'] if rows else ''}.")
    if paper_known:
        lines.append(
            f"Paper column: {PAPER_ACCURACY_KIND}, so compare it with the best-epoch column; "
            "snell = SNELL-32. FGVC means in the paper: "
            + ", ".join(f"{k} {v}" for k, v in FGVC_MEAN_RESULTS.items())
            + "."
        )
    return "\n".join(lines) + "\n"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    write_json_atomically(path, payload)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_text_atomically(path, text)


def results_payload(
    rows: list[dict[str, Any]], dataset: str, settings: dict[str, Any], extra: Optional[dict] = None
) -> dict[str, Any]:
    return {"dataset": dataset, "paper_accuracy_kind": PAPER_ACCURACY_KIND, "settings": settings,
            "rows": rows, **(extra or {})}

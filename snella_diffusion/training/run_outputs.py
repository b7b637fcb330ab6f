"""What a DreamBooth run writes besides the adapter: ``allocation.json`` and its heatmap, the
loss plot, the model card; and the run summaries they need (objective name, per-process drop
counts, tracker hyper-parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..allocator import BiLevelAllocator
from ..config import SnellaConfig
from ..errors import SnellaError
from ..families import ModelFamily
from ..viz import save_allocation_heatmap, save_line_plot
from .data_arguments import data_settings
from .job_config import RESOLVED_CONFIG_FILE
from .model_card import render_model_card, write_model_card
from .run_settings import RunSettings


def describe_objective(objective: Any) -> str:
    """The objective's class name and, for DDPM objectives, the prediction type."""
    prediction_type = getattr(objective, "prediction_type", None)
    return type(objective).__name__ + (f" ({prediction_type})" if prediction_type else "")


def check_ranks_agree(accelerator: Any, allocator: BiLevelAllocator) -> list[list[int]]:
    """The per-layer drop counts of every process (rows = ranks); raises if they differ."""
    drops = torch.tensor([allocator.adapters[n].drop_count_host for n in allocator.names], dtype=torch.int64)
    gathered = accelerator.gather(drops.to(accelerator.device)).cpu().view(accelerator.num_processes, -1)
    rows = gathered.tolist()
    if any(row != rows[0] for row in rows[1:]):
        raise SnellaError("the processes ended with different per-layer sparsities (allocator out of sync)")
    return rows


def finalize_allocation(accelerator: Any, allocator: BiLevelAllocator, finished: bool) -> list[list[int]]:
    """When the run ``finished`` between reallocation steps, apply the final budget to the saved
    adapter; returns the per-process drop counts (``check_ranks_agree``)."""
    if finished and allocator.history_steps[-1] != allocator.step_count:
        allocator.reallocate(allocator.final_volume)
    return check_ranks_agree(accelerator, allocator)


def tracker_config(settings: RunSettings) -> dict[str, Any]:
    """The flags as TensorBoard hyper-parameters (scalars and strings only)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in settings.flags().items()}


def write_outputs(
    settings: RunSettings,
    family: ModelFamily,
    config: SnellaConfig,
    allocator: BiLevelAllocator,
    rank_drops: list[list[int]],
    losses: list[tuple[float, float]],
    validations: list[str],
    output_dir: Path,
    seconds: float,
    num_processes: int,
    objective_name: str,
    data_subsets: Sequence[dict[str, Any]] = (),
    denoisers: Sequence[str] = (),
) -> None:
    """The allocation heatmap and JSON, the loss plot and the model card (with the table of
    ``data_subsets``, the run's dataset subsets, when it has them). ``denoisers``: the denoiser
    components the run trained, the main one first (``TrainingComponents.denoiser_component``,
    then the family's ``extra_denoisers``; Wan 2.2 A14B with ``--wan_expert low``:
    ``transformer_2``), default the family's one."""
    save_allocation_heatmap(allocator.history_steps, allocator.history_kept, allocator.names,
                            output_dir / "allocation.png")
    budgets = allocator.budgets()
    allocation = {
        "layers": allocator.names,
        "final_sparsity": [budgets[n] for n in allocator.names],
        "history_steps": allocator.history_steps,
        "history_kept": allocator.history_kept,
        "drop_counts_per_rank": rank_drops,
    }
    (output_dir / "allocation.json").write_text(json.dumps(allocation))
    if losses:
        save_line_plot({"loss": losses}, output_dir / "loss.png", title="training loss (this run)")
    training, data = settings.training, settings.data
    summary = {
        "max_train_steps": training.max_train_steps,
        "train_batch_size": training.train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "processes": num_processes,
        "learning_rate": training.learning_rate,
        "lr_scheduler": training.lr_scheduler,
        "resolution": data.resolution or "native",
        "train_text_encoder": training.train_text_encoder,
        "snr_gamma": training.snr_gamma,
        "mixed_precision": training.mixed_precision or "accelerate default",
        "seed": training.seed,
        "objective": objective_name,
        "wall_seconds_this_run": round(seconds, 1),
        **data_settings(settings.flags()),
    }
    config_path = output_dir / RESOLVED_CONFIG_FILE
    card = render_model_card(
        base_model=settings.model.pretrained_model_name_or_path, family=family.name,
        instance_prompt=data.instance_prompt, config=config, budgets=budgets, training=summary,
        validation_prompt=settings.validation.validation_prompt, validation_images=validations,
        class_prompt=data.class_prompt if data.with_prior_preservation else None,
        run_config=config_path.read_text(encoding="utf-8") if config_path.is_file() else None,
        adapter=settings.adapter.adapter, lora_rank=settings.adapter.lora_rank,
        component=denoisers[0] if denoisers else family.denoiser_component, also_trained=tuple(denoisers[1:]),
        data_subsets=data_subsets,
    )
    write_model_card(output_dir / "README.md", card)

"""The pipeline that validation samples with: the family's own pipeline over the training
components, with the trained modules swapped in and a scheduler of its own."""

from __future__ import annotations

from typing import Any

import torch

from ..families import ModelFamily, TrainingComponents


def fresh_scheduler(scheduler: Any) -> Any:
    """A copy of a noise scheduler (inference mutates timesteps; training must not see that)."""
    return type(scheduler).from_config(scheduler.config)


def validation_pipeline(family: ModelFamily, components: TrainingComponents,
                        trained: dict[str, torch.nn.Module]) -> Any:
    """The family's pipeline with ``trained`` (component name → module being trained) in place
    of the loaded components, a fresh copy of the noise scheduler and no progress bar."""
    overrides: dict[str, Any] = dict(trained)
    overrides["scheduler"] = fresh_scheduler(components.noise_scheduler)
    pipeline = family.pipeline(components, overrides)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

"""Validation samples of a DreamBooth run: a grid of images of the validation prompt (and,
on request, the class prompt) with the current adapters, every ``--validation_steps``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..delta_cache import without_delta_cache
from ..families import ModelFamily, TrainingComponents
from ..viz import save_image_grid
from .run_settings import RunSettings
from .vae_inputs import decode_in_vae_dtype
from .validation_pipeline import validation_pipeline
from .video_validation import run_video_validation

logger = logging.getLogger(__name__)


@torch.no_grad()
def run_validation(
    settings: RunSettings,
    accelerator: Any,
    family: ModelFamily,
    components: TrainingComponents,
    trained: dict[str, torch.nn.Module],
    step: int,
    resolution: int,
    output_dir: Path,
) -> Path:
    """Sample ``--num_validation_images`` images of ``--validation_prompt`` with the current
    adapters and write them as ``validation/step_<step>.png``; a video family writes videos
    and a frame strip (``video_validation.py``)."""
    if family.is_video:
        return run_video_validation(settings, accelerator, family, components, trained, step, resolution, output_dir)
    validation, data = settings.validation, settings.data
    pipeline = validation_pipeline(family, components, trained)
    images = []
    with_class = validation.validation_with_class_prompt and data.class_prompt
    prompts = [validation.validation_prompt] + ([data.class_prompt] if with_class else [])
    for prompt, index in ((p, i) for p in prompts for i in range(validation.num_validation_images)):
        generator = torch.Generator().manual_seed(settings.training.seed + index)
        # No ΔW cache: each adapted layer builds its ΔW, uses it and drops it, so validation
        # needs one layer's ΔW on top of the model, not a second copy of every adapted weight.
        with accelerator.autocast(), without_delta_cache(*trained.values()), decode_in_vae_dtype(components.vae):
            inputs = {**family.validation_inputs(components, prompt), **validation.guidance_kwargs(family.guidance_argument)}
            result = pipeline(
                **inputs, num_inference_steps=validation.validation_inference_steps,
                generator=generator, height=resolution, width=resolution, output_type="pil",
            )
        images.append(result.images[0])
    path = save_image_grid(images, output_dir / "validation" / f"step_{step}.png",
                           columns=min(4, len(images)) if len(prompts) == 1 else validation.num_validation_images,
                           row_labels=prompts if len(prompts) > 1 else None)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    logger.info("validation samples: %s", path)
    return path

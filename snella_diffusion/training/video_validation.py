"""Validation samples of a video family: for each validation prompt and sample, an ``.mp4``
(written with PyAV) and one frame-strip PNG of all samples, every ``--validation_steps``.

Files: ``validation/step_<N>_<prompt index>_<sample>.mp4`` and ``validation/step_<N>.png`` (a
row per sample, at most ``STRIP_FRAMES`` frames evenly spaced across each video)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..delta_cache import without_delta_cache
from ..families import ModelFamily, TrainingComponents
from ..viz import save_image_grid
from .run_settings import RunSettings
from .vae_inputs import decode_in_vae_dtype
from .validation_pipeline import validation_pipeline
from .video_dataset import resolve_num_frames
from .video_files import write_video

logger = logging.getLogger(__name__)

STRIP_FRAMES = 8


def strip_frames(video: np.ndarray, count: int = STRIP_FRAMES) -> list[Image.Image]:
    """``count`` frames (or all, if fewer) evenly spaced over ``video`` ``(F, H, W, 3)`` uint8, first and last included."""
    positions = np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int)
    return [Image.fromarray(video[index]) for index in positions]


def to_uint8(video: np.ndarray) -> np.ndarray:
    """A pipeline's float video in [0, 1] → uint8 ``(F, H, W, 3)``."""
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@torch.no_grad()
def run_video_validation(
    settings: RunSettings,
    accelerator: Any,
    family: ModelFamily,
    components: TrainingComponents,
    trained: dict[str, torch.nn.Module],
    step: int,
    resolution: int,
    output_dir: Path,
) -> Path:
    """Sample ``--num_validation_images`` videos of ``--validation_prompt`` (``--num_frames``
    frames at ``resolution``²) with the current adapters; write each as an .mp4 and all as
    one frame strip ``validation/step_<step>.png`` (returned)."""
    validation = settings.validation
    pipeline = validation_pipeline(family, components, trained)
    folder = output_dir / "validation"
    num_frames = resolve_num_frames(settings, family, components)
    rows: list[Image.Image] = []
    prompts = [validation.validation_prompt]
    for prompt_index, prompt in enumerate(prompts):
        for index in range(validation.num_validation_images):
            generator = torch.Generator().manual_seed(settings.training.seed + index)
            with accelerator.autocast(), without_delta_cache(*trained.values()), decode_in_vae_dtype(components.vae):
                inputs = {**family.validation_inputs(components, prompt), **validation.guidance_kwargs(family.guidance_argument)}
                video = pipeline(**inputs, num_frames=num_frames, num_inference_steps=validation.validation_inference_steps,
                                 generator=generator, height=resolution, width=resolution, output_type="np").frames[0]
            frames = to_uint8(np.asarray(video, dtype=np.float32))
            write_video(folder / f"step_{step}_{prompt_index}_{index}.mp4", frames, family.video_fps)
            rows.extend(strip_frames(frames))
    columns = min(STRIP_FRAMES, num_frames)
    path = save_image_grid(rows, folder / f"step_{step}.png", columns=columns)
    logger.info("validation videos: %s/step_%d_*.mp4, frame strip %s", folder, step, path)
    return path

"""The embedded run: what a DreamBooth run without ``--pretrained_model_name_or_path`` (and
without instance images) trains, and the defaults that make it a complete run in under two
minutes on a CPU.

The embedded model's setting is the lab's best (docs/lab.md, issue 26: picked on seed 0, held
out over seeds 1-3): rank 8 with the text encoder adapted, target sparsity 0.5, lr 3e-2 with the
default β decay, 400 steps drew the concept in 0.995 of 64 samples of "a sks square" (strict
checkerboard 0.44) where the UNet alone reached 0.13-0.16 (rank 8, issue 16). Real models keep
the paper's rank 32 and sparsity 0.8, UNet/transformer only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS
from .data import synthetic_instance_images, write_images

if TYPE_CHECKING:
    from .run_settings import RunSettings

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_FOLDER = "embedded-base-model"
EMBEDDED_INSTANCE_FOLDER = "instance-images"
EMBEDDED_PROMPT = "a sks square"
SYNTHETIC_PROMPT = "a photo of sks toy"
EMBEDDED_CLASS_PROMPT = "a square"
EMBEDDED_CLASS_FOLDER = "class-images"
EMBEDDED_INSTANCE_COUNT = 5
EMBEDDED_CLASS_IMAGES = 50
EMBEDDED_MAX_STEPS = 400
EMBEDDED_RANK = 8
EMBEDDED_TARGET_SPARSITY = 0.5
DEFAULT_RANK = 32
DEFAULT_TARGET_SPARSITY = 0.8
# The lab base draws its prompts best at guidance 3 (lab.base.BASE_GUIDANCE_SCALE, issue 16).
EMBEDDED_GUIDANCE_SCALE = BASE_GUIDANCE_SCALE
DEFAULT_VALIDATION_STEPS = 100
DEFAULT_CHECKPOINTING_STEPS = 500


def prepare_embedded_inputs(settings: RunSettings, accelerator: Any, output_dir: Path) -> RunSettings:
    """The run's settings with the embedded model and generated instance images filled in where
    flags are missing (written to ``output_dir`` by the main process), and the step defaults
    of validation and checkpoints resolved."""
    model, data, training, validation = settings.model, settings.data, settings.training, settings.validation
    no_images = (data.instance_data_dir is None and settings.datasets.dataset_name is None
                 and settings.datasets.dataset_config is None)
    embedded_model = model.pretrained_model_name_or_path is None
    if embedded_model:
        folder = output_dir / EMBEDDED_MODEL_FOLDER
        if accelerator.is_main_process:
            from ..lab.shipped import materialize_base

            logger.info("no --pretrained_model_name_or_path: writing the pretrained lab base to %s", folder)
            materialize_base(folder)
        model = dataclasses.replace(model, pretrained_model_name_or_path=str(folder))
        if training.max_train_steps is None:
            training = dataclasses.replace(training, max_train_steps=EMBEDDED_MAX_STEPS)
    if no_images and embedded_model:
        from ..lab.world import instance_pil_images

        folder = output_dir / EMBEDDED_INSTANCE_FOLDER
        if accelerator.is_main_process:
            logger.info("no --instance_data_dir: writing %d images of the lab concept sks to %s",
                        EMBEDDED_INSTANCE_COUNT, folder)
            write_images(instance_pil_images(EMBEDDED_INSTANCE_COUNT, seed=0), folder, "instance")
        data = dataclasses.replace(data, instance_data_dir=str(folder),
                                   instance_prompt=data.instance_prompt or EMBEDDED_PROMPT)
        if not data.with_prior_preservation:
            data = dataclasses.replace(
                data, with_prior_preservation=True,
                class_prompt=data.class_prompt or EMBEDDED_CLASS_PROMPT,
                class_data_dir=data.class_data_dir or str(output_dir / EMBEDDED_CLASS_FOLDER),
                num_class_images=min(data.num_class_images, EMBEDDED_CLASS_IMAGES),
                sample_batch_size=max(data.sample_batch_size, EMBEDDED_CLASS_IMAGES // 2),
                class_inference_steps=(BASE_INFERENCE_STEPS if data.class_inference_steps is None
                                       else data.class_inference_steps),
            )
            validation = dataclasses.replace(validation, validation_with_class_prompt=True)
    elif no_images:
        folder = output_dir / EMBEDDED_INSTANCE_FOLDER
        if accelerator.is_main_process:
            logger.info("no --instance_data_dir: writing 4 generated instance images to %s", folder)
            write_images(synthetic_instance_images(count=4, size=64, seed=0), folder, "instance")
        data = dataclasses.replace(data, instance_data_dir=str(folder),
                                   instance_prompt=SYNTHETIC_PROMPT if data.instance_prompt is None
                                   else data.instance_prompt)
    validation_steps, checkpointing_steps = validation.validation_steps, validation.checkpointing_steps
    if embedded_model:
        half_run = max(1, training.max_train_steps // 2)
        validation = dataclasses.replace(
            validation,
            validation_prompt=data.instance_prompt if validation.validation_prompt is None
            else validation.validation_prompt,
            validation_guidance_scale=EMBEDDED_GUIDANCE_SCALE if validation.validation_guidance_scale is None
            else validation.validation_guidance_scale,
        )
        validation_steps = validation_steps or half_run
        checkpointing_steps = checkpointing_steps or half_run
    validation = dataclasses.replace(
        validation, validation_steps=validation_steps or DEFAULT_VALIDATION_STEPS,
        checkpointing_steps=checkpointing_steps or DEFAULT_CHECKPOINTING_STEPS,
    )
    accelerator.wait_for_everyone()
    return dataclasses.replace(settings, model=model, data=data, training=training, validation=validation)

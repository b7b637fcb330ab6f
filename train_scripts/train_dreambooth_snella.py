"""DreamBooth with SNELLA adapters for Stable Diffusion 1.x/2.x, SDXL, SD3, Flux, PixArt, ... and Wan (video), run with accelerate.

    accelerate launch train_scripts/train_dreambooth_snella.py \\
        --pretrained_model_name_or_path=<hub id or folder> --instance_data_dir=<images> \\
        --instance_prompt="a photo of sks dog" --output_dir=<dir>

Flags follow diffusers' ``train_dreambooth_lora.py``. With no ``--pretrained_model_name_or_path``
the script trains the embedded model, the shipped pretrained 16 px lab base
(``snella_diffusion/lab``, written to ``<output_dir>/embedded-base-model`` and loaded by path),
and with no ``--instance_data_dir`` it generates 5 images of the lab concept ``sks`` and turns
on prior preservation: a complete run in under two minutes on a CPU.

The flags are parsed once into a frozen ``RunSettings`` (``snella_diffusion/training/run_settings.py``:
``--name`` fills the field ``name`` of one settings group); setup, validation and outputs live
in ``snella_diffusion/training/``; this file is the training loop.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from accelerate.logging import get_logger

from snella_diffusion import SnellaError, save_snella
from snella_diffusion.families import detect_family, read_scheduler_config
from snella_diffusion.families.base import TRAINED_MODULES_KEY
from snella_diffusion.training.adapters import attach_method
from snella_diffusion.training.checkpointing import CheckpointableGenerator, list_checkpoints, register_adapter_hooks, save_checkpoint
from snella_diffusion.training.data_arguments import check_data_settings, subset_records
from snella_diffusion.training.ema import AdapterEMA
from snella_diffusion.training.embedded_run import prepare_embedded_inputs
from snella_diffusion.training.job_config import RESOLVED_CONFIG_FILE, write_resolved_config
from snella_diffusion.training.loop import MicroBatchStep, RunProgress
from snella_diffusion.training.param_groups import freeze_snella_beta
from snella_diffusion.training.run_checks import check_family_settings, check_run_settings
from snella_diffusion.training.run_outputs import describe_objective, finalize_allocation, tracker_config, write_outputs
from snella_diffusion.training.run_settings import RunSettings, parse_run_settings
from snella_diffusion.training.run_setup import (
    BLOCK_SWAP_KEY,
    build_dataset,
    load_components,
    load_run_images,
    make_optimization,
    prepare_for_training,
    prompt_conditioning,
    resolve_step_count,
    resume_step,
    start_run,
)
from snella_diffusion.training.validation import run_validation

logger = get_logger(__name__)

RAW_OUTPUT_FILE = "snella_weights_raw.safetensors"


def parse_args(argv: Optional[Sequence[str]] = None) -> RunSettings:
    """The run's resolved, frozen settings from command-line flags (``argv`` defaults to
    ``sys.argv[1:]``) and ``--config``."""
    return parse_run_settings(argv)


def main(settings: RunSettings) -> Path:
    """Train; returns the path of the written adapter (``snella_weights.safetensors`` for SNELLA).

    Raises:
        SnellaError (or a subclass): bad flags, data, model or a non-finite loss; the message
            names the flag or file at fault.
    """
    started = time.monotonic()
    check_data_settings(settings)
    check_run_settings(settings)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    accelerator, output_dir, report_to = start_run(settings)
    settings = prepare_embedded_inputs(settings, accelerator, output_dir)
    base_model, seed, process = settings.model.pretrained_model_name_or_path, settings.training.seed, accelerator.process_index

    family, model_index = detect_family(base_model, settings.model.revision)
    check_family_settings(settings, family, read_scheduler_config(base_model, settings.model.revision))
    instance_images, subsets, subset_parts = load_run_images(settings, family)
    logger.info("model family: %s (%s)", family.name, model_index.get("_class_name"))
    components, resolution, weight_dtype = load_components(settings, family, model_index, accelerator)
    encode_generator = CheckpointableGenerator(seed + 7919 * process)
    dataset, loader = build_dataset(settings, accelerator, family, components, instance_images, resolution, encode_generator,
                                    subsets, subset_parts)
    data_subsets = subset_records(dataset)
    settings, steps_per_epoch = resolve_step_count(settings, loader, accelerator.num_processes)
    training, validation, adapter = settings.training, settings.validation, settings.adapter
    if accelerator.is_main_process:
        write_resolved_config(settings.flags(), output_dir / RESOLVED_CONFIG_FILE, data_subsets)

    config = adapter.snella_config(family.denoiser_preset, training.max_train_steps)
    method = adapter.method
    text_encoders = components.text_encoders if training.train_text_encoder else None
    trained, allocator = attach_method(method, components.denoiser, components.denoiser_component, config,
                                       training.max_train_steps, adapter.lora_rank, text_encoders=text_encoders,
                                       extra_denoisers=family.extra_denoisers(components))
    if adapter.freeze_beta:
        freeze_snella_beta(trained.values())
    trainable = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    logger.info("SNELLA: %d adapted layers (%s), %d trainable parameters", len(allocator.names),
                ", ".join(trained), sum(p.numel() for p in trainable))
    prepare_for_training(settings, components, trained)
    optimizer, lr_scheduler = make_optimization(settings, trainable, accelerator.num_processes, trained,
                                                components.denoiser_component)
    # with --blocks_to_swap the denoiser is placed already (its swapped weights in CPU memory)
    placement = [BLOCK_SWAP_KEY not in components.extra] * len(trained) + [accelerator.device_placement] * 3
    *wrapped_modules, optimizer, loader, lr_scheduler = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler,
                                                                            device_placement=placement)
    components.extra[TRAINED_MODULES_KEY] = dict(zip(trained, wrapped_modules))
    noise_generator = CheckpointableGenerator(seed + 104729 * process)
    if method.snella_layers:
        register_adapter_hooks(accelerator, trained, base_model, accelerator.unwrap_model)
    ema = AdapterEMA(trainable, settings.ema.ema_decay) if settings.ema.use_ema else None
    for state in (allocator, noise_generator, encode_generator, *([ema] if ema is not None else [])):
        accelerator.register_for_checkpointing(state)
    if accelerator.is_main_process and report_to:
        accelerator.init_trackers("snella-dreambooth", config=tracker_config(settings))
    global_step = resume_step(accelerator, output_dir, validation.resume_from_checkpoint)
    objective = family.objective(components, snr_gamma=training.snr_gamma)
    step = MicroBatchStep(settings, accelerator, family, components, objective,
                          prompt_conditioning(settings, family, components, dataset, accelerator.device),
                          dict(zip(trained, wrapped_modules)), trainable, optimizer, lr_scheduler, allocator, ema,
                          encode_generator, noise_generator, weight_dtype)

    first_epoch, num_epochs = global_step // steps_per_epoch, math.ceil(training.max_train_steps / steps_per_epoch)
    skip_batches = (global_step % steps_per_epoch) * training.gradient_accumulation_steps
    logger.info("training %d steps (%d epochs, %d instance images, batch %d × %d processes × %d accumulation)",
                training.max_train_steps, num_epochs, len(instance_images), training.train_batch_size,
                accelerator.num_processes, training.gradient_accumulation_steps)
    progress = RunProgress(accelerator, training.max_train_steps, global_step)
    validations: list[str] = []
    checkpoints = list_checkpoints(output_dir)
    last_checkpoint = checkpoints[-1].name if checkpoints else "none"

    def validate() -> None:
        path = run_validation(settings, accelerator, family, components, trained, global_step, resolution, output_dir)
        validations.append(path.relative_to(output_dir).as_posix())

    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= training.max_train_steps:
                break
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip_batches) if epoch == first_epoch and skip_batches else loader
            for batch in batches:
                mean_loss = step(batch, global_step, last_checkpoint)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.record(global_step, mean_loss, lr_scheduler.get_last_lr()[0], allocator)
                if global_step % validation.checkpointing_steps == 0:
                    path = save_checkpoint(accelerator, output_dir, global_step, validation.checkpoints_total_limit)
                    last_checkpoint = path.name
                    logger.info("saved %s", path)
                if validation.validation_prompt and global_step % validation.validation_steps == 0 and accelerator.is_main_process:
                    validate()
                if global_step >= training.max_train_steps:
                    break
    except BaseException:
        accelerator.end_training()
        raise
    progress.close()

    accelerator.wait_for_everyone()
    rank_drops = finalize_allocation(accelerator, allocator, finished=global_step >= training.max_train_steps)
    adapter_path = method.output_file(output_dir, components.denoiser_component)
    if accelerator.is_main_process:
        if ema is not None:
            save_snella(trained, output_dir / RAW_OUTPUT_FILE, base_model=base_model)
            ema.copy_to_parameters()
        if validation.validation_prompt and not any(v.endswith(f"step_{global_step}.png") for v in validations):
            validate()
        method.save(trained, output_dir, base_model)
        write_outputs(settings, family, config, allocator, rank_drops, progress.losses, validations, output_dir,
                      time.monotonic() - started, accelerator.num_processes, describe_objective(objective),
                      data_subsets, (components.denoiser_component, *family.extra_denoisers(components)))
        logger.info("wrote %s", adapter_path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter_path


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: errors raised on purpose print one line, not a traceback (after
    the traceback of the library error that caused them, if any)."""
    settings = parse_args(argv)
    try:
        main(settings)
    except SnellaError as error:
        cause = error.__cause__
        if cause is not None and not isinstance(cause, SnellaError):
            # e.g. a failed from_pretrained: its own traceback says what was wrong in the files.
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()

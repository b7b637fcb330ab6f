"""Setting up one DreamBooth run from its settings: the loaded model, the SNELLA adapters and
their allocator, the training images (one folder or dataset, or dataset subsets), the dataset
and its loader, the optimizer and its schedule, the resumed step."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from ..block_swap import BlockSwap, move_except_blocks
from ..families import ModelFamily, TrainingComponents
from ..single_file import check_single_file_class
from .captions import PromptEmbeddingCache
from .checkpointing import CheckpointableGenerator, resolve_resume_path
from .data import CachedLatentsDataset, generate_class_images, load_image_folder, warn_small_images
from .data_arguments import bucket_sizes, make_subset_dataset, make_training_dataset, make_training_loader, run_subsets
from .optimizers import make_optimizer
from .param_groups import optimizer_param_groups, uses_one_group
from .quantized_base import quantize_denoiser, quantize_text_encoders, quantized_text_encoders
from .run_checks import TrainingSetupError, resolve_report_to, use_cpu
from .run_settings import RunSettings
from .subset_dataset import SubsetImages
from .subsets import DatasetSubset, is_kohya_layout, load_subset
from .training_images import TrainingImage, load_training_images
from .vae_inputs import decode_in_vae_dtype
from .validation_pipeline import fresh_scheduler
from .video_dataset import describe_records, load_video_records, make_video_dataset, refuse_video_flags

logger = logging.getLogger(__name__)

# components.extra key of the run's BlockSwap (--blocks_to_swap)
BLOCK_SWAP_KEY = "block_swap"


def load_components(
    settings: RunSettings, family: ModelFamily, model_index: dict[str, Any], accelerator: Any
) -> tuple[TrainingComponents, int, torch.dtype]:
    """The family's components loaded in the training dtype (the VAE in float32, as diffusers'
    scripts do), configured with the run's family settings and moved to the device, the
    denoiser's linears quantized on ``--quantize_base`` (or loaded from the GGUF file of
    ``--pretrained_denoiser_file``) and the large text encoders on ``--quantize_text_encoder``;
    with ``--blocks_to_swap`` the swapped blocks stay in CPU
    memory (``block_swap_for``); returns ``(components, resolution in pixels, weight dtype)``."""
    source = settings.model.pretrained_model_name_or_path
    if settings.training.blocks_to_swap is not None and not family.block_lists:
        raise TrainingSetupError(f"--blocks_to_swap: {source} is a {family.name} model, which has no transformer "
                                 "blocks to swap (DiT families only)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    denoiser_file = settings.quantization.pretrained_denoiser_file
    encoders = []
    if settings.quantization.quantize_text_encoder is not None:
        encoders = quantized_text_encoders(model_index, family.text_encoder_components)
        if not encoders:
            raise TrainingSetupError(
                f"--quantize_text_encoder={settings.quantization.quantize_text_encoder}: {source}'s text encoders "
                f"({', '.join(family.text_encoder_components)}) are CLIP models only, which stay unquantized; "
                "drop the flag")
    spec = model_index.get(family.denoiser_component)
    if denoiser_file is not None and isinstance(spec, (list, tuple)) and len(spec) == 2:
        check_single_file_class(spec[0], spec[1], family.denoiser_component)
    components = family.load(source, model_index, settings.model.revision, settings.model.variant, dtype=weight_dtype,
                             denoiser_file=denoiser_file)
    if denoiser_file is not None:
        logger.info("the denoiser's weights from %s (GGUF, computed in %s)", denoiser_file, weight_dtype)
    family.configure(components, settings.family_settings())
    resolution = settings.data.resolution or family.native_resolution(components)
    vae_factor = family.vae_scale_factor(components)
    if resolution % vae_factor:
        raise TrainingSetupError(
            f"--resolution={resolution}: must be a multiple of {vae_factor} (the VAE's downsampling of {source})"
        )
    swap = block_swap_for(settings, family, components, accelerator.device)
    for module in components.modules.values():
        if swap is not None and module is components.denoiser:
            move_except_blocks(module, [swap.blocks[index] for index in swap.slots], accelerator.device)
        elif isinstance(module, torch.nn.Module):
            module.to(accelerator.device)
    quantization = settings.quantization
    quantized = quantize_denoiser(components.denoiser, quantization, weight_dtype)
    if quantized:
        logger.info("the denoiser's %d linears stored as %s (%s), computed in %s", quantized,
                    quantization.quantize_base, quantization.backend, weight_dtype)
    counts = quantize_text_encoders({name: components.modules[name] for name in encoders}, quantization, weight_dtype)
    for name, count in counts.items():
        logger.info("%s: %d linears stored as %s (%s), computed in %s", name, count,
                    quantization.quantize_text_encoder, quantization.text_encoder_backend, weight_dtype)
    return components, resolution, weight_dtype


def block_swap_for(settings: RunSettings, family: ModelFamily, components: TrainingComponents,
                   device: torch.device) -> Optional[BlockSwap]:
    """The run's :class:`BlockSwap` over the last ``--blocks_to_swap`` of the family's transformer
    blocks (kept in ``components.extra[BLOCK_SWAP_KEY]``), or None without the flag. Raises
    BlockSwapError for a family without blocks or more blocks than the denoiser has."""
    count = settings.training.blocks_to_swap
    if count is None:
        return None
    swap = BlockSwap(components.denoiser, family.swappable_blocks(components.denoiser), count, device)
    components.extra[BLOCK_SWAP_KEY] = swap
    logger.info("--blocks_to_swap=%d: the frozen weights of %d of %d transformer blocks wait in CPU memory",
                count, count, len(swap.blocks))
    return swap


def load_run_images(
    settings: RunSettings, family: Optional[ModelFamily] = None,
) -> tuple[list[Any], Optional[list[DatasetSubset]], Optional[list[SubsetImages]]]:
    """``(instance images, dataset subsets, the training subsets loaded)``: the subsets of
    ``--dataset_config`` or of kohya's ``<repeats>_<prompt>`` folders (``run_subsets``), whose
    training subsets are read here (the regularisation ones in :func:`build_dataset`); None,
    None for a plain folder or ``--dataset_name``, read as one set of instance images. For a
    video ``family``: its clips and images (``video_dataset.load_video_records``), None, None."""
    if family is not None and family.is_video:
        return load_video_records(settings), None, None
    if family is not None:
        refuse_video_flags(settings, family.name)
    subsets = run_subsets(settings)
    if subsets is None:
        return load_training_images(settings), None, None
    parts = [SubsetImages(subset, load_subset(subset)) for subset in subsets if not subset.is_reg]
    return [image for part in parts for image in part.images], subsets, parts


def build_dataset(
    settings: RunSettings,
    accelerator: Any,
    family: ModelFamily,
    components: TrainingComponents,
    instance_images: list[TrainingImage],
    resolution: int,
    encode_generator: CheckpointableGenerator,
    subsets: Optional[list[DatasetSubset]] = None,
    subset_parts: Optional[list[SubsetImages]] = None,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.DataLoader]:
    """The DreamBooth dataset and its loader: instance images (``TrainingImage`` records with
    captions and masks), class images with prior preservation (missing ones generated by the
    base model on the main process), aspect-ratio buckets, latents cached on request. With
    ``subsets`` (``subset_parts`` their loaded training subsets, :func:`load_run_images`), the
    subsets' dataset: the regularisation subsets are loaded here, after class images are
    generated (none for a kohya ``<repeats>_<prompt>`` class folder). A video family trains
    on ``video_dataset.VideoDataset`` (clips and one-frame images, frame-count buckets)."""
    data, dataset_name = settings.data, settings.datasets.dataset_name
    if family.is_video:
        video = make_video_dataset(settings, instance_images, family, components, resolution,
                                   bucket_sizes(settings.buckets, family, components, resolution))
        logger.info("video data: %s", describe_records(instance_images))
        clips: torch.utils.data.Dataset = video
        if data.cache_latents:
            clips = CachedLatentsDataset(
                video, lambda pixels: family.encode_latents(components, pixels.to(accelerator.device),
                                                            encode_generator.generator))
        return clips, make_training_loader(settings, clips, video)
    if subset_parts is None:
        source = f"--dataset_name={dataset_name}" if dataset_name else f"--instance_data_dir={data.instance_data_dir}"
        warn_small_images({image.name: image.image for image in instance_images}, resolution, source)
    for part in subset_parts or []:
        smallest = min(part.subset.resolution) if part.subset.resolution else resolution
        warn_small_images({image.name: image.image for image in part.images}, smallest, part.subset.where())
    class_images = None
    if data.with_prior_preservation and not is_kohya_layout(data.class_data_dir):
        class_folder = Path(data.class_data_dir)
        if accelerator.is_main_process:
            base_pipeline = family.pipeline(components, {"scheduler": fresh_scheduler(components.noise_scheduler)})
            base_pipeline.set_progress_bar_config(disable=True)
            steps = {} if data.class_inference_steps is None else {"num_inference_steps": data.class_inference_steps}
            with decode_in_vae_dtype(components.vae):
                generate_class_images(
                    base_pipeline, data.class_prompt, class_folder, data.num_class_images, data.sample_batch_size,
                    seed=settings.training.seed, progress=True,
                    pipeline_kwargs={"height": resolution, "width": resolution,
                                     **settings.validation.guidance_kwargs(family.guidance_argument), **steps},
                )
            del base_pipeline
        accelerator.wait_for_everyone()
        if subsets is None:
            class_named = load_image_folder(class_folder, "--class_data_dir")
            warn_small_images(class_named, resolution, f"--class_data_dir={class_folder}")
            class_images = list(class_named.values())[: data.num_class_images]

    if subsets is not None:
        parts = list(subset_parts or []) + [SubsetImages(s, load_subset(s)) for s in subsets if s.is_reg]
        images = make_subset_dataset(settings, parts, family, components, resolution)
        for record in images.subset_records():
            logger.info("subset %s: %d images × %d repeats%s", record["folder"], record["images"], record["repeats"],
                        " (regularisation)" if record["is_reg"] else "")
    else:
        buckets = bucket_sizes(settings.buckets, family, components, resolution)
        if buckets:
            logger.info("aspect-ratio buckets (h, w): %s", buckets)
        images = make_training_dataset(settings, instance_images, resolution, buckets, class_images)
    dataset: torch.utils.data.Dataset = images
    if data.cache_latents:
        dataset = CachedLatentsDataset(
            images, lambda pixels: family.encode_latents(components, pixels.to(accelerator.device), encode_generator.generator)
        )
    return dataset, make_training_loader(settings, dataset, images)


def make_optimization(
    settings: RunSettings, trainable: list[torch.nn.Parameter], num_processes: int,
    trained: Optional[dict[str, torch.nn.Module]] = None, denoiser_component: str = "unet",
) -> tuple[Any, Any]:
    """The optimizer over ``trainable`` and its learning-rate schedule (``--scale_lr`` scales
    the rates by processes × accumulation × batch size). With ``--text_encoder_lr``,
    ``--snella_scalar_lr`` or ``--beta_decay``, the parameters of ``trained`` (``{component:
    model}``) are split into groups (``param_groups.optimizer_param_groups``); without them,
    one list at ``--learning_rate``, as the reference."""
    training = settings.training
    learning_rate = training.learning_rate
    lr_scale = 1.0
    if training.scale_lr:
        lr_scale = training.gradient_accumulation_steps * training.train_batch_size * num_processes
        learning_rate *= lr_scale
    params: list[Any] = trainable
    if trained is not None and not uses_one_group(settings.optimizer):
        params = optimizer_param_groups(trained, denoiser_component, settings.optimizer, learning_rate,
                                        training.adam_weight_decay, lr_scale)
    optimizer = make_optimizer(settings.optimizer, training, params, learning_rate)
    lr_scheduler = get_scheduler(
        training.lr_scheduler, optimizer=optimizer, num_warmup_steps=training.lr_warmup_steps * num_processes,
        num_training_steps=training.max_train_steps * num_processes,
        num_cycles=training.lr_num_cycles, power=training.lr_power,
    )
    return optimizer, lr_scheduler


def resume_step(accelerator: Any, output_dir: Path, resume_from_checkpoint: Any) -> int:
    """Load the state of ``--resume_from_checkpoint`` (a folder, or "latest" in ``output_dir``)
    into ``accelerator``; returns its optimizer step (0 when there is nothing to resume)."""
    if not resume_from_checkpoint:
        return 0
    resume_path = resolve_resume_path(output_dir, resume_from_checkpoint)
    if resume_path is None:
        logger.info("--resume_from_checkpoint=latest: no checkpoint in %s, starting a new run", output_dir)
        return 0
    logger.info("resuming from %s", resume_path)
    accelerator.load_state(str(resume_path))
    return int(resume_path.name.split("-")[1])


def make_accelerator(settings: RunSettings, output_dir: Path, report_to: Any) -> Accelerator:
    """The run's Accelerator: accumulation, precision, tracker, logging folder, device choice."""
    training = settings.training
    return Accelerator(
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        mixed_precision=training.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / settings.validation.logging_dir)),
        cpu=use_cpu(training.cpu),
        # SDXL's first text encoder contributes its penultimate layer only: the adapters of its
        # last layer get no gradient, which DDP must be told about.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(training.train_text_encoder))],
    )


def start_run(settings: RunSettings) -> tuple[Accelerator, Path, Optional[str]]:
    """The run's Accelerator, output folder (created by the main process) and tracker; seeds
    every generator with ``--seed`` and allows TF32 on request. Refuses ``--blocks_to_swap`` on
    several processes."""
    output_dir = Path(settings.training.output_dir)
    report_to = resolve_report_to(settings.validation.report_to)
    accelerator = make_accelerator(settings, output_dir, report_to)
    if settings.training.blocks_to_swap is not None and accelerator.num_processes > 1:
        raise TrainingSetupError(f"--blocks_to_swap runs on one process ({accelerator.num_processes} were launched: "
                                 "DDP wants every parameter on one device)")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(settings.training.seed)
    if settings.training.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator, output_dir, report_to


def prepare_for_training(settings: RunSettings, components: TrainingComponents,
                         trained: dict[str, torch.nn.Module]) -> None:
    """xformers attention and gradient checkpointing on request; the trained modules in train mode;
    with ``--blocks_to_swap``, the swapped blocks' frozen weights homed in CPU memory, their
    adapters (created beside those weights, in CPU memory) moved to the device, and the hooks
    installed."""
    if settings.training.enable_xformers_memory_efficient_attention:
        components.denoiser.enable_xformers_memory_efficient_attention()
    if settings.training.gradient_checkpointing:
        denoisers = {components.denoiser_component, *trained} - set(components.text_encoder_components)
        for name in sorted(denoisers):
            components.modules[name].enable_gradient_checkpointing()
        if settings.training.train_text_encoder:
            for name in components.text_encoder_components:
                components.modules[name].gradient_checkpointing_enable()
    for module in trained.values():
        module.train()
    swap = components.extra.get(BLOCK_SWAP_KEY)
    if swap is not None:
        swap.attach()


def resolve_step_count(settings: RunSettings, loader: Any, num_processes: int) -> tuple[RunSettings, int]:
    """``(settings with --max_train_steps resolved from the epochs when not given, optimizer
    steps per epoch)``: batches per process divided by the accumulation steps, rounded up."""
    training = settings.training
    steps_per_epoch = math.ceil(math.ceil(len(loader) / num_processes) / training.gradient_accumulation_steps)
    if training.max_train_steps is None:
        training = dataclasses.replace(training, max_train_steps=training.num_train_epochs * steps_per_epoch)
    return dataclasses.replace(settings, training=training), steps_per_epoch


def prompt_conditioning(
    settings: RunSettings, family: ModelFamily, components: TrainingComponents, dataset: Any, device: torch.device
) -> PromptEmbeddingCache:
    """Prompts → the family's conditioning tensors; with frozen text encoders every known
    prompt (instance captions, class prompt) is encoded once and the family may then release
    its encoders."""
    train_text_encoder = bool(settings.training.train_text_encoder)
    conditioning_for = PromptEmbeddingCache(
        lambda prompts: family.encode_prompt(components, prompts, device), train_text_encoder,
    )
    known_prompts = getattr(dataset, "dataset", dataset).possible_prompts()
    if not train_text_encoder and known_prompts is not None:
        conditioning_for.precompute(known_prompts | ({settings.data.class_prompt} - {None}))
        family.release_text_encoders(components, settings.validation.validation_prompt, device)
    return conditioning_for

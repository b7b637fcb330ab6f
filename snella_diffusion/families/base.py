"""The model-family base class: what the DreamBooth script calls on a family, the loaded
components it works on, and the generic loader.

What the training script calls, in order (``components`` is a :class:`TrainingComponents`):

- ``family.load(source, model_index, revision, variant, dtype)``: every pipeline component by
  its ``model_index.json`` class (safety checker / feature extractor / image encoder skipped).
- ``family.configure(components, settings)``: check the run's :class:`FamilySettings` and keep
  what the family needs (no-op by default).
- ``family.native_resolution(components)``: default training resolution in pixels.
- ``family.encode_latents(components, pixels)``: ``(B, 3, H, W)`` in [-1, 1] → latents
  (scaled with the VAE's ``scaling_factor`` and ``shift_factor``).
- ``family.encode_prompt(components, prompts, device)``: ``{name: tensor}``, every tensor with
  the batch on dim 0 (the script concatenates and repeats them along dim 0). Must be
  differentiable through the text encoders (they may be trained).
- ``family.release_text_encoders(components, validation_prompt, device)``: after the prompts
  were encoded once (text encoders not trained); a family may free its encoders.
- ``family.objective(components, snr_gamma)``: an object with
  ``prepare(latents, noise, generator) -> ObjectiveBatch`` (see ``training/objectives.py``).
- ``family.predict(components, noisy_latents, timesteps, conditioning, batch)``: the
  denoiser output compared with ``ObjectiveBatch.target``; ``batch`` is the data batch
  (``original_sizes``, ``crop_top_lefts``: ``(B, 2)`` int tensors, pixels).
- ``family.pipeline(components)``: a diffusers pipeline built from the loaded (possibly
  adapted) modules, for validation and class-image generation, called with
  ``**family.validation_inputs(components, prompt)``.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..hub import HubDownloadError, download_hub_file
from ..single_file import load_gguf_denoiser
from ..training.objectives import NoiseObjective, TrainingObjective

if TYPE_CHECKING:
    from .dit import DiTFlags


@dataclass(frozen=True)
class FamilySettings:
    """The run settings a family's ``configure`` reads.

    Attributes:
        dit: the flags of the transformer families (``--weighting_scheme``, ...; ignored by the
            UNet families).
        train_text_encoder: whether the text encoders are trained (``--train_text_encoder``).
        resolution: ``--resolution`` in pixels, or None for the model's native size.
        wan_expert: ``--wan_expert`` (Wan 2.2 A14B: "high", "low", "both"; None: the family's default).
    """

    dit: "DiTFlags"
    train_text_encoder: bool = False
    resolution: Optional[int] = None
    wan_expert: Optional[str] = None


SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


# TrainingComponents.extra key: {component: the module as the training loop calls it} (the
# accelerate-wrapped trained modules), set by the training script after ``accelerator.prepare``.
TRAINED_MODULES_KEY = "trained_modules"

# Loaded in float32 whatever the training dtype: SD/SDXL VAEs overflow in fp16 (NaN latents).
FLOAT32_COMPONENTS = ("vae",)


def dtype_keyword(library: str) -> str:
    """The ``from_pretrained`` keyword that sets the load dtype: ``dtype`` for transformers 4.56
    and later (``torch_dtype`` is deprecated there), ``torch_dtype`` otherwise (diffusers)."""
    if library == "transformers":
        import transformers

        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        if (major, minor) >= (4, 56):
            return "dtype"
    return "torch_dtype"


class UnknownModelFamilyError(SnellaError):
    """The pipeline's ``model_index.json`` names a class no registered family handles."""


@dataclass
class TrainingComponents:
    """The loaded pipeline modules a trainer works with.

    Attributes:
        source: hub id or local folder the modules came from.
        pipeline_class_name: ``_class_name`` from ``model_index.json``.
        modules: every loaded component by its pipeline attribute name (``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler``, ...).
        denoiser_component: the key of the trained denoiser in ``modules``.
        text_encoder_components: the keys of the text encoders in ``modules``.
    """

    source: str
    pipeline_class_name: str
    modules: dict[str, Any]
    denoiser_component: str
    text_encoder_components: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> nn.Module:
        return self.modules[self.denoiser_component]

    @property
    def vae(self) -> nn.Module:
        return self.modules["vae"]

    @property
    def noise_scheduler(self) -> Any:
        return self.modules["scheduler"]

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {name: self.modules[name] for name in self.text_encoder_components}


def read_model_index(source: str, revision: Optional[str] = None) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a local pipeline folder or a hub repository."""
    local = Path(source)
    if local.is_dir():
        index_path = local / "model_index.json"
        if not index_path.is_file():
            raise UnknownModelFamilyError(
                f"--pretrained_model_name_or_path={source}: folder has no model_index.json "
                "(expected a diffusers pipeline folder, e.g. one written by save_pretrained)"
            )
    elif os.path.exists(source):
        raise UnknownModelFamilyError(
            f"--pretrained_model_name_or_path={source}: is a file, expected a diffusers pipeline folder"
        )
    else:
        try:
            index_path = download_hub_file(source, "model_index.json", revision=revision)
        except HubDownloadError as error:
            raise UnknownModelFamilyError(
                f"--pretrained_model_name_or_path={source}: no local folder of that name, and {error}"
            ) from error
    try:
        return json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise UnknownModelFamilyError(f"{index_path}: not valid JSON ({error})") from error


def read_scheduler_config(source: str, revision: Optional[str] = None) -> dict[str, Any]:
    """The parsed ``scheduler/scheduler_config.json`` of a local pipeline folder or a hub
    repository; ``{}`` when the pipeline has none (read before any model loads)."""
    local = Path(source)
    if local.is_dir():
        path = local / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            return {}
    else:
        try:
            path = download_hub_file(source, "scheduler/scheduler_config.json", revision=revision)
        except HubDownloadError:
            return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UnknownModelFamilyError(f"{path}: not valid JSON ({error})") from error


def _import_class(library: str, class_name: str) -> type:
    module = importlib.import_module(library)
    return getattr(module, class_name)


class ModelFamily:
    """What differs between pipeline families; one subclass per file of this package, one
    instance in ``FAMILIES`` (``families/__init__.py``)."""

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_component: str = "unet"
    denoiser_preset: str = "unet"
    text_encoder_components: tuple[str, ...] = ("text_encoder",)
    # Video families train on (B, 3, F, H, W) clips (training/video_dataset.py) and validate with videos.
    is_video: bool = False
    # Frames per second a video family's validation clips are written at (its pipeline's rate).
    video_fps: float = 16.0
    # The pipeline call's argument that --validation_guidance_scale sets (Qwen-Image 2.1's
    # pipeline has only ``true_cfg_scale``); None where the pipeline takes none (refused).
    guidance_argument: Optional[str] = "guidance_scale"
    # Extra keyword arguments the pipeline constructor needs for skipped components.
    pipeline_kwargs: dict[str, Any] = {}
    # The denoiser's ``nn.ModuleList`` attributes of transformer blocks, in the order its forward
    # runs them (``swappable_blocks``, ``--blocks_to_swap``); none for UNet families.
    block_lists: tuple[str, ...] = ()

    def swappable_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's transformer blocks in the order its forward runs them: the modules of
        its ``block_lists`` attributes that exist, concatenated ([] when there are none)."""
        blocks: list[nn.Module] = []
        for name in self.block_lists:
            blocks.extend(getattr(denoiser, name, None) or ())
        return blocks

    def load(
        self,
        source: str,
        model_index: dict[str, Any],
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        denoiser_file: Optional[str] = None,
    ) -> TrainingComponents:
        """Load every component named in ``model_index`` from ``source`` (folder or hub id).

        ``dtype`` is the dtype the neural modules are loaded in (``torch_dtype=``, as diffusers'
        scripts do, so no float32 copy of a large model is built first); the components of
        ``FLOAT32_COMPONENTS`` (the VAE) load in float32 whatever ``dtype`` is. With
        ``denoiser_file`` (a GGUF checkpoint), the denoiser is built from ``source``'s config and
        that file's quantized weights instead (``single_file.load_gguf_denoiser``).
        """
        modules: dict[str, Any] = {}
        for component, spec in model_index.items():
            if component.startswith("_") or component in SKIPPED_COMPONENTS:
                continue
            # [library, class] pairs; null components and pipeline settings (Krea 2's [2, 5, ...]) are not loaded
            if not isinstance(spec, (list, tuple)) or len(spec) != 2 or not all(isinstance(part, str) for part in spec):
                continue
            library, class_name = spec
            cls = _import_class(library, class_name)
            kwargs: dict[str, Any] = {"subfolder": component}
            if revision is not None:
                kwargs["revision"] = revision
            is_module = isinstance(cls, type) and issubclass(cls, nn.Module)
            if is_module and variant is not None:
                kwargs["variant"] = variant
            if is_module and dtype is not None:
                kwargs[dtype_keyword(library)] = torch.float32 if component in FLOAT32_COMPONENTS else dtype
            if component == self.denoiser_component and denoiser_file is not None:
                modules[component] = load_gguf_denoiser(cls, denoiser_file, source, component,
                                                        dtype or torch.float32, revision)
                continue
            try:
                loaded = cls.from_pretrained(source, **kwargs)
            except Exception as error:
                raise SnellaError(
                    f"--pretrained_model_name_or_path={source}: could not load component "
                    f"{component!r} ({class_name}): {type(error).__name__}: {error}"
                ) from error
            if is_module:
                loaded.requires_grad_(False)
            modules[component] = loaded
        for component, loaded in self.components_from_elsewhere(source, modules, revision, dtype).items():
            modules[component] = loaded
        for required in (self.denoiser_component, "vae", "scheduler", *self.text_encoder_components):
            if required not in modules:
                raise SnellaError(
                    f"--pretrained_model_name_or_path={source}: component {required!r} is missing "
                    f"from model_index.json (family {self.name})"
                )
        return TrainingComponents(
            source=source,
            pipeline_class_name=model_index.get("_class_name", ""),
            modules=modules,
            denoiser_component=self.denoiser_component,
            text_encoder_components=self.text_encoder_components,
        )

    def extra_denoisers(self, components: TrainingComponents) -> dict[str, nn.Module]:
        """Denoisers trained beside ``components.denoiser`` in the same adapter file, by
        component name (Wan 2.2 A14B's second expert); none by default."""
        return {}

    def components_from_elsewhere(
        self, source: str, loaded: dict[str, Any], revision: Optional[str], dtype: Optional[torch.dtype]
    ) -> dict[str, Any]:
        """Components the pipeline folder does not hold (``model_index.json`` names none or null)
        that the family loads from another source, given the ``loaded`` ones; called by ``load``
        before it checks that every required component is there. Default: none (HiDream loads
        its Llama encoder here, as diffusers' example does)."""
        return {}

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    def pixel_multiple(self, components: TrainingComponents) -> int:
        """The pixel granularity of the denoiser (bucket sides are multiples of it): VAE factor ×
        the UNet's downsampling, or × the DiT's patch size."""
        vae_factor = self.vae_scale_factor(components)
        config = components.denoiser.config
        if hasattr(config, "block_out_channels"):
            return vae_factor * 2 ** (len(config.block_out_channels) - 1)
        return vae_factor * int(getattr(config, "patch_size", 1) or 1)

    def native_resolution(self, components: TrainingComponents) -> int:
        """The denoiser's native sample size in pixels (512 for SD 1.5, 1024 for SDXL)."""
        return int(components.denoiser.config.sample_size) * self.vae_scale_factor(components)

    @torch.no_grad()
    def encode_latents(
        self, components: TrainingComponents, pixels: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → latents ``(B, C, H/f, W/f)`` in the denoiser's units."""
        vae = components.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def configure(self, components: TrainingComponents, settings: "FamilySettings") -> None:
        """Check the family's settings and store what it needs in ``components.extra`` (the
        transformer families of ``dit.py`` do); called right after ``load``. Default: nothing."""

    def release_text_encoders(
        self, components: TrainingComponents, validation_prompt: Optional[str], device: torch.device
    ) -> None:
        """Called once the training prompts are cached (text encoders not trained): a family
        may free or offload its encoders here. Default: keep them."""

    def validation_inputs(self, components: TrainingComponents, prompt: str) -> dict[str, Any]:
        """Keyword arguments of a validation pipeline call besides the sampling settings."""
        return {"prompt": prompt}

    def encode_prompt(
        self, components: TrainingComponents, prompts: list[str], device: torch.device
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def objective(self, components: TrainingComponents, snr_gamma: Optional[float] = None) -> TrainingObjective:
        """DDPM noise objective; the prediction type comes from the scheduler config."""
        return NoiseObjective(components.noise_scheduler, snr_gamma=snr_gamma)

    def predict(
        self,
        components: TrainingComponents,
        noisy_latents: Tensor,
        timesteps: Tensor,
        conditioning: dict[str, Tensor],
        batch: dict[str, Any],
        denoiser: Optional[nn.Module] = None,
    ) -> Tensor:
        """The denoiser output for ``noisy_latents``; ``denoiser`` overrides the module called
        (the accelerate-wrapped one)."""
        raise NotImplementedError

    def pipeline(self, components: TrainingComponents, modules: Optional[dict[str, Any]] = None) -> Any:
        """A diffusers pipeline of this family built from the loaded modules (``modules``
        overrides some, e.g. the unwrapped adapted UNet)."""
        import diffusers

        cls = getattr(diffusers, components.pipeline_class_name)
        parts = dict(components.modules)
        parts.update(modules or {})
        return cls(**parts, **self.pipeline_kwargs)


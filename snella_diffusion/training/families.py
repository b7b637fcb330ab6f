"""Model families for training: detection from ``model_index.json`` and everything that differs
between pipelines (which components exist, prompt encoding, the denoiser call, the objective).

Registry interface (for other modules, e.g. ``snella_diffusion/training/dit_families.py``)
-------------------------------------------------------------------------------------------
A family is an instance of a :class:`ModelFamily` subclass, registered with
:func:`register_family`. :func:`detect_family` reads ``_class_name`` from the pipeline's
``model_index.json`` and returns the registered family whose ``pipeline_class_names`` contains
it. Modules named in ``FAMILY_PLUGINS`` are imported on first detection, so a plugin module
only has to exist and call ``register_family`` at import time::

    from snella_diffusion.training.families import ModelFamily, TrainingComponents, register_family

    class SD3Family(ModelFamily):
        name = "sd3"
        pipeline_class_names = ("StableDiffusion3Pipeline",)
        denoiser_component = "transformer"              # attribute name in the pipeline
        denoiser_preset = "dit"                          # SnellaConfig target preset
        text_encoder_components = ("text_encoder", "text_encoder_2", "text_encoder_3")

        def encode_prompt(self, components, prompts, device): ...   # -> dict of batch-first tensors
        def predict(self, components, noisy_latents, timesteps, conditioning, batch): ...
        def objective(self, components, snr_gamma): ...             # -> a TrainingObjective

    register_family(SD3Family())

A plugin module that needs its own command-line flags registers a function adding them
with :func:`register_arguments` (``register_arguments(add_dit_arguments)``); the training
script calls :func:`add_family_arguments` on its parser, which imports the plugins first.

What the training script calls, in order (``components`` is a :class:`TrainingComponents`):

- ``family.load(source, revision, variant, dtype)``: every pipeline component by its
  ``model_index.json`` class (safety checker / feature extractor / image encoder skipped).
  Inherited implementation is generic; override only for special cases.
- ``family.configure(components, args)``: read family-specific flags (no-op by default).
- ``family.native_resolution(components)``: default training resolution in pixels.
- ``family.encode_latents(components, pixels)``: ``(B, 3, H, W)`` in [-1, 1] → latents
  (scaled with the VAE's ``scaling_factor`` and ``shift_factor``).
- ``family.encode_prompt(components, prompts, device)``: ``{name: tensor}``, every tensor with
  the batch on dim 0 (the script concatenates and repeats them along dim 0). Must be
  differentiable through the text encoders (they may be trained).
- ``family.release_text_encoders(components, validation_prompt, device)``: after the prompts
  were encoded once (text encoders not trained); a family may free its encoders.
- ``family.objective(components, snr_gamma)``: an object with
  ``prepare(latents, noise, generator) -> ObjectiveBatch`` (see ``objectives.py``).
- ``family.predict(components, noisy_latents, timesteps, conditioning, batch)``: the
  denoiser output compared with ``ObjectiveBatch.target``; ``batch`` is the data batch
  (``original_sizes``, ``crop_top_lefts``: ``(B, 2)`` int tensors, pixels).
- ``family.pipeline(components)``: a diffusers pipeline built from the loaded (possibly
  adapted) modules, for validation and class-image generation, called with
  ``**family.validation_inputs(components, prompt)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..hub import HubDownloadError, download_hub_file
from .objectives import NoiseObjective, TrainingObjective

FAMILY_PLUGINS: tuple[str, ...] = ("snella_diffusion.training.dit_families",)

# Components a trainer never needs (and that may be missing or heavy).
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


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


def _import_class(library: str, class_name: str) -> type:
    module = importlib.import_module(library)
    return getattr(module, class_name)


def tokenize(tokenizer: Any, prompts: list[str]) -> Tensor:
    """Token ids ``(B, model_max_length)``, padded and truncated like diffusers pipelines."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


class ModelFamily:
    """What differs between pipeline families; subclass and ``register_family`` an instance."""

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_component: str = "unet"
    denoiser_preset: str = "unet"
    text_encoder_components: tuple[str, ...] = ("text_encoder",)
    # Extra keyword arguments the pipeline constructor needs for skipped components.
    pipeline_kwargs: dict[str, Any] = {}

    def load(
        self,
        source: str,
        model_index: dict[str, Any],
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> TrainingComponents:
        """Load every component named in ``model_index`` from ``source`` (folder or hub id).

        ``dtype`` is the dtype the neural modules are loaded in (``torch_dtype=``, as diffusers'
        scripts do, so no float32 copy of a large model is built first); the components of
        ``FLOAT32_COMPONENTS`` (the VAE) load in float32 whatever ``dtype`` is.
        """
        modules: dict[str, Any] = {}
        for component, spec in model_index.items():
            if component.startswith("_") or component in SKIPPED_COMPONENTS:
                continue
            if not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
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

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

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

    def configure(self, components: TrainingComponents, args: Any) -> None:
        """Read family-specific flags into ``components.extra`` (the DiT families of
        ``dit_families.py`` read theirs here); called right after ``load``. Default: none."""

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


class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon or v-prediction."""

    name = "stable-diffusion"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompt(self, components, prompts, device):
        encoder = components.modules["text_encoder"]
        ids = tokenize(components.modules["tokenizer"], prompts).to(device)
        return {"prompt_embeds": encoder(ids)[0]}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        unet = denoiser or components.denoiser
        return unet(noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated), the pooled embedding
    of the second, and added time ids (original size, crop corner, target size)."""

    name = "stable-diffusion-xl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    pipeline_kwargs = {}

    def encode_prompt(self, components, prompts, device):
        hidden_states, pooled = [], None
        for encoder_name, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            ids = tokenize(components.modules[tokenizer_name], prompts).to(device)
            output = components.modules[encoder_name](ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        unet = denoiser or components.denoiser
        factor = self.vae_scale_factor(components)
        # target_size is the (height, width) trained at: the bucket's size with aspect-ratio buckets
        size = torch.tensor([noisy_latents.shape[-2] * factor, noisy_latents.shape[-1] * factor])
        count = noisy_latents.shape[0]
        original = batch.get("original_sizes")
        crops = batch.get("crop_top_lefts")
        if original is None:
            original = size.repeat(count, 1)
        if crops is None:
            crops = torch.zeros((count, 2))
        target = size.repeat(count, 1)
        time_ids = torch.cat([original, crops, target], dim=1).to(noisy_latents.device, noisy_latents.dtype)
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": time_ids}
        return unet(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
            added_cond_kwargs=added,
        ).sample


FAMILIES: dict[str, ModelFamily] = {}
ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []
_plugins_loaded = False


def register_arguments(hook: Callable[[argparse.ArgumentParser], None]) -> None:
    """Have ``hook(parser)`` add a plugin's flags to the training script's parser (once)."""
    if hook not in ARGUMENT_HOOKS:
        ARGUMENT_HOOKS.append(hook)


def add_family_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every registered plugin asked for (see ``register_arguments``)."""
    _load_plugins()
    for hook in ARGUMENT_HOOKS:
        hook(parser)


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` detectable; a later registration of the same name replaces it."""
    if not family.name or not family.pipeline_class_names:
        raise SnellaError(f"{type(family).__name__}: a family needs a name and pipeline_class_names")
    FAMILIES[family.name] = family
    return family


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module_name in FAMILY_PLUGINS:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise


def family_for_class(pipeline_class_name: str, where: str = "") -> ModelFamily:
    """The registered family handling ``pipeline_class_name``; UnknownModelFamilyError if none."""
    _load_plugins()
    for family in FAMILIES.values():
        if pipeline_class_name in family.pipeline_class_names:
            return family
    known = sorted(name for family in FAMILIES.values() for name in family.pipeline_class_names)
    raise UnknownModelFamilyError(
        f"{where or 'model_index.json'}: pipeline class {pipeline_class_name!r} is not a supported "
        f"model family (supported: {', '.join(known)})"
    )


def detect_family(source: str, revision: Optional[str] = None) -> tuple[ModelFamily, dict[str, Any]]:
    """The family of the pipeline at ``source`` (folder or hub id) and its model index."""
    model_index = read_model_index(source, revision)
    class_name = model_index.get("_class_name")
    if not class_name:
        raise UnknownModelFamilyError(f"{source}/model_index.json: has no '_class_name'")
    return family_for_class(class_name, f"{source}/model_index.json"), model_index


register_family(StableDiffusionFamily())
register_family(StableDiffusionXLFamily())

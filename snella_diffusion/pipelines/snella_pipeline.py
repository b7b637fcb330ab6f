"""A diffusers custom pipeline for Stable Diffusion 1.x/2.x and SDXL bases with SNELLA adapters.

Installed with the package; use it directly, or through diffusers' ``custom_pipeline=``::

    from snella_diffusion.pipelines import SnellaStableDiffusionPipeline, CUSTOM_PIPELINE

    pipe = SnellaStableDiffusionPipeline.from_pretrained(
        base, snella_weights="snella-output/snella_weights.safetensors")   # optional
    pipe = DiffusionPipeline.from_pretrained(
        base, custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True, snella_weights=...)
    pipe.set_snella_adapters(["default_0"], [0.8])
    image = pipe("a photo of sks dog").images[0]

(``custom_pipeline="pipelines/snella_pipeline"`` from a checkout runs this same class.)

It holds the union of the SD and SDXL components and runs the matching diffusers pipeline
(``StableDiffusionXLPipeline`` when ``text_encoder_2`` is present, else
``StableDiffusionPipeline``) on the very same modules, so every argument of those pipelines'
``__call__`` works. The SNELLA methods come from ``snella_diffusion.loaders.SnellaLoaderMixin``.

DiT bases (SD3, Flux, PixArt) have other components (``transformer``, ``text_encoder_3``,
T5 tokenizers) and pipelines; load adapters into them with the functions of
``snella_diffusion.loaders`` (``load_snella_weights(pipe, path)`` etc.), which work on any
pipeline whose ``transformer`` and text encoders match the file's components.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from snella_diffusion.loaders import SnellaLoaderMixin

SnellaWeights = Union[None, str, os.PathLike, dict[str, Union[str, os.PathLike]]]


class SnellaStableDiffusionPipeline(DiffusionPipeline, SnellaLoaderMixin):
    """Text-to-image for SD 1.x/2.x and SDXL bases, with the SNELLA adapter methods.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: as in ``StableDiffusionPipeline``.
        text_encoder_2, tokenizer_2: SDXL's second encoder (None for SD 1.x/2.x).
        safety_checker, feature_extractor, image_encoder: optional, as in diffusers.
        requires_safety_checker: SD 1.x/2.x setting, passed to ``StableDiffusionPipeline``.
        force_zeros_for_empty_prompt, add_watermarker: SDXL settings.
        snella_weights: adapter(s) to load at construction: a file, a folder, a Hub id, or
            ``{adapter_name: file}`` for several; not stored in the pipeline config.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = [
        "text_encoder_2", "tokenizer_2", "safety_checker", "feature_extractor", "image_encoder",
    ]
    _exclude_from_cpu_offload = ["safety_checker"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder_2: Optional[CLIPTextModelWithProjection],
        tokenizer_2: Optional[CLIPTokenizer],
        safety_checker: Any,
        feature_extractor: Any,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
        snella_weights: SnellaWeights = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, safety_checker=safety_checker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self.register_to_config(
            requires_safety_checker=requires_safety_checker,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        if snella_weights is not None:
            self.load_snella_from(snella_weights)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> "SnellaStableDiffusionPipeline":
        """Share ``pipeline``'s modules (an SD or SDXL pipeline); components it lacks are None.

        ``snella_weights=`` is loaded after diffusers' dtype conversion, so adapter tensors
        stay float32. The modules are shared: an adapter loaded here acts in ``pipeline`` too.
        """
        snella_weights = kwargs.pop("snella_weights", None)
        for name in cls._optional_components:
            if name not in pipeline.components:
                kwargs.setdefault(name, None)
        new_pipeline = super().from_pipe(pipeline, **kwargs)
        if snella_weights is not None:
            new_pipeline.load_snella_from(snella_weights)
        return new_pipeline

    def load_snella_from(self, snella_weights: SnellaWeights) -> list[str]:
        """Load one adapter (a path or Hub id) or ``{name: path}``; returns the adapter names."""
        if isinstance(snella_weights, dict):
            return [self.load_snella_weights(path, adapter_name=name) for name, path in snella_weights.items()]
        return [self.load_snella_weights(snella_weights)]

    @property
    def is_sdxl(self) -> bool:
        """True when the pipeline holds SDXL's second text encoder."""
        return getattr(self, "text_encoder_2", None) is not None

    def base_pipeline(self) -> DiffusionPipeline:
        """The diffusers pipeline that runs generation, built on this pipeline's own modules."""
        shared = dict(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
        )
        if self.is_sdxl:
            pipeline = StableDiffusionXLPipeline(
                text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt,
                add_watermarker=self.config.add_watermarker, **shared,
            )
        else:
            pipeline = StableDiffusionPipeline(
                safety_checker=self.safety_checker,
                requires_safety_checker=self.config.requires_safety_checker,
                **shared,
            )
        pipeline.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipeline

    def __call__(self, *args: Any, **kwargs: Any):
        """Generate as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` would."""
        return self.base_pipeline()(*args, **kwargs)

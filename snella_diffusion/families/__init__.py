"""Model families for training: one module per family, one table, detection from
``model_index.json``.

A family is an instance of a :class:`~snella_diffusion.families.base.ModelFamily` subclass
(``base.py`` documents what the training script calls on it). :data:`FAMILIES` below is the
one table of them, filled by plain imports; :func:`detect_family` reads ``_class_name`` from
the pipeline's ``model_index.json`` and returns the family whose ``pipeline_class_names``
holds it.

===============  ==========================  ================================================
module           family                      pipelines
===============  ==========================  ================================================
sd               StableDiffusionFamily       StableDiffusionPipeline
sdxl             StableDiffusionXLFamily     StableDiffusionXLPipeline
sd3              SD3Family                   StableDiffusion3Pipeline
flux             FluxFamily                  FluxPipeline
pixart           PixArtFamily                PixArtAlphaPipeline, PixArtSigmaPipeline
qwen_image       QwenImageFamily             QwenImagePipeline
z_image          ZImageFamily                ZImagePipeline
flux2            Flux2KleinFamily            Flux2KleinPipeline
flux2            Flux2DevFamily              Flux2Pipeline
chroma           ChromaFamily                ChromaPipeline
krea2            Krea2Family                 Krea2Pipeline
wan              WanFamily                   WanPipeline (Wan 2.1, Wan 2.2 TI2V-5B and A14B; video)
lumina2          Lumina2Family               Lumina2Pipeline
sana             SanaFamily                  SanaPipeline
hidream          HiDreamFamily               HiDreamImagePipeline
ideogram4        Ideogram4Family             Ideogram4Pipeline
qwen_image21     QwenImage21Family           QwenImage21Pipeline
ltx2             LTX2Family                  LTX2Pipeline (LTX-2, video stream only)
hunyuan_video15  HunyuanVideo15Family        HunyuanVideo15Pipeline (text-to-video; video)
===============  ==========================  ================================================

Shared pieces: ``base.py`` (ModelFamily, TrainingComponents, FamilySettings, the generic
loader), ``dit.py`` (the transformer families' flags, options, block filters and the
DiTFamily / FlowMatchingFamily bases), ``tokens.py`` (tokenization).

Adding a family
---------------
1. One new file here, e.g. ``families/wan.py``, with one subclass of ``ModelFamily`` (or of
   ``DiTFamily`` / ``FlowMatchingFamily`` for a transformer): ``name``,
   ``pipeline_class_names``, ``denoiser_component``, ``denoiser_preset``,
   ``text_encoder_components``, and ``encode_prompt``, ``predict`` (and ``objective`` when it
   is not the scheduler's DDPM objective; ``pixel_multiple`` when the denoiser's pixel
   granularity is not the VAE factor × ``patch_size``). New flags go in a frozen settings dataclass with
   ``add_arguments`` (as ``dit.DiTFlags``), read in ``configure`` from ``FamilySettings``.
2. One entry in :data:`FAMILIES` below (an import and an instance).
3. Its tests: a tiny pipeline of the family saved with ``save_pretrained``, detected by
   ``detect_family`` and trained for a few steps by the DreamBooth script (see
   ``tests/test_dreambooth_dit.py``).
"""

from __future__ import annotations

from typing import Any, Optional

from ..errors import SnellaError
from .base import (
    FamilySettings,
    ModelFamily,
    TrainingComponents,
    UnknownModelFamilyError,
    read_model_index,
    read_scheduler_config,
)
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2DevFamily, Flux2KleinFamily
from .hidream import HiDreamFamily
from .krea2 import Krea2Family
from .lumina2 import Lumina2Family
from .pixart import PixArtFamily
from .qwen_image import QwenImageFamily
from .z_image import ZImageFamily
from .sana import SanaFamily
from .sd import StableDiffusionFamily
from .sd3 import SD3Family
from .sdxl import StableDiffusionXLFamily
from .wan import WanFamily
from .ideogram4 import Ideogram4Family
from .qwen_image21 import QwenImage21Family
from .ltx2 import LTX2Family
from .hunyuan_video15 import HunyuanVideo15Family

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        StableDiffusionFamily(),
        StableDiffusionXLFamily(),
        SD3Family(),
        FluxFamily(),
        PixArtFamily(),
        QwenImageFamily(),
        ZImageFamily(),
        Flux2KleinFamily(),
        ChromaFamily(),
        Flux2DevFamily(),
        Krea2Family(),
        WanFamily(),
        Lumina2Family(),
        SanaFamily(),
        HiDreamFamily(),
        Ideogram4Family(),
        QwenImage21Family(),
        LTX2Family(),
        HunyuanVideo15Family(),
    )
}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to :data:`FAMILIES` at run time (user code; the package's own families are
    listed above); a later registration of the same name replaces it."""
    if not family.name or not family.pipeline_class_names:
        raise SnellaError(f"{type(family).__name__}: a family needs a name and pipeline_class_names")
    FAMILIES[family.name] = family
    return family


def family_for_class(pipeline_class_name: str, where: str = "") -> ModelFamily:
    """The family handling ``pipeline_class_name``; UnknownModelFamilyError if none."""
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


__all__ = [
    "ChromaFamily",
    "FAMILIES",
    "FamilySettings",
    "Flux2DevFamily",
    "Flux2KleinFamily",
    "FluxFamily",
    "HiDreamFamily",
    "Ideogram4Family",
    "HunyuanVideo15Family",
    "Krea2Family",
    "Lumina2Family",
    "ModelFamily",
    "PixArtFamily",
    "QwenImageFamily",
    "QwenImage21Family",
    "SD3Family",
    "SanaFamily",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TrainingComponents",
    "UnknownModelFamilyError",
    "WanFamily",
    "LTX2Family",
    "ZImageFamily",
    "detect_family",
    "family_for_class",
    "read_model_index",
    "read_scheduler_config",
    "register_family",
]

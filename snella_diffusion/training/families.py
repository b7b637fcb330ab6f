"""Old import path of the model families: they live in ``snella_diffusion/families/``."""

from ..families import (
    FAMILIES,
    FamilySettings,
    ModelFamily,
    StableDiffusionFamily,
    StableDiffusionXLFamily,
    TrainingComponents,
    UnknownModelFamilyError,
    detect_family,
    family_for_class,
    read_model_index,
    register_family,
)
from ..families.base import FLOAT32_COMPONENTS, SKIPPED_COMPONENTS, dtype_keyword
from ..families.tokens import tokenize

__all__ = [
    "FAMILIES",
    "FLOAT32_COMPONENTS",
    "SKIPPED_COMPONENTS",
    "FamilySettings",
    "ModelFamily",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TrainingComponents",
    "UnknownModelFamilyError",
    "detect_family",
    "dtype_keyword",
    "family_for_class",
    "read_model_index",
    "register_family",
    "tokenize",
]

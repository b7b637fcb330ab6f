"""Old import path of the model families: they live in ``snella_diffusion/families/``."""

from ..families import (  # noqa: F401
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
from ..families.base import FLOAT32_COMPONENTS, SKIPPED_COMPONENTS, dtype_keyword  # noqa: F401
from ..families.tokens import tokenize  # noqa: F401

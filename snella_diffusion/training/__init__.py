"""Training pieces shared by the training scripts: data, objectives, model families,
checkpointing and model cards. See ``families.py`` for the model-family registry."""

from .families import (
    FAMILIES,
    ModelFamily,
    TrainingComponents,
    UnknownModelFamilyError,
    detect_family,
    family_for_class,
    register_family,
)
from .objectives import NoiseObjective, ObjectiveBatch, TrainingObjective, weighted_mse

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "NoiseObjective",
    "ObjectiveBatch",
    "TrainingComponents",
    "TrainingObjective",
    "UnknownModelFamilyError",
    "detect_family",
    "family_for_class",
    "register_family",
    "weighted_mse",
]

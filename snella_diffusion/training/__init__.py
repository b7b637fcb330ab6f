"""Training pieces shared by the training scripts: the typed run settings, data, objectives,
checkpointing and model cards. The model families are in ``snella_diffusion/families/``."""

from .objectives import NoiseObjective, ObjectiveBatch, TrainingObjective, weighted_mse

__all__ = [
    "NoiseObjective",
    "ObjectiveBatch",
    "TrainingObjective",
    "weighted_mse",
]

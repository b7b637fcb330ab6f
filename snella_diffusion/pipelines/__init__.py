"""diffusers pipelines with the SNELLA adapter methods, shipped inside the package.

``CUSTOM_PIPELINE`` is the path of the pipeline file for diffusers' ``custom_pipeline=``
argument (a ``.py`` path works from any installed copy of the package).
"""

from pathlib import Path

from .snella_pipeline import SnellaStableDiffusionPipeline

CUSTOM_PIPELINE = str(Path(__file__).with_name("snella_pipeline.py"))

__all__ = ["CUSTOM_PIPELINE", "SnellaStableDiffusionPipeline"]

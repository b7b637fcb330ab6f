"""``custom_pipeline="pipelines/snella_pipeline"`` from a checkout: the pipeline itself ships
inside the package (``snella_diffusion.pipelines``); after ``pip install`` pass
``custom_pipeline=snella_diffusion.pipelines.CUSTOM_PIPELINE`` instead."""

from snella_diffusion.pipelines.snella_pipeline import SnellaStableDiffusionPipeline

__all__ = ["SnellaStableDiffusionPipeline"]

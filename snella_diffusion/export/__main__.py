"""``python -m snella_diffusion.export``."""

from .cli import cli

cli()

"""Old import path of the transformer families: they live in ``snella_diffusion/families/``
(``dit.py`` for what they share, ``sd3.py``, ``flux.py``, ``pixart.py``)."""

from ..families.dit import (
    BLOCK_ALIASES,
    OPTIONS_KEY,
    VALIDATION_KEY,
    DiTFamily,
    DiTFlags,
    DiTOptions,
    FlowMatchingFamily,
    add_dit_arguments,
    block_filter_patterns,
    expand_block_filters,
)
from ..families.flux import FluxFamily
from ..families.pixart import PixArtFamily
from ..families.sd3 import SD3Family

__all__ = [
    "BLOCK_ALIASES",
    "DiTFamily",
    "DiTFlags",
    "DiTOptions",
    "FlowMatchingFamily",
    "FluxFamily",
    "OPTIONS_KEY",
    "PixArtFamily",
    "SD3Family",
    "VALIDATION_KEY",
    "add_dit_arguments",
    "block_filter_patterns",
    "expand_block_filters",
]

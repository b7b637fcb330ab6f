"""Old import path of the transformer families: they live in ``snella_diffusion/families/``
(``dit.py`` for what they share, ``sd3.py``, ``flux.py``, ``pixart.py``)."""

from ..families.dit import (  # noqa: F401
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
from ..families.flux import FluxFamily  # noqa: F401
from ..families.pixart import PixArtFamily  # noqa: F401
from ..families.sd3 import SD3Family  # noqa: F401

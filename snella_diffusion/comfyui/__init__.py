"""SNELLA in ComfyUI: a weight adapter its stock Load LoRA nodes use, for the files
``snella-export --to comfyui`` writes, and ``snella-comfyui install`` for its custom_nodes.

Nothing is imported from ComfyUI until :func:`register` runs (the custom node calls it);
importing this package inside a ComfyUI process that has already loaded
``comfy.weight_adapter`` registers the adapter at once.
"""

import sys

from .layout import KEY_INFIX, LAYOUT_VERSION, SnellaLayerTensors, encode_layer, layer_keys
from .weight_adapter import ADAPTER_NAME, SnellaAdapterMethods, adapter_class, register

__all__ = [
    "ADAPTER_NAME",
    "KEY_INFIX",
    "LAYOUT_VERSION",
    "SnellaAdapterMethods",
    "SnellaLayerTensors",
    "adapter_class",
    "encode_layer",
    "layer_keys",
    "register",
]

if "comfy.weight_adapter" in sys.modules:
    register()

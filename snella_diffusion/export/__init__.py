"""Export SNELLA adapters to the formats ComfyUI, Forge, AUTOMATIC1111 and diffusers load.

``diff``: the dense ΔW of each layer (``<key>.diff``, LyCORIS "full"), exact up to the dtype.
``lora``: a truncated SVD of each ΔW as a kohya LoRA (``lora_down``/``lora_up``/``alpha``).
``peft``: the same factors under diffusers/PEFT names with ``lora_adapter_metadata``.
``comfyui``: the SNELLA factors, scalars and τ per layer under ComfyUI's names, exact, for the
weight adapter in ``snella_diffusion.comfyui`` (``export.comfyui``).
Key names follow the base's family (``families``); the command line is ``snella-export``.
"""

from .exporter import ExportReport, export_snella, parse_adapter_spec
from .families import ExportFamily, ExportTarget, export_family, flux_fused_targets
from .svd import LowRank, RankChoice, truncate

__all__ = [
    "ExportFamily",
    "ExportReport",
    "ExportTarget",
    "LowRank",
    "RankChoice",
    "export_family",
    "export_snella",
    "flux_fused_targets",
    "parse_adapter_spec",
    "truncate",
]

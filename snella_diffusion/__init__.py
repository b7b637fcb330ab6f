"""snella-diffusion: SNELLA sparse adapters (kernelized low-rank merge, bi-level sparsity
allocation) for diffusers UNets and DiTs and transformers ViTs."""

from .allocator import BiLevelAllocator
from .config import SnellaConfig
from .errors import SnellaConfigError, SnellaError, SnellaFormatError
from .fuse import UnfuseError, fuse_snella, fused_energy_kept, unfuse_snella
from .inject import TARGET_PRESETS, apply_snella, remove_snella
from .io import load_snella, read_snella_file, save_snella, snella_state_dict
from .layer import SnellaAdapter, SnellaLinear, snella_layers
from .loaders import (
    SnellaLoaderMixin,
    disable_snella,
    enable_snella,
    get_active_snella_adapters,
    get_snella_adapter_weights,
    load_snella_weights,
    set_snella_adapters,
    unload_snella_weights,
)

__version__ = "0.1.0"

__all__ = [
    "BiLevelAllocator",
    "SnellaAdapter",
    "SnellaConfig",
    "SnellaConfigError",
    "SnellaError",
    "SnellaFormatError",
    "SnellaLinear",
    "SnellaLoaderMixin",
    "TARGET_PRESETS",
    "UnfuseError",
    "apply_snella",
    "disable_snella",
    "enable_snella",
    "fuse_snella",
    "fused_energy_kept",
    "get_active_snella_adapters",
    "get_snella_adapter_weights",
    "load_snella",
    "load_snella_weights",
    "read_snella_file",
    "remove_snella",
    "save_snella",
    "set_snella_adapters",
    "snella_layers",
    "snella_state_dict",
    "unfuse_snella",
    "unload_snella_weights",
]

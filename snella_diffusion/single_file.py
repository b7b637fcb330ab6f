"""A pipeline's denoiser loaded from one GGUF checkpoint file, as diffusers loads them.

``<Denoiser>.from_single_file(path, config=<pipeline>, subfolder=<component>,
quantization_config=GGUFQuantizationConfig(compute_dtype=...))`` builds the model from the
pipeline's config and puts diffusers' ``GGUFLinear`` layers over the file's quantized blocks
(Q8_0, Q4_K, ...; F32/F16 tensors load as plain weights). The file's keys are either
diffusers' own names (loaded as they are) or the original checkpoint's names, which the
class's single-file converter renames (``diffusers.loaders.single_file_utils``). SNELLA trains
beside those layers and never writes their blocks (``snella_diffusion.quantized``).

The denoiser classes of this toolkit's families that load this way in diffusers 0.42:
``FluxTransformer2DModel``, ``Flux2Transformer2DModel``, ``SD3Transformer2DModel``,
``QwenImageTransformer2DModel``, ``ZImageTransformer2DModel`` (and ``UNet2DConditionModel``);
PixArt's ``PixArtTransformer2DModel`` does not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import nn

from .errors import SnellaError

__all__ = ["GGUF_SUFFIX", "DenoiserFileError", "check_denoiser_file", "check_single_file_class",
           "load_gguf_denoiser"]

GGUF_SUFFIX = ".gguf"
FLAG = "--pretrained_denoiser_file"


class DenoiserFileError(SnellaError):
    """The denoiser checkpoint file is missing, not GGUF, or its class cannot load one."""


def check_denoiser_file(path: str) -> None:
    """Raise DenoiserFileError (one line naming the flag and ``path``) unless ``path`` is an
    existing ``.gguf`` file and the ``gguf`` package is installed."""
    if not path.endswith(GGUF_SUFFIX):
        raise DenoiserFileError(f"{FLAG}={path}: expected a GGUF checkpoint (a file ending in {GGUF_SUFFIX})")
    if not os.path.isfile(path):
        raise DenoiserFileError(f"{FLAG}={path}: no such file")
    if importlib.util.find_spec("gguf") is None:
        raise DenoiserFileError(f"{FLAG}={path}: the gguf package is not installed (pip install 'snella-diffusion[gguf]')")


def check_single_file_class(library: str, class_name: str, component: str) -> None:
    """Raise DenoiserFileError unless ``library.class_name`` (the pipeline's ``component``, as
    ``model_index.json`` names it) loads from a single file in the installed diffusers."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    cls = getattr(importlib.import_module(library), class_name, None)
    if not (isinstance(cls, type) and any(base.__name__ in SINGLE_FILE_LOADABLE_CLASSES for base in cls.__mro__)):
        raise DenoiserFileError(
            f"{FLAG}: the pipeline's {component} ({class_name}) has no single-file loader in diffusers, "
            "so it cannot be loaded from a GGUF file; drop the flag")


def load_gguf_denoiser(
    cls: type, path: str, config_source: str, subfolder: str, compute_dtype: torch.dtype,
    revision: Optional[str] = None,
) -> nn.Module:
    """``cls`` (a diffusers model class) built from the config in ``config_source``/``subfolder``
    (a pipeline folder or hub id) with the weights of the GGUF file ``path``: its quantized
    linears as diffusers ``GGUFLinear`` layers that dequantize to ``compute_dtype`` at each
    forward, the rest in ``compute_dtype``; frozen (``requires_grad`` False)."""
    from diffusers import GGUFQuantizationConfig

    try:
        model = cls.from_single_file(
            path, config=config_source, subfolder=subfolder, config_revision=revision, torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        )
    except Exception as error:
        raise DenoiserFileError(
            f"{FLAG}={path}: could not load it as the {subfolder} ({cls.__name__}) of {config_source}: "
            f"{type(error).__name__}: {error}"
        ) from error
    return model.requires_grad_(False)

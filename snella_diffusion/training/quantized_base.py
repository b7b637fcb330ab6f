"""``--quantize_base {fp8,int8,nf4}`` and ``--quantize_backend``: the frozen denoiser stored
quantized while SNELLA trains beside it (``docs/quantized-bases.md``).

- ``fp8``: float8 (e4m3) weight storage, each layer cast to the training dtype for its forward
  (diffusers' layerwise casting; backend ``diffusers``);
- ``int8``: weight-only int8 with per-row scales (backend ``torchao``, the default, or
  ``quanto`` for optimum-quanto qint8);
- ``nf4``: bitsandbytes 4-bit NormalFloat ``Linear4bit`` (backend ``bitsandbytes``; CUDA only).

``--quantize_text_encoder {fp8,int8}`` stores the frozen text encoders other than CLIP (T5,
Qwen2.5-VL, Mistral, Qwen3, ...: the large ones, used only to encode or cache prompts) the same
way, with the same backends. ``--pretrained_denoiser_file`` loads a denoiser that a GGUF file
already holds quantized (``snella_diffusion.single_file``).

The layers quantized are the denoiser's ``nn.Linear`` layers outside the patterns diffusers'
layerwise casting skips (its default embeddings and norms, the model's
``_keep_in_fp32_modules`` and ``_skip_layerwise_casting_patterns``), for every backend. SNELLA
layers over them compute base(x) + x·ΔWᵀ and never write the stored weights
(``snella_diffusion.quantized``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .flag_settings import FlagSettings

QUANTIZE_BASE_CHOICES = ("fp8", "int8", "nf4")
QUANTIZE_TEXT_ENCODER_CHOICES = ("fp8", "int8")
# text encoder classes left in the training dtype by --quantize_text_encoder: CLIP's (at most
# 0.7B parameters, and CLIP-only families have nothing large to quantize)
SMALL_TEXT_ENCODER_PREFIX = "CLIP"
# --quantize_base -> its backends, the default first
BACKENDS: dict[str, tuple[str, ...]] = {"fp8": ("diffusers",), "int8": ("torchao", "quanto"), "nf4": ("bitsandbytes",)}
BACKEND_MODULES = {"diffusers": "diffusers", "torchao": "torchao", "quanto": "optimum.quanto",
                   "bitsandbytes": "bitsandbytes"}


@dataclass(frozen=True)
class QuantizationSettings(FlagSettings):
    """How the frozen denoiser is stored: as loaded (None), quantized after loading, or loaded
    from a GGUF file already quantized."""

    quantize_base: Optional[str] = None
    quantize_backend: Optional[str] = None
    pretrained_denoiser_file: Optional[str] = None
    quantize_text_encoder: Optional[str] = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("quantized base")
        group.add_argument("--quantize_base", type=str, default=None, choices=list(QUANTIZE_BASE_CHOICES),
                           help="Store the frozen denoiser's linears quantized: fp8 (float8 storage, compute in the "
                                "training dtype), int8 (weight-only int8), nf4 (bitsandbytes 4-bit, CUDA). SNELLA "
                                "adds x·ΔWᵀ beside the quantized product and never writes those weights.")
        group.add_argument("--quantize_backend", type=str, default=None,
                           choices=sorted({b for backends in BACKENDS.values() for b in backends}),
                           help="Library for --quantize_base and --quantize_text_encoder: fp8 diffusers; int8 "
                                "torchao (default) or quanto; nf4 bitsandbytes.")
        group.add_argument("--quantize_text_encoder", type=str, default=None,
                           choices=list(QUANTIZE_TEXT_ENCODER_CHOICES),
                           help="Store the frozen text encoders other than CLIP (T5, Qwen2.5-VL, Mistral, Qwen3...) "
                                "quantized, as --quantize_base does the denoiser; not with --train_text_encoder.")
        group.add_argument("--pretrained_denoiser_file", type=str, default=None,
                           help="A GGUF checkpoint (.gguf) of the denoiser, loaded as diffusers does "
                                "(from_single_file with GGUFQuantizationConfig, the config from "
                                "--pretrained_model_name_or_path) in place of the pipeline's own; SNELLA trains "
                                "beside its quantized layers. Needs the gguf package.")

    @property
    def backend(self) -> Optional[str]:
        """The backend that quantizes: ``--quantize_backend``, or the default of ``--quantize_base``."""
        if self.quantize_base is None:
            return None
        return self.quantize_backend or BACKENDS[self.quantize_base][0]

    @property
    def text_encoder_backend(self) -> Optional[str]:
        """The backend that quantizes the text encoders: ``--quantize_backend``, or the default
        of ``--quantize_text_encoder``."""
        if self.quantize_text_encoder is None:
            return None
        return self.quantize_backend or BACKENDS[self.quantize_text_encoder][0]


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The regexes of module names left unquantized: diffusers' layerwise-casting defaults and
    the model's ``_keep_in_fp32_modules`` and ``_skip_layerwise_casting_patterns``."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN)
    for attribute in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        patterns.extend(getattr(model, attribute, None) or ())
    return tuple(patterns)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s ``nn.Linear`` layers no ``skip_patterns`` regex finds."""
    patterns = skip_patterns(model)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and not any(re.search(pattern, name) for pattern in patterns)]


def quantize_denoiser(model: nn.Module, settings: QuantizationSettings, compute_dtype: torch.dtype) -> int:
    """Quantize ``model``'s linears in place, on the device they are on, as ``settings`` says;
    ``compute_dtype`` is the training dtype the products run in. Returns the number of linears
    quantized (0 when ``--quantize_base`` is not given)."""
    if settings.quantize_base is None:
        return 0
    return quantize_linears(model, settings.quantize_base, settings.backend, compute_dtype)


def quantized_text_encoders(model_index: dict[str, Any], text_encoder_components: tuple[str, ...]) -> list[str]:
    """The text encoder components ``--quantize_text_encoder`` quantizes: those of
    ``text_encoder_components`` present in ``model_index`` whose class is not CLIP's."""
    chosen = []
    for component in text_encoder_components:
        spec = model_index.get(component)
        if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] is not None:
            if not str(spec[1]).startswith(SMALL_TEXT_ENCODER_PREFIX):
                chosen.append(component)
    return chosen


def quantize_text_encoders(encoders: dict[str, nn.Module], settings: QuantizationSettings,
                           compute_dtype: torch.dtype) -> dict[str, int]:
    """Quantize each of ``encoders`` (component name → frozen text encoder) in place as
    ``--quantize_text_encoder`` says; returns the number of linears quantized per component
    (empty when the flag is not given)."""
    if settings.quantize_text_encoder is None:
        return {}
    return {name: quantize_linears(encoder, settings.quantize_text_encoder, settings.text_encoder_backend,
                                   compute_dtype)
            for name, encoder in encoders.items()}


def quantize_linears(model: nn.Module, base: str, backend: str, compute_dtype: torch.dtype) -> int:
    """Quantize ``model``'s ``quantized_linear_names`` in place, on their device, to ``base``
    ("fp8", "int8", "nf4") with ``backend``; the products run in ``compute_dtype``. Returns
    the number of linears quantized."""
    names = quantized_linear_names(model)
    chosen = set(names)
    if backend == "diffusers":
        from diffusers.hooks import apply_layerwise_casting

        for name in names:
            apply_layerwise_casting(model.get_submodule(name), storage_dtype=torch.float8_e4m3fn,
                                    compute_dtype=compute_dtype, skip_modules_pattern=())
    elif backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in chosen)
    elif backend == "quanto":
        from optimum.quanto import freeze, qint8, quantize

        quantize(model, weights=qint8, include=names)
        freeze(model)
    else:
        _to_nf4(model, names, compute_dtype)
    return len(names)


def _to_nf4(model: nn.Module, names: list[str], compute_dtype: torch.dtype) -> None:
    """Replace the named linears with bitsandbytes nf4 ``Linear4bit`` (packed when on CUDA)."""
    import bitsandbytes as bnb

    for name in names:
        linear = model.get_submodule(name)
        packed = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   compute_dtype=compute_dtype, quant_type="nf4")
        packed.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        packed.bias = linear.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed.to(linear.weight.device))

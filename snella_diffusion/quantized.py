"""Which quantized base linears SNELLA adapts, told apart without importing their libraries.

A quantized base layer keeps its weight in a storage format other than a plain float matrix:

- ``"float8 storage"``: a float8 weight that a hook casts to the compute dtype for each forward
  (diffusers' ``enable_layerwise_casting`` / ``apply_layerwise_casting``);
- ``"torchao <TensorClass>"``: a torchao tensor subclass (``quantize_(model,
  Int8WeightOnlyConfig())``: ``Int8Tensor`` int8 data and per-row scales);
- ``"optimum-quanto <TensorClass>"``: an optimum-quanto ``QLinear`` (``quantize(model,
  weights=qint8)``, frozen or not);
- ``"bitsandbytes Linear4bit"``: packed 4-bit ``Params4bit`` (nf4/fp4) with a ``quant_state``;
- ``"GGUF <type>"``: diffusers' ``GGUFLinear`` over a ``GGUFParameter`` (a GGUF checkpoint loaded
  with ``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``: the file's
  uint8 blocks, e.g. Q8_0, dequantized to the compute dtype at each forward).

SNELLA never writes these weights. A layer over one computes base(x) + x·ΔWᵀ: the base product
through the quantized module itself and ΔW (built in float32 from the factors and τ) cast to
the compute dtype. Any other packed or integer weight (bitsandbytes ``Linear8bitLt``, an int8
``nn.Linear``, an unknown tensor subclass) is refused by name (``unsupported_quantization``).
Detection reads class names, modules and dtypes, so none of these libraries needs to be
installed (or is imported).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["FLOAT8_DTYPES", "base_quantization", "is_packed", "unsupported_quantization"]

FLOAT8_DTYPES = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# bitsandbytes layers and weights that are packed or integer; Linear4bit alone is supported.
_BITSANDBYTES_PACKED_LINEARS = frozenset({"Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "Linear8bit"})
_BITSANDBYTES_PACKED_WEIGHTS = frozenset({"Params4bit", "Int8Params"})
_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


def _library_of(obj: object) -> str:
    """The top-level package that defines ``obj``'s class ("torch", "torchao", "optimum", ...)."""
    return type(obj).__module__.split(".", 1)[0]


def _is_bitsandbytes_4bit(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (_library_of(module) == "bitsandbytes" and type(module).__name__ in {"Linear4bit", "LinearFP4", "LinearNF4"}
            and type(weight).__name__ == "Params4bit")


def _gguf_type(module: nn.Module) -> Optional[str]:
    """The GGUF quantization type name of a diffusers ``GGUFLinear``'s weight ("Q8_0", "Q4_K",
    "BF16", ...), else None."""
    weight = getattr(module, "weight", None)
    if not (_library_of(module) == "diffusers" and type(module).__name__ == "GGUFLinear"
            and type(weight).__name__ == "GGUFParameter"):
        return None
    quant_type = getattr(weight, "quant_type", None)
    return str(getattr(quant_type, "name", quant_type))


def base_quantization(module: nn.Module) -> Optional[str]:
    """What quantized storage ``module``'s weight has, if it is one SNELLA adapts
    ("float8 storage", "torchao Int8Tensor", "optimum-quanto WeightQBytesTensor",
    "bitsandbytes Linear4bit", "GGUF Q8_0"), else None (a plain float weight, or an
    unsupported format: see ``unsupported_quantization``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    if _is_bitsandbytes_4bit(module):
        return "bitsandbytes Linear4bit"
    gguf_type = _gguf_type(module)
    if gguf_type is not None:
        return f"GGUF {gguf_type}"
    if _library_of(module) == "optimum" and "quanto" in type(module).__module__:
        return f"optimum-quanto {type(weight).__name__}"
    if type(weight) in _PLAIN_TENSOR_TYPES:
        return "float8 storage" if weight.dtype in FLOAT8_DTYPES else None
    if _library_of(weight) == "torchao":
        return f"torchao {type(weight).__name__}"
    return None


def unsupported_quantization(module: nn.Module) -> Optional[str]:
    """A description of ``module``'s packed or integer weight when SNELLA cannot adapt it
    (e.g. "Linear8bitLt (weight Int8Params)", "Linear (weight dtype torch.int8)",
    "Linear (weight SomePackedTensor)"), else None (plain float or supported: ``base_quantization``)."""
    if base_quantization(module) is not None:
        return None
    weight = getattr(module, "weight", None)
    kind, weight_kind = type(module).__name__, type(weight).__name__
    if kind in _BITSANDBYTES_PACKED_LINEARS or weight_kind in _BITSANDBYTES_PACKED_WEIGHTS:
        return f"{kind} (weight {weight_kind})"
    if weight is not None and getattr(weight, "quant_state", None) is not None:
        return f"{kind} (weight with a quant_state)"
    if not isinstance(weight, Tensor):
        return None
    if type(weight) not in _PLAIN_TENSOR_TYPES:
        return f"{kind} (weight {weight_kind})"
    if not weight.is_floating_point():
        return f"{kind} (weight dtype {weight.dtype})"
    return None


def is_packed(weight: Tensor) -> bool:
    """Whether ``weight`` is not a plain float16/bfloat16/float32/float64 tensor (float8 storage,
    a tensor subclass, integer data): such a weight is never written and never merged with ΔW."""
    return type(weight) not in _PLAIN_TENSOR_TYPES or not weight.is_floating_point() or weight.dtype in FLOAT8_DTYPES

"""Checks of a SNELLA adapter file's contents, before any model is touched.

Each check takes the file's path (for the message) and plain values: the ``shapes`` header,
the config, one layer's tensors. Every failure raises SnellaFormatError naming the file and
the header entry or tensor key at fault. A layer that passes has tensors of the right dtype
and shape, finite in float32, and a ΔW whose every entry is provably below
``DELTA_LIMIT`` in magnitude (``delta_bound``), so ΔW and the layer's output stay finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .config import SnellaConfig
from .errors import SnellaFormatError
from .method import GAMMA_FLOOR

KEY_INFIX = ".snella."
PARAM_NAMES = ("in_factors", "out_factors", "alpha", "gamma", "beta", "sparsity", "threshold")
OPTIONAL_PARAM_NAMES = ("drop_count",)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# The largest |ΔW| entry a file may imply. Trained adapters stay far below 1 (base weights
# are ~0.1); 1e6 leaves room for loose bounds yet keeps x·ΔWᵀ of a normalised activation,
# and the next layer's product with it, inside float32.
DELTA_LIMIT = 1e6


def parse_shapes(file: Path, text: str) -> dict[str, list[int]]:
    """The ``shapes`` header: ``{"<component>.<module path>": [m, n]}``, m, n ≥ 1.

    Raises:
        SnellaFormatError: not JSON, not an object, a key that is not ``component.path``, or a
            value that is not two positive integers; the message names the entry.
    """
    try:
        shapes = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnellaFormatError(f"{file}: header 'shapes' is not valid JSON ({error})") from error
    if not isinstance(shapes, dict) or not shapes:
        raise SnellaFormatError(
            f"{file}: header 'shapes' must be a non-empty JSON object {{\"<component>.<module path>\": "
            f"[m, n]}}, got {type(shapes).__name__} {str(shapes)[:80]}"
        )
    for layer_key, shape in shapes.items():
        component, _, module_path = layer_key.partition(".")
        if not component or not module_path:
            raise SnellaFormatError(f"{file}: header 'shapes' key {layer_key!r} is not '<component>.<module path>'")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise SnellaFormatError(
                f"{file}: header 'shapes' entry {layer_key!r} is {shape!r}, expected [m, n] of two positive integers"
            )
    return shapes


def _expected_shapes(shape: list[int], config: SnellaConfig) -> dict[str, tuple[int, ...]]:
    out_features, in_features = shape
    heads, width = config.num_heads, config.head_width
    scalars = {name: () for name in PARAM_NAMES[2:] + OPTIONAL_PARAM_NAMES}
    return {"in_factors": (heads, in_features, width), "out_factors": (heads, out_features, width), **scalars}


def check_layer_tensors(file: Path, layer_key: str, params: dict[str, Tensor], shape: list[int],
                        config: SnellaConfig) -> None:
    """One layer's tensors: present, of a float (drop_count: integer) dtype, of the shapes the
    config and ``shape`` = [m, n] imply, finite in float32, in range, and with a bounded ΔW.

    Raises:
        SnellaFormatError naming ``file`` and the key ``<layer_key>.snella.<param>`` at fault.
    """
    out_features, in_features = shape
    missing = [p for p in PARAM_NAMES if p not in params]
    if missing:
        raise SnellaFormatError(f"{file}: missing key {layer_key}{KEY_INFIX}{missing[0]}")
    expected = _expected_shapes(shape, config)
    for param, tensor in params.items():
        key = f"{layer_key}{KEY_INFIX}{param}"
        allowed = INTEGER_DTYPES if param == "drop_count" else FLOAT_DTYPES
        if tensor.dtype not in allowed:
            kind = "an integer" if param == "drop_count" else "a floating-point"
            raise SnellaFormatError(f"{file}: key {key} has dtype {tensor.dtype}, expected {kind} dtype")
        if tuple(tensor.shape) != expected[param]:
            raise SnellaFormatError(
                f"{file}: key {key} has shape {tuple(tensor.shape)}, expected {expected[param]} for a "
                f"{out_features}x{in_features} layer at rank {config.rank} with {config.num_heads} heads"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.to(torch.float32)).all()):
            raise SnellaFormatError(f"{file}: key {key} holds non-finite values (in float32)")
    where = f"{file}: key {layer_key}{KEY_INFIX}"
    sparsity = float(params["sparsity"])
    if not 0.0 <= sparsity <= 1.0:
        raise SnellaFormatError(f"{where}sparsity = {sparsity} is outside [0, 1]")
    if "drop_count" in params and not 0 <= int(params["drop_count"]) <= out_features * in_features:
        raise SnellaFormatError(
            f"{where}drop_count = {int(params['drop_count'])} is outside [0, {out_features * in_features}]"
        )
    threshold = float(params["threshold"].to(torch.float32))
    if threshold < 0.0:
        raise SnellaFormatError(f"{where}threshold = {threshold}: τ is a magnitude and must be >= 0")
    bound = delta_bound(config, params)
    if not bound <= DELTA_LIMIT:
        raise SnellaFormatError(
            f"{where}in_factors/out_factors/alpha/beta: |ΔW| of this layer may reach {bound:.3g}, above "
            f"{DELTA_LIMIT:g} (the factors' norms, alpha, beta and kernel_scale={config.kernel_scale} "
            "are out of any trained range: a corrupt file)"
        )


def _max_row_norms(factors: Tensor) -> Tensor:
    """``(P,)``: per head, the largest Euclidean norm of a factor vector, in float64."""
    return torch.linalg.vector_norm(factors.to(torch.float64), dim=-1).amax(dim=-1)


def delta_bound(config: SnellaConfig, params: dict[str, Tensor]) -> float:
    """An upper bound on max |ΔW| of one layer, from the factors' row norms (no ΔW is built).

    With a_p, b_p the largest row norms of head p's in/out factors (float64):
    linear: |M| ≤ Σ_p a_p·b_p (Cauchy–Schwarz); piecewise_linear: |K| = |c|·|D_0 - D_1| ≤
    |c|·max_p (a_p + b_p) (triangle inequality, distances are ≥ 0); mix: |M| ≤ |K| + |α| + |β|
    (the softmax lies in [0, 1]). Then |ΔW| ≤ |M|² ("official": M·|M|; "soft_threshold":
    M·max(|M| - τ, 0) with τ ≥ 0) or |M| ("dense"). The mix kernel's softmax logits K/γ are
    also bounded, by |K| / max(γ, GAMMA_FLOOR), and so are the squared distances the kernel
    forms, by (a_p + b_p)²: returns inf when either would overflow float32.
    """
    in_norms, out_norms = _max_row_norms(params["in_factors"]), _max_row_norms(params["out_factors"])
    if float((in_norms + out_norms).max()) ** 2 > torch.finfo(torch.float32).max / 4:
        return math.inf  # the squared distances ||b||² + ||a||² - 2·b·a would overflow float32
    if config.kernel == "linear":
        merged = float((in_norms * out_norms).sum())
    else:
        kernel = abs(config.kernel_scale) * float((in_norms + out_norms).max())
        merged = kernel
        if config.kernel == "mix":
            gamma = max(float(params["gamma"].to(torch.float64)), GAMMA_FLOOR)
            if kernel / gamma > torch.finfo(torch.float32).max / 2:
                return math.inf
            merged += abs(float(params["alpha"].to(torch.float64))) + abs(float(params["beta"].to(torch.float64)))
    return merged if config.sparsify == "dense" else merged * merged


"""Fuse adapters into the base weights and restore them bit for bit.

The fused weight is cast(W0 + Σ_k s_k·ΔW_k) with the sum in float32. Where the pristine base
weight W0 is kept is the caller's choice (``keep_original``):

- ``"cpu"`` (default): a copy in host memory, in the weight's dtype. No extra accelerator
  memory; unfuse copies it back (host-to-device traffic of the adapted weights).
- ``"device"``: a copy next to the weight (a buffer that follows ``.to()``): fastest unfuse,
  but the adapted weights' memory once more on the accelerator.
- ``False``: nothing kept; ``unfuse_snella`` is refused (``UnfuseError``) and removing the
  adapters leaves the fused weights in place (merge and unload).

With a kept copy the fused weight is always recomputed from it, so any number of fuse/unfuse
cycles ends exactly where it started. The copy's size is the adapted weights' size in their
dtype: with the default presets in bf16/fp16, SD1.5 0.48 GB, SDXL 4.4 GB, Flux.1-dev 17 GB
(``benchmarks/bench_fuse_memory.py``).

Into a half-precision weight the cast rounds ΔW to W0's spacing (~1.2e-4 in bf16, ~1.5e-5 in
fp16 for |W0| ~ 0.02), as fusing a LoRA does. Each fuse measures what survives as the
fraction of ΔW energy kept, 1 − ||cast(W0 + ΔW) − (W0 + ΔW)||² / ||ΔW||², which lies in
[0, 1] (round-to-nearest moves an entry by at most |ΔW|) and is 1 for float32 weights;
``fuse_snella`` logs it and ``fused_energy_kept`` returns it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import SnellaError
from .blocked import effective_blocked
from .layer import SnellaLinear, snella_layers

KeepOriginal = Union[str, bool]
KEEP_ORIGINAL_CHOICES: tuple[KeepOriginal, ...] = ("cpu", "device", False)
DEFAULT_KEEP_ORIGINAL: KeepOriginal = "cpu"

logger = logging.getLogger(__name__)


class UnfuseError(SnellaError):
    """The base weights cannot be restored: they were fused with ``keep_original=False``."""


def _check_keep_original(keep_original: KeepOriginal) -> None:
    if keep_original not in KEEP_ORIGINAL_CHOICES or keep_original is True:
        raise SnellaError(f"keep_original={keep_original!r}: expected one of 'cpu', 'device', False")


def pristine_weight(layer: SnellaLinear) -> Optional[Tensor]:
    """The kept base weight W0 of a fused layer (on its device or the CPU), or None."""
    return layer.unfused_weight if layer.unfused_weight is not None else layer.unfused_weight_cpu


def _discarded_error(layer_name: str) -> UnfuseError:
    return UnfuseError(
        f"layer {layer_name or '<model>'}: adapters were fused with keep_original=False, so the base "
        "weights were not kept and cannot be restored; reload the base model (or fuse with "
        "keep_original='cpu' to be able to unfuse)"
    )


def restore_base_weight(layer: SnellaLinear, layer_name: str = "") -> None:
    """Put the pristine base weight back (a bit-exact copy) and mark nothing as fused.

    Raises:
        UnfuseError: adapters are fused and W0 was not kept (``keep_original=False``).
    """
    if layer.fused_adapters and layer.original_discarded:
        raise _discarded_error(layer_name)
    pristine = pristine_weight(layer)
    if pristine is not None:
        with torch.no_grad():
            layer.base_layer.weight.copy_(pristine)
    layer.unfused_weight = None
    layer.unfused_weight_cpu = None
    layer.fused_adapters = {}
    layer.fused_delta_energy = (0.0, 0.0)


def _keep_pristine(layer: SnellaLinear, keep_original: KeepOriginal) -> None:
    weight = layer.base_layer.weight.detach()
    if keep_original == "device":
        layer.unfused_weight = weight.clone()
    elif keep_original == "cpu":
        layer.unfused_weight_cpu = weight.to("cpu", copy=True)
    else:
        layer.original_discarded = True


def write_fused_weight(
    layer: SnellaLinear, fused: dict[str, float], keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
    layer_name: str = "",
) -> None:
    """Set the base weight to cast(W0 + Σ_k factor_k·ΔW_k) for ``fused = {name: factor}``,
    computed in float32 from the pristine copy (kept as ``keep_original`` says at the first
    fuse); an empty dict restores W0 exactly. Without a kept W0 (``keep_original=False``)
    only adding adapters is possible: their ΔW goes onto the fused weight."""
    if not fused:
        restore_base_weight(layer, layer_name)
        return
    _check_keep_original(keep_original)
    weight = layer.base_layer.weight
    if pristine_weight(layer) is None and not layer.original_discarded:
        _keep_pristine(layer, keep_original)
    pristine = pristine_weight(layer)
    if _fuses_in_one_pass(layer, fused, pristine):
        with torch.no_grad():
            name, factor = next(iter(fused.items()))
            layer.fused_delta_energy = _fuse_one_float32(layer, name, factor, pristine)
        layer.fused_adapters = dict(fused)
        layer._delta_cache = None
        return
    with torch.no_grad():
        reference = pristine if pristine is not None else weight
        if pristine is not None:
            total = pristine.to(weight.device, torch.float32, copy=True)
            adding = fused
        else:
            if any(name not in fused for name in layer.fused_adapters):
                raise _discarded_error(layer_name)
            total = weight.to(torch.float32, copy=True)
            adding = {n: f for n, f in fused.items() if n not in layer.fused_adapters}
        for name, factor in adding.items():
            total = total.add_(layer.adapters[name].delta_weight(), alpha=factor)
        fused_weight = total.to(weight.dtype)
        layer.fused_delta_energy = _rounding_and_delta_energy(reference, total, fused_weight)
        weight.copy_(fused_weight)
    layer.fused_adapters = dict(fused)
    layer._delta_cache = None


def _fuses_in_one_pass(layer: SnellaLinear, fused: dict[str, float], pristine: Optional[Tensor]) -> bool:
    """Whether the fused weight is W0 + s·ΔW of one adapter into a float32 weight with W0 kept
    on the same device: then one blocked pass writes it."""
    weight = layer.base_layer.weight
    return (len(fused) == 1 and not layer.fused_adapters and weight.dtype == torch.float32
            and pristine is not None and pristine.device == weight.device and pristine.dtype == torch.float32)


def _fuse_one_float32(layer: SnellaLinear, name: str, factor: float, pristine: Tensor) -> tuple[float, float]:
    """W0 + factor·ΔW written over the float32 weight by one blocked pass that builds ΔW block
    by block (``blocked.effective_blocked``: the same expressions and the same float32 sum as
    adding ``delta_weight()``, without the whole-matrix M, ΔW and sum); returns the energies
    (0, ||W − W0||²) with W0 the kept ``pristine`` weight."""
    adapter = layer.adapters[name]
    weight = layer.base_layer.weight
    threshold = adapter.refresh_threshold()
    factors = (adapter.in_factors, adapter.out_factors, adapter.alpha, adapter.effective_gamma(), adapter.beta)
    factors = tuple(t.to(torch.float32) for t in factors)
    fused = effective_blocked(adapter.kernel, *factors, adapter.kernel_scale, threshold.to(torch.float32),
                              adapter.sparsify_mode, factor, pristine, torch.float32, out=weight.data)
    return _rounding_and_delta_energy(pristine, fused, fused)


def _rounding_and_delta_energy(pristine: Tensor, exact: Tensor, fused: Tensor) -> tuple[float, float]:
    """(||fused − exact||², ||exact − W0||²) in float32 sums, for the energy-kept figure;
    ``exact`` is W0 + Σ_k s_k·ΔW_k in float32, ``fused`` its cast to the weight's dtype; W0 is
    ``pristine`` (on any device), or the weight before this fuse when W0 was not kept."""
    if fused.dtype == exact.dtype:
        rounding = 0.0
    else:
        rounding = float(torch.sub(fused.to(exact.dtype), exact).square_().sum())
    delta_energy = float(torch.sub(exact, pristine.to(exact.device, exact.dtype)).square_().sum())
    return rounding, delta_energy


def fused_energy_kept(model: nn.Module) -> Optional[float]:
    """The fraction of fused ΔW energy the base weights of ``model`` hold now,
    1 − Σ_l ||cast(W0 + ΔW) − (W0 + ΔW)||² / Σ_l ||ΔW||² over the layers with fused adapters
    (ΔW = Σ_k s_k·ΔW_k of what is fused there); 1.0 for float32 weights, None when nothing is
    fused (or the fused ΔW is zero)."""
    return energy_kept_in(snella_layers(model).values())


def energy_kept_in(layers: Iterable[SnellaLinear]) -> Optional[float]:
    """``fused_energy_kept`` over the given layers."""
    rounding = delta = 0.0
    for layer in layers:
        if layer.fused_adapters:
            rounding += layer.fused_delta_energy[0]
            delta += layer.fused_delta_energy[1]
    return None if delta == 0.0 else 1.0 - rounding / delta


def fuse_layer(
    layer: SnellaLinear, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
    keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
) -> None:
    """Add scale·w_k·ΔW_k of the given (default: active) adapters into the base weight.

    Adapters already fused in this layer are left as they are (fusing is idempotent);
    ``keep_original`` as in ``fuse_snella``.
    """
    names = list(layer.active_adapters if adapter_names is None else adapter_names)
    for name in names:
        if name not in layer.adapters:
            raise SnellaError(f"no adapter named {name!r} to fuse")
    new = {n: scale * layer.adapter_weights.get(n, 1.0) for n in names if n not in layer.fused_adapters}
    if new:
        write_fused_weight(layer, {**layer.fused_adapters, **new}, keep_original)


def fuse_snella(
    model: nn.Module, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None,
    keep_original: KeepOriginal = DEFAULT_KEEP_ORIGINAL,
) -> int:
    """Fuse adapters into every SnellaLinear of ``model``; returns the number of layers fused.

    Fused adapters no longer run in the forward pass, so inference costs what the base model
    costs. ``keep_original`` says where the pristine base weights are kept: ``"cpu"``
    (default, host memory), ``"device"`` (beside the weights) or ``False`` (not kept:
    ``unfuse_snella`` then raises ``UnfuseError``). ``unfuse_snella`` undoes it exactly.
    Half-precision base weights round ΔW to their
    spacing: the fraction of ΔW energy kept is logged (INFO) and ``fused_energy_kept(model)``
    returns it.
    """
    _check_keep_original(keep_original)
    layers = snella_layers(model)
    for layer in layers.values():
        names = layer.active_adapters if adapter_names is None else [
            n for n in adapter_names if n in layer.adapters
        ]
        if names:
            fuse_layer(layer, scale, names, keep_original)
    log_energy_kept(layers.values())
    return len(layers)


def log_energy_kept(layers: Iterable[SnellaLinear]) -> None:
    """Log ``energy_kept_in(layers)`` at INFO level (nothing when nothing is fused)."""
    kept = energy_kept_in(layers)
    if kept is not None:
        logger.info("fused SNELLA adapters: the base weights keep %.2f %% of the ΔW energy", 100.0 * kept)


def unfuse_snella(model: nn.Module) -> int:
    """Restore every fused base weight bit for bit; returns the number of layers restored.

    Raises:
        UnfuseError: a layer was fused with ``keep_original=False`` (checked for every layer
            before any is restored, so nothing is half-undone).
    """
    layers = snella_layers(model)
    for name, layer in layers.items():
        if layer.fused_adapters and layer.original_discarded:
            raise _discarded_error(name)
    restored = 0
    for layer in layers.values():
        if pristine_weight(layer) is not None:
            restored += 1
        restore_base_weight(layer)
    return restored

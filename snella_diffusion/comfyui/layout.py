"""The per-layer tensors of a ``snella-export --to comfyui`` file, and ΔW built from them.

ComfyUI hands a weight adapter the file's tensors only, never its header, so everything one
layer's ΔW depends on travels as tensors under that layer's key prefix ``x`` (the name
ComfyUI's key map gives the layer, e.g. ``lora_unet_down_blocks_0_attentions_0_..._to_q``):

``x.snella.in_factors``   float32 ``(P, n, r/P)``, as in the SNELLA file
``x.snella.out_factors``  float32 ``(P, m, r/P)``
``x.snella.scalars``      float32 ``[alpha, gamma, beta, sparsity, threshold τ]``
``x.snella.spec``         int64 ``[layout version, kernel, sparsify rule, m, n, drop_count]``
                          (kernel / rule as indices into ``config.KERNELS`` /
                          ``config.SPARSIFY_MODES``; drop_count -1 = derive it from sparsity)
``x.snella.scales``       float64 ``[kernel_scale, adapter weight]``

The factors stay float32: rounded to fp16 they moved the patched weights by up to 86× max|ΔW|
(the kernel is sensitive to its inputs). ΔW is built by the library's own
:class:`~snella_diffusion.layer.SnellaAdapter` with the file's τ, so it is the ΔW
``fuse_snella`` fuses. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..config import KERNELS, SPARSIFY_MODES, SnellaConfig
from ..errors import SnellaFormatError
from ..layer import SnellaAdapter

LAYOUT_VERSION = 1
KEY_INFIX = ".snella."
TENSOR_NAMES = ("in_factors", "out_factors", "scalars", "spec", "scales")
SCALAR_NAMES = ("alpha", "gamma", "beta", "sparsity", "threshold")
UNKNOWN_DROP_COUNT = -1


def layer_keys(prefix: str) -> list[str]:
    """Every key one layer occupies under ``prefix``."""
    return [f"{prefix}{KEY_INFIX}{name}" for name in TENSOR_NAMES]


def encode_layer(prefix: str, params: Mapping[str, Tensor], config: SnellaConfig,
                 shape: tuple[int, int], weight: float = 1.0) -> dict[str, Tensor]:
    """The tensors of one layer under ``prefix``.

    Args:
        params: the layer's SNELLA tensors as ``read_snella_file`` gives them (``in_factors``,
            ``out_factors``, ``alpha``, ``gamma``, ``beta``, ``sparsity``, ``threshold`` and
            optionally ``drop_count``).
        config: the file's config (kernel, sparsify rule, kernel_scale).
        shape: ``(m, n)`` of the layer.
        weight: a factor on ΔW (the adapter weight given to the export).
    """
    out_features, in_features = shape
    drop_count = int(params["drop_count"]) if "drop_count" in params else UNKNOWN_DROP_COUNT
    spec = [LAYOUT_VERSION, KERNELS.index(config.kernel), SPARSIFY_MODES.index(config.sparsify),
            out_features, in_features, drop_count]
    return {
        f"{prefix}{KEY_INFIX}in_factors": params["in_factors"].to(torch.float32).contiguous(),
        f"{prefix}{KEY_INFIX}out_factors": params["out_factors"].to(torch.float32).contiguous(),
        f"{prefix}{KEY_INFIX}scalars": torch.stack([params[name].reshape(()).to(torch.float32)
                                                    for name in SCALAR_NAMES]),
        f"{prefix}{KEY_INFIX}spec": torch.tensor(spec, dtype=torch.int64),
        f"{prefix}{KEY_INFIX}scales": torch.tensor([config.kernel_scale, weight], dtype=torch.float64),
    }


@dataclasses.dataclass
class SnellaLayerTensors:
    """One layer of a comfyui export, decoded and checked.

    Attributes:
        prefix: the key prefix ComfyUI offered (names the layer in errors).
        config: kernel, rule and scale of the layer (rank and heads from the factor shapes).
        out_features, in_features: ``(m, n)``.
        tensors: ``in_factors``, ``out_factors`` (float32) and the five scalars by name.
        drop_count: the exact number of removed entries, or None to derive it from sparsity.
        weight: the factor on ΔW written by the export.
    """

    prefix: str
    config: SnellaConfig
    out_features: int
    in_features: int
    tensors: dict[str, Tensor]
    drop_count: Optional[int]
    weight: float

    @classmethod
    def find(cls, prefix: str, state: Mapping[str, Tensor]) -> Optional["SnellaLayerTensors"]:
        """The layer stored under ``prefix`` in ``state``, or None when ``state`` holds no
        SNELLA layer there.

        Raises:
            SnellaFormatError naming the key at fault when the layer is incomplete or malformed.
        """
        spec_key = f"{prefix}{KEY_INFIX}spec"
        if spec_key not in state:
            return None
        missing = [key for key in layer_keys(prefix) if key not in state]
        if missing:
            raise SnellaFormatError(f"SNELLA layer {prefix}: key {missing[0]} is missing")
        spec = state[spec_key]
        if spec.dtype != torch.int64 or tuple(spec.shape) != (6,):
            raise SnellaFormatError(f"SNELLA layer {prefix}: key {spec_key} must be 6 int64 values")
        version, kernel, rule, out_features, in_features, drop_count = (int(v) for v in spec.tolist())
        if version != LAYOUT_VERSION:
            raise SnellaFormatError(
                f"SNELLA layer {prefix}: key {spec_key} has layout version {version}; this "
                f"snella-diffusion reads {LAYOUT_VERSION} (upgrade the package)")
        if not (0 <= kernel < len(KERNELS) and 0 <= rule < len(SPARSIFY_MODES)):
            raise SnellaFormatError(f"SNELLA layer {prefix}: key {spec_key} names kernel {kernel} / rule {rule}, "
                                    f"expected indices into {KERNELS} / {SPARSIFY_MODES}")
        if not (0 <= drop_count <= out_features * in_features or drop_count == UNKNOWN_DROP_COUNT):
            raise SnellaFormatError(f"SNELLA layer {prefix}: key {spec_key} holds drop_count {drop_count}, "
                                    f"outside [0, {out_features * in_features}]")
        in_factors = state[f"{prefix}{KEY_INFIX}in_factors"]
        out_factors = state[f"{prefix}{KEY_INFIX}out_factors"]
        scalars = state[f"{prefix}{KEY_INFIX}scalars"]
        scales = state[f"{prefix}{KEY_INFIX}scales"]
        if in_factors.dim() != 3 or in_factors.shape[1] != in_features or tuple(out_factors.shape) != (
                in_factors.shape[0], out_features, in_factors.shape[2]):
            raise SnellaFormatError(
                f"SNELLA layer {prefix}: factors {tuple(in_factors.shape)} / {tuple(out_factors.shape)} do not "
                f"fit a {out_features}x{in_features} layer")
        if tuple(scalars.shape) != (len(SCALAR_NAMES),) or tuple(scales.shape) != (2,):
            raise SnellaFormatError(f"SNELLA layer {prefix}: keys {prefix}{KEY_INFIX}scalars / scales must hold "
                                    f"{len(SCALAR_NAMES)} and 2 values")
        for name, tensor in (("in_factors", in_factors), ("out_factors", out_factors), ("scalars", scalars),
                             ("scales", scales)):
            if not bool(torch.isfinite(tensor).all()):
                raise SnellaFormatError(f"SNELLA layer {prefix}: key {prefix}{KEY_INFIX}{name} holds non-finite values")
        heads, width = int(in_factors.shape[0]), int(in_factors.shape[2])
        kernel_scale, weight = (float(v) for v in scales.tolist())
        try:
            config = SnellaConfig(rank=heads * width, num_heads=heads, kernel=KERNELS[kernel],
                                  kernel_scale=kernel_scale, sparsify=SPARSIFY_MODES[rule],
                                  init_sparsity=0.0, target_sparsity=0.0)
        except ValueError as error:
            raise SnellaFormatError(f"SNELLA layer {prefix}: {error}") from error
        tensors = {"in_factors": in_factors.to(torch.float32), "out_factors": out_factors.to(torch.float32)}
        tensors.update({name: scalars[i].to(torch.float32) for i, name in enumerate(SCALAR_NAMES)})
        if not 0.0 <= float(tensors["sparsity"]) <= 1.0:
            raise SnellaFormatError(f"SNELLA layer {prefix}: sparsity {float(tensors['sparsity'])} is outside [0, 1]")
        return cls(prefix, config, out_features, in_features, tensors,
                   None if drop_count == UNKNOWN_DROP_COUNT else drop_count, weight)

    @property
    def keys(self) -> list[str]:
        return layer_keys(self.prefix)

    @torch.no_grad()
    def adapter(self, device: Optional[torch.device] = None) -> SnellaAdapter:
        """The library's adapter holding these tensors (factors, sparsity, the file's τ)."""
        adapter = SnellaAdapter(self.out_features, self.in_features, self.config, device=device)
        for name in ("in_factors", "out_factors", "alpha", "gamma", "beta"):
            getattr(adapter, name).copy_(self.tensors[name])
        adapter.set_sparsity(float(self.tensors["sparsity"]), drop_count=self.drop_count)
        adapter.record_threshold(self.tensors["threshold"].to(adapter.threshold.device))
        return adapter

    @torch.no_grad()
    def delta_weight(self, device: Optional[torch.device] = None) -> Tensor:
        """weight·ΔW ``(m, n)`` float32 on ``device``, built exactly as ``fuse_snella`` builds it."""
        delta = self.adapter(device).delta_weight()
        return delta if self.weight == 1.0 else delta * self.weight

"""The methods the classification entry compares (``snella_diffusion.methods``), set up on one
ViT classifier.

Every method trains the classification head the same way; they differ in what else trains:

- ``snella``: SNELLA adapters ("mix" kernel) with the bi-level allocator (s_init → s_target).
- ``snell``: SNELL: "piecewise_linear" kernel, one fixed sparsity for every layer, no allocator.
- ``lora``: PEFT LoRA on the same linears.
- ``full``: every parameter.
- ``linear``: the head only.
- ``masked_sparse``: SPT/GPS-style gradient-masked sparse tuning of the same linears' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from ..allocator import BiLevelAllocator
from ..baselines import GradientMaskedSparse
from ..config import SnellaConfig
from ..errors import SnellaConfigError
from ..methods import METHODS as REGISTRY
from ..methods import AttachSettings, Method, method_for

METHODS = tuple(REGISTRY)


@dataclass
class MethodSettings:
    """Adapter settings shared by the methods (steps are optimizer steps)."""

    rank: int = 32
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    init_sparsity: float = 0.0
    target_sparsity: float = 0.8
    masked_density: Optional[float] = None
    calibration_batches: int = 4
    target_modules: str = "vit"
    total_steps: int = 1
    allocator_warmup_steps: int = 0
    allocator_final_steps: int = 0
    allocator_interval: int = 1
    forward_mode: str = "merged"
    adapter_dropout: float = 0.0
    drop_path: float = 0.0
    train_cls_token: bool = False
    zero_sparsity_update: str = "dense"

    def density(self) -> float:
        """Fraction of each weight masked_sparse trains (default: SNELLA's final kept fraction)."""
        return self.masked_density if self.masked_density is not None else 1.0 - self.target_sparsity


@dataclass
class PreparedMethod:
    """What the training loop needs from a method, after the model was modified in place.

    Attributes:
        param_groups: optimizer groups; entries without "weight_decay" take the loop's value.
        allocator: SNELLA's allocator (call ``step()`` after each optimizer step), else None.
        masked: the masked-sparse tuner (already calibrated), else None.
        trainable_count: number of parameter entries the method updates (for masked_sparse the
            masked entries, not the full weights the optimizer holds).
        state_bytes: bytes of method state outside parameters and optimizer (masks, EMAs).
    """

    name: str
    param_groups: list[dict]
    allocator: Optional[BiLevelAllocator] = None
    masked: Optional[GradientMaskedSparse] = None
    trainable_count: int = 0
    state_bytes: int = 0
    details: dict = field(default_factory=dict)


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise SnellaConfigError(f"{type(model).__name__} has no .classifier head")
    return head


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


ZERO_SPARSITY_UPDATES = ("dense", "square")


def _snella_config(settings: MethodSettings, method: Method) -> SnellaConfig:
    """SNELLA (allocating, s_init → s_target) or SNELL (one fixed sparsity) settings. When no
    entry is ever dropped and ``zero_sparsity_update`` is "dense", ΔW = M (= K for SNELL), as
    in the reference scripts; "square" keeps M·|M|."""
    if settings.zero_sparsity_update not in ZERO_SPARSITY_UPDATES:
        raise SnellaConfigError(
            f"--zero_sparsity_update {settings.zero_sparsity_update!r}: expected one of {ZERO_SPARSITY_UPDATES}"
        )
    init_sparsity = settings.init_sparsity if method.allocates else settings.target_sparsity
    dense = settings.zero_sparsity_update == "dense" and init_sparsity == 0.0 and settings.target_sparsity == 0.0
    common = dict(
        rank=settings.rank, kernel=method.kernel or "mix", target_modules=settings.target_modules,
        init_sparsity=init_sparsity, target_sparsity=settings.target_sparsity,
        sparsify="dense" if dense else "official", forward_mode=settings.forward_mode,
        adapter_dropout=settings.adapter_dropout, drop_path=settings.drop_path,
    )
    if method.allocates:
        return SnellaConfig(
            **common,
            allocator_warmup_steps=settings.allocator_warmup_steps,
            allocator_final_steps=settings.allocator_final_steps,
            allocator_interval=settings.allocator_interval,
        )
    return SnellaConfig(**common)


def cls_token(model: nn.Module) -> Optional[nn.Parameter]:
    """The ViT's learned class token ``(1, 1, hidden)``, or None when the model has none."""
    embeddings = getattr(getattr(model, "vit", None), "embeddings", None)
    token = getattr(embeddings, "cls_token", None)
    return token if isinstance(token, nn.Parameter) else None


def weight_decay_groups(model: nn.Module, param_groups: list[dict], weight_decay: float,
                        decay_1d: bool) -> list[dict]:
    """``param_groups`` with ``weight_decay`` set, each group split so that 1-D (and 0-d)
    parameters and biases get none unless ``decay_1d`` (the reference's ``set_weight_decay``).
    Groups that already name a weight decay keep it."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for group in param_groups:
        if "weight_decay" in group or decay_1d:
            groups.append({"weight_decay": weight_decay, **group})
            continue
        decayed, exempt = [], []
        for param in group["params"]:
            no_decay = param.ndim <= 1 or names.get(id(param), "").endswith(".bias")
            (exempt if no_decay else decayed).append(param)
        rest = {key: value for key, value in group.items() if key != "params"}
        groups += [{**rest, "params": params, "weight_decay": decay}
                   for params, decay in ((decayed, weight_decay), (exempt, 0.0)) if params]
    return groups


def _state_bytes(allocator: Optional[BiLevelAllocator], masked: Optional[GradientMaskedSparse]) -> int:
    """Bytes of the allocator's importance EMAs (float32) and of masked_sparse's bool masks."""
    total = 0
    if allocator is not None:
        total += sum(t.numel() * t.element_size() for tensors in (allocator.sensitivity, allocator.uncertainty)
                     for pair in tensors.values() for t in pair)
    if masked is not None:
        total += sum(m.numel() for m in masked.masks.values())
    return total


def prepare_method(
    model: nn.Module,
    method: str,
    settings: MethodSettings,
    calibration_loss: Optional[Callable[[], Tensor]] = None,
) -> PreparedMethod:
    """Modify ``model`` in place for ``method`` and return its optimizer groups and helpers.

    ``calibration_loss`` (a loss on the next training batch) is required by masked_sparse.
    The head always trains, in its own group (with the cls token when
    ``settings.train_cls_token``, for the methods that adapt chosen layers).
    """
    chosen = method_for(method, METHODS)
    head_params = list(_head(model).parameters())
    head_count = sum(p.numel() for p in head_params)
    attach_settings = AttachSettings(
        target_modules=settings.target_modules,
        snella=_snella_config(settings, chosen) if chosen.snella_layers else None,
        lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha, density=settings.density(),
        calibration_loss=calibration_loss, calibration_batches=settings.calibration_batches,
        total_steps=settings.total_steps,
    )
    attached = chosen.attach(model, attach_settings)
    allocator = chosen.allocator(attached.layers, attach_settings)
    prepared = PreparedMethod(method, [], allocator, attached.masked,
                              state_bytes=_state_bytes(allocator, attached.masked),
                              details=chosen.describe(attached, attach_settings))
    token = cls_token(model)
    if settings.train_cls_token and chosen.adapts_layers and token is not None:
        token.requires_grad_(True)
        head_params.append(token)
        head_count += token.numel()
    for p in head_params:
        p.requires_grad_(True)
    head_ids = {id(p) for p in head_params}
    if prepared.masked is not None:
        prepared.param_groups = prepared.masked.optimizer_param_groups()
        prepared.trainable_count = prepared.masked.masked_count() + head_count
    else:
        body = [p for p in _trainable(model) if id(p) not in head_ids]
        if body:
            prepared.param_groups.append({"params": body})
        prepared.trainable_count = sum(p.numel() for p in body) + head_count
    prepared.param_groups.append({"params": head_params})
    return prepared

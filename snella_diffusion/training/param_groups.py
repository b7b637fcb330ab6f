"""The optimizer's parameter groups of a DreamBooth run, and freezing SNELLA's β.

By default every trainable parameter is in one group at ``--learning_rate`` (the reference
behaviour). Three flags split them (``OptimizerSettings``):

- ``--text_encoder_lr``: the text encoders' trainable parameters (SNELLA factors or LoRA
  matrices) at their own rate;
- ``--snella_scalar_lr``: every SNELLA layer's scalars α, γ, β (denoiser and text encoders) at
  their own rate;
- ``--beta_decay``: β in a group of its own whose decoupled weight decay is ``beta_decay``
  (AdamW: β ← β·(1 − lr_β·beta_decay) each step before the Adam update), at the scalars' rate.

``--freeze_beta`` (``AdapterSettings``) sets ``requires_grad=False`` on every β, which then
stays at its initial 0: it is in no group at all.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from ..adapter import SnellaAdapter
from .optimizers import OptimizerSettings


def freeze_snella_beta(models: Iterable[nn.Module]) -> int:
    """Freeze every SNELLA adapter's β (``requires_grad=False``) in ``models``; returns how many."""
    count = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, SnellaAdapter):
                module.beta.requires_grad_(False)
                count += 1
    return count


def _scalar_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """(ids of every SNELLA α and γ, ids of every β) in ``model``."""
    scalars, betas = set(), set()
    for module in model.modules():
        if isinstance(module, SnellaAdapter):
            scalars.update((id(module.alpha), id(module.gamma)))
            betas.add(id(module.beta))
    return scalars, betas


def optimizer_param_groups(
    trained: dict[str, nn.Module], denoiser_component: str, settings: OptimizerSettings,
    learning_rate: float, weight_decay: float, lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``trained`` (``{component: model}``) as optimizer groups.

    Args:
        trained: the trained models; every component but ``denoiser_component`` is a text
            encoder.
        settings: the optimizer flags (``snella_scalar_lr``, ``text_encoder_lr``, ``beta_decay``).
        learning_rate: ``--learning_rate`` (already scaled by ``--scale_lr``).
        weight_decay: ``--adam_weight_decay``.
        lr_scale: the ``--scale_lr`` factor, applied to the per-group rates too.
    Returns:
        Dicts with ``name``, ``params`` (model order), ``lr`` and ``weight_decay``; one group
        ``"all"`` when none of the three flags is given. Empty groups are left out.
    """
    text_lr: Optional[float] = None if settings.text_encoder_lr is None else settings.text_encoder_lr * lr_scale
    scalar_lr: Optional[float] = None if settings.snella_scalar_lr is None else settings.snella_scalar_lr * lr_scale
    order = ["denoiser", "text_encoder", "snella_scalars", "beta", "text_encoder_beta"]
    groups: dict[str, dict[str, Any]] = {}

    def add(name: str, param: nn.Parameter, lr: float, decay: float) -> None:
        groups.setdefault(name, {"name": name, "params": [], "lr": lr, "weight_decay": decay})["params"].append(param)

    for component, model in trained.items():
        is_text = component != denoiser_component
        base_name = "text_encoder" if is_text and text_lr is not None else "denoiser"
        base_lr = text_lr if base_name == "text_encoder" else learning_rate
        scalars, betas = _scalar_ids(model)
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if id(param) in betas and settings.beta_decay is not None:
                beta_name = "beta" if scalar_lr is not None or base_name == "denoiser" else "text_encoder_beta"
                add(beta_name, param, scalar_lr if scalar_lr is not None else base_lr, settings.beta_decay)
            elif (id(param) in scalars or id(param) in betas) and scalar_lr is not None:
                add("snella_scalars", param, scalar_lr, weight_decay)
            else:
                add(base_name, param, base_lr, weight_decay)
    if text_lr is None and scalar_lr is None and settings.beta_decay is None:
        return [{"name": "all", "params": groups["denoiser"]["params"] if groups else [],
                 "lr": learning_rate, "weight_decay": weight_decay}]
    return [groups[name] for name in order if name in groups]


def uses_one_group(settings: OptimizerSettings) -> bool:
    """True when no flag splits the parameters (the reference: one list at --learning_rate)."""
    return settings.snella_scalar_lr is None and settings.text_encoder_lr is None and settings.beta_decay is None

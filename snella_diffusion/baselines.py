"""Baselines SNELLA is compared with, on exactly the layers SNELLA would adapt.

- ``apply_lora``: PEFT LoRA on the linears ``apply_snella`` would pick.
- ``GradientMaskedSparse``: the two-stage sparse-tuning baseline of SPT/GPS. Stage one scores
  every entry of each target weight by its accumulated gradient magnitude and keeps the top
  ``density`` fraction; stage two trains the full weight tensors with gradients outside the
  kept entries zeroed, so the optimizer holds full-size state (as those methods do).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import SnellaConfig, TargetModules
from .errors import SnellaConfigError, SnellaError
from .inject import find_target_linears


def _resolve_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Linear]:
    """The linears ``apply_snella`` would adapt for ``target_modules``; error if none."""
    targets = find_target_linears(model, SnellaConfig(target_modules=target_modules))
    if not targets:
        raise SnellaError(
            f"target_modules={target_modules!r} matched no nn.Linear in {type(model).__name__}"
        )
    return targets


def apply_lora(
    model: nn.Module,
    target_modules: TargetModules,
    rank: int,
    lora_alpha: Optional[float] = None,
) -> list[str]:
    """Inject PEFT LoRA adapters of ``rank`` into the SNELLA target linears, in place.

    Everything except the LoRA factors is frozen. ``lora_alpha`` defaults to ``rank`` (scaling
    alpha/r = 1).

    Returns:
        The qualified names of the adapted linears, in model order.
    """
    if rank < 1:
        raise SnellaConfigError(f"rank={rank}: LoRA rank must be at least 1")
    names = list(_resolve_targets(model, target_modules))
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if lora_alpha is None else lora_alpha),
        lora_dropout=0.0,
        target_modules=names,
        bias="none",
    )
    inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name in adapted:
        module = model.get_submodule(name)
        for factors in (module.lora_A, module.lora_B):
            factors.requires_grad_(True)
    if sorted(adapted) != sorted(names):
        raise SnellaError(
            f"PEFT adapted {len(adapted)} linears, expected the {len(names)} SNELLA targets"
        )
    return adapted


class GradientMaskedSparse:
    """Train only the top-``density`` entries (by calibration gradient magnitude) of each target weight.

    Usage::

        sparse = GradientMaskedSparse(model, "vit", density=0.1)
        sparse.calibrate(lambda: loss_on_next_batch(), num_batches=4)
        optimizer = torch.optim.AdamW(sparse.trainable_parameters(), weight_decay=0.0)

    Untouched entries see exactly zero gradient, so with Adam-type optimizers their moments stay
    zero and their values bit-identical. Decoupled weight decay would still shrink them: give the
    masked weights ``weight_decay=0`` (see ``optimizer_param_groups``).

    Attributes:
        weights: ``{qualified_name: weight Parameter (m, n)}`` of the target linears.
        masks: ``{qualified_name: bool Tensor (m, n)}``, True where the entry trains; empty
            until ``calibrate`` ran.
    """

    def __init__(self, model: nn.Module, target_modules: TargetModules, density: float) -> None:
        if not 0.0 < density <= 1.0:
            raise SnellaConfigError(f"density={density}: must lie in (0, 1]")
        self.model = model
        self.density = float(density)
        self.weights: dict[str, nn.Parameter] = {
            name: linear.weight for name, linear in _resolve_targets(model, target_modules).items()
        }
        self.masks: dict[str, Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        model.requires_grad_(False)
        for weight in self.weights.values():
            weight.requires_grad_(True)

    def calibrate(self, compute_loss: Callable[[], Tensor], num_batches: int) -> None:
        """Stage one: score entries by Σ|∂loss/∂W| over ``num_batches`` calls, build masks, hook.

        ``compute_loss`` runs a forward pass on the next batch and returns a scalar loss. All
        gradients the calls leave on the model are cleared afterwards. Under torch.distributed
        the scores are summed over ranks first, so every rank builds the same masks.
        """
        if num_batches < 1:
            raise SnellaConfigError(f"num_batches={num_batches}: must be at least 1")
        if self.masks:
            raise SnellaError("GradientMaskedSparse.calibrate was already called")
        scores = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in self.weights.items()}
        for _ in range(num_batches):
            self.model.zero_grad(set_to_none=True)
            compute_loss().backward()
            for name, weight in self.weights.items():
                if weight.grad is not None:
                    scores[name].add_(weight.grad.detach().abs().float())
        self.model.zero_grad(set_to_none=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must keep the same entries: sum the scores over all ranks' batches.
            for score in scores.values():
                dist.all_reduce(score)
        for name, score in scores.items():
            keep = max(1, round(self.density * score.numel()))
            mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
            mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
            self.masks[name] = mask.view_as(score)
        for name, weight in self.weights.items():
            self._hooks.append(weight.register_hook(self._masking_hook(self.masks[name])))

    @staticmethod
    def _masking_hook(mask: Tensor) -> Callable[[Tensor], Tensor]:
        def zero_outside_mask(grad: Tensor) -> Tensor:
            return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

        return zero_outside_mask

    def _require_calibrated(self) -> None:
        if not self.masks:
            raise SnellaError("call GradientMaskedSparse.calibrate before training")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The full target weights (optimizer state is full-size, as in SPT/GPS)."""
        self._require_calibrated()
        return list(self.weights.values())

    def optimizer_param_groups(self) -> list[dict]:
        """One param group of the masked weights with ``weight_decay=0`` (keeps untouched entries exact)."""
        return [{"params": self.trainable_parameters(), "weight_decay": 0.0}]

    def masked_count(self) -> int:
        """Number of weight entries that train (Σ over layers of the mask's True count)."""
        self._require_calibrated()
        return int(sum(int(mask.sum()) for mask in self.masks.values()))

    def remove_hooks(self) -> None:
        """Drop the gradient hooks (the weights then train densely)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

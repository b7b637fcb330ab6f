"""What the DreamBooth script trains, selected by ``--adapter`` (one of ``ADAPTERS``, methods of
``snella_diffusion.methods``): SNELLA (the default), PEFT LoRA on the same linears at the same
trainable-parameter count, or the full denoiser. With ``--train_text_encoder`` SNELLA and LoRA
also adapt the text encoders (the ``text_encoder`` preset: attention projections and MLP
linears), so an A/B run changes the adapter only.

SNELLA-r holds r·(m + n) factor entries per (m, n) linear (plus 3 scalars), exactly what LoRA
of rank r holds, so ``--lora_rank`` defaults to ``--rank``. A LoRA run is saved in the diffusers
LoRA format (``pytorch_lora_weights.safetensors``: keys ``unet.<module>.lora_A.weight`` …, and
``text_encoder.<module>.lora_linear_layer.down.weight`` … for trained text encoders, as
diffusers' own DreamBooth LoRA script writes them) that ``pipeline.load_lora_weights(output_dir)``
reads; a full run saves the fine-tuned denoiser as a diffusers model folder
(``<output_dir>/<component>``). ``Method.output_file`` / ``Method.save`` write them.

LoRA and full runs have no sparsity to allocate: ``StaticAllocator`` stands in for the
SNELLA allocator in the training loop (every entry kept, nothing reallocated).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Union

from torch import nn

from ..allocator import BiLevelAllocator
from ..config import SnellaConfig
from ..errors import SnellaConfigError
from ..methods import LORA_FILE, SNELLA_FILE, AttachSettings, Method

ADAPTERS = ("snella", "lora", "full")

__all__ = ["ADAPTERS", "LORA_FILE", "SNELLA_FILE", "StaticAllocator", "attach_method"]


class StaticAllocator:
    """The allocator interface of ``BiLevelAllocator`` for a run without sparsity: one entry
    per trained component, all of its trainable parameters kept, no reallocation."""

    def __init__(self, trained: dict[str, nn.Module]) -> None:
        self.names = list(trained)
        self.capacities = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in trained.values()]
        self.adapters = {name: SimpleNamespace(drop_count_host=0) for name in self.names}
        self.step_count = 0
        self.history_steps = [0]
        self.history_kept = [list(self.capacities)]
        self.final_volume = sum(self.capacities)

    def step(self, skipped: bool = False) -> bool:
        """Counts the step; never reallocates."""
        self.step_count += 0 if skipped else 1
        self.history_steps[-1] = self.step_count
        return False

    def reallocate(self, volume: int) -> None:
        """Nothing to reallocate."""

    def budgets(self) -> dict[str, float]:
        """Per-component sparsity: 0 (dense)."""
        return {name: 0.0 for name in self.names}

    def keep_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.capacities))

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.history_steps[-1] = self.step_count


def attach_method(
    method: Method,
    denoiser: nn.Module,
    component: str,
    config: SnellaConfig,
    total_steps: int,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    text_encoders: Optional[dict[str, nn.Module]] = None,
    extra_denoisers: Optional[dict[str, nn.Module]] = None,
) -> tuple[dict[str, nn.Module], Union[BiLevelAllocator, StaticAllocator]]:
    """Make ``denoiser`` (and each of ``text_encoders``, with the ``text_encoder`` preset)
    trainable the ``method`` way: SNELLA with ``config``, LoRA on ``config``'s targets at rank
    ``lora_rank`` or ``config.rank`` (alpha = rank unless given), or every denoiser parameter.
    ``extra_denoisers`` (``{component: model}``, e.g. Wan 2.2 A14B's ``transformer_2``) are
    adapted like ``denoiser``, in the same allocator.

    Returns ``({component: model}, allocator)``: SNELLA's allocator over every adapted layer,
    named ``<component>.<module path>``, over ``total_steps`` optimizer steps; else a
    ``StaticAllocator`` over the trained components.
    """
    if text_encoders and not method.adapts_layers:
        raise SnellaConfigError(f"--adapter={method.name} trains the denoiser only: drop --train_text_encoder")
    settings = AttachSettings(target_modules=config.target_modules, snella=config, lora_rank=lora_rank or config.rank,
                              lora_alpha=lora_alpha, total_steps=total_steps)
    trained: dict[str, nn.Module] = {component: denoiser, **(extra_denoisers or {})}
    layers = {f"{name}.{n}": layer for name, model in trained.items()
              for n, layer in method.attach(model, settings).layers.items()}
    if text_encoders:
        text_settings = settings.for_targets("text_encoder")
        for name, encoder in text_encoders.items():
            trained[name] = encoder
            layers.update({f"{name}.{n}": layer for n, layer in method.attach(encoder, text_settings).layers.items()})
    allocator = method.allocator(layers, settings)
    return trained, allocator if allocator is not None else StaticAllocator(trained)

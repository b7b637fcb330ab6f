"""What the DreamBooth script trains, selected by ``--adapter``: SNELLA (the default), PEFT LoRA
on the same linears at the same trainable-parameter count, or the full denoiser. With
``--train_text_encoder`` SNELLA and LoRA also adapt the text encoders (the ``text_encoder``
preset: attention projections and MLP linears), so an A/B run changes the adapter only.

SNELLA-r holds r·(m + n) factor entries per (m, n) linear (plus 3 scalars), exactly what LoRA
of rank r holds, so ``--lora_rank`` defaults to ``--rank``. A LoRA run is saved in the diffusers
LoRA format (``pytorch_lora_weights.safetensors``: keys ``unet.<module>.lora_A.weight`` …, and
``text_encoder.<module>.lora_linear_layer.down.weight`` … for trained text encoders, as
diffusers' own DreamBooth LoRA script writes them) that ``pipeline.load_lora_weights(output_dir)``
reads; a full run saves the fine-tuned denoiser as a diffusers model folder
(``<output_dir>/<component>``).

LoRA and full runs have no sparsity to allocate: ``StaticAllocator`` stands in for the
SNELLA allocator in the training loop (every entry kept, nothing reallocated).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from torch import nn

from ..baselines import apply_lora
from ..config import SnellaConfig
from ..errors import SnellaConfigError
from ..io import save_snella

ADAPTERS = ("snella", "lora", "full")
SNELLA_FILE = "snella_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


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


def attach_baseline(
    adapter: str, denoiser: nn.Module, component: str, config: SnellaConfig, lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None, text_encoders: Optional[dict[str, nn.Module]] = None,
) -> tuple[dict[str, nn.Module], StaticAllocator]:
    """Makes ``denoiser`` trainable the ``adapter`` way (``"lora"``: PEFT LoRA on the SNELLA
    targets of ``config``, rank ``lora_rank`` or ``config.rank``, alpha = rank unless given, and
    on the ``text_encoder`` preset of each of ``text_encoders``; ``"full"``: every denoiser
    parameter, no text encoder). Returns ``({component: model}, StaticAllocator)``."""
    trained = {component: denoiser}
    if adapter == "lora":
        rank = lora_rank or config.rank
        apply_lora(denoiser, config.target_modules, rank, lora_alpha)
        for name, encoder in (text_encoders or {}).items():
            apply_lora(encoder, "text_encoder", rank, lora_alpha)
            trained[name] = encoder
    elif adapter == "full":
        if text_encoders:
            raise SnellaConfigError("--adapter=full trains the denoiser only: drop --train_text_encoder")
        denoiser.requires_grad_(True)
    else:
        raise SnellaConfigError(f"--adapter={adapter}: expected one of {', '.join(ADAPTERS[1:])} here")
    return trained, StaticAllocator(trained)


def output_file(adapter: str, output_dir: Path, component: str = "unet") -> Path:
    """Where ``save_trained`` writes the result of an ``adapter`` run."""
    if adapter == "snella":
        return output_dir / SNELLA_FILE
    if adapter == "lora":
        return output_dir / LORA_FILE
    return output_dir / component / "diffusion_pytorch_model.safetensors"


def save_trained(adapter: str, trained: dict[str, nn.Module], output_dir: Path, base_model: str) -> Path:
    """Writes the run's result (see the module docstring); returns the file written."""
    if adapter == "snella":
        return save_snella(trained, output_file(adapter, output_dir), base_model=base_model)
    if adapter == "lora":
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if "unet" not in trained or not set(trained) <= {"unet", "text_encoder", "text_encoder_2"}:
            raise SnellaConfigError(
                "--adapter=lora: saving in the diffusers LoRA format supports a UNet and its text encoders, "
                f"got {sorted(trained)}"
            )
        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                  for name, model in trained.items()}
        saver = StableDiffusionXLPipeline if "text_encoder_2" in trained else StableDiffusionPipeline
        saver.save_lora_weights(output_dir, **layers, safe_serialization=True)
        return output_file(adapter, output_dir)
    (component, model), = trained.items()
    model.save_pretrained(output_dir / component)
    return output_file(adapter, output_dir, component)

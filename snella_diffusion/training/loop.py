"""One micro-batch of the DreamBooth loop: latents, loss, backward, and (when the accumulated
gradients are synchronised) clipping, the optimizer, allocator and EMA steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from ..errors import SnellaError
from ..families import ModelFamily, TrainingComponents
from .batch_loss import training_loss
from .checkpointing import CheckpointableGenerator
from .ema import AdapterEMA
from .run_settings import RunSettings
from .sharding import average_gradients


class NonFiniteLossError(SnellaError):
    """The training loss became NaN or infinite; training stopped without saving."""


@dataclass
class MicroBatchStep:
    """What one micro-batch step needs; call it with a data batch (see ``__call__``)."""

    settings: RunSettings
    accelerator: Any
    family: ModelFamily
    components: TrainingComponents
    objective: Any
    conditioning_for: Callable[[list[str]], dict[str, torch.Tensor]]
    wrapped: dict[str, torch.nn.Module]
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    allocator: Any
    ema: Optional[AdapterEMA]
    encode_generator: CheckpointableGenerator
    noise_generator: CheckpointableGenerator
    weight_dtype: torch.dtype

    def __call__(self, batch: dict[str, Any], global_step: int, last_checkpoint: str) -> torch.Tensor:
        """Train on ``batch``; returns the loss averaged over processes (0-dim). Raises
        NonFiniteLossError, naming ``global_step + 1`` and ``last_checkpoint``, on a NaN/inf loss."""
        accelerator, family, components = self.accelerator, self.family, self.components
        with accelerator.accumulate(*self.wrapped.values()):
            if "latents" in batch:
                latents = batch["latents"].to(accelerator.device, self.weight_dtype)
            else:
                pixels = batch["pixel_values"].to(accelerator.device)
                latents = family.encode_latents(components, pixels, self.encode_generator.generator)
                latents = latents.to(self.weight_dtype)
            loss = training_loss(
                family, components, self.objective, batch, latents, self.conditioning_for(batch["prompts"]),
                self.wrapped[components.denoiser_component], self.noise_generator.generator,
                self.settings.data.prior_loss_weight, self.settings.loss.noise_offset,
                self.settings.loss.input_perturbation,
            )
            mean_loss = accelerator.gather(loss.detach().reshape(1)).mean()
            if not torch.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"training loss is {mean_loss.item()} at step {global_step + 1}: stopped without "
                    f"saving; the last checkpoint ({last_checkpoint}) is intact. Lower "
                    "--learning_rate, or train with --mixed_precision=no or bf16"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and accelerator.distributed_type == DistributedType.FSDP:
                average_gradients(self.trainable)  # FSDP2 leaves the SNELLA parameters out of its units
            max_grad_norm = self.settings.training.max_grad_norm
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.trainable, max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.allocator.step(skipped=accelerator.optimizer_step_was_skipped)
                if self.ema is not None:
                    self.ema.update()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return mean_loss


class RunProgress:
    """The progress bar, the loss history ``[(step, loss)]`` and the tracker log of a run's
    optimizer steps."""

    def __init__(self, accelerator: Any, total_steps: int, first_step: int) -> None:
        self.accelerator = accelerator
        self.bar = tqdm(range(total_steps), initial=first_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self.losses: list[tuple[float, float]] = []

    def record(self, step: int, mean_loss: torch.Tensor, learning_rate: float, allocator: Any) -> None:
        """Log optimizer step ``step``: its loss, learning rate and the kept fraction of ΔW entries."""
        self.bar.update(1)
        loss_value = mean_loss.item()
        self.losses.append((float(step), loss_value))
        kept = sum(allocator.keep_counts().values()) / sum(allocator.capacities)
        self.bar.set_postfix(loss=f"{loss_value:.4f}", kept=f"{kept:.3f}")
        self.accelerator.log({"loss": loss_value, "lr": learning_rate, "kept_fraction": kept}, step=step)

    def close(self) -> None:
        self.bar.close()

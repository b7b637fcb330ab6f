"""Training checkpoints with accelerate: adapter-only model saving, a checkpointable random
generator, atomic ``checkpoint-<N>`` folders, "latest" lookup and pruning.

A ``checkpoint-<N>/`` folder holds accelerate's optimizer, LR scheduler and RNG files, one
``custom_checkpoint_<i>.pkl`` per object registered with ``register_for_checkpointing`` (the
allocator, the noise generator) and ``snella_weights.safetensors``: the adapters of every
trained component in the core file format (usable on its own with ``load_snella``). Frozen
base weights are not copied.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import SnellaError
from ..io import read_snella_file, save_snella
from ..layer import snella_layers

ADAPTER_FILE = "snella_weights.safetensors"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(SnellaError):
    """A checkpoint folder is missing or does not fit the model being trained."""


class CheckpointableGenerator:
    """A ``torch.Generator`` whose state travels in accelerate checkpoints."""

    def __init__(self, seed: int, device: str = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint-<step> folder")
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<N>`` folders in ``output_dir``, oldest (smallest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume_path(output_dir: Path, resume_from: str) -> Optional[Path]:
    """``--resume_from_checkpoint``: "latest" → newest checkpoint in ``output_dir`` (None if
    there is none); otherwise a folder path (absolute, or a name inside ``output_dir``)."""
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not path.is_dir() and (output_dir / resume_from).is_dir():
        path = output_dir / resume_from
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint={resume_from}: no such checkpoint folder")
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: Path, total_limit: Optional[int]) -> list[Path]:
    """Delete the oldest checkpoints so that one more can be written within ``total_limit``."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) - (total_limit - 1)
    removed = checkpoints[: max(0, excess)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, total_limit: Optional[int]) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>`` atomically: written to a temporary
    folder, renamed into place on the main process. Call it on every process."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def load_adapter_tensors(models: dict[str, nn.Module], path: Path, adapter_name: str = "default") -> None:
    """Copy the adapter tensors of a SNELLA file into the existing adapters of ``models``
    (``{component: model}``, layers already injected), exactly: factors, scalars, sparsity,
    drop count and τ.

    Raises:
        CheckpointError: the file's layers and the models' adapted layers differ.
    """
    snella_file = read_snella_file(path)
    for component, model in models.items():
        layers = snella_layers(model)
        stored = snella_file.layers.get(component, {})
        if set(stored) != set(layers):
            missing = sorted(set(layers) - set(stored))[:3]
            extra = sorted(set(stored) - set(layers))[:3]
            raise CheckpointError(
                f"{path}: adapters of {component!r} do not match the model (missing {missing}, "
                f"unexpected {extra}); was the checkpoint written with other --target_modules "
                "or --train_text_encoder settings?"
            )
        state = {
            f"{layer_path}.adapters.{adapter_name}.{param}": tensor
            for layer_path, params in stored.items()
            for param, tensor in params.items()
        }
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # size mismatches: another --rank
            raise CheckpointError(
                f"{path}: adapter tensors of {component!r} do not fit the model (was the checkpoint "
                f"written with another --rank?): {str(error).splitlines()[-1].strip()}"
            ) from error
        if result.unexpected_keys:
            raise CheckpointError(f"{path}: unexpected adapter key {result.unexpected_keys[0]}")


def register_adapter_hooks(
    accelerator: Any,
    components: dict[str, nn.Module],
    base_model: str,
    unwrap: Callable[[nn.Module], nn.Module],
) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the adapters of the prepared
    models in ``components`` (``{component name: unwrapped model}``), as ``ADAPTER_FILE``."""

    def component_of(model: nn.Module) -> Optional[str]:
        target = unwrap(model)
        for name, candidate in components.items():
            if candidate is target:
                return name
        return None

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        to_save: dict[str, nn.Module] = {}
        for index in reversed(range(len(models))):
            name = component_of(models[index])
            if name is not None:
                to_save[name] = components[name]
                if weights:
                    weights.pop(index)
        if to_save and accelerator.is_main_process:
            ordered = {name: to_save[name] for name in components if name in to_save}
            save_snella(ordered, Path(output_dir) / ADAPTER_FILE, base_model=base_model)

    def load_hook(models: list, input_dir: str) -> None:
        to_load: dict[str, nn.Module] = {}
        for index in reversed(range(len(models))):
            name = component_of(models[index])
            if name is not None:
                to_load[name] = components[name]
                models.pop(index)
        if to_load:
            load_adapter_tensors(to_load, Path(input_dir) / ADAPTER_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


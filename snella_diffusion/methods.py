"""The fine-tuning methods the scripts compare, behind one interface (``Method``), and their
registry ``METHODS`` (look one up with ``method_for``).

Every method works on the linears SNELLA's ``target_modules`` rule picks in one model:

- ``snella``: SNELLA adapters (the config's kernel, "mix" by default) and the bi-level
  allocator (s_init → s_target).
- ``snell``: SNELL: SNELLA adapters with the "piecewise_linear" kernel at one fixed sparsity,
  no allocator.
- ``lora``: PEFT LoRA of rank r: r·(m + n) factor entries per (m, n) linear, as SNELLA-r.
- ``full``: every parameter of the model.
- ``linear``: a linear probe: nothing of the model trains (the caller trains its head).
- ``masked_sparse``: SPT/GPS-style gradient-masked sparse tuning of the target weights.

Three callers choose among them by name: the DreamBooth script (``--adapter``: snella, lora,
full; ``training/adapters.py``), the classification script (``--method``: all of them;
``classification/methods.py``) and ``testing/benchmarking.py`` (snella, lora, masked_sparse, full).
What differs between methods is asked of the method object, never by comparing its name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

from .allocator import BiLevelAllocator
from .baselines import GradientMaskedSparse, apply_lora
from .config import SnellaConfig, TargetModules
from .errors import SnellaConfigError
from .files import write_atomically
from .inject import apply_snella
from .io import save_snella

SNELLA_FILE = "snella_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class AttachSettings:
    """What attaching a method to one model reads (each method reads its own fields).

    Attributes:
        target_modules: the linears lora and masked_sparse work on (a preset, names or regular
            expressions, SNELLA's rule); snella and snell take theirs from ``snella``.
        snella: the SnellaConfig of snella and snell (None for the other methods).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (None: r, a scale alpha/r of 1).
        density: fraction of the entries of each target weight masked_sparse trains, in (0, 1].
        calibration_loss: masked_sparse: a scalar loss on the next training batch.
        calibration_batches: masked_sparse: calls of ``calibration_loss`` whose |grad| scores
            the entries.
        total_steps: optimizer steps of the run (the allocator's schedule).
    """

    target_modules: TargetModules = "unet"
    snella: Optional[SnellaConfig] = None
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    density: float = 1.0
    calibration_loss: Optional[Callable[[], Tensor]] = None
    calibration_batches: int = 1
    total_steps: int = 1

    def for_targets(self, target_modules: TargetModules) -> "AttachSettings":
        """These settings on other linears (e.g. the ``text_encoder`` preset of a text encoder):
        the SNELLA config with these targets and no exclusions."""
        snella = None
        if self.snella is not None:
            snella = dataclasses.replace(self.snella, target_modules=target_modules, exclude_modules=[])
        return dataclasses.replace(self, target_modules=target_modules, snella=snella)


@dataclass
class Attached:
    """One model after ``Method.attach`` (modified in place).

    Attributes:
        model: the model.
        layers: ``{qualified name: module}`` of the adapted linears (SnellaLinear, PEFT LoRA
            layer or masked nn.Linear), in model order; empty for full and linear.
        masked: the calibrated GradientMaskedSparse tuner (masked_sparse), else None.
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    masked: Optional[GradientMaskedSparse] = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model's parameters that require grad, in model order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimizer groups: masked_sparse's (full weights, no weight decay), else one group of
        the trainable parameters."""
        if self.masked is not None:
            return self.masked.optimizer_param_groups()
        return [{"params": self.trainable_parameters()}]


class Method(ABC):
    """One fine-tuning method. Attributes say what a caller must know about it:

    Attributes:
        name: registry key and flag value (``--adapter``, ``--method``).
        label: how reports and cards name it.
        snella_layers: trains SnellaLinear adapters (needs ``AttachSettings.snella``; saved
            with ``save_snella``; the DreamBooth checkpoint hooks and ``--use_ema`` apply).
        kernel: the kernel the method fixes (None: the SnellaConfig's own, or no SNELLA layers).
        allocates: anneals its sparsity with the bi-level allocator (``allocator`` returns one).
        adapts_layers: trains chosen layers of the model (adapters or masks) rather than all of
            it or none of it; only these also adapt text encoders (DreamBooth) and the class
            token (classification).
        uses_lora_rank: reads ``AttachSettings.lora_rank`` (``--lora_rank`` applies).
    """

    name: str
    label: str
    snella_layers: bool = False
    kernel: Optional[str] = None
    allocates: bool = False
    adapts_layers: bool = False
    uses_lora_rank: bool = False

    @abstractmethod
    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        """Make ``model`` trainable this method's way, in place: what trains requires grad,
        the rest is frozen."""

    def allocator(self, layers: dict[str, nn.Module], settings: AttachSettings) -> Optional[BiLevelAllocator]:
        """The allocator to ``step()`` after each optimizer step over ``layers`` (the adapted
        layers of every attached model); None when the method reallocates nothing."""
        return None

    def output_file(self, output_dir: Path, component: str = "unet") -> Path:
        """The file ``save`` writes: the fine-tuned ``component`` as a diffusers model folder."""
        return output_dir / component / "diffusion_pytorch_model.safetensors"

    def save(self, trained: dict[str, nn.Module], output_dir: Path, base_model: Optional[str]) -> Path:
        """Write the result of a run that trained ``trained`` (``{component: model}``);
        returns ``output_file``. Full weights: the one trained model's ``save_pretrained``."""
        if len(trained) != 1:
            raise SnellaConfigError(
                f"method {self.name!r} saves one fine-tuned model, got components {sorted(trained)}"
            )
        (component, model), = trained.items()
        model.save_pretrained(output_dir / component)
        return self.output_file(output_dir, component)

    def describe(self, attached: Attached, settings: AttachSettings) -> dict[str, Any]:
        """Facts of the attached method for reports (JSON-safe)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SnellaMethod(Method):
    """SNELLA adapters on ``settings.snella``'s targets; with ``allocates`` the bi-level
    allocator anneals their sparsity, else it stays at the config's ``init_sparsity``."""

    snella_layers = True
    adapts_layers = True

    def __init__(self, name: str, label: str, kernel: Optional[str], allocates: bool) -> None:
        self.name = name
        self.label = label
        self.kernel = kernel
        self.allocates = allocates

    def _config(self, settings: AttachSettings) -> SnellaConfig:
        config = settings.snella
        if config is None:
            raise SnellaConfigError(f"method {self.name!r} needs a SnellaConfig (AttachSettings.snella)")
        if self.kernel is not None and config.kernel != self.kernel:
            raise SnellaConfigError(f"method {self.name!r}: kernel={config.kernel!r}, expected {self.kernel!r}")
        return config

    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        return Attached(model, dict(apply_snella(model, self._config(settings))))

    def allocator(self, layers: dict[str, nn.Module], settings: AttachSettings) -> Optional[BiLevelAllocator]:
        if not self.allocates:
            return None
        return BiLevelAllocator(layers, self._config(settings), total_steps=settings.total_steps)

    def output_file(self, output_dir: Path, component: str = "unet") -> Path:
        """The SNELLA adapter file (every trained component in one file)."""
        return output_dir / SNELLA_FILE

    def save(self, trained: dict[str, nn.Module], output_dir: Path, base_model: Optional[str]) -> Path:
        return save_snella(trained, self.output_file(output_dir), base_model=base_model)

    def describe(self, attached: Attached, settings: AttachSettings) -> dict[str, Any]:
        return {"layers": len(attached.layers), "config": self._config(settings).to_dict()}


class LoraMethod(Method):
    """PEFT LoRA of rank ``settings.lora_rank`` on ``settings.target_modules``."""

    name = "lora"
    label = "LoRA"
    adapts_layers = True
    uses_lora_rank = True

    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        adapted = apply_lora(model, settings.target_modules, settings.lora_rank, settings.lora_alpha)
        return Attached(model, {name: model.get_submodule(name) for name in adapted})

    def output_file(self, output_dir: Path, component: str = "unet") -> Path:
        """The diffusers LoRA file ``pipeline.load_lora_weights(output_dir)`` reads."""
        return output_dir / LORA_FILE

    def save(self, trained: dict[str, nn.Module], output_dir: Path, base_model: Optional[str]) -> Path:
        """The diffusers LoRA format (keys ``unet.<module>.lora_A.weight`` …, and
        ``text_encoder.<module>.lora_linear_layer.down.weight`` … for text encoders), as
        diffusers' DreamBooth LoRA script writes it; a UNet and its text encoders, or a DiT
        ``transformer`` alone (keys ``transformer.<module>.lora_A.weight`` …, what the
        transformer pipelines' ``load_lora_weights`` reads)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if set(trained) == {"transformer"}:
            # PEFT's own key names (lora_A/lora_B), as diffusers' DiT DreamBooth scripts save them
            return self._save_transformer(get_peft_model_state_dict(trained["transformer"]), output_dir)
        if "unet" not in trained or not set(trained) <= {"unet", "text_encoder", "text_encoder_2"}:
            raise SnellaConfigError(
                "--adapter=lora: saving in the diffusers LoRA format supports a UNet and its text encoders, "
                f"or a transformer alone, got {sorted(trained)}"
            )
        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                  for name, model in trained.items()}
        saver = StableDiffusionXLPipeline if "text_encoder_2" in trained else StableDiffusionPipeline
        saver.save_lora_weights(output_dir, **layers, safe_serialization=True)
        return self.output_file(output_dir)

    def _save_transformer(self, state: dict[str, Tensor], output_dir: Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"transformer.{key}": value.detach().contiguous() for key, value in state.items()}
        return write_atomically(self.output_file(output_dir),
                                lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))

    def describe(self, attached: Attached, settings: AttachSettings) -> dict[str, Any]:
        return {"layers": len(attached.layers), "lora_rank": settings.lora_rank}


class FullMethod(Method):
    """Every parameter of the model trains."""

    name = "full"
    label = "full fine-tuning"

    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        model.requires_grad_(True)
        return Attached(model, {})


class LinearProbe(Method):
    """Nothing of the model trains: the caller trains a head on its features."""

    name = "linear"
    label = "linear probe"

    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        model.requires_grad_(False)
        return Attached(model, {})


class MaskedSparseMethod(Method):
    """Gradient-masked sparse tuning: the top ``settings.density`` entries of each target
    weight by calibration |grad| train; the optimizer holds the full weights."""

    name = "masked_sparse"
    label = "gradient-masked sparse"
    adapts_layers = True

    def attach(self, model: nn.Module, settings: AttachSettings) -> Attached:
        if settings.calibration_loss is None:
            raise SnellaConfigError("masked_sparse needs a calibration loss on training batches")
        masked = GradientMaskedSparse(model, settings.target_modules, settings.density)
        masked.calibrate(settings.calibration_loss, settings.calibration_batches)
        return Attached(model, {name: model.get_submodule(name) for name in masked.weights}, masked)

    def describe(self, attached: Attached, settings: AttachSettings) -> dict[str, Any]:
        return {"layers": len(attached.layers), "density": settings.density}


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        SnellaMethod("snella", "SNELLA", kernel=None, allocates=True),
        SnellaMethod("snell", "SNELL", kernel="piecewise_linear", allocates=False),
        LoraMethod(),
        FullMethod(),
        LinearProbe(),
        MaskedSparseMethod(),
    )
}


def method_for(name: str, choices: Optional[Sequence[str]] = None, flag: str = "--method") -> Method:
    """The registered method called ``name``, if it is one of ``choices`` (default: all).

    Raises:
        SnellaConfigError: naming ``flag``, ``name`` and the valid choices.
    """
    valid = list(METHODS) if choices is None else [choice for choice in choices if choice in METHODS]
    if name not in valid:
        raise SnellaConfigError(f"{flag} {name!r}: expected one of {', '.join(valid)}")
    return METHODS[name]

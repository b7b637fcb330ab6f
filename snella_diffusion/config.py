"""SnellaConfig: every setting of a SNELLA adapter and of its bi-level allocator."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from .errors import SnellaConfigError

KERNELS = ("mix", "piecewise_linear", "linear")
SPARSIFY_MODES = ("official", "soft_threshold", "dense")
FORWARD_MODES = ("merged", "parallel")

TargetModules = Union[str, Sequence[str]]


def _is_string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# The JSON values each annotated field type accepts (bool is not a number here, though
# Python's bool subclasses int: ``rank: true`` is refused).
FIELD_TYPE_CHECKS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "TargetModules": ("a preset name or a list of strings", lambda v: isinstance(v, str) or _is_string_list(v)),
    "list[str]": ("a list of strings", _is_string_list),
}


def check_field_type(name: str, annotation: str, value: Any) -> None:
    """Raise SnellaConfigError if ``value`` (from JSON) does not fit field ``name``'s type."""
    expected, accepts = FIELD_TYPE_CHECKS[str(annotation)]
    if not accepts(value):
        raise SnellaConfigError(f"{name}={value!r}: must be {expected}, got {type(value).__name__}")


@dataclass
class SnellaConfig:
    """Settings of a SNELLA adapter (docs/METHOD.md §1-3).

    Attributes:
        rank: total factor width r, split over ``num_heads`` heads (r/P each); SNELLA-r has the
            same trainable factor count as LoRA-r.
        num_heads: P, the number of distance heads. The "mix" and "piecewise_linear" kernels
            need exactly 2.
        kernel: "mix" (default), "piecewise_linear" (SNELL) or "linear" (LoRA-like product).
        kernel_scale: c in K = c·(D_0 - D_1); 0.1 in the paper.
        sparsify: "official" (ΔW = M·|M| on survivors), "soft_threshold" (M·max(|M|-τ, 0)) or
            "dense" (ΔW = M, no selection: the reference scripts' update when the sparsity is 0,
            e.g. SNELLA on Stanford Cars; needs init_sparsity = target_sparsity = 0).
        target_modules: a preset ("unet", "dit", "vit", "text_encoder") or a list whose items
            are exact qualified module names or regular expressions matched against them.
        init_sparsity: s_init, fraction of ΔW entries set to zero at the start.
        target_sparsity: s_target, the fraction set to zero at the end of the schedule.
        forward_mode: "merged" (one GEMM on W0 + ΔW_eff) or "parallel" (base output + ΔW_eff x).
        adapter_dropout: input dropout on the adapter branch ("parallel" mode only).
        drop_path: DropPath probability on the adapter output ("parallel" mode only).
        threshold_sample_size: 0 selects τ exactly with ``kthvalue`` over all m·n entries;
            N > 0 selects it on a fixed strided sample of N entries when m·n > N (faster; the
            kept count then deviates from the target by about 0.5/sqrt(N) of m·n).
        compile_kernels: deprecated and ignored; accepted so that configs and adapter files
            that carry it still load. It chose a whole-matrix path compiled with
            ``torch.compile``, which lost to the blocked path (``blocked.py``: 7.4 s against
            4.8–6.7 s per SD1.5 step on a CPU) and was retired.
        forward_cache_mb: keep W0 + ΔW_eff from each training forward until the layer's
            backward, up to this many MiB over all layers (0: off). Under gradient checkpointing
            the recompute then skips its build and the backward its merge with W0: memory
            traded for time (``forward_cache.py``).
        importance_beta1, importance_beta2: EMA factors of sensitivity and uncertainty.
        allocator_warmup_steps: t_i, optimizer steps at the initial budget before reallocating.
        allocator_final_steps: t_f, last optimizer steps at the final budget.
        allocator_interval: Δ, optimizer steps between reallocations.
    """

    rank: int = 32
    num_heads: int = 2
    kernel: str = "mix"
    kernel_scale: float = 0.1
    sparsify: str = "official"
    target_modules: TargetModules = "unet"
    init_sparsity: float = 0.0
    target_sparsity: float = 0.8
    forward_mode: str = "merged"
    adapter_dropout: float = 0.0
    drop_path: float = 0.0
    threshold_sample_size: int = 0
    compile_kernels: bool = False
    forward_cache_mb: int = 0
    importance_beta1: float = 0.85
    importance_beta2: float = 0.85
    allocator_warmup_steps: int = 0
    allocator_final_steps: int = 0
    allocator_interval: int = 10
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        self.exclude_modules = list(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise SnellaConfigError naming the first field that holds an invalid value."""
        if self.kernel not in KERNELS:
            raise SnellaConfigError(f"kernel={self.kernel!r}: expected one of {KERNELS}")
        if self.sparsify not in SPARSIFY_MODES:
            raise SnellaConfigError(f"sparsify={self.sparsify!r}: expected one of {SPARSIFY_MODES}")
        if self.forward_mode not in FORWARD_MODES:
            raise SnellaConfigError(
                f"forward_mode={self.forward_mode!r}: expected one of {FORWARD_MODES}"
            )
        if not math.isfinite(self.kernel_scale):
            raise SnellaConfigError(f"kernel_scale={self.kernel_scale}: must be a finite number")
        if self.num_heads < 1:
            raise SnellaConfigError(f"num_heads={self.num_heads}: must be at least 1")
        if self.kernel != "linear" and self.num_heads != 2:
            raise SnellaConfigError(
                f"num_heads={self.num_heads}: kernel {self.kernel!r} takes the difference of "
                "exactly 2 distance heads"
            )
        if self.rank < self.num_heads or self.rank % self.num_heads:
            raise SnellaConfigError(
                f"rank={self.rank}: must be a positive multiple of num_heads={self.num_heads}"
            )
        for name in ("init_sparsity", "target_sparsity", "adapter_dropout", "drop_path",
                     "importance_beta1", "importance_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise SnellaConfigError(f"{name}={value}: must lie in [0, 1)")
        if self.sparsify == "dense" and (self.init_sparsity or self.target_sparsity):
            raise SnellaConfigError(
                f"sparsify='dense' keeps every entry: init_sparsity={self.init_sparsity} and "
                f"target_sparsity={self.target_sparsity} must both be 0"
            )
        if self.threshold_sample_size < 0:
            raise SnellaConfigError(
                f"threshold_sample_size={self.threshold_sample_size}: must be 0 (exact) or positive"
            )
        if self.forward_cache_mb < 0:
            raise SnellaConfigError(f"forward_cache_mb={self.forward_cache_mb}: must be >= 0 (0 turns it off)")
        if self.allocator_interval < 1:
            raise SnellaConfigError(f"allocator_interval={self.allocator_interval}: must be >= 1")
        for name in ("allocator_warmup_steps", "allocator_final_steps"):
            if getattr(self, name) < 0:
                raise SnellaConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if not self.target_modules:
            raise SnellaConfigError("target_modules is empty: name a preset or list modules")

    @property
    def head_width(self) -> int:
        """r/P, the width of one head's factor vectors."""
        return self.rank // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SnellaConfig":
        """Build a config from ``to_dict`` output (e.g. a file's JSON), checking every value's
        type before its range; unknown keys or a value of the wrong type raise
        SnellaConfigError naming the field."""
        if not isinstance(values, dict):
            raise SnellaConfigError(f"config must be a JSON object of fields, got {type(values).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SnellaConfigError(f"unknown SnellaConfig field(s): {', '.join(unknown)}")
        for name, value in values.items():
            check_field_type(name, fields[name], value)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "SnellaConfig":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise SnellaConfigError(f"config is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise SnellaConfigError("config JSON must be an object")
        return cls.from_dict(values)

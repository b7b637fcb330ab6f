"""Training-step benchmarks at real model scale: SNELLA vs PEFT LoRA vs gradient-masked sparse
tuning vs full fine-tuning, on the published architectures with random weights (no hub).

One benchmark run measures one method in the current process (``run_train_step_benchmark``);
``benchmarks/bench_train_step.py`` starts a fresh process per method so that each peak RSS
belongs to one method alone. The training step is DreamBooth-style: random "VAE latents",
noise, a random timestep, random text-encoder outputs of the model's real shapes (SDXL: also
pooled text embeddings and time ids; SD3/Flux: pooled projections; Flux: text/image position
ids and guidance), an MSE loss on the model's objective (ε for UNets, flow velocity for DiTs),
backward, AdamW.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..allocator import BiLevelAllocator
from ..baselines import GradientMaskedSparse
from ..config import SnellaConfig
from ..errors import SnellaError
from ..inject import find_target_linears
from ..methods import AttachSettings, method_for
from .reference_configs import build_reference_model

METHODS = ("snella", "lora", "masked_sparse", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A 2-level SD-style UNet (channels 32/64, one cross-attention level): the SD1.5 config with
# these keys overridden. Seconds per step on a CPU; for CI runs of the benchmark itself.
TINY_UNET_OVERRIDES: dict[str, Any] = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build and condition one benchmark model.

    Attributes:
        reference: the ``reference_configs`` name the architecture comes from.
        family: "unet" (ε-prediction, 4-channel latents), "sd3" or "flux" (flow matching).
        target_preset: SNELLA target preset; LoRA and masked sparse tuning use the same layers.
        overrides: config keys changed from the published config.
        text_length: tokens of the random text-encoder output (the pipelines' defaults: CLIP 77;
            SD3 77 CLIP + 256 T5; Flux.1-dev 512 T5).
        latent_channels: channels of the VAE latents.
    """

    reference: str
    family: str
    target_preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    text_length: int = 77
    latent_channels: int = 4


MODEL_SPECS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "unet", "unet"),
    "sdxl": ModelSpec("sdxl", "unet", "unet"),
    "sd3": ModelSpec("sd3", "sd3", "dit", text_length=333, latent_channels=16),
    # A few real-size blocks of Flux.1-dev: one double-stream and two single-stream blocks.
    "flux-block": ModelSpec(
        "flux", "flux", "dit", {"num_layers": 1, "num_single_layers": 2}, text_length=512,
        latent_channels=16,
    ),
    "tiny": ModelSpec("sd15", "unet", "unet", TINY_UNET_OVERRIDES),
}


@dataclass
class BenchmarkSettings:
    """One method's benchmark run.

    Attributes:
        model: a ``MODEL_SPECS`` key.
        method: one of ``METHODS``.
        resolution: image side in pixels (latents are resolution/8).
        rank: LoRA rank and SNELLA total factor width r (same trainable factor count).
        sparsity: SNELLA's per-layer sparsity (initial and target, so the top-k selection runs
            at its steady-state cost from the first step); masked sparse tuning trains the
            complementary density ``1 - sparsity``.
        repeats: timed steps after ``warmup`` untimed ones; the step time is their median.
        config_overrides: further model config keys (e.g. ``{"num_single_layers": 4}``).
        snella_options: further SnellaConfig fields for the snella method (e.g.
            ``{"compile_kernels": True}``).
        num_threads: torch intra-op threads (0: torch's default). On cores shared with other
            processes, 1 avoids the OpenMP barrier waits that make every parallel elementwise
            op wait for a descheduled thread (milliseconds per op).
    """

    model: str
    method: str
    resolution: int = 512
    batch_size: int = 1
    rank: int = 32
    sparsity: float = 0.8
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    seed: int = 0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    snella_options: dict[str, Any] = field(default_factory=dict)
    num_threads: int = 0
    allocator_interval: int = SnellaConfig.allocator_interval

    def validate(self) -> None:
        """Raise SnellaError naming the flag that holds an invalid value."""
        if self.model not in MODEL_SPECS:
            raise SnellaError(f"--model {self.model!r}: expected one of {sorted(MODEL_SPECS)}")
        method_for(self.method, METHODS)
        if self.dtype not in DTYPES:
            raise SnellaError(f"--dtype {self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.resolution < 8 or self.resolution % 8:
            raise SnellaError(f"--resolution {self.resolution}: must be a positive multiple of 8")
        for flag, value, least in (
            ("--batch_size", self.batch_size, 1),
            ("--rank", self.rank, 2),
            ("--repeats", self.repeats, 1),
            ("--warmup", self.warmup, 0),
            ("--num_threads", self.num_threads, 0),
            ("--allocator_interval", self.allocator_interval, 1),
        ):
            if value < least:
                raise SnellaError(f"{flag} {value}: must be at least {least}")
        if not 0.0 < self.sparsity < 1.0:
            raise SnellaError(f"--sparsity {self.sparsity}: must lie in (0, 1)")
        known = {f.name for f in dataclasses.fields(SnellaConfig)}
        fixed = {"rank", "target_modules", "init_sparsity", "target_sparsity", "allocator_interval"}
        for key in self.snella_options:
            if key not in known or key in fixed:
                raise SnellaError(
                    f"--snella_option {key}: not a SnellaConfig field the benchmark leaves open "
                    f"(open: {sorted(known - fixed)})"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_benchmark_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> nn.Module:
    """The ``MODEL_SPECS[name]`` architecture with seeded random weights, in ``dtype``.

    Parameters are created directly in ``dtype`` (no float32 copy first), so a bfloat16
    model's peak memory is that of a bfloat16 model.
    """
    spec = MODEL_SPECS[name]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_reference_model(spec.reference, device=device, **{**spec.overrides, **overrides})
    finally:
        torch.set_default_dtype(previous)
    return model


def target_module_names(model: nn.Module, preset: str) -> list[str]:
    """Qualified names of the linears SNELLA's ``preset`` adapts (the shared target list)."""
    return list(find_target_linears(model, SnellaConfig(target_modules=preset)))


@dataclass
class TrainingBatch:
    """Inputs of one training step: ``model(**model_inputs)`` should predict ``target``."""

    model_inputs: dict[str, Any]
    target: Tensor


def _latent_size(model: nn.Module, spec: ModelSpec, resolution: int) -> int:
    """Latent side (resolution/8), checked against the model's down-sampling."""
    side = resolution // 8
    if spec.family == "unet":
        multiple = 2 ** (len(model.config.block_out_channels) - 1)
    elif spec.family == "sd3":
        multiple = model.config.patch_size
    else:
        multiple = 2  # Flux packs 2×2 latent patches into tokens
    if side % multiple:
        raise SnellaError(
            f"--resolution {resolution}: the {spec.reference} latents (resolution/8 = {side}) must "
            f"be a multiple of {multiple}; use a multiple of {8 * multiple} pixels"
        )
    return side


def _unet_alphas_cumprod(steps: int = 1000) -> Tensor:
    """ᾱ_t of Stable Diffusion's training schedule ("scaled_linear", β from 0.00085 to 0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def make_training_batch(
    model: nn.Module,
    model_name: str,
    batch_size: int,
    resolution: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TrainingBatch:
    """Random latents, noise, timestep and text conditioning of the model's real shapes.

    UNets (ε-prediction): latents ``(B, 4, H/8, W/8)``, a timestep in [0, 1000), x_t =
    sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε, target ε; ``encoder_hidden_states`` ``(B, 77, cross_attention_dim)``;
    SDXL adds ``text_embeds`` ``(B, projection_dim - 6·time_embed_dim)`` and ``time_ids`` ``(B, 6)``.
    SD3 (flow matching): latents ``(B, 16, H/8, W/8)``, σ ~ U(0, 1), x_σ = (1-σ)·x0 + σ·ε,
    target ε - x0, timestep 1000·σ, text ``(B, 333, joint_attention_dim)``, pooled
    ``(B, pooled_projection_dim)``. Flux: the same objective on 2×2-packed latents
    ``(B, (H/16)·(W/16), 64)``, timestep σ, text ``(B, 512, joint_attention_dim)``, pooled
    projections, ``txt_ids`` ``(512, 3)`` zeros, ``img_ids`` ``(tokens, 3)`` (0, row, column),
    guidance ``(B,)`` = 3.5 when the model embeds guidance.
    """
    spec = MODEL_SPECS[model_name]
    config = model.config
    side = _latent_size(model, spec, resolution)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if spec.family == "unet":
        latents, noise = randn(batch_size, spec.latent_channels, side, side), randn(batch_size, spec.latent_channels, side, side)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        alpha_bar = _unet_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise.double()
        inputs: dict[str, Any] = {
            "sample": noisy.to(dtype),
            "timestep": timesteps.to(device),
            "encoder_hidden_states": randn(batch_size, spec.text_length, config.cross_attention_dim),
        }
        if config.addition_embed_type == "text_time":
            time_embed = config.addition_time_embed_dim
            pooled = config.projection_class_embeddings_input_dim - 6 * time_embed
            time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype)
            inputs["added_cond_kwargs"] = {
                "text_embeds": randn(batch_size, pooled),
                "time_ids": time_ids.to(device).repeat(batch_size, 1),
            }
        return TrainingBatch(inputs, noise)

    sigmas = torch.rand(batch_size, generator=generator)
    text = randn(batch_size, spec.text_length, config.joint_attention_dim)
    pooled = randn(batch_size, config.pooled_projection_dim)
    if spec.family == "sd3":
        latents, noise = randn(batch_size, spec.latent_channels, side, side), randn(batch_size, spec.latent_channels, side, side)
        sigma = sigmas.to(device=device, dtype=dtype).view(-1, 1, 1, 1)
        inputs = {
            "hidden_states": (1 - sigma) * latents + sigma * noise,
            "timestep": (sigmas * 1000).to(device=device, dtype=dtype),
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
        }
        return TrainingBatch(inputs, noise - latents)

    packed_side = side // 2
    tokens, channels = packed_side * packed_side, 4 * spec.latent_channels
    latents, noise = randn(batch_size, tokens, channels), randn(batch_size, tokens, channels)
    sigma = sigmas.to(device=device, dtype=dtype).view(-1, 1, 1)
    rows, columns = torch.meshgrid(torch.arange(packed_side), torch.arange(packed_side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(tokens, 3)
    inputs = {
        "hidden_states": (1 - sigma) * latents + sigma * noise,
        "timestep": sigmas.to(device=device, dtype=dtype),
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "txt_ids": torch.zeros(spec.text_length, 3, device=device, dtype=dtype),
        "img_ids": img_ids.to(device=device, dtype=dtype),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch_size,), 3.5, device=device, dtype=dtype)
    return TrainingBatch(inputs, noise - latents)


def diffusion_loss(model: nn.Module, batch: TrainingBatch) -> Tensor:
    """MSE between the model's prediction and the batch target, in float32."""
    prediction = model(**batch.model_inputs, return_dict=False)[0]
    return F.mse_loss(prediction.float(), batch.target.float())


@dataclass
class TrainingSetup:
    """A model prepared for one method, with its optimizer and (SNELLA) allocator.

    Attributes:
        target_names: the linears the adapters (or the sparse masks) sit on.
        next_batch: draws a fresh random training batch.
        masked_sparse: the GradientMaskedSparse tuner (masked_sparse only).
    """

    settings: BenchmarkSettings
    model: nn.Module
    optimizer: torch.optim.Optimizer
    target_names: list[str]
    next_batch: Callable[[], TrainingBatch]
    allocator: Optional[BiLevelAllocator] = None
    masked_sparse: Optional[GradientMaskedSparse] = None

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def build_training_setup(settings: BenchmarkSettings) -> TrainingSetup:
    """Build the model, apply ``settings.method`` to the shared target linears, make AdamW.

    - snella: ``apply_snella`` (rank r, sparsity s from the start) and a BiLevelAllocator that
      reallocates every ``allocator_interval`` steps (default: SnellaConfig's 10; 1 is its most
      expensive schedule, where k changes every step and τ is always selected cold).
    - lora: PEFT LoRA of rank r on the same linears.
    - masked_sparse: gradient-masked training of the full target weights (density 1 - s),
      calibrated on one batch; AdamW holds full-size state for those weights.
    - full: every parameter trains.
    """
    settings.validate()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    spec = MODEL_SPECS[settings.model]
    dtype = DTYPES[settings.dtype]
    model = build_benchmark_model(
        settings.model, settings.device, dtype, settings.seed, **settings.config_overrides
    )
    _latent_size(model, spec, settings.resolution)
    model.train()
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    targets = target_module_names(model, spec.target_preset)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    calibration_generator = torch.Generator().manual_seed(settings.seed + 2)

    def draw_batch(source: torch.Generator) -> TrainingBatch:
        return make_training_batch(
            model, settings.model, settings.batch_size, settings.resolution, source, dtype,
            settings.device,
        )

    def next_batch() -> TrainingBatch:
        return draw_batch(generator)

    def calibration_loss() -> Tensor:
        # Calibration draws from its own generator: every method trains on the same batches.
        return diffusion_loss(model, draw_batch(calibration_generator))

    method = method_for(settings.method, METHODS)
    config = None
    if method.snella_layers:
        config = SnellaConfig(
            rank=settings.rank, target_modules=targets, init_sparsity=settings.sparsity,
            target_sparsity=settings.sparsity, allocator_interval=settings.allocator_interval,
            **settings.snella_options,
        )
    attach_settings = AttachSettings(
        target_modules=targets, snella=config, lora_rank=settings.rank, density=1.0 - settings.sparsity,
        calibration_loss=calibration_loss, calibration_batches=1, total_steps=settings.warmup + settings.repeats,
    )
    attached = method.attach(model, attach_settings)
    allocator = method.allocator(attached.layers, attach_settings)
    optimizer = torch.optim.AdamW(attached.param_groups(), lr=settings.learning_rate)
    return TrainingSetup(settings, model, optimizer, targets, next_batch, allocator, attached.masked)


def _synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTiming:
    """Seconds of one training step and of the allocator's share of it.

    ``cpu_seconds`` is the CPU time of the process (all threads) during the step: less
    sensitive than wall time to other processes sharing the cores.
    """

    step_seconds: float
    cpu_seconds: float
    allocator_seconds: float
    loss: float


def training_step(setup: TrainingSetup) -> StepTiming:
    """One optimizer step on a fresh batch: forward, backward, AdamW, allocator, zero_grad.

    The batch is drawn before the clock starts; the step time includes everything after.
    """
    batch = setup.next_batch()
    device = setup.settings.device
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = diffusion_loss(setup.model, batch)
    loss.backward()
    setup.optimizer.step()
    allocator_seconds = 0.0
    if setup.allocator is not None:
        _synchronize(device)
        allocator_start = time.perf_counter()
        setup.allocator.step()
        _synchronize(device)
        allocator_seconds = time.perf_counter() - allocator_start
    setup.optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return StepTiming(
        time.perf_counter() - start, time.process_time() - cpu_start, allocator_seconds,
        float(loss.detach()),
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (AdamW: both moments)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if isinstance(value, Tensor) and key != "step"
    )


def peak_memory_bytes(device: str | torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated, else this process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024), "peak RSS"


def run_train_step_benchmark(
    settings: BenchmarkSettings, progress: Optional[Callable[[int, int], None]] = None
) -> dict[str, Any]:
    """Build, warm up and time one method in this process; a JSON-safe result dict.

    Keys: ``settings``, ``target_layers``, ``trainable_params``, ``optimizer_state_bytes``,
    ``peak_memory_bytes`` and ``memory_kind``, ``step_seconds`` (timed steps),
    ``step_seconds_median``, ``cpu_seconds`` / ``cpu_seconds_median`` (process CPU time per
    step), ``allocator_seconds`` / ``allocator_seconds_median`` (SNELLA only,
    else zeros), ``allocator_fraction`` (median allocator time / median step time),
    ``setup_seconds``, ``losses`` (every step, warm-up included).
    """
    if torch.device(settings.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(settings.device)
    setup_start = time.perf_counter()
    setup = build_training_setup(settings)
    setup_seconds = time.perf_counter() - setup_start
    total = settings.warmup + settings.repeats
    timings: list[StepTiming] = []
    for index in range(total):
        timing = training_step(setup)
        if index == 0:
            _check_gradients_reached(setup)
        timings.append(timing)
        if progress is not None:
            progress(index + 1, total)
    timed = timings[settings.warmup :]
    step_median = statistics.median(t.step_seconds for t in timed)
    allocator_median = statistics.median(t.allocator_seconds for t in timed)
    peak, memory_kind = peak_memory_bytes(settings.device)
    return {
        "settings": settings.to_dict(),
        "target_layers": len(setup.target_names),
        "trainable_params": sum(p.numel() for p in setup.trainable_parameters),
        "optimizer_state_bytes": optimizer_state_bytes(setup.optimizer),
        "peak_memory_bytes": peak,
        "memory_kind": memory_kind,
        "step_seconds": [t.step_seconds for t in timed],
        "step_seconds_median": step_median,
        "cpu_seconds": [t.cpu_seconds for t in timed],
        "cpu_seconds_median": statistics.median(t.cpu_seconds for t in timed),
        "allocator_seconds": [t.allocator_seconds for t in timed],
        "allocator_seconds_median": allocator_median,
        "allocator_fraction": allocator_median / step_median if step_median > 0 else 0.0,
        "setup_seconds": setup_seconds,
        "torch_threads": torch.get_num_threads(),
        "losses": [t.loss for t in timings],
    }


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's results from several fresh-process rounds, as one result.

    The timed steps of every round are pooled and the medians taken over the pool, so a
    slow spell of a shared machine that hits one round moves the median by less; the peak
    memory is the highest of the rounds; the rest comes from the first round. ``rounds``
    records how many were merged.
    """
    merged = dict(rounds[0])
    for key in ("step_seconds", "cpu_seconds", "allocator_seconds"):
        merged[key] = [value for result in rounds for value in result[key]]
        merged[f"{key}_median"] = statistics.median(merged[key])
    step_median = merged["step_seconds_median"]
    merged["allocator_fraction"] = merged["allocator_seconds_median"] / step_median if step_median > 0 else 0.0
    merged["peak_memory_bytes"] = max(result["peak_memory_bytes"] for result in rounds)
    merged["rounds"] = len(rounds)
    return merged


def _check_gradients_reached(setup: TrainingSetup) -> None:
    """After the first step every trainable parameter must have had optimizer state created:
    a parameter without it received no gradient (e.g. checkpointing cut the graph)."""
    missing = [p for p in setup.trainable_parameters if p not in setup.optimizer.state]
    if missing:
        raise SnellaError(
            f"{setup.settings.method}: {len(missing)} of {len(setup.trainable_parameters)} "
            "trainable parameters received no gradient in the first step"
        )


def _format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _ratio(value: float, baseline: Optional[float]) -> str:
    return f"{value / baseline:.2f}×" if baseline else "n/a"


def method_label(result: dict[str, Any]) -> str:
    """The method name, with its non-default SNELLA options (``snella[compile_kernels=True]``)."""
    settings = result["settings"]
    options = settings.get("snella_options") if method_for(settings["method"]).snella_layers else None
    if not options:
        return settings["method"]
    return settings["method"] + "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def format_results_table(results: list[dict[str, Any]], baseline: str = "lora") -> str:
    """A Markdown table: one row per method, absolute numbers and ratios to ``baseline``."""
    by_method = {r["settings"]["method"]: r for r in results}
    reference = by_method.get(baseline)
    base_memory = reference["peak_memory_bytes"] if reference else None
    base_time = reference["step_seconds_median"] if reference else None
    base_cpu = reference.get("cpu_seconds_median") if reference else None
    memory_kind = results[0]["memory_kind"] if results else "peak memory"
    header = (
        f"| method | trainable params | optimizer state | {memory_kind} | memory vs {baseline} "
        f"| step time (median) | time vs {baseline} | CPU time per step | CPU vs {baseline} "
        "| allocator per step |"
    )
    lines = [header, "| --- |" + " ---: |" * 9]
    for result in results:
        allocator = (
            f"{result['allocator_seconds_median'] * 1000:.0f} ms ({100 * result['allocator_fraction']:.2f} %)"
            if method_for(result["settings"]["method"]).allocates
            else "–"
        )
        cpu = result.get("cpu_seconds_median")
        lines.append(
            f"| {method_label(result)} "
            f"| {result['trainable_params'] / 1e6:.3g} M "
            f"| {_format_bytes(result['optimizer_state_bytes'])} "
            f"| {result['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"| {_ratio(result['peak_memory_bytes'], base_memory)} "
            f"| {result['step_seconds_median']:.2f} s "
            f"| {_ratio(result['step_seconds_median'], base_time)} "
            f"| {f'{cpu:.2f} s' if cpu is not None else 'n/a'} "
            f"| {_ratio(cpu, base_cpu) if cpu is not None else 'n/a'} "
            f"| {allocator} |"
        )
    return "\n".join(lines)


def chart_values(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{metric: {method: value}}`` for ``viz.save_bar_chart``: peak memory (GiB), step time
    and CPU time per step (s)."""
    memory_kind = results[0]["memory_kind"] if results else "peak memory"
    values = {
        f"{memory_kind} (GiB)": {
            method_label(r): r["peak_memory_bytes"] / 2**30 for r in results
        },
        "step time (s, median)": {method_label(r): r["step_seconds_median"] for r in results},
    }
    if all("cpu_seconds_median" in r for r in results):
        values["CPU time per step (s)"] = {method_label(r): r["cpu_seconds_median"] for r in results}
    return values

"""The SNELLA flags of the DreamBooth script as typed settings (the "SNELLA" group: rank,
kernel, targets, allocator schedule, speed options, and ``--adapter`` for A/B runs against
LoRA or full fine-tuning), and the :class:`~snella_diffusion.SnellaConfig` they make."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional

from ..config import FORWARD_MODES, KERNELS, SPARSIFY_MODES, SnellaConfig
from ..families.dit import expand_block_filters
from ..methods import Method, method_for
from .adapters import ADAPTERS
from .embedded_run import DEFAULT_RANK, DEFAULT_TARGET_SPARSITY, EMBEDDED_RANK, EMBEDDED_TARGET_SPARSITY
from .flag_settings import FlagSettings


@dataclass(frozen=True)
class AdapterSettings(FlagSettings):
    """What is trained and how: the SNELLA adapter's shape and schedule, or ``adapter`` lora /
    full. ``rank`` and ``target_sparsity`` are None until resolved (``resolve_model_defaults``
    in ``run_settings.py``); ``target_modules`` None means the family's preset."""

    rank: Optional[int]
    kernel: str
    sparsify: str
    target_modules: Optional[tuple[str, ...]]
    init_sparsity: float
    target_sparsity: Optional[float]
    allocator_warmup_steps: Optional[int]
    allocator_final_steps: Optional[int]
    allocator_interval: int
    importance_beta1: float
    importance_beta2: float
    forward_mode: str
    threshold_sample_size: int
    compile_snella_kernels: bool
    adapter: str
    lora_rank: Optional[int]
    forward_cache_mb: int

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("SNELLA")
        group.add_argument("--rank", type=int, default=None,
                           help="Total factor width r (SNELLA-r has LoRA-r's trainable factor count; "
                                f"default {DEFAULT_RANK}, {EMBEDDED_RANK} for the embedded model).")
        group.add_argument("--kernel", type=str, default="mix", choices=list(KERNELS), help="Kernel merging the factors.")
        group.add_argument("--sparsify", type=str, default="official", choices=list(SPARSIFY_MODES),
                           help="Survivor rule: M·|M| (official) or soft thresholding.")
        group.add_argument("--target_modules", type=str, nargs="+", default=None,
                           help='Denoiser layers: a preset ("unet", "dit"), module names / regular expressions, or '
                                'for DiTs a block filter such as "dit@double" or "dit@single:0-9" '
                                "(default: the family's preset).")
        group.add_argument("--init_sparsity", type=float, default=0.0,
                           help="Fraction of ΔW entries set to zero at the start.")
        group.add_argument("--target_sparsity", type=float, default=None,
                           help="Fraction of ΔW entries set to zero at the end of the schedule (default "
                                f"{DEFAULT_TARGET_SPARSITY}, {EMBEDDED_TARGET_SPARSITY} for the embedded model).")
        group.add_argument("--allocator_warmup_steps", type=int, default=None,
                           help="Steps at the initial budget before reallocating (default: 10%% of the steps).")
        group.add_argument("--allocator_final_steps", type=int, default=None,
                           help="Last steps at the final budget (default: 20%% of the steps).")
        group.add_argument("--allocator_interval", type=int, default=10, help="Steps between reallocations.")
        group.add_argument("--importance_beta1", type=float, default=0.85, help="EMA factor of the sensitivity.")
        group.add_argument("--importance_beta2", type=float, default=0.85, help="EMA factor of the uncertainty.")
        group.add_argument("--forward_mode", type=str, default="merged", choices=list(FORWARD_MODES),
                           help="merged: one GEMM on W0 + ΔW; parallel: base output + ΔW·x.")
        group.add_argument("--threshold_sample_size", type=int, default=0,
                           help="Select τ on a strided sample of this many entries (0: exact).")
        group.add_argument("--compile_snella_kernels", action="store_true",
                           help="Build ΔW and its backward over whole matrices fused by torch.compile "
                                "instead of the default blocked eager path (slower than the default on a "
                                "CPU; costs tens of seconds of compilation at the first step).")
        group.add_argument("--adapter", type=str, default="snella", choices=list(ADAPTERS),
                           help="What to train: SNELLA, PEFT LoRA on the same layers (diffusers LoRA file), or "
                                "the full denoiser; the other flags stay the same, for A/B runs.")
        group.add_argument("--lora_rank", type=int, default=None,
                           help="LoRA rank with --adapter=lora (default --rank: the same parameter count).")
        group.add_argument("--forward_cache_mb", type=int, default=0,
                           help="Keep W0 + ΔW from each forward until the layer's backward, up to this many "
                                "MiB over all layers: with --gradient_checkpointing the recompute skips its "
                                "build (memory traded for time; 0: off).")

    @property
    def method(self) -> Method:
        """The ``--adapter`` choice as its ``snella_diffusion.methods`` method."""
        return method_for(self.adapter, ADAPTERS, "--adapter")

    def snella_config(self, denoiser_preset: str, total_steps: int) -> SnellaConfig:
        """The denoiser adapter config (schedule defaults from ``total_steps``: warm-up 10 %,
        final 20 %). ``--target_modules`` stays a list, so one name or regex works like several,
        with block filters (``dit@double``) expanded; without it, ``denoiser_preset``."""
        targets: Any = expand_block_filters(list(self.target_modules)) if self.target_modules else denoiser_preset
        warmup = self.allocator_warmup_steps if self.allocator_warmup_steps is not None else total_steps // 10
        final = self.allocator_final_steps if self.allocator_final_steps is not None else total_steps // 5
        return SnellaConfig(
            rank=self.rank, kernel=self.kernel, sparsify=self.sparsify, target_modules=targets,
            init_sparsity=self.init_sparsity, target_sparsity=self.target_sparsity,
            forward_mode=self.forward_mode, threshold_sample_size=self.threshold_sample_size,
            compile_kernels=self.compile_snella_kernels, forward_cache_mb=self.forward_cache_mb,
            importance_beta1=self.importance_beta1, importance_beta2=self.importance_beta2,
            allocator_warmup_steps=warmup, allocator_final_steps=final,
            allocator_interval=self.allocator_interval,
        )

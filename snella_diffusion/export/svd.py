"""Truncated SVD of a ΔW into LoRA factors, with the rank chosen by count or by energy.

Energy is the fraction of ‖ΔW‖²_F a rank-r approximation keeps: Σ_{i≤r} σ_i² / Σ_i σ_i², so
‖ΔW − ΔW_r‖_F = sqrt((1 − energy)·‖ΔW‖²_F) (Eckart–Young).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..errors import SnellaError


@dataclasses.dataclass(frozen=True)
class RankChoice:
    """How ranks are picked: a fixed ``rank``, or the smallest rank keeping ``energy``
    (capped by ``max_rank``). ``energy=1.0`` keeps the full rank min(m, n)."""

    rank: Optional[int] = None
    energy: Optional[float] = None
    max_rank: Optional[int] = None

    def validate(self) -> None:
        """Raises SnellaError naming the flag at fault."""
        if (self.rank is None) == (self.energy is None):
            raise SnellaError("pass exactly one of --rank R or --energy E for --to lora / peft")
        if self.rank is not None and self.rank < 1:
            raise SnellaError(f"--rank {self.rank}: must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise SnellaError(f"--energy {self.energy}: must lie in (0, 1]")
        if self.max_rank is not None:
            if self.energy is None:
                raise SnellaError("--max_rank caps the rank --energy picks: use it with --energy")
            if self.max_rank < 1:
                raise SnellaError(f"--max_rank {self.max_rank}: must be at least 1")


@dataclasses.dataclass
class LowRank:
    """``up @ down`` ≈ ΔW: ``up`` ``(m, r)``, ``down`` ``(r, n)`` in float32.

    Attributes:
        rank: r (0 for an all-zero ΔW, which exports no factors).
        energy: fraction of ‖ΔW‖²_F kept (1.0 for an all-zero ΔW).
        norm: ‖ΔW‖_F.
        residual_norm: ‖ΔW − up @ down‖_F from the discarded singular values.
    """

    up: Tensor
    down: Tensor
    rank: int
    energy: float
    norm: float
    residual_norm: float


def _rank_for(squared: Tensor, choice: RankChoice, where: str) -> int:
    full = squared.numel()
    if choice.rank is not None:
        if choice.rank > full:
            raise SnellaError(f"--rank {choice.rank}: layer {where} allows at most rank {full} (min(m, n))")
        return choice.rank
    if choice.energy >= 1.0:
        rank = full
    else:
        kept = torch.cumsum(squared, 0) / squared.sum()
        rank = int(torch.searchsorted(kept, torch.tensor(choice.energy, dtype=kept.dtype)).item()) + 1
    return min(rank, full, choice.max_rank or full)


def truncate(delta: Tensor, choice: RankChoice, where: str) -> LowRank:
    """Factor ``delta`` ``(m, n)`` at the chosen rank; the singular values are split evenly
    (up = U·√S, down = √S·Vᵀ) so neither factor overflows in half precision.

    Raises:
        SnellaError: ``--rank`` exceeds min(m, n) of this layer (named by ``where``).
    """
    delta = delta.to(torch.float32)
    left, singular, right = torch.linalg.svd(delta, full_matrices=False)
    squared = singular.double() ** 2
    total = float(squared.sum())
    rank = _rank_for(squared, choice, where)
    if total == 0.0:
        empty_up, empty_down = delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1])
        return LowRank(empty_up, empty_down, 0, 1.0, 0.0, 0.0)
    root = singular[:rank].sqrt()
    up = left[:, :rank] * root
    down = root[:, None] * right[:rank]
    discarded = float(squared[rank:].sum())
    return LowRank(up, down, rank, 1.0 - discarded / total, total ** 0.5, discarded ** 0.5)

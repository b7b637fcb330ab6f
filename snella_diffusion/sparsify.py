"""In-layer competition (docs/METHOD.md §2): the magnitude threshold τ and the masked product.

τ is the k-th smallest |M| with k = round(s·m·n), selected with ``torch.kthvalue`` (a
selection, not a sort), which works for any number of entries (``torch.quantile`` refuses more
than 2^24) and returns a device tensor, so no device-to-host sync happens per layer. k is a
Python int that the layer keeps beside its ``sparsity`` buffer.

On the CPU, where reading a count back costs nothing, large matrices take an exact shortcut:
a strided sample brackets τ, one chunked pass counts the entries below the bracket and gathers
the few inside it, and ``kthvalue`` runs on that window only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def drop_count_for(sparsity: float, numel: int) -> int:
    """k = round(s·numel): the number of entries a sparsity s removes (round half to even)."""
    return int(round(float(sparsity) * numel))


def _coprime_stride(numel: int, sample_size: int, row_length: int) -> int:
    """A stride near numel/sample_size sharing no factor with the row length, so the strided
    sample visits every column instead of a few."""
    stride = max(1, numel // sample_size)
    while math.gcd(stride, row_length) != 1:
        stride += 1
    return stride


BRACKET_MIN_NUMEL = 1 << 16
BRACKET_SAMPLE = 1 << 16
BRACKET_CHUNK = 1 << 18


def _bracketed_kthvalue(flat: Tensor, count: int, row_length: int, absolute: bool = False) -> Tensor:
    """Exact k-th smallest of a flattened CPU matrix with rows of ``row_length`` (of its
    magnitudes when ``absolute``) via a sample-estimated window around it. The count and the
    window are gathered chunk by chunk, so each chunk is read from memory once and the
    comparisons run in cache."""
    numel = flat.numel()
    # About one entry in sixteen, at most BRACKET_SAMPLE, from every column (the columns of M
    # differ in scale; a stride sharing a factor with the row length would see only a few and
    # miss τ): the window then holds about 6/sqrt(sample) of the entries, a few percent.
    stride = _coprime_stride(numel, min(BRACKET_SAMPLE, numel // 16), row_length)
    sample = flat[stride // 2 :: stride]
    if absolute:
        sample = sample.abs()
    size = sample.numel()
    quantile = count / numel
    margin = 6 * 0.5 / math.sqrt(size) + 2 / size  # six standard deviations of the estimate
    low_rank = max(1, int((quantile - margin) * size))
    high_rank = min(size, int((quantile + margin) * size) + 1)
    low = torch.kthvalue(sample, low_rank).values
    high = torch.kthvalue(sample, high_rank).values
    below = torch.zeros((), dtype=torch.int64)
    inside = []
    size = min(BRACKET_CHUNK, numel)
    magnitude = torch.empty(size, dtype=flat.dtype)
    under, within = torch.empty(size, dtype=torch.bool), torch.empty(size, dtype=torch.bool)
    for start in range(0, numel, BRACKET_CHUNK):
        chunk = flat[start : start + BRACKET_CHUNK]
        count_here = chunk.numel()
        if absolute:
            chunk = torch.abs(chunk, out=magnitude[:count_here])
        torch.lt(chunk, low, out=under[:count_here])
        below += torch.count_nonzero(under[:count_here])
        # low <= v <= high is (v <= high) xor (v < low), as v < low implies v <= high.
        torch.le(chunk, high, out=within[:count_here]).logical_xor_(under[:count_here])
        inside.append(chunk[within[:count_here]])
    below = int(below)
    window = torch.cat(inside)
    if below < count <= below + window.numel():
        return torch.kthvalue(window, count - below).values
    return torch.kthvalue(flat.abs() if absolute else flat, count).values


def select_threshold(magnitude: Tensor, drop_count: int, sample_size: int = 0, absolute: bool = False) -> Tensor:
    """τ, the ``drop_count``-th smallest entry of ``magnitude`` (a 0-d tensor, same device).

    Args:
        magnitude: ``(m, n)`` non-negative |M|, detached; or M itself with ``absolute``.
        drop_count: k, how many entries are removed; 0 gives τ = 0 (nothing removed).
        sample_size: 0 for the exact selection; N > 0 selects on a fixed strided sample of
            about N entries when m·n > N (deterministic; the kept count then lies within about
            0.5/sqrt(N)·m·n of the target).
        absolute: ``magnitude`` holds signed values whose magnitudes are ranked (saves
            building |M| as a whole on the CPU).
    """
    if drop_count <= 0:
        return torch.zeros((), dtype=magnitude.dtype, device=magnitude.device)
    flat = magnitude.reshape(-1)
    numel = flat.numel()
    exact = not (sample_size and numel > sample_size)
    if flat.device.type == "cpu" and numel >= BRACKET_MIN_NUMEL and exact and drop_count < numel:
        return _bracketed_kthvalue(flat, drop_count, magnitude.shape[-1], absolute)
    if not exact and drop_count < numel:
        stride = _coprime_stride(numel, sample_size, magnitude.shape[-1])
        sample = flat[stride // 2 :: stride]
        sample = sample.abs() if absolute else sample
        sample_k = min(max(1, round(drop_count / numel * sample.numel())), sample.numel())
        return torch.kthvalue(sample, sample_k).values
    flat = flat.abs() if absolute else flat
    if drop_count >= numel:
        return flat.max()
    return torch.kthvalue(flat, drop_count).values


def survivor_gate(magnitude: Tensor, threshold: Tensor, mode: str) -> Tensor:
    """The detached factor G with ΔW_eff = M ⊙ G, ``(m, n)``; may reuse ``magnitude``'s memory.

    "official": G = |M| where |M| > τ, else 0 (ΔW_eff = M·|M| on survivors).
    "soft_threshold": G = max(|M| - τ, 0) (SNELL, Eq. 5).
    "dense": G = 1 (ΔW_eff = M: the reference's update at sparsity 0, nothing selected).
    """
    if mode == "official":
        return magnitude.mul_(magnitude > threshold)
    if mode == "dense":
        return magnitude.fill_(1.0)
    return magnitude.sub_(threshold).clamp_min_(0.0)

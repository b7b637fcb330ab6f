"""In-layer competition (METHOD.md §2): the magnitude threshold τ and the masked product.

τ is the k-th smallest |M| with k = round(s·m·n), selected with ``torch.kthvalue`` (a
selection, not a sort), which works for any number of entries (``torch.quantile`` refuses more
than 2^24) and returns a device tensor, so no device-to-host sync happens per layer. k is a
Python int that the layer keeps beside its ``sparsity`` buffer.

On the CPU, where reading a count back costs nothing, large matrices take an exact shortcut:
a strided sample brackets τ, one pass counts the entries below the bracket and gathers the
few inside it, and ``kthvalue`` runs on that window only (about 2.4× faster on 13M entries).
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


BRACKET_MIN_NUMEL = 1 << 20
BRACKET_SAMPLE = 1 << 16


def _bracketed_kthvalue(flat: Tensor, count: int) -> Tensor:
    """Exact k-th smallest of a 1-D CPU tensor via a sample-estimated window around it."""
    numel = flat.numel()
    stride = max(1, numel // BRACKET_SAMPLE)
    sample = flat[stride // 2 :: stride]
    size = sample.numel()
    quantile = count / numel
    margin = 6 * 0.5 / math.sqrt(size) + 2 / size  # six standard deviations of the estimate
    low_rank = max(1, int((quantile - margin) * size))
    high_rank = min(size, int((quantile + margin) * size) + 1)
    low = torch.kthvalue(sample, low_rank).values
    high = torch.kthvalue(sample, high_rank).values
    below = int((flat < low).sum())
    window = flat[(flat >= low) & (flat <= high)]
    if below < count <= below + window.numel():
        return torch.kthvalue(window, count - below).values
    return torch.kthvalue(flat, count).values


def select_threshold(magnitude: Tensor, drop_count: int, sample_size: int = 0) -> Tensor:
    """τ, the ``drop_count``-th smallest entry of ``magnitude`` (a 0-d tensor, same device).

    Args:
        magnitude: ``(m, n)`` non-negative |M|, detached.
        drop_count: k, how many entries are removed; 0 gives τ = 0 (nothing removed).
        sample_size: 0 for the exact selection; N > 0 selects on a fixed strided sample of
            about N entries when m·n > N (deterministic; the kept count then lies within about
            0.5/sqrt(N)·m·n of the target).
    """
    if drop_count <= 0:
        return torch.zeros((), dtype=magnitude.dtype, device=magnitude.device)
    flat = magnitude.reshape(-1)
    numel = flat.numel()
    if drop_count >= numel:
        return flat.max()
    if sample_size and numel > sample_size:
        stride = _coprime_stride(numel, sample_size, magnitude.shape[-1])
        sample = flat[stride // 2 :: stride]
        sample_k = min(max(1, round(drop_count / numel * sample.numel())), sample.numel())
        return torch.kthvalue(sample, sample_k).values
    if flat.device.type == "cpu" and numel >= BRACKET_MIN_NUMEL:
        return _bracketed_kthvalue(flat, drop_count)
    return torch.kthvalue(flat, drop_count).values


def survivor_gate(magnitude: Tensor, threshold: Tensor, mode: str) -> Tensor:
    """The detached factor G with ΔW_eff = M ⊙ G, ``(m, n)``; may reuse ``magnitude``'s memory.

    "official": G = |M| where |M| > τ, else 0 (ΔW_eff = M·|M| on survivors).
    "soft_threshold": G = max(|M| - τ, 0) (SNELL, Eq. 5).
    """
    if mode == "official":
        return magnitude.mul_(magnitude > threshold)
    return magnitude.sub_(threshold).clamp_min_(0.0)


def sparsified_delta(merged: Tensor, threshold: Tensor, mode: str) -> Tensor:
    """ΔW_eff = M ⊙ G for a given τ, ``(m, n)``; no gradient flows through G."""
    return merged * survivor_gate(merged.detach().abs(), threshold, mode)

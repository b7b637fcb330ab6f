"""Independent, naive re-computation of docs/METHOD.md §1-2 for the tests.

Written with broadcasting over an explicit (P, m, n, d) difference tensor and a full sort, the
opposite of the library's GEMM identity and kthvalue selection.
"""

import torch


def naive_merged(in_factors, out_factors, alpha, gamma, beta, kernel, scale=0.1):
    if kernel == "linear":
        return torch.einsum("pod,pid->oi", out_factors, in_factors)
    difference = out_factors[:, :, None, :] - in_factors[:, None, :, :]
    distances = difference.pow(2).sum(-1).sqrt()
    kernel_values = scale * (distances[0] - distances[1])
    if kernel == "piecewise_linear":
        return kernel_values
    logits = kernel_values / gamma
    softmax = torch.exp(logits) / torch.exp(logits).sum(dim=0, keepdim=True)
    return kernel_values + alpha * softmax + beta


def naive_threshold(merged, sparsity):
    count = round(sparsity * merged.numel())
    if count == 0:
        return torch.zeros((), dtype=merged.dtype)
    return merged.abs().flatten().sort().values[count - 1]


def naive_delta(merged, sparsity, mode):
    """ΔW_eff with the gate detached, as in docs/METHOD.md §2."""
    magnitude = merged.detach().abs()
    threshold = naive_threshold(merged.detach(), sparsity)
    if mode == "official":
        return torch.where(magnitude > threshold, merged * magnitude, torch.zeros_like(merged))
    return merged * torch.clamp(magnitude - threshold, min=0)

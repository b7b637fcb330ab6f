"""FSDP2 for a frozen base too large for one device: the base's weights sharded across ranks
(``torch.distributed.fsdp.fully_shard``), the SNELLA parameters replicated and trained.

Each transformer block (and then the root module) is one ``fully_shard`` unit whose frozen
parameters are split into equal row shards (DTensors, one per rank) and all-gathered just
before the unit's forward and backward. The SNELLA parameters are left out of the units
(``ignored_params``; FSDP2 refuses their scalar ``alpha`` besides): every rank holds all of
them, so after the backward their gradients are averaged over the ranks
(``average_gradients``) and every rank takes the same optimizer step. Identical factors and the
allocator's layer scores broadcast from rank 0 (``BiLevelAllocator.layer_scores``) make the
allocation decisions identical on every rank. A checkpoint holds replicated state only (the
adapter, the allocator, the optimizer), so rank 0 writes it and every rank reads it back; the
sharded base is reloaded from its files, never saved.

With accelerate (``configs/accelerate_fsdp2.yaml``), the same plan is accelerate's FSDP2
wrapping with ``fsdp_ignored_modules`` matching ``ADAPTER_MODULES_PATTERN``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ADAPTER_MODULES_PATTERN", "average_gradients", "shard_frozen_base"]

# The SNELLA adapter modules by qualified name (``<layer>.adapters.<adapter name>``), as a
# regular expression matched in full (accelerate's ``fsdp_ignored_modules``).
ADAPTER_MODULES_PATTERN = r".*\.adapters\.[^.]+"


def shard_frozen_base(model: nn.Module, blocks: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Shard ``model``'s frozen parameters over the default process group: one FSDP2 unit per
    module of ``blocks`` (the transformer blocks), then one for the rest of ``model``. The
    parameters that require grad (the SNELLA ones) stay whole on every rank; they are returned,
    in ``model.parameters()`` order, for the optimizer and ``average_gradients``."""
    from torch.distributed.fsdp import fully_shard

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    ignored = set(trainable)
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return trainable


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks of the default process
    group, in one all-reduce of the gradients flattened into one float32 buffer. Parameters
    without a grad are skipped (every rank runs the same model, so they are the same ones on
    every rank). No-op outside torch.distributed or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with_grad = [parameter for parameter in parameters if parameter.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([parameter.grad.reshape(-1).float() for parameter in with_grad])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter in with_grad:
        count = parameter.grad.numel()
        parameter.grad.copy_(flat[offset:offset + count].view_as(parameter.grad))
        offset += count

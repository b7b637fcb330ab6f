"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with 2 CPU processes over gloo (issue 23, item
4): the tiny Flux transformer's frozen weights sharded by ``shard_frozen_base``, SNELLA trained
with gradients averaged over the ranks, the allocator reallocating each step.

One spawn of two ranks runs three trainings of 6 steps, each rank on its own inputs: straight
through; 3 steps then a checkpoint written by rank 0; and a fresh model, optimizer and
allocator that read the checkpoint and run steps 4–6. Shown: every base weight is a row shard
on each rank; the SNELLA parameters, the allocations (kept counts and the kept entries of
every ΔW) are identical on both ranks; the loss over both ranks' inputs falls; the resumed run ends
bit-identical to the straight one; and the straight run equals one process training on both
ranks' inputs together (the averaged gradient is the full batch's gradient).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.allocator import BiLevelAllocator
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline
from snella_diffusion.training.sharding import ADAPTER_MODULES_PATTERN, average_gradients, shard_frozen_base

WORLD, STEPS, RESUME_AT, TOKENS, TEXT_TOKENS = 2, 6, 3, 16, 8
CONFIG = SnellaConfig(rank=4, target_modules="dit", init_sparsity=0.3, target_sparsity=0.6,
                      allocator_warmup_steps=1, allocator_final_steps=1, allocator_interval=1)


def flux_inputs(rank: int, step: int) -> tuple[dict, torch.Tensor]:
    """Rank ``rank``'s batch of 2 (the same at every ``step``): the transformer's keyword inputs
    and the target, zeros (the adapters learn to cancel the output)."""
    generator = torch.Generator().manual_seed(rank)
    image_ids = torch.zeros(TOKENS, 3)
    image_ids[:, 1], image_ids[:, 2] = torch.arange(TOKENS) // 4, torch.arange(TOKENS) % 4
    inputs = dict(hidden_states=torch.randn(2, TOKENS, 16, generator=generator),
                  encoder_hidden_states=torch.randn(2, TEXT_TOKENS, 64, generator=generator),
                  pooled_projections=torch.randn(2, 32, generator=generator), timestep=torch.tensor([0.3, 0.8]),
                  img_ids=image_ids, txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.tensor([3.5, 3.5]))
    return inputs, torch.zeros(2, TOKENS, 16)


def adapted_flux():
    model = tiny_flux_pipeline(seed=0).transformer.requires_grad_(False)
    layers = apply_snella(model, CONFIG)
    return model, layers, BiLevelAllocator(layers, CONFIG, STEPS)


def train(model, params, allocator, optimizer, steps: range, batch) -> list[float]:
    """``steps`` optimizer steps on ``batch(step)`` (inputs, target), gradients averaged."""
    losses = []
    for step in steps:
        inputs, target = batch(step)
        loss = F.mse_loss(model(**inputs).sample, target)
        optimizer.zero_grad()
        loss.backward()
        average_gradients(params)
        optimizer.step()
        allocator.step()
        losses.append(float(loss.detach()))
    return losses


def sharded_run():
    model, layers, allocator = adapted_flux()
    params = shard_frozen_base(model, [*model.transformer_blocks, *model.single_transformer_blocks])
    return model, layers, allocator, params, torch.optim.Adam(params, lr=3e-2)


def state(layers, allocator, losses) -> dict:
    return {"params": {f"{n}.{k}": p.detach().clone() for n, layer in layers.items()
                       for k, p in layer.named_parameters() if p.requires_grad},
            "kept": {n: layer.delta_weight() != 0 for n, layer in layers.items()},
            "keep_counts": allocator.keep_counts(), "history": allocator.history_kept, "losses": losses}


def rank_main(rank: int, port: int, folder: Path) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        def batch(step):
            return flux_inputs(rank, step)

        model, layers, allocator, params, optimizer = sharded_run()
        weight = model.transformer_blocks[0].attn.to_q.base_layer.weight
        shard = (type(weight).__name__, tuple(weight.to_local().shape), tuple(weight.shape))
        straight = state(layers, allocator, train(model, params, allocator, optimizer, range(STEPS), batch))

        model, layers, allocator, params, optimizer = sharded_run()
        first = train(model, params, allocator, optimizer, range(RESUME_AT), batch)
        if rank == 0:
            torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict(),
                        "allocator": allocator.state_dict()}, folder / "checkpoint.pt")
        dist.barrier()
        model, layers, allocator, params, optimizer = sharded_run()
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
        with torch.no_grad():
            for parameter, saved in zip(params, checkpoint["params"]):
                parameter.copy_(saved)
        optimizer.load_state_dict(checkpoint["optimizer"])
        allocator.load_state_dict(checkpoint["allocator"])
        resumed = state(layers, allocator, first + train(model, params, allocator, optimizer,
                                                         range(RESUME_AT, STEPS), batch))
        torch.save({"shard": shard, "straight": straight, "resumed": resumed}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(rank_main, args=(free_port(), folder), nprocs=WORLD)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_same(first: dict, second: dict) -> None:
    """Same SNELLA parameters, kept entries and allocation history (bit for bit)."""
    assert first["keep_counts"] == second["keep_counts"] and first["history"] == second["history"]
    for key in ("params", "kept"):
        assert first[key].keys() == second[key].keys()
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), f"{key} {name}"


@pytest.mark.slow
def test_base_is_sharded_and_both_ranks_train_to_the_same_adapter_and_allocation(ranks):
    for rank in ranks:  # each rank holds half the rows of a 32 × 32 base weight
        assert rank["shard"] == ("DTensor", (16, 32), (32, 32))
    assert_same(ranks[0]["straight"], ranks[1]["straight"])
    straight = ranks[0]["straight"]
    assert len(straight["history"]) == 1 + (STEPS - 1)  # the initial budget, then steps 2..6 reallocated
    assert straight["history"][-1] != straight["history"][0]  # the allocation did move
    losses = [sum(values) / WORLD for values in zip(*(rank["straight"]["losses"] for rank in ranks))]
    assert losses[-1] < 0.9 * losses[0], losses  # the loss over both ranks' inputs


@pytest.mark.slow
def test_resumed_run_ends_identical_to_the_straight_one(ranks):
    for rank in ranks:
        assert_same(rank["straight"], rank["resumed"])
        assert rank["straight"]["losses"] == rank["resumed"]["losses"]


@pytest.mark.slow
def test_averaged_gradients_train_as_one_process_on_both_ranks_inputs(ranks):
    torch.manual_seed(0)
    model, layers, allocator = adapted_flux()
    params = [p for p in model.parameters() if p.requires_grad]

    def both(step):
        parts = [flux_inputs(rank, step) for rank in range(WORLD)]
        inputs = {key: torch.cat([p[0][key] for p in parts]) if key not in ("img_ids", "txt_ids") else value
                  for key, value in parts[0][0].items()}
        return inputs, torch.cat([p[1] for p in parts])

    alone = state(layers, allocator, train(model, params, allocator, torch.optim.Adam(params, lr=3e-2),
                                           range(STEPS), both))
    sharded = ranks[0]["straight"]
    assert alone["keep_counts"] == sharded["keep_counts"]
    # the same up to float32 summation order, which Adam's division by √v amplifies in entries
    # whose gradient is near zero: compared as whole tensors
    for name, tensor in alone["params"].items():
        assert float((sharded["params"][name] - tensor).norm() / tensor.norm()) < 1e-4, name


def test_accelerate_config_ignores_exactly_the_adapter_modules():
    import re

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "accelerate_fsdp2.yaml").read_text())
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_ignored_modules"] == ADAPTER_MODULES_PATTERN
    model, layers, _ = adapted_flux()
    ignored = {name for name, _ in model.named_modules() if re.fullmatch(ADAPTER_MODULES_PATTERN, name)}
    assert ignored == {f"{name}.adapters.default" for name in layers}
    ignored_params = {id(p) for name in ignored for p in model.get_submodule(name).parameters()}
    assert ignored_params == {id(p) for p in model.parameters() if p.requires_grad}

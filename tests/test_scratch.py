"""Reused CPU buffers for the layer's weight-sized temporaries."""

import pytest
import torch

from layer_runs import fresh_step
from snella_diffusion import SnellaConfig, SnellaLinear, apply_snella, remove_snella
from snella_diffusion.scratch import KEEP_PER_SHAPE, idle_buffers


@pytest.fixture
def small_buffers(monkeypatch):
    """Pool buffers from 1 KiB up so that tiny layers exercise it."""
    idle_buffers.release()
    monkeypatch.setattr(idle_buffers, "min_bytes", 1024)
    yield
    idle_buffers.release()


def test_large_buffers_are_reused_small_ones_are_not(small_buffers, monkeypatch):
    first = idle_buffers.borrow((64, 32), torch.float32, torch.device("cpu"))
    idle_buffers.give_back(first)
    idle_buffers.give_back(first)  # the same tensor is kept once
    assert idle_buffers.idle_bytes() == 64 * 32 * 4
    again = idle_buffers.borrow((64, 32), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr()
    other = idle_buffers.borrow((64, 32), torch.float32, torch.device("cpu"))
    assert other.data_ptr() != again.data_ptr()  # a buffer in use is never handed out twice
    small = torch.empty(8, 8)  # 256 bytes, under MIN_BYTES
    idle_buffers.give_back(small)
    assert idle_buffers.idle_bytes() == 0
    for tensor in (again, other, torch.empty(64, 32)):
        idle_buffers.give_back(tensor)
    assert idle_buffers.idle_bytes() == KEEP_PER_SHAPE * 64 * 32 * 4
    monkeypatch.setattr(idle_buffers, "max_idle_bytes", 64 * 32 * 4 * 3)
    idle_buffers.give_back(torch.empty(128, 32))  # would exceed the cap: dropped
    assert idle_buffers.idle_bytes() == 2 * 64 * 32 * 4
    idle_buffers.release()
    assert idle_buffers.idle_bytes() == 0


def test_layer_results_do_not_depend_on_reused_buffers(small_buffers, monkeypatch):
    config = SnellaConfig(rank=8, target_modules=["x"], init_sparsity=0.3)
    torch.manual_seed(0)
    layer = SnellaLinear(torch.nn.Linear(40, 48), config)
    x = torch.randn(5, 40)
    pooled = [fresh_step(layer, x) for _ in range(3)]  # later calls run on buffers earlier ones gave back
    assert idle_buffers.idle_bytes() > 0
    monkeypatch.setattr(idle_buffers, "min_bytes", 1 << 62)
    idle_buffers.release()
    fresh = fresh_step(layer, x)
    for results in pooled:
        for got, want in zip(results, fresh):
            assert torch.equal(got, want)


def test_remove_snella_frees_the_idle_buffers(small_buffers):
    model = torch.nn.Sequential(torch.nn.Linear(40, 48))
    apply_snella(model, SnellaConfig(rank=8, target_modules=["0"]))
    model(torch.randn(3, 40)).sum().backward()
    assert idle_buffers.idle_bytes() > 0
    remove_snella(model)
    assert idle_buffers.idle_bytes() == 0


def test_pools_are_objects_with_their_own_limits_and_buffers():
    from snella_diffusion.scratch import BufferPool

    pool = BufferPool(min_bytes=1024, keep_per_shape=1, max_idle_bytes=1 << 20)
    idle_before = idle_buffers.idle_bytes()
    first, second = torch.empty(64, 32), torch.empty(64, 32)
    pool.give_back(first)
    pool.give_back(second)  # keep_per_shape=1: dropped
    assert pool.idle_bytes() == 64 * 32 * 4
    assert idle_buffers.idle_bytes() == idle_before  # the process-wide pool is untouched
    assert pool.borrow((64, 32), torch.float32, torch.device("cpu")) is first
    pool.give_back(first)
    pool.release()
    assert pool.idle_bytes() == 0

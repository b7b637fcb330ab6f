import math

import pytest
import torch
from torch import nn

from snella_diffusion import BiLevelAllocator, SnellaConfig, apply_snella
from snella_diffusion.allocator import distribute_budget


def _model_and_config(**overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    values = dict(rank=4, target_modules=["0", "2", "4"], init_sparsity=0.1, target_sparsity=0.7,
                  allocator_warmup_steps=3, allocator_final_steps=4, allocator_interval=2)
    values.update(overrides)
    config = SnellaConfig(**values)
    apply_snella(model, config)
    return model, config


def _train_step(model, optimizer, allocator, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    allocator.step()
    optimizer.zero_grad()


def test_volume_follows_cubic_schedule():
    model, config = _model_and_config()
    allocator = BiLevelAllocator(model, config, total_steps=20)
    sizes = [12 * 20, 20 * 16, 16 * 3]
    v0 = sum(s - round(0.1 * s) for s in sizes)
    vt = sum(s - round(0.7 * s) for s in sizes)
    assert allocator.initial_volume == v0 and allocator.final_volume == vt
    for step in (0, 1, 3):
        assert allocator.scheduled_volume(step) == v0
    for step in (4, 9, 13, 16):
        expected = vt + (v0 - vt) * (1 - (step - 3) / (20 - 4 - 3)) ** 3
        assert allocator.scheduled_volume(step) == round(expected)
    for step in (17, 20):
        assert allocator.scheduled_volume(step) == vt


def test_kept_counts_add_up_to_scheduled_volume_during_training():
    model, config = _model_and_config()
    allocator = BiLevelAllocator(model, config, total_steps=20)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    reallocated_at = []
    for _ in range(20):
        _train_step(model, optimizer, allocator, x, y)
        if allocator.history_steps[-1] == allocator.step_count:
            reallocated_at.append(allocator.step_count)
            kept = sum(allocator.keep_counts().values())
            assert kept == allocator.scheduled_volume(allocator.step_count)
    assert reallocated_at == [4, 6, 8, 10, 12, 14, 16, 18, 20]
    budgets = allocator.budgets()
    assert len(set(round(v, 6) for v in budgets.values())) > 1  # layers really compete
    layers = [model[0], model[2], model[4]]
    for layer, sparsity in zip(layers, budgets.values()):
        assert math.isclose(layer.sparsity.item(), sparsity, rel_tol=1e-6)
        kept = int((layer.delta_weight() != 0).sum())
        assert kept == layer.primary.keep_count()


def test_state_round_trip_gives_identical_next_allocations():
    model, config = _model_and_config()
    allocator = BiLevelAllocator(model, config, total_steps=20)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    for _ in range(7):
        _train_step(model, optimizer, allocator, x, y)
    state = allocator.state_dict()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()

    def continue_run(model, optimizer, allocator):
        for _ in range(6):
            _train_step(model, optimizer, allocator, x, y)
        return allocator.keep_counts(), allocator.state_dict()

    first_counts, first_state = continue_run(model, optimizer, allocator)
    clone, _ = _model_and_config()
    clone.load_state_dict(model_state)
    clone_optimizer = torch.optim.SGD([p for p in clone.parameters() if p.requires_grad], lr=1e-2)
    clone_optimizer.load_state_dict(optimizer_state)
    restored = BiLevelAllocator(clone, config, total_steps=20)
    restored.load_state_dict(state)
    second_counts, second_state = continue_run(clone, clone_optimizer, restored)
    assert first_counts == second_counts
    for name in first_state["sensitivity"]:
        for a, b in zip(first_state["sensitivity"][name], second_state["sensitivity"][name]):
            assert torch.equal(a, b)


def test_skipped_steps_are_ignored_and_non_finite_scores_fall_back():
    model, config = _model_and_config(allocator_warmup_steps=0, allocator_interval=1)
    allocator = BiLevelAllocator(model, config, total_steps=10)
    assert allocator.step(skipped=True) is False and allocator.step_count == 0
    for layer in (model[0], model[2], model[4]):
        layer.in_factors.grad = torch.full_like(layer.in_factors, float("nan"))
        layer.out_factors.grad = torch.full_like(layer.out_factors, float("inf"))
    assert allocator.step() is True
    capacities = allocator.capacities
    volume = allocator.scheduled_volume(1)
    kept = list(allocator.keep_counts().values())
    assert sum(kept) == volume
    for count, capacity in zip(kept, capacities):  # size-proportional fallback
        assert abs(count - volume * capacity / sum(capacities)) <= 1


@pytest.mark.parametrize("volume", [0, 1, 17, 500, 10_000])
def test_distribute_budget_is_exact_and_capped(volume):
    scores = [5.0, 0.0, 1.0, 1e-9]
    capacities = [100, 50, 300, 7]
    alloc = distribute_budget(volume, scores, capacities)
    assert sum(alloc) == min(volume, sum(capacities))
    assert all(0 <= a <= c for a, c in zip(alloc, capacities))
    if volume >= 500:
        assert alloc[0] == 100  # the top layer is full, the rest went to the others

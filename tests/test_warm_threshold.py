"""The warm-started τ selection changes the work, never a value: τ, ΔW and every gradient are
bit-identical to the cold (plain blocked) selection, across sparsity changes, window misses
and a resume from a state dict."""

import copy

import pytest
import torch
from torch import nn

from snella_diffusion import SnellaConfig, apply_snella, warm_threshold
from snella_diffusion import layer as layer_module
from snella_diffusion.layer import snella_layers
from snella_diffusion.sparsify import select_threshold


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 256×320 = 81,920 entries: the cold CPU selection takes its bracketed path.
    model = nn.Sequential(nn.Linear(320, 256), nn.GELU(), nn.Linear(256, 48))
    apply_snella(model, SnellaConfig(rank=8, target_modules=["0", "2"], init_sparsity=0.7, target_sparsity=0.7))
    return model


def train(model: nn.Module, steps: int, seed: int = 1, sparsity_at: dict[int, float] | None = None,
          optimizer_state: dict | None = None, lr: float = 1e-3) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], dict]:
    """AdamW steps on random batches; per step the τ of each layer and every gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))  # AdamW updates its moments in place
    generator = torch.Generator().manual_seed(seed)
    thresholds, gradients = [], []
    for step in range(steps):
        for fraction in (sparsity_at or {}).get(step, []):
            for layer in snella_layers(model).values():
                layer.primary.set_sparsity(fraction)
        x = torch.randn(16, 320, generator=generator)
        model(x).square().mean().backward()
        thresholds.append([layer.threshold.clone() for layer in snella_layers(model).values()])
        gradients.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return thresholds, gradients, optimizer.state_dict()


def assert_identical(first: list[list[torch.Tensor]], second: list[list[torch.Tensor]]) -> None:
    assert len(first) == len(second)
    for step, (a, b) in enumerate(zip(first, second)):
        for index, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, tensor {index} differs"


@pytest.fixture
def window_counter(monkeypatch):
    """Counts warm selections that hit their window and cold selections."""
    counts = {"hit": 0, "cold": 0}
    select_in_window = layer_module.SnellaAdapter.select_threshold_in_window
    select_cold = layer_module.SnellaAdapter.select_threshold_on

    def counting_window(self, merged, window, below, inside):
        counts["hit"] += 0 < self.drop_count_host - below <= inside.numel()
        return select_in_window(self, merged, window, below, inside)

    def counting_cold(self, merged, missed_window=False):
        counts["cold"] += 1
        return select_cold(self, merged, missed_window)

    monkeypatch.setattr(layer_module.SnellaAdapter, "select_threshold_in_window", counting_window)
    monkeypatch.setattr(layer_module.SnellaAdapter, "select_threshold_on", counting_cold)
    return counts


def test_warm_selection_is_bit_identical_to_cold_over_training(window_counter):
    warm_model, cold_model = make_model(), make_model()
    warm_tau, warm_grads, _ = train(warm_model, 12)
    hits, colds = window_counter["hit"], window_counter["cold"]
    with warm_threshold.disabled():
        cold_tau, cold_grads, _ = train(cold_model, 12)
    assert_identical(warm_tau, cold_tau)
    assert_identical(warm_grads, cold_grads)
    for a, b in zip(warm_model.parameters(), cold_model.parameters()):
        assert torch.equal(a, b)
    # Two layers, 12 steps: the first selection of each is cold; of the 22 warm tries, the
    # window held τ in 16 here (the misses are early, while τ still grows fast); each miss
    # fell back to one cold selection.
    assert hits >= 14 and colds == 2 + (22 - hits)


def test_warm_tau_equals_kthvalue_of_the_full_matrix():
    model = make_model()
    train(model, 5)
    model(torch.randn(4, 320))  # τ for the parameters after the last step (warm-started)
    for layer in snella_layers(model).values():
        adapter = layer.primary
        merged = adapter._training_merged()
        expected = torch.kthvalue(merged.abs().reshape(-1), adapter.drop_count_host).values
        assert torch.equal(adapter.threshold, expected)
        assert torch.equal(select_threshold(merged, adapter.drop_count_host, absolute=True), expected)


def test_sparsity_changes_and_window_misses_stay_exact(window_counter, monkeypatch):
    schedule = {3: [0.5], 6: [0.9], 9: [0.75]}
    warm_model, cold_model = make_model(), make_model()
    # Steps of lr 3e-2 move τ by up to 6× early on, and the windows are kept far too narrow:
    # most selections miss and fall back.
    monkeypatch.setattr(warm_threshold, "MIN_HALF_WIDTH", 1e-9)
    monkeypatch.setattr(warm_threshold, "HALF_WIDTH_PER_MOVE", 1e-6)
    warm = train(warm_model, 12, sparsity_at=schedule, lr=3e-2)
    with warm_threshold.disabled():
        cold = train(cold_model, 12, sparsity_at=schedule, lr=3e-2)
    assert_identical(warm[0], cold[0])
    assert_identical(warm[1], cold[1])
    assert window_counter["cold"] > 2  # misses happened and were handled


def test_resume_from_state_dict_stays_bit_identical():
    straight = make_model()
    _, _, straight_state = train(straight, 4)
    tail_tau, tail_grads, _ = train(straight, 4, seed=2, optimizer_state=straight_state)

    first = make_model()
    _, _, optimizer_state = train(first, 4)
    state = copy.deepcopy(first.state_dict())
    resumed = make_model(seed=5)
    resumed.load_state_dict(state)
    assert all(layer.primary._warm_start is not None for layer in snella_layers(resumed).values())
    # The optimizer state of the first run continues (its moments, not a fresh AdamW).
    resumed_tau, resumed_grads, _ = train(resumed, 4, seed=2, optimizer_state=optimizer_state)
    with warm_threshold.disabled():
        cold = make_model(seed=5)
        cold.load_state_dict(state)
        cold_tau, cold_grads, _ = train(cold, 4, seed=2, optimizer_state=optimizer_state)
    assert_identical(resumed_tau, cold_tau)
    assert_identical(resumed_grads, cold_grads)
    assert_identical(resumed_tau, tail_tau)
    assert_identical(resumed_grads, tail_grads)


def test_window_shifts_with_the_drop_count():
    state = warm_threshold.WarmStart(threshold=1.0, drop_count=1000, density=500.0, half_width=0.01)
    low, high = state.window(1040)
    assert low < 1.08 < high and high - low == pytest.approx(0.02 + 0.08)
    assert state.window(1100) is None  # moved by 10 % of k: cold
    assert warm_threshold.WarmStart(1.0, 1000).window(1010) is None  # density unknown: cold
    assert warm_threshold.WarmStart(1.0, 1000).window(1000) == pytest.approx((0.99, 1.01))
    assert warm_threshold.WarmStart(0.0, 1000).window(1000) is None

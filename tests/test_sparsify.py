import torch

from snella_diffusion.sparsify import drop_count_for, select_threshold, survivor_gate


def test_kept_count_exact_on_matrix_above_2_pow_24():
    """4097² = 16,785,409 entries > 2^24, where torch.quantile refuses to work."""
    generator = torch.Generator().manual_seed(0)
    merged = torch.randn(4097, 4097, generator=generator)
    sparsity = 0.37
    count = drop_count_for(sparsity, merged.numel())
    threshold = select_threshold(merged.abs(), count)
    kept = int((merged.abs() > threshold).sum())
    assert kept == merged.numel() - round(sparsity * merged.numel())


def test_threshold_is_kth_smallest_and_zero_when_nothing_dropped():
    magnitude = torch.arange(1.0, 101.0)[torch.randperm(100)].reshape(10, 10)
    assert float(select_threshold(magnitude, 25)) == 25.0
    assert float(select_threshold(magnitude, 0)) == 0.0
    assert int((magnitude > select_threshold(magnitude, 100)).sum()) == 0


def test_sampled_threshold_keeps_count_within_tolerance_and_is_deterministic():
    generator = torch.Generator().manual_seed(1)
    magnitude = torch.randn(1280, 5120, generator=generator).abs()
    count = drop_count_for(0.6, magnitude.numel())
    first = select_threshold(magnitude, count, sample_size=1 << 20)
    second = select_threshold(magnitude, count, sample_size=1 << 20)
    assert torch.equal(first, second)
    kept = int((magnitude > first).sum())
    target = magnitude.numel() - count
    assert abs(kept - target) <= 0.001 * magnitude.numel()


def test_gate_modes():
    merged = torch.tensor([[-3.0, 0.5], [2.0, -1.0]])
    threshold = torch.tensor(1.0)
    official = merged * survivor_gate(merged.abs(), threshold, "official")
    assert torch.equal(official, torch.tensor([[-9.0, 0.0], [4.0, 0.0]]))
    soft = merged * survivor_gate(merged.abs(), threshold, "soft_threshold")
    assert torch.equal(soft, torch.tensor([[-6.0, 0.0], [2.0, 0.0]]))
    assert torch.equal(survivor_gate(torch.tensor([0.0, 2.0]), torch.tensor(0.0), "official"), torch.tensor([0.0, 2.0]))


def test_drop_count_uses_nearest_integer():
    assert drop_count_for(0.5, 3) == 2  # 1.5 rounds half to even
    assert drop_count_for(0.3, 10) == 3
    assert drop_count_for(0.0, 47_185_920) == 0


def test_bracketed_selection_equals_kthvalue_including_ties_and_extremes():
    from snella_diffusion.sparsify import _bracketed_kthvalue

    generator = torch.Generator().manual_seed(3)
    values = torch.randn(1 << 21, generator=generator).abs()
    values[::7] = 0.5  # many ties
    for count in (1, 1000, values.numel() // 2, values.numel() - 1, values.numel()):
        assert torch.equal(_bracketed_kthvalue(values, count, 1024), torch.kthvalue(values, count).values)
    sorted_values = torch.sort(values).values  # a sample that brackets nothing useful
    assert torch.equal(_bracketed_kthvalue(sorted_values, 12345, 1024),
                       torch.kthvalue(sorted_values, 12345).values)
    signed = torch.randn(1 << 20, generator=generator)
    count = 700_000
    assert torch.equal(_bracketed_kthvalue(signed, count, 1280, absolute=True),
                       torch.kthvalue(signed.abs(), count).values)


def test_bracket_samples_every_column_so_the_window_holds_tau(monkeypatch):
    """Columns of M differ in scale. A sample stride sharing a factor with the row length
    (200 and 1280 here) sees 32 of 1280 columns; its window then misses τ and the selection
    falls back to kthvalue over all m·n entries."""
    generator = torch.Generator().manual_seed(4)
    column_scales = torch.logspace(-3, 0, 1280)[torch.randperm(1280, generator=generator)]
    merged = torch.randn(10240, 1280, generator=generator) * column_scales
    count = int(0.8 * merged.numel())
    sizes = []
    original = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda values, k, *a, **kw: sizes.append(values.numel()) or original(values, k, *a, **kw))
    threshold = select_threshold(merged, count, absolute=True)
    monkeypatch.undo()
    assert torch.equal(threshold, torch.kthvalue(merged.abs().reshape(-1), count).values)
    assert max(sizes) < merged.numel() // 20  # sample and window only, no full fallback

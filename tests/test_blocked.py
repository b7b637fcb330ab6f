"""The blocked layer evaluation against the naive formula, with blocks forced small enough
that every matrix spans several of them and the last one is narrower."""

import pytest
import torch

from snella_diffusion import SnellaConfig, SnellaLinear, blocked
from snella_diffusion.blocked import (Factors, KernelSpec, backward_blocked, column_blocks, effective_blocked,
                                      merged_blocked)
from snella_diffusion.errors import SnellaError

from layer_runs import fresh_step
from reference_math import naive_merged

KERNELS = ["mix", "piecewise_linear", "linear"]
MODES = ["official", "soft_threshold"]
OUT, IN = 37, 53
BLOCK = OUT * 16  # 16 columns per block: 16 + 16 + 16 + 5
SPARSITY = 0.4


def _midpoint_threshold(merged, sparsity=SPARSITY):
    """τ halfway between the k-th and (k+1)-th smallest |M|: the same survivors as the naive
    τ (the k-th value itself), without an entry within rounding of it."""
    ordered = merged.detach().abs().flatten().sort().values
    count = round(sparsity * merged.numel())
    return (ordered[count - 1] + ordered[count]) / 2


def _delta(merged, threshold, mode):
    """ΔW_eff for a given τ, gate detached (docs/METHOD.md §2)."""
    magnitude = merged.detach().abs()
    if mode == "official":
        return torch.where(magnitude > threshold, merged * magnitude, torch.zeros_like(merged))
    return merged * torch.clamp(magnitude - threshold, min=0)


def _factors(kernel, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    heads = 2 if kernel != "linear" else 4

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return (randn(heads, IN, 3) * 0.7, randn(heads, OUT, 3) * 0.7, torch.tensor(0.7, dtype=dtype),
            torch.tensor(1.3, dtype=dtype), torch.tensor(0.1, dtype=dtype))


def test_kernel_spec_refuses_an_unknown_kernel_and_factors_give_the_shape_of_m():
    with pytest.raises(SnellaError, match="kernel='gaussian'"):
        KernelSpec("gaussian", 0.1, "official")
    assert KernelSpec("mix", 0.1, "official") == KernelSpec("mix", 0.1, "official")
    factors = Factors(*_factors("mix", dtype=torch.float32))
    assert factors.shape == (OUT, IN)
    assert factors.in_compute_dtype().in_factors is factors.in_factors  # float32 already: no copy
    assert Factors(*_factors("mix", dtype=torch.float64)).in_compute_dtype().alpha.dtype == torch.float64


def test_column_blocks_cover_every_column_once_in_aligned_widths():
    blocks = list(column_blocks(53, 37, BLOCK))
    assert [(b.start, b.stop) for b in blocks] == [(0, 16), (16, 32), (32, 48), (48, 53)]
    assert [b.stop - b.start for b in column_blocks(1280, 10240, 1 << 19)][:2] == [48, 48]
    assert list(column_blocks(7, 10_000_000, 1 << 19)) == [slice(0, 7)]  # at least one aligned width


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [0.1, -0.3])
def test_merged_matches_naive(kernel, scale):
    factors = _factors(kernel)
    expected = naive_merged(*factors, kernel, scale=scale)
    merged = merged_blocked(KernelSpec(kernel, scale, "official"), Factors(*factors), block_entries=BLOCK)
    assert torch.allclose(merged, expected, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_effective_weight_matches_naive(kernel, mode):
    factors = _factors(kernel)
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    merged = naive_merged(*factors, kernel)
    threshold = _midpoint_threshold(merged)
    expected = weight + 0.5 * _delta(merged, threshold, mode)
    args = (KernelSpec(kernel, 0.1, mode), Factors(*factors), threshold, 0.5)
    built = effective_blocked(*args, weight, torch.float64, block_entries=BLOCK)
    from_merged = effective_blocked(*args, weight, torch.float64, merged=merged, block_entries=BLOCK)
    alone = effective_blocked(*args, None, torch.float64, block_entries=BLOCK)
    assert torch.allclose(built, expected, atol=1e-12)
    assert torch.allclose(from_merged, built, atol=1e-12)
    assert torch.allclose(alone, expected - weight, atol=1e-12)
    assert int((alone != 0).sum()) == OUT * IN - round(SPARSITY * OUT * IN)


def test_effective_weight_in_half_precision_rounds_the_float32_sum():
    factors = _factors("mix", dtype=torch.float32)
    weight = torch.randn(OUT, IN).to(torch.bfloat16)
    merged = naive_merged(*factors, "mix")
    threshold = _midpoint_threshold(merged)
    built = effective_blocked(KernelSpec("mix", 0.1, "official"), Factors(*factors), threshold, 1.0, weight,
                              torch.bfloat16, block_entries=BLOCK)
    expected = (weight.float() + _delta(merged, threshold, "official")).to(torch.bfloat16)
    assert built.dtype == torch.bfloat16
    assert torch.equal(built, expected)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [0.1, -0.3])
def test_backward_matches_autograd_through_the_naive_formula(kernel, mode, scale):
    """L = Σ grad_delta ⊙ (W0 + s·M⊙G) with G detached: the blocked gradients equal autograd's."""
    leaves = [t.clone().requires_grad_() for t in _factors(kernel)]
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    grad_delta = torch.randn(OUT, IN, dtype=torch.float64)
    merged = naive_merged(*leaves, kernel, scale=scale)
    threshold = _midpoint_threshold(merged)
    total = weight + 0.5 * _delta(merged, threshold, mode)
    wanted = torch.autograd.grad((grad_delta * total).sum(), leaves, allow_unused=True)

    spec, factors = KernelSpec(kernel, scale, mode), Factors(*(t.detach() for t in leaves))
    grads, effective = backward_blocked(spec, factors, threshold, 0.5, grad_delta, weight, torch.float64,
                                        block_entries=BLOCK)
    got = (grads.in_factors, grads.out_factors, grads.alpha, grads.gamma, grads.beta)
    for name, mine, reference in zip(("in", "out", "alpha", "gamma", "beta"), got, wanted):
        reference = torch.zeros_like(mine) if reference is None else reference
        assert torch.allclose(mine, reference, atol=1e-10), name
    assert torch.allclose(effective, total.detach(), atol=1e-12)
    # The backward rebuilds exactly the forward's weight (the input gradient uses what the forward used).
    forward_weight = effective_blocked(spec, factors, threshold, 0.5, weight, torch.float64, block_entries=BLOCK)
    assert torch.equal(effective, forward_weight)
    _, no_weight = backward_blocked(spec, factors, threshold, 0.5, grad_delta, None, None, block_entries=BLOCK)
    assert no_weight is None


def test_layer_with_many_blocks_matches_one_block(monkeypatch):
    """The layer's forward and backward do not depend on how its matrix is cut into blocks."""
    config = SnellaConfig(rank=8, target_modules=["x"], init_sparsity=0.3)
    torch.manual_seed(0)
    layer = SnellaLinear(torch.nn.Linear(IN, OUT), config)
    with torch.no_grad():
        layer.primary.in_factors.normal_(std=0.5)
        layer.primary.out_factors.normal_(std=0.5)
    x = torch.randn(4, IN)
    one_block = fresh_step(layer, x)
    monkeypatch.setattr(blocked, "BLOCK_ENTRIES", OUT * 16)
    many_blocks = fresh_step(layer, x)
    for one, many in zip(one_block, many_blocks):
        assert torch.allclose(one, many, rtol=1e-5, atol=1e-6)

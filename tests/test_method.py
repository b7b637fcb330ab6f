"""``snella_diffusion.method`` is the definition of ΔW (docs/METHOD.md §1-2); these tests hold
it and the fast path to each other.

1. method.py against the independent naive recomputation in ``reference_math`` (broadcast
   differences and a full sort instead of the GEMM identity and ``kthvalue``).
2. float64 ``gradcheck`` of method.py's gradient, with the convention that the gate is detached.
3. The fast path (``SnellaAdapter.delta_weight`` and the training forward/backward of
   ``SnellaLinear``, in both forward modes) equals method.py at real layer sizes in float64:
   ΔW, τ, the output, and the gradients of the input, the factors and the scalars, for every
   kernel, both sparsify rules and sparsities 0, 0.5 and 0.9; also with c < 0, γ under its
   floor and vectors at distance 0. On a machine with CUDA the same runs on the GPU path.
4. The package cites docs/METHOD.md, and the sections it cites exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snella_diffusion import SnellaConfig, SnellaLinear, method
from snella_diffusion.errors import SnellaError
from snella_diffusion.layer import SnellaAdapter

from reference_math import naive_delta, naive_merged, naive_threshold

pytestmark = pytest.mark.usefixtures("single_thread")

KERNELS = ["mix", "piecewise_linear", "linear"]
RULES = ["official", "soft_threshold"]
SPARSITIES = [0.0, 0.5, 0.9]
SCALARS = {"alpha": 0.7, "gamma": 0.05, "beta": 0.01}
PARAMS = ("in_factors", "out_factors", "alpha", "gamma", "beta")
TIGHT = 1e-12  # relative to the largest entry: float64 sums taken in another order


def _factors(out_features, in_features, width=3, seed=0):
    """Random float64 (in_factors, out_factors, alpha, gamma, beta) for a 2-head adapter."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_features, width, generator=generator, dtype=torch.float64) * 0.7,
            torch.randn(2, out_features, width, generator=generator, dtype=torch.float64) * 0.7,
            torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64),
            torch.tensor(0.1, dtype=torch.float64))


def _assert_close(actual, expected, tolerance=TIGHT):
    """max |actual - expected| <= tolerance·max|expected| (a scale-aware tight check)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= tolerance * scale, f"max error {error:.3g} > {tolerance:g} x max |expected| {scale:.3g}"


# --- 1. method.py against the naive recomputation ------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(7, 13), (13, 7)])
def test_merged_matrix_matches_naive(kernel, shape):
    factors = _factors(*shape, seed=1)
    merged = method.merged_matrix(kernel, *factors, kernel_scale=0.1)
    assert merged.shape == shape
    _assert_close(merged, naive_merged(*factors, kernel, scale=0.1))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_delta_weight_matches_naive(kernel, rule, sparsity):
    factors = _factors(7, 13, seed=2)
    expected = naive_delta(naive_merged(*factors, kernel), sparsity, rule)
    delta = method.delta_weight(*factors, sparsity, kernel=kernel, sparsify=rule)
    _assert_close(delta, expected)
    assert int((delta == 0).sum()) == round(sparsity * 91)


def test_dense_rule_is_the_merged_matrix():
    factors = _factors(7, 13, seed=3)
    _assert_close(method.delta_weight(*factors, 0.0, sparsify="dense"), naive_merged(*factors, "mix"))


def test_threshold_is_the_kth_smallest_magnitude():
    merged = method.merged_matrix("mix", *_factors(7, 13, seed=4))
    for sparsity in (0.0, 0.1, 0.5, 0.99):
        assert float(method.select_threshold(merged, sparsity)) == float(naive_threshold(merged, sparsity))
    # k = 0 gives τ = 0 even with an exact zero in M; drop_count overrides round(s·m·n).
    merged[0, 0] = 0.0
    assert float(method.select_threshold(merged, 0.001)) == 0.0
    assert method.select_threshold(merged, 0.5, drop_count=10) == merged.abs().flatten().sort().values[9]
    # s = 1 (no budget) removes every entry.
    assert not method.delta_weight(*_factors(7, 13, seed=4), 1.0).any()


def test_softmax_runs_over_the_outputs_of_each_input():
    """With K = 0 (all factors equal) M = α/m + β: the softmax is uniform over the m outputs."""
    factors = list(_factors(5, 11, seed=5))
    factors[0] = torch.ones(2, 11, 3, dtype=torch.float64)
    factors[1] = torch.ones(2, 5, 3, dtype=torch.float64)
    merged = method.merged_matrix("mix", *factors)
    assert torch.allclose(merged, torch.full((5, 11), 0.7 / 5 + 0.1, dtype=torch.float64), atol=1e-15)
    factors = _factors(5, 11, seed=5)
    softmax = (method.merged_matrix("mix", *factors) - method.merged_matrix("piecewise_linear", *factors)
               - factors[4]) / factors[2]
    assert torch.allclose(softmax.sum(0), torch.ones(11, dtype=torch.float64), atol=1e-14)


def test_unknown_kernel_and_rule_name_the_setting():
    factors = _factors(3, 4)
    with pytest.raises(SnellaError, match="kernel='gauss'"):
        method.merged_matrix("gauss", *factors)
    with pytest.raises(SnellaError, match="sparsify='hard'"):
        method.delta_weight(*factors, 0.5, sparsify="hard")


# --- 2. gradients: float64 gradcheck with the gate detached --------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_with_the_gate_detached(kernel, rule):
    """The gradient convention of docs/METHOD.md §2: ∂ΔW/∂θ = G ⊙ ∂M/∂θ with G detached.

    ΔW = M ⊙ G(|M|, τ) and G moves with M, so finite differences of ΔW itself would see
    ∂G/∂θ too (for "official", twice the convention's gradient); the convention deliberately
    drops it. The check is therefore in two parts: ``gradcheck`` of θ ↦ M(θ) ⊙ G₀ with the gate
    G₀ taken at the base point θ₀ checks autograd through method.py's kernel numerically, and
    method.py's own ΔW must give that same gradient at θ₀.

    The base point keeps every |M| other than the k-th one (which is τ) at least 1e-4 away from
    τ, 100 times gradcheck's step of 1e-6 times any |∂M/∂θ| here: no perturbed point would
    change the survivor set, so G₀ is the gate of every evaluated point up to its magnitude.
    """
    factors = [t.requires_grad_() for t in _factors(5, 7, seed=6)]
    sparsity = 0.4
    base = method.merged_matrix(kernel, *factors).detach()
    threshold = method.select_threshold(base, sparsity)
    gaps = (base.abs() - threshold).abs().flatten().sort().values
    assert gaps[0] == 0 and gaps[1] > 1e-4, "choose a seed without an |M| next to τ"
    frozen_gate = method.survivor_gate(base, threshold, rule)

    def frozen(*theta):
        return method.merged_matrix(kernel, *theta) * frozen_gate

    assert torch.autograd.gradcheck(frozen, factors, eps=1e-6, atol=1e-9, rtol=1e-7)
    upstream = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = torch.autograd.grad(frozen(*factors), factors, upstream, allow_unused=True, materialize_grads=True)
    delta = method.delta_weight(*factors, sparsity, kernel=kernel, sparsify=rule)
    got = torch.autograd.grad(delta, factors, upstream, allow_unused=True, materialize_grads=True)
    for mine, reference in zip(got, want):
        _assert_close(mine, reference)


def test_gradient_matches_the_naive_formula():
    """Autograd through method.py equals autograd through the broadcast-difference formula."""
    for kernel in KERNELS:
        for rule in RULES:
            factors = [t.requires_grad_() for t in _factors(6, 9, seed=8)]
            upstream = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
            want = torch.autograd.grad(naive_delta(naive_merged(*factors, kernel), 0.5, rule), factors, upstream,
                                       allow_unused=True, materialize_grads=True)
            got = torch.autograd.grad(method.delta_weight(*factors, 0.5, kernel=kernel, sparsify=rule), factors,
                                      upstream, allow_unused=True, materialize_grads=True)
            for mine, reference in zip(got, want):
                _assert_close(mine, reference, 1e-11)


# --- 3. the fast path equals the method ---------------------------------------------------------

def _layer(base, kernel, rule, forward_mode, factors, kernel_scale=0.1):
    """A float64 SnellaLinear on ``base`` holding ``factors`` (rank 2·width)."""
    config = SnellaConfig(rank=2 * factors[0].shape[-1], kernel=kernel, sparsify=rule, target_modules=["x"],
                          forward_mode=forward_mode, kernel_scale=kernel_scale, target_sparsity=0.0)
    layer = SnellaLinear(base, config).to(torch.float64)
    adapter = layer.primary
    assert isinstance(adapter, SnellaAdapter)
    with torch.no_grad():
        for name, value in zip(PARAMS, factors):
            getattr(adapter, name).copy_(value)
    return layer


def _real_factors(out_features, in_features, seed, gamma=SCALARS["gamma"], device="cpu"):
    """Factors like a trained layer's: kernel values of order 0.1, a peaked softmax (γ = 0.05)."""
    generator = torch.Generator().manual_seed(seed)
    factors = (torch.randn(2, in_features, 16, generator=generator, dtype=torch.float64) * 0.3,
               torch.randn(2, out_features, 16, generator=generator, dtype=torch.float64) * 0.3,
               torch.tensor(SCALARS["alpha"], dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64),
               torch.tensor(SCALARS["beta"], dtype=torch.float64))
    return tuple(t.to(device) for t in factors)


def _base(out_features, in_features, seed, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, dtype=torch.float64).to(device)


# (m, n): SD1.5 attention 320², an FF output 1280→320 (one CPU block of 2^19 entries), then
# layers of several CPU blocks (640×2048: 3, 1280×5120: 13).
SIZES = [(320, 320), (320, 1280), (640, 2048), (1280, 5120)]
# The accelerator path (one block up to 2^24 entries, τ selected on the device) where present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_delta_weight_and_threshold_equal_the_method(size, kernel, device):
    """``SnellaAdapter.delta_weight()`` and its τ equal method.py's in float64."""
    factors = _real_factors(*size, seed=10, device=device)
    base = _base(*size, seed=11, device=device)
    with torch.no_grad():
        merged = method.merged_matrix(kernel, *factors)
        adapters = {rule: _layer(base, kernel, rule, "merged", factors).primary for rule in RULES}
        for sparsity in SPARSITIES:
            threshold = method.select_threshold(merged, sparsity)
            for rule, adapter in adapters.items():
                adapter.set_sparsity(sparsity)
                delta = adapter.delta_weight()
                _assert_close(adapter.threshold, threshold)
                assert int((delta == 0).sum()) == round(sparsity * merged.numel())
                _assert_close(delta, merged * method.survivor_gate(merged, threshold, rule))
                del delta
        dense = _layer(base, kernel, "dense", "merged", factors).primary.delta_weight()
        _assert_close(dense, merged)


@pytest.mark.parametrize("kernel", KERNELS)
def test_differentiable_delta_weight_equals_the_method(kernel):
    """With autograd on, ``SnellaAdapter.delta_weight()`` (values from the blocked build, the
    gradient through the whole-matrix ``kernels.kernel_matrix``) has method.py's ΔW gradient."""
    size = (640, 2048)
    factors = _real_factors(*size, seed=20)
    upstream = torch.randn(*size, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    theta = [t.clone().requires_grad_() for t in factors]
    for rule in RULES:
        adapter = _layer(_base(*size, seed=22), kernel, rule, "merged", factors).primary
        adapter.set_sparsity(0.5)
        delta = adapter.delta_weight()
        got = torch.autograd.grad(delta, [getattr(adapter, name) for name in PARAMS], upstream,
                                  allow_unused=True, materialize_grads=True)
        want_delta = method.delta_weight(*theta, 0.5, kernel=kernel, sparsify=rule)
        want = torch.autograd.grad(want_delta, theta, upstream, allow_unused=True, materialize_grads=True)
        _assert_close(delta.detach(), want_delta.detach())
        for name, mine, reference in zip(PARAMS, got, want):
            if reference.abs().max() == 0:
                assert not mine.any(), name
            else:
                _assert_close(mine, reference, 1e-10 if name == "gamma" else 1e-11)


def _library_step(layer, x, upstream):
    """Output and gradients (x, factors, scalars) of one training forward/backward of ``layer``."""
    x = x.detach().clone().requires_grad_()
    output = layer(x)
    adapter = layer.primary
    grads = torch.autograd.grad(output, [x] + [getattr(adapter, name) for name in PARAMS], upstream)
    return output.detach(), grads


def _method_step(base, theta, merged, x, upstream, sparsity, rule):
    """The same through x·(W0 + ΔW)ᵀ + b with ΔW from method.py (``merged`` built from ``theta``)."""
    x = x.detach().clone().requires_grad_()
    gate = method.survivor_gate(merged, method.select_threshold(merged, sparsity), rule)
    output = F.linear(x, base.weight + merged * gate, base.bias)
    grads = torch.autograd.grad(output, [x] + theta, upstream, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
    return output.detach(), grads


def _compare_steps(library, reference):
    (output, grads), (want_output, want_grads) = library, reference
    _assert_close(output, want_output)
    for name, got, want in zip(("x",) + PARAMS, grads, want_grads):
        if want.abs().max() == 0:
            assert not got.any(), name
            continue
        _assert_close(got, want, 1e-10 if name == "gamma" else 1e-11)


# Every kernel, rule, sparsity and forward mode at the sizes of one block and of a few blocks;
# at the largest size (seconds per float64 step on one core) every kernel and rule at s = 0.9.
GRADIENT_CASES = [(size, kernel, SPARSITIES, ("merged", "parallel")) for size in SIZES[:3] for kernel in KERNELS]
GRADIENT_CASES += [(SIZES[3], kernel, [0.9], ("merged",)) for kernel in KERNELS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size, kernel, sparsities, modes", GRADIENT_CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}-{c[1]}" for c in GRADIENT_CASES])
def test_fast_training_gradients_equal_the_method(size, kernel, sparsities, modes, device):
    """The training forward/backward of ``SnellaLinear`` (merged and parallel modes, both
    rules) gives the output and the gradients of the input, the factors and the scalars that
    autograd gives through x·(W0 + ΔW)ᵀ + b with ΔW from method.py, in float64."""
    _assert_training_matches_the_method(size, kernel, sparsities, modes, device, kernel_scale=0.1)


@pytest.mark.parametrize("kernel", ["mix", "piecewise_linear"])
def test_negative_kernel_scale_matches_the_method(kernel):
    """c < 0 (the fast path swaps the heads to keep |c|·D under the root) over 3 CPU blocks."""
    _assert_training_matches_the_method((640, 2048), kernel, [0.5], ("merged",), "cpu", kernel_scale=-0.3)


def _assert_training_matches_the_method(size, kernel, sparsities, modes, device, kernel_scale):
    """One forward/backward per rule, mode and sparsity, library against method.py."""
    out_features, in_features = size
    factors = _real_factors(out_features, in_features, seed=12, device=device)
    base = _base(out_features, in_features, seed=13, device=device)
    generator = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, in_features, generator=generator, dtype=torch.float64).to(device)
    upstream = torch.randn(2, 3, out_features, generator=generator, dtype=torch.float64).to(device)
    theta = [t.clone().requires_grad_() for t in factors]
    merged = method.merged_matrix(kernel, *theta, kernel_scale=kernel_scale)
    for rule in RULES:
        for mode in modes:
            layer = _layer(base, kernel, rule, mode, factors, kernel_scale)
            for sparsity in sparsities:
                layer.primary.set_sparsity(sparsity)
                _compare_steps(_library_step(layer, x, upstream),
                               _method_step(base, theta, merged, x, upstream, sparsity, rule))


def test_gamma_below_the_floor_matches_the_library():
    """γ under GAMMA_FLOOR: both use max(γ, floor) as the temperature, and γ gets no gradient."""
    factors = _real_factors(64, 96, seed=15, gamma=1e-6)
    base = _base(64, 96, seed=16)
    layer = _layer(base, "mix", "official", "merged", factors)
    layer.primary.set_sparsity(0.5)
    at_floor = list(factors)
    at_floor[3] = torch.tensor(method.GAMMA_FLOOR, dtype=torch.float64)
    with torch.no_grad():
        _assert_close(layer.primary.delta_weight(), method.delta_weight(*at_floor, 0.5))
    x = torch.randn(5, 96, dtype=torch.float64)
    upstream = torch.randn(5, 64, dtype=torch.float64)
    theta = [t.clone().requires_grad_() for t in factors]
    reference = _method_step(base, theta, method.merged_matrix("mix", *theta), x, upstream, 0.5, "official")
    assert float(reference[1][4]) == 0.0
    _compare_steps(_library_step(layer, x, upstream), reference)


@pytest.mark.parametrize("kernel", ["mix", "piecewise_linear"])
def test_zero_distances_give_the_library_gradients(kernel):
    """At D = 0 both the method and the fast path use the subgradient 0. Factors of small
    dyadic values and c = 0.25 keep the arithmetic exact (the fast path folds c² into the
    factors), so the squared distances are exactly 0 where vectors coincide; the gradients
    are then finite and equal."""
    generator = torch.Generator().manual_seed(17)
    in_factors = torch.randint(-2, 3, (2, 24, 4), generator=generator).double() / 4
    out_factors = in_factors[:, :16].clone()  # output o meets input o at distance 0 in both heads
    out_factors[1, 8:] = torch.randint(-2, 3, (8, 4), generator=generator).double() / 4
    factors = (in_factors, out_factors) + _real_factors(16, 24, seed=18)[2:]
    assert (method.head_distances(in_factors, out_factors) == 0).sum() >= 24
    base = _base(16, 24, seed=19)
    layer = _layer(base, kernel, "soft_threshold", "merged", factors, kernel_scale=0.25)
    layer.primary.set_sparsity(0.3)
    x = torch.randn(4, 24, dtype=torch.float64, generator=generator)
    upstream = torch.randn(4, 16, dtype=torch.float64, generator=generator)
    theta = [t.clone().requires_grad_() for t in factors]
    merged = method.merged_matrix(kernel, *theta, kernel_scale=0.25)
    reference = _method_step(base, theta, merged, x, upstream, 0.3, "soft_threshold")
    assert all(torch.isfinite(g).all() for g in reference[1])
    _compare_steps(_library_step(layer, x, upstream), reference)


def test_code_cites_the_sections_of_docs_method():
    """Every ``METHOD.md`` the package cites is the repository's docs/METHOD.md, and every
    section it cites (§N or §N-M) is a heading of that page."""
    root = Path(__file__).resolve().parents[1]
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", (root / "docs" / "METHOD.md").read_text(), re.M)}
    cited = []
    for path in sorted((root / "snella_diffusion").rglob("*.py")):
        for match in re.finditer(r"(\S*)METHOD\.md(?: §(\d+)(?:-(\d+))?)?", path.read_text()):
            assert match.group(1).endswith("docs/"), f"{path.name} cites {match.group(0)}, not docs/METHOD.md"
            if match.group(2):
                first, last = int(match.group(2)), int(match.group(3) or match.group(2))
                cited.append((path.name, set(range(first, last + 1))))
    assert {"method.py", "kernels.py", "sparsify.py", "allocator.py"} <= {name for name, _ in cited}
    for name, sections in cited:
        assert sections <= headings, f"{name} cites §{sorted(sections - headings)}, missing from docs/METHOD.md"

import pytest
import torch

from snella_diffusion import SnellaConfig, SnellaLinear
from snella_diffusion.autograd import _SnellaLinearFunction
from snella_diffusion.kernels import head_distances

from reference_math import naive_delta, naive_merged

KERNELS = ["mix", "piecewise_linear", "linear"]
MODES = ["official", "soft_threshold"]


def _randomised_layer(kernel, mode, out_features=7, in_features=13, sparsity=0.3, rank=8):
    torch.manual_seed(0)
    config = SnellaConfig(rank=rank, kernel=kernel, sparsify=mode, target_modules=["x"], init_sparsity=sparsity)
    layer = SnellaLinear(torch.nn.Linear(in_features, out_features), config)
    adapter = layer.primary
    with torch.no_grad():
        adapter.in_factors.normal_(std=0.5)
        adapter.out_factors.normal_(std=0.5)
        adapter.alpha.fill_(0.7)
        adapter.gamma.fill_(1.3)
        adapter.beta.fill_(0.1)
    return layer


def test_head_distances_match_broadcast():
    torch.manual_seed(1)
    in_factors, out_factors = torch.randn(2, 9, 4), torch.randn(2, 5, 4)
    expected = (out_factors[:, :, None] - in_factors[:, None]).norm(dim=-1)
    assert torch.allclose(head_distances(in_factors, out_factors), expected, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(7, 13), (13, 7)])
def test_delta_weight_matches_naive(kernel, mode, shape):
    layer = _randomised_layer(kernel, mode, *shape)
    adapter = layer.primary
    merged = naive_merged(adapter.in_factors, adapter.out_factors, adapter.alpha, adapter.gamma, adapter.beta, kernel)
    expected = naive_delta(merged, 0.3, mode)
    delta = layer.delta_weight()
    assert delta.shape == shape and delta.dtype == torch.float32
    assert torch.allclose(delta, expected, atol=1e-6, rtol=1e-6)
    assert int((delta != 0).sum()) == shape[0] * shape[1] - round(0.3 * shape[0] * shape[1])


def test_softmax_runs_over_outputs():
    """alpha·S sums to alpha over the outputs of each input column (per input feature)."""
    layer = _randomised_layer("mix", "official")
    adapter = layer.primary
    merged, terms = adapter.merged_matrix(keep_terms=True)
    column_sums = terms.softmax.sum(dim=0)
    assert torch.allclose(column_sums, torch.ones(13), atol=1e-6)
    assert not torch.allclose(terms.softmax.sum(dim=1), torch.ones(7), atol=1e-2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_layer_gradients_match_autograd_reference(kernel, mode):
    """The custom function's gradients equal autograd through the naive formula (float64)."""
    layer = _randomised_layer(kernel, mode).double()
    adapter = layer.primary
    x = torch.randn(3, 4, 13, dtype=torch.float64)
    upstream = torch.randn(3, 4, 7, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in (x, adapter.in_factors, adapter.out_factors, adapter.alpha, adapter.gamma, adapter.beta)]
    merged = naive_merged(*leaves[1:], kernel)
    delta = naive_delta(merged, 0.3, mode)
    reference = torch.nn.functional.linear(leaves[0], layer.base_layer.weight + delta, layer.base_layer.bias)
    reference_grads = torch.autograd.grad((reference * upstream).sum(), leaves, allow_unused=True)

    x_leaf = x.clone().requires_grad_()
    output = layer(x_leaf)
    assert torch.allclose(output, reference, atol=1e-10)
    (output * upstream).sum().backward()
    mine = [x_leaf.grad, adapter.in_factors.grad, adapter.out_factors.grad, adapter.alpha.grad, adapter.gamma.grad, adapter.beta.grad]
    for got, want in zip(mine, reference_grads):
        want = torch.zeros_like(got) if want is None else want
        assert torch.allclose(got, want, atol=1e-9), (got, want)


def test_gradcheck_through_layer_function_with_fixed_gate():
    """gradcheck of the full autograd function in float64 where τ = 0 keeps the gate fixed
    (soft-threshold with no sparsity: ΔW = M·|M|, |M| detached, so compare with M·c for a
    constant c, which gradcheck can differentiate numerically)."""
    layer = _randomised_layer("mix", "soft_threshold", sparsity=0.0).double()
    adapter = layer.primary
    gate = naive_merged(adapter.in_factors, adapter.out_factors, adapter.alpha, adapter.gamma, adapter.beta, "mix").abs().detach()

    def through_function(x, in_factors, out_factors, alpha, gamma, beta):
        return _SnellaLinearFunction.apply(x, layer.base_layer.weight, layer.base_layer.bias, in_factors, out_factors, alpha, gamma, beta, adapter, 1.0)

    def constant_gate(x, in_factors, out_factors, alpha, gamma, beta):
        merged = naive_merged(in_factors, out_factors, alpha, gamma, beta, "mix")
        return torch.nn.functional.linear(x, layer.base_layer.weight + merged * gate, layer.base_layer.bias)

    inputs = tuple(t.detach().clone().requires_grad_() for t in (torch.randn(2, 13, dtype=torch.float64), adapter.in_factors, adapter.out_factors, adapter.alpha, adapter.gamma, adapter.beta))
    assert torch.autograd.gradcheck(constant_gate, inputs)
    upstream = torch.randn(2, 7, dtype=torch.float64)
    got = torch.autograd.grad((through_function(*inputs) * upstream).sum(), inputs)
    want = torch.autograd.grad((constant_gate(*inputs) * upstream).sum(), inputs)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)


def test_zero_distance_gives_finite_gradients():
    config = SnellaConfig(rank=4, target_modules=["x"])
    layer = SnellaLinear(torch.nn.Linear(3, 2), config)
    with torch.no_grad():
        layer.primary.in_factors.zero_()
        layer.primary.out_factors.zero_()
    layer(torch.randn(5, 3)).sum().backward()
    for param in layer.primary.parameters():
        assert torch.isfinite(param.grad).all()

"""W0 + ΔW kept from the forward for the checkpoint recompute and the backward."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from snella_diffusion import SnellaConfig, SnellaConfigError, apply_snella, remove_snella
from snella_diffusion import autograd as autograd_module
from snella_diffusion.forward_cache import kept_weights


def _model(cache_mb, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    apply_snella(model, SnellaConfig(rank=8, target_modules=["0", "2"], init_sparsity=0.5,
                                     forward_cache_mb=cache_mb))
    return model


def _checkpointed_step(model, x):
    output = checkpoint(model, x.requires_grad_(), use_reentrant=False)
    output.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return output.detach(), grads


@pytest.fixture(autouse=True)
def empty_cache():
    kept_weights.clear()
    yield
    kept_weights.clear()


def _count_builds(monkeypatch):
    """Count weight builds in forward and in backward."""
    counts = {"forward": 0, "backward_with_weight": 0}
    build, backward = autograd_module._build_effective, autograd_module.backward_blocked

    def counted_build(*args, **kwargs):
        counts["forward"] += 1
        return build(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        counts["backward_with_weight"] += args[6] is not None  # effective_dtype
        return backward(*args, **kwargs)

    monkeypatch.setattr(autograd_module, "_build_effective", counted_build)
    monkeypatch.setattr(autograd_module, "backward_blocked", counted_backward)
    return counts


def test_cached_checkpointed_step_equals_the_uncached_one_with_one_build_per_layer(monkeypatch):
    x = torch.randn(5, 64)
    plain = _model(0)
    cached = _model(1)
    cached.load_state_dict(plain.state_dict())
    want_output, want_grads = _checkpointed_step(plain, x)
    counts = _count_builds(monkeypatch)
    got_output, got_grads = _checkpointed_step(cached, x)
    assert torch.equal(got_output, want_output)
    for got, want in zip(got_grads, want_grads):
        assert torch.equal(got, want)
    # Two layers: built once each in the first forward; the recompute and the backward reuse it.
    assert counts == {"forward": 2, "backward_with_weight": 0}
    assert kept_weights.held_bytes() == 0  # each backward dropped its entry


def test_without_cache_each_layer_builds_in_forward_recompute_and_backward(monkeypatch):
    counts = _count_builds(monkeypatch)
    _checkpointed_step(_model(0), torch.randn(5, 64))
    assert counts == {"forward": 4, "backward_with_weight": 2}


def _key(snella_layer, x):
    return autograd_module._forward_cache_key(snella_layer.primary, 1.0, x.dtype, snella_layer.base_layer.weight)


def test_full_budget_keeps_the_latest_forward_layers_and_parameter_changes_miss(monkeypatch):
    model = _model(1)
    one_matrix = 96 * 64 * 4
    for snella_layer in (model[0], model[2]):
        snella_layer.primary.forward_cache_bytes = one_matrix  # room for one matrix
    x = torch.randn(5, 64)
    model(x)
    # The second layer evicted the first: the backward reaches it first and frees it soonest.
    assert kept_weights.held_bytes() == one_matrix
    assert kept_weights.lookup(model[0].primary, _key(model[0], x)) is None
    assert kept_weights.lookup(model[2].primary, _key(model[2], x)) is not None
    with torch.no_grad():
        model[2].primary.alpha.add_(0.1)  # like an optimizer step
    assert kept_weights.lookup(model[2].primary, _key(model[2], x)) is None
    counts = _count_builds(monkeypatch)
    model(x)
    assert counts["forward"] == 2  # the stale entry was not used


def test_recompute_inside_backward_evicts_nothing(monkeypatch):
    model = _model(1)
    for snella_layer in (model[0], model[2]):
        snella_layer.primary.forward_cache_bytes = 96 * 64 * 4
    counts = _count_builds(monkeypatch)
    _checkpointed_step(model, torch.randn(5, 64))
    # Forward: both layers built, the second kept. Recompute (in backward): the second is a hit,
    # the first is rebuilt without evicting it; the backward then rebuilds the first's weight.
    assert counts == {"forward": 3, "backward_with_weight": 1}
    assert kept_weights.held_bytes() == 0


def test_negative_budget_is_refused_and_remove_snella_clears():
    with pytest.raises(SnellaConfigError, match="forward_cache_mb"):
        SnellaConfig(forward_cache_mb=-1)
    model = _model(1)
    model(torch.randn(5, 64))
    assert kept_weights.held_bytes() > 0
    remove_snella(model)
    assert kept_weights.held_bytes() == 0


def test_a_forward_cache_object_keeps_its_own_entries_within_the_budget():
    from snella_diffusion.forward_cache import ForwardCache

    cache = ForwardCache()
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    matrix = torch.zeros(8, 8)  # 256 bytes
    assert cache.store(first, ("v", 1), matrix, budget_bytes=512, evict_older=True)
    assert cache.store(second, ("v", 1), matrix.clone(), budget_bytes=512, evict_older=True)
    assert cache.held_bytes() == 512 and kept_weights.held_bytes() == 0
    assert cache.lookup(first, ("v", 2)) is None and cache.lookup(first, ("v", 1)) is matrix
    assert not cache.store(first, ("v", 2), torch.zeros(16, 16), budget_bytes=512, evict_older=False)
    assert cache.held_bytes() == 256  # the old entry of ``first`` was replaced, the new one did not fit
    cache.drop(second)
    assert cache.held_bytes() == 0

import pytest
import torch
from torch import nn

from snella_diffusion import SnellaConfig, SnellaError, SnellaLinear, apply_snella


def _config(**overrides):
    return SnellaConfig(**{"rank": 8, "target_modules": ["x"], **overrides})


def test_attributes_and_shapes():
    layer = SnellaLinear(nn.Linear(20, 12), _config(rank=8, init_sparsity=0.25))
    assert layer.in_factors.shape == (2, 20, 4)
    assert layer.out_factors.shape == (2, 12, 4)
    assert layer.alpha.item() == 1.0 and layer.gamma.item() == 1.0 and layer.beta.item() == 0.0
    assert layer.delta_weight().shape == (12, 20)
    assert abs(layer.sparsity.item() - 0.25) < 1e-7
    names = dict(layer.named_buffers())
    assert {"adapters.default.sparsity", "adapters.default.threshold"} <= set(names)
    factor_count = layer.in_factors.numel() + layer.out_factors.numel()
    assert factor_count == 8 * (20 + 12)  # LoRA-8's parameter count


def test_init_is_near_zero_but_not_zero():
    torch.manual_seed(0)
    base = nn.Linear(320, 320)
    layer = SnellaLinear(base, _config(rank=32))
    x = torch.randn(4, 320)
    delta = layer.delta_weight()
    assert 0 < delta.abs().max() < 1e-4
    relative = (layer(x) - base(x)).norm() / base(x).norm()
    assert relative < 0.01


def test_merged_and_parallel_modes_agree_and_buffers_follow_to():
    torch.manual_seed(1)
    base = nn.Linear(16, 24)
    merged = SnellaLinear(base, _config(forward_mode="merged", init_sparsity=0.5))
    with torch.no_grad():
        merged.primary.in_factors.normal_()
        merged.primary.out_factors.normal_()
    parallel = SnellaLinear(nn.Linear(16, 24), _config(forward_mode="parallel", init_sparsity=0.5))
    parallel.load_state_dict(merged.state_dict())
    x = torch.randn(3, 5, 16)
    assert torch.allclose(merged(x), parallel(x), atol=1e-5)
    merged.double()
    assert merged.primary.threshold.dtype == torch.float64
    assert merged.primary.drop_count.dtype == torch.int64


def test_base_weights_keep_their_dtype_and_delta_is_float32():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = SnellaLinear(base, _config())
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.in_factors.dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.in_factors.grad.dtype == torch.float32 and torch.isfinite(layer.in_factors.grad).all()
    assert layer.base_layer.weight.grad is None


def test_no_dense_tensor_is_saved_between_forward_and_backward():
    """Only the input, the frozen base weight, the factors, scalars and τ are saved."""
    out_features, in_features = 512, 384
    layer = SnellaLinear(nn.Linear(in_features, out_features), _config(rank=16, init_sparsity=0.5))
    x = torch.randn(4, in_features)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = layer(x)
    fresh_dense = [
        t for t in saved
        if t.numel() >= out_features * in_features and t.data_ptr() != layer.base_layer.weight.data_ptr()
    ]
    assert fresh_dense == []
    output.sum().backward()
    assert layer.in_factors.grad is not None


def test_threshold_selected_once_per_parameter_version(monkeypatch):
    import snella_diffusion.adapter as adapter_module

    calls = []
    original = adapter_module.select_threshold
    monkeypatch.setattr(adapter_module, "select_threshold", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer = SnellaLinear(nn.Linear(8, 8), _config(init_sparsity=0.5))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):  # three micro-batches: one selection
        layer(torch.randn(2, 8)).sum().backward()
    assert len(calls) == 1
    optimizer.step()
    layer(torch.randn(2, 8)).sum().backward()
    assert len(calls) == 2


def test_toy_regression_loss_decreases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    target_model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    y = target_model(x).detach()
    apply_snella(model, SnellaConfig(rank=8, target_modules=["0", "2"], init_sparsity=0.3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_dropout_and_drop_path_only_in_parallel_training():
    torch.manual_seed(0)
    layer = SnellaLinear(nn.Linear(8, 8), _config(forward_mode="parallel", adapter_dropout=0.5, drop_path=0.5))
    with torch.no_grad():
        layer.primary.out_factors.normal_()
    x = torch.randn(16, 8)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_wrapping_a_non_linear_is_refused():
    with pytest.raises(SnellaError, match="Conv2d"):
        SnellaLinear(nn.Conv2d(3, 3, 1), _config())


def test_wraps_linear_subclasses_and_keeps_their_weights():
    class ScaledLinear(nn.Linear):
        """Stands for diffusers/transformers subclasses of nn.Linear."""

    base = ScaledLinear(6, 4)
    model = nn.Sequential(base)
    layers = apply_snella(model, _config(target_modules=["0"]))
    assert layers["0"].base_layer is base
    assert layers["0"].weight is base.weight
    assert not base.weight.requires_grad


def _trained_layer(in_features=20, out_features=12, seed=0):
    torch.manual_seed(seed)
    layer = SnellaLinear(nn.Linear(in_features, out_features), _config(init_sparsity=0.3))
    with torch.no_grad():
        layer.primary.out_factors.normal_(std=0.5)
    return layer


def test_inference_delta_cache_methods_measure_free_and_switch_off_the_cache():
    layer = _trained_layer()
    x = torch.randn(3, 20)
    with torch.no_grad():
        want = layer.base_layer(x) + x @ layer.delta_weight().T
        assert layer.delta_cache_bytes() == 0
        assert torch.allclose(layer(x), want, atol=1e-6)
        assert layer.delta_cache_bytes() == 12 * 20 * 4  # one float32 (m, n) matrix
        layer.release_delta_cache()
        assert layer.delta_cache_bytes() == 0
        layer(x)
        layer.set_inference_delta_caching(False)  # frees the cache now
        assert layer.delta_cache_bytes() == 0 and not layer.cache_inference_delta
        assert torch.equal(layer(x), layer(x)) and layer.delta_cache_bytes() == 0
        layer.set_inference_delta_caching(True)
        layer(x)
        assert layer.delta_cache_bytes() == 12 * 20 * 4


def test_fuse_remove_and_unwrap_are_layer_methods_that_restore_w0_bit_for_bit():
    layer = _trained_layer()
    layer.add_adapter("second", _config(init_sparsity=0.5))
    with torch.no_grad():
        layer.adapters["second"].out_factors.normal_(std=0.5)
    w0 = layer.base_layer.weight.detach().clone()
    first, second = layer.delta_weight("default"), layer.delta_weight("second")
    layer.fuse_adapters(scale=0.5)
    assert layer.fused_adapters == {"default": 0.5, "second": 0.5}
    assert torch.equal(layer.pristine_weight, w0)
    assert torch.allclose(layer.base_layer.weight, w0 + 0.5 * first + 0.5 * second, atol=1e-6)
    layer.remove_adapter("second")  # its ΔW leaves the weight, the other stays fused
    assert layer.fused_adapters == {"default": 0.5} and list(layer.adapters) == ["default"]
    assert torch.equal(layer.base_layer.weight, (w0 + 0.5 * first))
    base = layer.unwrap()
    assert base is layer.base_layer and torch.equal(base.weight, w0)
    assert layer.fused_adapters == {} and layer.pristine_weight is None


def test_weights_fused_without_a_kept_w0_refuse_restoring_and_unwrap_keeps_them():
    from snella_diffusion import UnfuseError

    layer = _trained_layer()
    layer.fuse_adapters(keep_original=False)
    fused = layer.base_layer.weight.detach().clone()
    with pytest.raises(UnfuseError, match="layer enc.0: adapters were fused with keep_original=False"):
        layer.restore_base_weight("enc.0")
    with pytest.raises(UnfuseError, match="adapter 'default' was fused"):
        layer.check_removable("default", "enc.0")
    assert torch.equal(layer.unwrap("enc.0").weight, fused)


def test_no_module_outside_the_layer_writes_its_state():
    """Fuse state, the inference ΔW cache and the disabled switch are written by SnellaLinear's
    methods only: no other module of the package assigns to those attributes."""
    import ast
    from pathlib import Path

    import snella_diffusion

    owned = {"fused_adapters", "fused_delta_energy", "unfused_weight", "unfused_weight_cpu",
             "original_discarded", "_delta_cache", "_cache_inference_delta", "cache_inference_delta", "disabled"}
    package = Path(snella_diffusion.__file__).parent
    writes = []
    for path in package.rglob("*.py"):
        if path.name == "layer.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in owned:
                    writes.append(f"{path.relative_to(package)}:{node.lineno} .{target.attr}")
    assert writes == []

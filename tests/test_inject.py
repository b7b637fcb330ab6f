import pytest
import torch
from torch import nn

from snella_diffusion import SnellaConfig, SnellaError, SnellaLinear, apply_snella, remove_snella, snella_layers
from snella_diffusion.testing.reference_configs import build_reference_model
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline


@pytest.mark.parametrize(
    "model_name, preset, expected",
    [("sd15", "unet", 160), ("sdxl", "unet", 700), ("sd3", "dit", 285), ("flux", "dit", 418), ("vit-b16", "vit", 72)],
)
def test_preset_counts_on_meta_models_from_real_configs(model_name, preset, expected):
    model = build_reference_model(model_name, device="meta")
    layers = apply_snella(model, SnellaConfig(rank=32, target_modules=preset))
    assert len(layers) == expected
    assert all(layer.in_factors.is_meta for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    expected_factor_params = sum(32 * (l.in_features + l.out_features) for l in layers.values())
    assert sum(model.get_parameter(n).numel() for n in trainable if "factors" in n) == expected_factor_params


def test_flux_parameter_count_is_12b_on_meta():
    model = build_reference_model("flux", device="meta")
    assert 11.5e9 < sum(p.numel() for p in model.parameters()) < 12.5e9


def test_apply_then_remove_restores_modules_and_outputs():
    torch.manual_seed(0)
    unet = tiny_sd_pipeline().unet
    originals = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    sample = torch.randn(1, 4, 16, 16)
    hidden = torch.randn(1, 7, 32)
    with torch.no_grad():
        before = unet(sample, 10, hidden).sample
    layers = apply_snella(unet, SnellaConfig(rank=4, target_modules="unet"))
    assert len(layers) == 60  # 6 transformer blocks (2 down, 1 mid, 3 up) × 10 linears
    for layer in layers.values():
        with torch.no_grad():
            layer.primary.out_factors.normal_()
    with torch.no_grad():
        changed = unet(sample, 10, hidden).sample
    assert not torch.allclose(changed, before)
    remove_snella(unet)
    assert snella_layers(unet) == {}
    for name, module in unet.named_modules():
        if name in originals:
            assert module is originals[name]
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, hidden).sample, before)


def test_explicit_lists_regex_and_exclusions():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    layers = apply_snella(model, SnellaConfig(rank=2, target_modules=[r"2\.\d"], exclude_modules=["2.1"]))
    assert list(layers) == ["2.0"]
    assert isinstance(model[2][0], SnellaLinear) and isinstance(model[2][1], nn.Linear)
    assert not model[0].weight.requires_grad


def test_errors_name_what_is_wrong():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SnellaError, match="matched no nn.Linear"):
        apply_snella(model, SnellaConfig(rank=2, target_modules=["nothing_here"]))
    with pytest.raises(SnellaError, match="not a preset"):
        apply_snella(model, SnellaConfig(rank=2, target_modules="unett"))
    apply_snella(model, SnellaConfig(rank=2, target_modules=["0"]))
    with pytest.raises(SnellaError, match="already exists"):
        apply_snella(model, SnellaConfig(rank=2, target_modules=["0"]))
    second = apply_snella(model, SnellaConfig(rank=2, target_modules=["0"]), adapter_name="second")
    assert list(second["0"].adapters) == ["default", "second"]

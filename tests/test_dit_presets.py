"""The "dit" preset on real DiT shapes: layer counts on meta-device SD3-medium and Flux.1-dev,
block filters, and one SNELLA training step on a Flux-sized single-stream block whose
``proj_out`` (3072 x 15360) has more than 2^24 entries."""

import pytest
import torch
from torch import nn

from snella_diffusion import SnellaConfig, apply_snella, snella_layers
from snella_diffusion.testing.reference_configs import build_reference_model


@pytest.fixture(scope="module")
def flux_meta():
    return build_reference_model("flux", device="meta")


def test_dit_preset_counts_on_sd3_medium():
    layers = apply_snella(build_reference_model("sd3", device="meta"), SnellaConfig(rank=4, target_modules="dit"))
    # 24 joint blocks x 12 linears, minus the last block's context output and context MLP
    assert len(layers) == 285
    assert not any("to_add_out" in name for name in layers if name.startswith("transformer_blocks.23."))


def test_dit_preset_counts_on_flux_dev(flux_meta):
    layers = apply_snella(flux_meta, SnellaConfig(rank=4, target_modules="dit"))
    double = [name for name in layers if name.startswith("transformer_blocks.")]
    single = [name for name in layers if name.startswith("single_transformer_blocks.")]
    assert (len(layers), len(double), len(single)) == (418, 19 * 12, 38 * 5)
    assert layers["single_transformer_blocks.0.proj_out"].in_features == 15360


def test_block_filters_restrict_the_preset():
    model = build_reference_model("flux", device="meta")
    double_only = SnellaConfig(rank=4, target_modules="dit", exclude_modules=[r"single_transformer_blocks\..*"])
    assert len(apply_snella(model, double_only)) == 228
    model = build_reference_model("flux", device="meta")
    mixed = SnellaConfig(rank=4, target_modules=[r"single_transformer_blocks\.[0-3]\.proj_(?:mlp|out)", "transformer_blocks.0.attn.to_q"])
    assert sorted(apply_snella(model, mixed)) == sorted(
        [f"single_transformer_blocks.{i}.proj_{kind}" for i in range(4) for kind in ("mlp", "out")]
        + ["transformer_blocks.0.attn.to_q"]
    )


@pytest.mark.parametrize(
    "targets, count, first",
    [
        (["dit@double"], 19 * 12, "transformer_blocks.0.attn.add_k_proj"),
        (["dit@single"], 38 * 5, "single_transformer_blocks.0.attn.to_k"),
        (["dit@double:0-1", "dit@single:37"], 2 * 12 + 5, "single_transformer_blocks.37.attn.to_k"),
        ([r"dit@transformer_blocks\.1[0-8]"], 9 * 12, "transformer_blocks.10.attn.add_k_proj"),
    ],
)
def test_script_block_filters_select_preset_layers_inside_blocks(targets, count, first):
    from snella_diffusion.families.dit import expand_block_filters

    layers = apply_snella(
        build_reference_model("flux", device="meta"), SnellaConfig(rank=4, target_modules=expand_block_filters(targets))
    )
    assert len(layers) == count and sorted(layers)[0] == first
    assert all(not name.endswith("norm1.linear") for name in layers)


def test_block_filter_errors_name_the_item():
    from snella_diffusion import SnellaError
    from snella_diffusion.families.dit import expand_block_filters

    with pytest.raises(SnellaError, match="'dat@double'.*not a preset"):
        expand_block_filters(["dat@double"])
    with pytest.raises(SnellaError, match="'dit@double:a-b'"):
        expand_block_filters(["dit@double:a-b"])
    assert expand_block_filters(["dit", "proj_out"]) == ["dit", "proj_out"]


class _SingleBlockHolder(nn.Module):
    """Gives the block the qualified names it has inside FluxTransformer2DModel."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.single_transformer_blocks = nn.ModuleList([block])


@pytest.mark.slow
def test_flux_sized_single_block_trains_one_step_with_bf16_base():
    """The "dit" preset's Flux-specific layers (the attention projections are the same code
    as in small models and are left out to keep this CPU test at ~15 s)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    with torch.device("meta"):
        block = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model = _SingleBlockHolder(block)
    config = SnellaConfig(rank=8, target_modules="dit", exclude_modules=[r".*\.attn\..*"], init_sparsity=0.5)
    layers = apply_snella(model, config)
    assert sorted(name.rsplit(".", 1)[-1] for name in layers) == ["proj_mlp", "proj_out"]
    big = layers["single_transformer_blocks.0.proj_out"]
    assert big.out_features * big.in_features > 2**24
    assert big.in_factors.dtype == torch.float32 and big.base_layer.weight.dtype == torch.bfloat16

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    before = big.out_factors.detach().clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    hidden = torch.randn(1, 4, 3072, dtype=torch.bfloat16)
    context = torch.randn(1, 2, 3072, dtype=torch.bfloat16)
    temb = torch.randn(1, 3072, dtype=torch.bfloat16)
    _, output = block(hidden, context, temb)
    assert output.shape == (1, 4, 3072) and output.dtype == torch.bfloat16
    output.float().pow(2).mean().backward()
    assert big.out_factors.grad is not None and torch.isfinite(big.out_factors.grad).all()
    assert big.in_factors.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(big.out_factors.detach(), before)
    # the exact top-k on 47M entries: half of ΔW removed (entries tied with τ go too, so a
    # handful more may be zero; never fewer)
    delta = big.delta_weight()
    surplus = int((delta == 0).sum()) - round(0.5 * delta.numel())
    assert 0 <= surplus <= 1000
    assert len(snella_layers(model)) == 2

"""benchmarks/memory_table.py: its weight accounting equals the bytes the quantization backends
really store on a tiny Flux transformer (bf16, fp8 layerwise casting, torchao int8, bitsandbytes
nf4), swapping N of M equal blocks removes N/M of the block weights (and equals what BlockSwap
homes in CPU memory), its activation measurement counts what autograd saves, and the measured
bytes grow linearly with the token count (no tokens × tokens attention matrix)."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch import nn

from snella_diffusion.block_swap import BlockSwap
from snella_diffusion.testing.reference_configs import build_reference_model
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline
from snella_diffusion.training.quantized_base import QuantizationSettings, quantize_denoiser

pytestmark = pytest.mark.usefixtures("single_thread")

table = load_benchmark("memory_table")
FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def stored_bytes(model: nn.Module) -> int:
    """Bytes every parameter of ``model`` really stores: a plain tensor's elements, a tensor
    subclass's inner tensors (torchao), a bitsandbytes Params4bit's packed data and quant state."""

    def of(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            return sum(of(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        total = tensor.data.numel() * tensor.data.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += sum(of(part) for part in (state.absmax, state.code, state.offset))
            total += of(state.state2.absmax) + of(state.state2.code)
        return total

    return sum(of(parameter) for parameter in model.parameters())


@pytest.mark.parametrize("quantization", ["bf16", "fp8", "int8", "nf4"])
def test_weight_accounting_equals_the_bytes_the_backends_store(quantization):
    if quantization == "int8":
        pytest.importorskip("torchao")
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    model = tiny_flux_pipeline(0).transformer.to(torch.bfloat16)
    accounted = table.weight_account(model, quantization, FLUX_BLOCKS)
    if quantization != "bf16":
        quantize_denoiser(model, QuantizationSettings(quantize_base=quantization), torch.bfloat16)
    assert accounted.total == stored_bytes(model)
    assert accounted.total > 0 and len(accounted.blocks) == 2
    plain = sum(p.numel() for p in model.parameters()) if quantization == "bf16" else None
    if plain is not None:
        assert accounted.total == 2 * plain


def test_swapping_n_of_m_blocks_removes_n_over_m_of_the_block_weights():
    model = build_reference_model("qwen-image", device="cpu", num_layers=4, num_attention_heads=2,
                                  attention_head_dim=16, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    model.to(torch.bfloat16).requires_grad_(False)
    account = table.weight_account(model, "bf16", ("transformer_blocks",))
    assert len(set(account.blocks)) == 1 and len(account.blocks) == 4
    blocks = sum(account.blocks)
    for swapped in range(5):
        assert account.swapped_away(swapped) * 4 == blocks * swapped
        in_flight = min(swapped, 2) * account.blocks[0]
        assert account.on_device(swapped) == account.total - blocks * swapped // 4 + in_flight
    swap = BlockSwap(model, list(model.transformer_blocks), 3, "cpu")
    swap.attach()
    assert swap.home_bytes() == account.swapped_away(3)


def test_saved_bytes_counts_what_autograd_keeps_for_the_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    outside, per_block = table.saved_bytes(model, lambda: model(x), [model[1]])
    # frozen linears save only their weights (parameters, not counted); GELU saves its input
    # (5 × 16 float32) inside the "block"; nothing else is kept
    assert (outside, per_block) == (0, [5 * 16 * 4])
    model[0].weight.requires_grad_(True)
    outside, per_block = table.saved_bytes(model, lambda: model(x), [model[1]])
    assert (outside, per_block) == (5 * 8 * 4, [5 * 16 * 4])  # the first linear now saves x for its weight's gradient


def test_saved_activations_grow_linearly_with_tokens_and_scale_with_width():
    row = table.MODELS["qwen-image"]
    fit = table.measure_activations(row)
    assert fit.residual < 1e-9
    outside, block = fit.at(4096, 8)
    assert block == pytest.approx(8 * (fit.block[0] + fit.block[1] * 4096))
    # one narrowed block keeps 10-100 bf16 values per token per width unit (attention, MLP, norms)
    width = row.narrow["num_attention_heads"] * 128
    assert 10 < fit.block[1] / (2 * width) < 100

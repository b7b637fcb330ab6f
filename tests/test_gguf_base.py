"""SNELLA over a GGUF denoiser checkpoint (issue 23): the tiny Flux transformer written by the
test to a GGUF file (Q8_0 blocks for every 2-D weight whose rows split into 32-value blocks,
F32 for the rest, under diffusers' own key names) and loaded as diffusers loads one
(``from_single_file`` with ``GGUFQuantizationConfig``).

The adapted layers compute base(x) + x·ΔWᵀ with the base product through diffusers'
``GGUFLinear``; the reference here dequantizes the file's blocks with the ``gguf`` package itself
(not diffusers), and the blocks keep their bytes through forward, backward and optimizer steps.
The DreamBooth script trains with ``--pretrained_denoiser_file`` and its adapter loads into the
unquantized pipeline.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn
from script_runs import run_dreambooth, tiny_flux_flags
from test_quantized_base import flux_call

from snella_diffusion import SnellaConfig, SnellaError, apply_snella, load_snella, read_snella_file
from snella_diffusion.fuse import fuse_snella
from snella_diffusion.layer import SnellaLinear
from snella_diffusion.single_file import DenoiserFileError, check_single_file_class, load_gguf_denoiser
from snella_diffusion.testing.gguf_files import Q8_0_BLOCK, write_q8_0_checkpoint
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
# max|adapted − (base(x) + x·ΔWᵀ in float32)| / max|base(x) + x·ΔWᵀ| per compute dtype (as in
# test_quantized_base: bf16 rounds x·ΔWᵀ and the sum once each; float32 differs in order only)
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny Flux pipeline folder, the GGUF file of its transformer)."""
    folder = tmp_path_factory.mktemp("gguf")
    pipe = tiny_flux_pipeline(seed=0)
    pipe.save_pretrained(folder / "flux")
    write_q8_0_checkpoint(pipe.transformer.state_dict(), folder / "transformer-Q8_0.gguf")
    return folder / "flux", folder / "transformer-Q8_0.gguf"


def gguf_flux(flux_files, compute_dtype: torch.dtype) -> nn.Module:
    folder, path = flux_files
    return load_gguf_denoiser(FluxTransformer2DModel, str(path), str(folder), "transformer", compute_dtype)


def packed_blocks(weight: Tensor) -> Tensor:
    """A copy of the uint8 blocks a ``GGUFParameter`` stores ``(m, bytes per row)``."""
    return weight.as_tensor().detach().clone()


def dequantized(weight: Tensor) -> Tensor:
    """W0 ``(m, n)`` float32, dequantized from the stored blocks by the gguf package (scale·q,
    exact in float32: an 11-bit float16 scale times an 8-bit integer)."""
    return torch.from_numpy(gguf.quants.dequantize(packed_blocks(weight).numpy(), Q8_0).astype(np.float32))


def multiplied_weight(weight: Tensor) -> Tensor:
    """The W0 ``(m, n)`` that diffusers' ``GGUFLinear`` multiplies by, in float32: its Q8_0
    dequantization runs in float16, so scale·q rounded to float16 (at most 2^-11 relative from
    ``dequantized``)."""
    return dequantized(weight).half().float()


def adapted(flux_files, compute_dtype: torch.dtype) -> tuple[nn.Module, dict[str, SnellaLinear]]:
    model = gguf_flux(flux_files, compute_dtype)
    layers = apply_snella(model, SnellaConfig(rank=4, target_modules="dit", init_sparsity=0.5))
    with torch.no_grad():  # factors away from their initialization, so ΔW is not tiny
        generator = torch.Generator().manual_seed(2)
        for layer in layers.values():
            layer.in_factors.add_(torch.randn(layer.in_factors.shape, generator=generator))
    return model, layers


def snapshot(layers: dict[str, SnellaLinear]) -> dict[str, Tensor]:
    return {name: packed_blocks(layer.base_layer.weight) for name, layer in layers.items()}


def assert_blocks_unchanged(layers: dict[str, SnellaLinear], before: dict[str, Tensor]) -> None:
    for name, blocks in before.items():
        assert torch.equal(packed_blocks(layers[name].base_layer.weight), blocks), f"{name} changed"


def test_the_file_holds_the_model_in_q8_0_blocks(flux_files):
    """diffusers loads the file as GGUFLinear layers over Q8_0 blocks that dequantize to the
    float weights within Q8_0's rounding (a scale of max|row block|/127 per 32 values)."""
    model = gguf_flux(flux_files, torch.float32)
    source = tiny_flux_pipeline(seed=0).transformer.state_dict()
    packed = {name: module for name, module in model.named_modules() if type(module).__name__ == "GGUFLinear"}
    blocked = {key[:-len(".weight")] for key, value in source.items() if value.dim() == 2 and value.shape[1] % Q8_0_BLOCK == 0}
    assert packed.keys() == blocked and len(packed) == 29  # all linears but x_embedder (16 inputs)
    for name, module in packed.items():
        assert module.weight.dtype == torch.uint8 and module.weight.shape[1] == module.in_features // Q8_0_BLOCK * 34
        original = source[f"{name}.weight"].reshape(module.out_features, -1, Q8_0_BLOCK)
        error = (dequantized(module.weight).reshape(original.shape) - original).abs()
        # half a step of the block's scale max|block|/127, plus that scale's float16 rounding
        # (2^-11 relative) times up to 127 steps: at most 0.562 of a step
        step = original.abs().amax(-1, keepdim=True) / 127
        assert 0 < float(error.max()) and float((error / step).max()) < 0.57, name


@pytest.mark.parametrize("dtype_name", sorted(COMPUTE_DTYPES))
def test_layers_add_delta_beside_the_gguf_product_with_float32_reference_gradients(flux_files, dtype_name):
    dtype = COMPUTE_DTYPES[dtype_name]
    model, layers = adapted(flux_files, dtype)
    assert len(layers) == 17 and {layer.base_quantization for layer in layers.values()} == {"GGUF Q8_0"}
    before = snapshot(layers)
    generator = torch.Generator().manual_seed(3)
    for name, layer in layers.items():
        x = torch.randn(5, layer.in_features, generator=generator).to(dtype)
        weight = multiplied_weight(layer.base_layer.weight)
        assert float((weight - dequantized(layer.base_layer.weight)).abs().max()) <= 2**-11 * float(weight.abs().max())
        with torch.no_grad():
            delta = layer.delta_weight()
            base = layer.base_layer(x)
            # the quantized module's product plus x·ΔWᵀ in float32, and the same from W0 read
            # out of the file by the gguf package
            expected = base.float() + x.float() @ delta.T
            from_file = x.float() @ (weight + delta).T + layer.base_layer.bias.float()
            inference = layer(x)
        x.requires_grad_(True)
        training = layer(x)
        scale = float(expected.abs().max())
        assert float((base.float() - expected).abs().max()) / scale > 2 * TOLERANCE[dtype]
        for output in (training, inference):
            assert output.dtype == dtype
            for reference in (expected, from_file):
                error = float((output.detach().float() - reference).abs().max()) / scale
                assert error < TOLERANCE[dtype], f"{name}: {error:.2e}"
        grads = torch.autograd.grad(training.float().square().sum(), [layer.in_factors, layer.out_factors, x])
        upstream = 2 * training.detach().float()
        reference = torch.autograd.grad((upstream * (x.detach().float() @ layer.delta_weight().T)).sum(),
                                        [layer.in_factors, layer.out_factors]) + (upstream @ (weight + delta),)
        for got, want in zip(grads, reference):
            assert float((got.float() - want).norm() / want.norm()) < 2 * TOLERANCE[dtype], name
    assert_blocks_unchanged(layers, before)


def test_training_lowers_the_loss_and_never_writes_the_blocks(flux_files):
    model, layers = adapted(flux_files, torch.float32)
    before = snapshot(layers)
    call = flux_call(model, torch.float32)
    with torch.no_grad():
        target = torch.zeros_like(call())
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    model.train()
    for _ in range(10):
        loss = F.mse_loss(call(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses
    assert not any(p.requires_grad for layer in layers.values() for p in layer.base_layer.parameters())
    assert_blocks_unchanged(layers, before)


def test_fuse_is_refused_and_leaves_the_blocks(flux_files):
    model, layers = adapted(flux_files, torch.float32)
    before = snapshot(layers)
    with pytest.raises(SnellaError, match=r"cannot fuse SNELLA adapters into a quantized base weight \(GGUF Q8_0\)"):
        fuse_snella(model)
    assert_blocks_unchanged(layers, before)


def test_single_file_classes_of_the_families():
    for class_name in ("FluxTransformer2DModel", "Flux2Transformer2DModel", "SD3Transformer2DModel",
                       "QwenImageTransformer2DModel", "ZImageTransformer2DModel"):
        check_single_file_class("diffusers", class_name, "transformer")
    with pytest.raises(DenoiserFileError, match=r"--pretrained_denoiser_file: the pipeline's transformer "
                                                r"\(PixArtTransformer2DModel\) has no single-file loader"):
        check_single_file_class("diffusers", "PixArtTransformer2DModel", "transformer")


def test_denoiser_file_flags_are_checked_with_one_line_errors(flux_files, tmp_path):
    from snella_diffusion.training import run_checks
    from train_scripts.train_dreambooth_snella import parse_args

    _, path = flux_files

    def error(*flags: str) -> str:
        settings = parse_args(["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "images",
                               "--instance_prompt", "sks", *flags])
        with pytest.raises(SnellaError) as raised:
            run_checks.check_quantization_settings(settings.quantization, settings.adapter.method.snella_layers, False)
        return str(raised.value)

    unquantized = tmp_path / "transformer.safetensors"
    assert error("--pretrained_denoiser_file", str(unquantized)) == (
        f"--pretrained_denoiser_file={unquantized}: expected a GGUF checkpoint (a file ending in .gguf)")
    missing = tmp_path / "missing.gguf"
    assert error("--pretrained_denoiser_file", str(missing)) == f"--pretrained_denoiser_file={missing}: no such file"
    assert error("--pretrained_denoiser_file", str(path), "--quantize_base", "fp8") == (
        "--quantize_base=fp8: the denoiser of --pretrained_denoiser_file is already quantized (GGUF); drop one of them")
    assert error("--pretrained_denoiser_file", str(path), "--adapter", "lora") == (
        "--pretrained_denoiser_file: only SNELLA adapters train beside a GGUF-quantized base (--adapter snella)")


@pytest.mark.slow
def test_script_trains_over_a_gguf_denoiser_and_the_adapter_loads_unquantized(flux_files, tmp_path, caplog,
                                                                                 monkeypatch):
    import train_scripts.train_dreambooth_snella as script
    from snella_diffusion.training.data import synthetic_instance_images, write_images

    folder, path = flux_files
    seen = {}
    write_outputs = script.write_outputs

    def recording_outputs(settings, family, config, allocator, rank_drops, losses, *rest):
        seen["losses"] = [loss for _, loss in losses]
        return write_outputs(settings, family, config, allocator, rank_drops, losses, *rest)

    monkeypatch.setattr(script, "write_outputs", recording_outputs)
    images = tmp_path / "images"
    write_images(synthetic_instance_images(count=2, size=64, seed=0), images, "instance")
    with caplog.at_level("INFO"):
        adapter = run_dreambooth([*tiny_flux_flags(folder, images, tmp_path / "out", steps=3),
                                  "--pretrained_denoiser_file", str(path), "--learning_rate", "1e-2"])
    assert f"the denoiser's weights from {path} (GGUF, computed in torch.float32)" in caplog.text
    assert len(seen["losses"]) == 3 and all(np.isfinite(seen["losses"])), seen
    assert (tmp_path / "out" / "validation" / "step_3.png").is_file()
    assert len(read_snella_file(adapter).layers["transformer"]) == 17
    # the adapter on the GGUF model and on the float model it was quantized from agree within
    # Q8_0's rounding, and both move the output away from the base
    quantized, unquantized = gguf_flux(flux_files, torch.float32), tiny_flux_pipeline(0).transformer
    outputs = {}
    for name, model in (("gguf", quantized), ("float", unquantized)):
        call = flux_call(model, torch.float32)
        with torch.no_grad():
            base = call()
            layers = load_snella(model, adapter)
            outputs[name] = (base, call())
        assert len(layers) == 17
    assert all(layer.base_quantization is None for layer in load_snella(tiny_flux_pipeline(0).transformer,
                                                                        adapter).values())
    (gguf_base, gguf_adapted), (float_base, float_adapted) = outputs["gguf"], outputs["float"]
    moved = float((float_adapted - float_base).abs().max())
    assert moved > 1e-3
    assert float(((gguf_adapted - gguf_base) - (float_adapted - float_base)).abs().max()) < 0.05 * moved

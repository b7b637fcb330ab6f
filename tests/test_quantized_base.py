"""SNELLA over quantized frozen bases (issue 23, items 2 and 5) on the tiny Flux transformer.

For each backend that runs here (float8 layerwise casting always; torchao int8 weight-only,
optimum-quanto qint8 and bitsandbytes nf4 where they import), the adapted layer computes
base(x) + x·ΔWᵀ with the base product through the quantized module, training lowers the loss,
the stored (packed) weight keeps its bytes through training, inference, load and unload, the
inference ΔW is cached in the compute dtype, and fusing into a packed weight is refused.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from script_runs import run_dreambooth, tiny_flux_flags
from snella_diffusion import SnellaConfig, SnellaError, apply_snella, save_snella
from snella_diffusion.fuse import fuse_snella as fuse_model
from snella_diffusion.inject import remove_snella
from snella_diffusion.layer import SnellaLinear, snella_layers
from snella_diffusion.loaders import fuse_snella, load_snella_weights, unload_snella_weights
from snella_diffusion.quantized import base_quantization
from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS, TEXT_TOKENS = 16, 8
# max|adapted − (base(x) + x·ΔWᵀ in float32)| / max|base(x) + x·ΔWᵀ| allowed per compute dtype:
# in bf16 x·ΔWᵀ and the sum are each rounded once (2^-9 relative each, and the product's inputs
# are bf16); in float32 only the summation order differs.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _fp8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    model.to(compute_dtype).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def _torchao_int8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    quantization = pytest.importorskip("torchao.quantization")
    model.to(compute_dtype)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())


def _quanto_qint8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    quanto = pytest.importorskip("optimum.quanto")
    model.to(compute_dtype)
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)


def _bitsandbytes_nf4(model: nn.Module, compute_dtype: torch.dtype) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model.to(compute_dtype)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or "transformer_blocks." not in name:
            continue
        packed = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                   compute_dtype=compute_dtype, quant_type="nf4")
        packed.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
        packed.bias = module.bias
        # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit weight in place at its first
        # eval-mode no-grad forward (and needs in_features % 64 == 0 for it): bitsandbytes' own
        # write, not SNELLA's, turned off so the bytes stay comparable.
        packed.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed.to(module.weight.device))


BACKENDS: dict[str, tuple[Callable[[nn.Module, torch.dtype], None], str]] = {
    "fp8": (_fp8, "float8 storage"),
    "torchao_int8": (_torchao_int8, "torchao Int8Tensor"),
    "quanto_qint8": (_quanto_qint8, "optimum-quanto WeightQBytesTensor"),
    "bnb_nf4": (_bitsandbytes_nf4, "bitsandbytes Linear4bit"),
}
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def stored_bytes(weight: Tensor) -> dict[str, Tensor]:
    """Copies of the tensors a (possibly packed) weight stores, by name: a plain weight is
    itself; a tensor subclass (torchao, quanto) is its flattened inner tensors; a bitsandbytes
    ``Params4bit`` is its packed data and its quant state's absmax."""
    if type(weight) in (Tensor, nn.Parameter) or type(weight).__name__ == "Params4bit":
        stored = {"data": weight.data.detach().view(torch.uint8).clone()}
        state = getattr(weight, "quant_state", None)
        if state is not None:
            stored["absmax"] = state.absmax.detach().clone()
        return stored
    names, _ = weight.__tensor_flatten__()
    found: dict[str, Tensor] = {}
    for name in names:
        for inner, tensor in stored_bytes(getattr(weight, name)).items():
            found[f"{name}.{inner}"] = tensor
    return found


def dequantized(base: nn.Module) -> Tensor:
    """The weight ``base`` multiplies by, in float32 ``(m, n)``, from its stored format."""
    weight = base.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(weight) in (Tensor, nn.Parameter):
        return weight.detach().float()
    return weight.dequantize().float()


def snapshot(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    return {name: stored_bytes(layer.base_layer.weight) for name, layer in snella_layers(model).items()}


def assert_bytes_unchanged(model: nn.Module, before: dict[str, dict[str, Tensor]]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, stored in before.items():
        for key, tensor in stored.items():
            assert torch.equal(after[name][key], tensor), f"{name}.{key} changed"


def quantized_flux(backend: str, compute_dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Tensor]]:
    """The tiny Flux transformer quantized by ``backend`` and a call on a fixed batch."""
    quantize, _ = BACKENDS[backend]
    model = tiny_flux_pipeline(seed=0).transformer
    quantize(model, compute_dtype)
    return model, flux_call(model, compute_dtype)


def flux_call(model: nn.Module, compute_dtype: torch.dtype) -> Callable[[], Tensor]:
    """``model``'s prediction on a fixed batch (inputs in ``compute_dtype``)."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, TOKENS, 16, generator=generator).to(compute_dtype)
    context = torch.randn(2, TEXT_TOKENS, 64, generator=generator).to(compute_dtype)
    pooled = torch.randn(2, 32, generator=generator).to(compute_dtype)
    image_ids = torch.zeros(TOKENS, 3)
    image_ids[:, 1] = torch.arange(TOKENS) // 4
    image_ids[:, 2] = torch.arange(TOKENS) % 4

    def call() -> Tensor:
        return model(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=torch.tensor([0.3, 0.8]).to(compute_dtype), img_ids=image_ids,
                     txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.tensor([3.5, 3.5]).to(compute_dtype)).sample

    return call


def adapted(backend: str, compute_dtype: torch.dtype, forward_mode: str = "merged"):
    model, call = quantized_flux(backend, compute_dtype)
    config = SnellaConfig(rank=4, target_modules="dit", init_sparsity=0.5, forward_mode=forward_mode)
    layers = apply_snella(model, config)
    with torch.no_grad():  # factors away from their initialization, so ΔW is not tiny
        generator = torch.Generator().manual_seed(2)
        for layer in layers.values():
            layer.in_factors.add_(torch.randn(layer.in_factors.shape, generator=generator))
    return model, call, layers


@pytest.mark.parametrize("dtype_name", sorted(COMPUTE_DTYPES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_layers_accept_quantized_bases_and_add_delta_beside_the_base_product(backend, dtype_name):
    dtype = COMPUTE_DTYPES[dtype_name]
    model, _, layers = adapted(backend, dtype)
    assert {layer.base_quantization for layer in layers.values()} == {BACKENDS[backend][1]}
    before = snapshot(model)
    generator = torch.Generator().manual_seed(3)
    for name, layer in layers.items():
        x = torch.randn(5, layer.in_features, generator=generator).to(dtype)
        with torch.no_grad():
            delta = layer.delta_weight()
            base = layer.base_layer(x)
            expected = base.float() + x.float() @ delta.T
            inference = layer(x)
        # (c) the inference ΔW is kept in the compute dtype, not the storage dtype
        assert layer._delta_cache[1].dtype == dtype
        x.requires_grad_(True)
        training = layer(x)  # grad on, trainable factors: the training forward
        scale = float(expected.abs().max())
        # the check can fail: leaving x·ΔWᵀ out is far outside the tolerance
        assert float((base.float() - expected).abs().max()) / scale > 2 * TOLERANCE[dtype]
        for output in (training, inference):
            assert output.dtype == dtype
            error = float((output.detach().float() - expected).abs().max()) / scale
            assert error < TOLERANCE[dtype], f"{name}: {error:.2e}"
        # factor gradients equal those of x·ΔWᵀ in float32 (the base does not depend on them)
        # factor gradients equal those of x·ΔWᵀ in float32 (the base does not depend on them); the
        # input gradient is upstream·(W0 + ΔW) with W0 dequantized, in float32
        grads = torch.autograd.grad(training.float().square().sum(), [layer.in_factors, layer.out_factors, x])
        with torch.no_grad():
            upstream = 2 * training.float()
            reference_x = upstream @ (dequantized(layer.base_layer) + delta)
        x_float = x.detach().float()
        reference = torch.autograd.grad((upstream * (x_float @ layer.delta_weight().T)).sum(),
                                        [layer.in_factors, layer.out_factors]) + (reference_x,)
        for got, want in zip(grads, reference):
            assert float((got.float() - want).norm() / want.norm()) < TOLERANCE[dtype] * 2, name
    assert_bytes_unchanged(model, before)


@pytest.mark.parametrize("dtype_name", sorted(COMPUTE_DTYPES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_training_lowers_the_loss_and_never_writes_the_packed_weight(backend, dtype_name):
    dtype = COMPUTE_DTYPES[dtype_name]
    model, call, layers = adapted(backend, dtype)
    before = snapshot(model)
    with torch.no_grad():
        target = torch.zeros_like(call(), dtype=torch.float32)  # the adapters learn to cancel the output
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    model.train()
    for _ in range(10):
        loss = F.mse_loss(call().float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses
    model.eval()
    with torch.no_grad():
        call()
    assert_bytes_unchanged(model, before)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fuse_refuses_naming_the_layer_and_the_quantization(backend):
    model, call, layers = adapted(backend, torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(SnellaError, match=r"layer \S+: cannot fuse SNELLA adapters into a quantized base weight "
                                          + rf"\({BACKENDS[backend][1]}\)"):
        fuse_model(model)
    assert not any(layer.fused_adapters for layer in layers.values())
    assert_bytes_unchanged(model, before)


def test_loaders_run_unfused_on_a_quantized_pipeline_and_unload_restores_it(tmp_path):
    trained, _, layers = adapted("fp8", torch.bfloat16)
    path = save_snella(trained, tmp_path / "adapter.safetensors")
    pipe = tiny_flux_pipeline(seed=0)
    model, call = quantized_flux("fp8", torch.bfloat16)
    pipe.transformer = model
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    original = {name: stored_bytes(module.weight) for name, module in linears.items()}
    with torch.no_grad():
        base_output = call()
    load_snella_weights(pipe, path)
    loaded = snella_layers(model)
    assert loaded.keys() == layers.keys()
    with torch.no_grad():
        adapted_output = call()
    assert not torch.equal(adapted_output, base_output)
    for name, layer in loaded.items():  # the loaded ΔW is the trained one
        assert torch.equal(layer.delta_weight(), layers[name].delta_weight())
        assert layer._delta_cache[1].dtype == torch.bfloat16
    refusal = r"cannot fuse SNELLA adapters into a quantized base weight \(float8 storage\)"
    with pytest.raises(SnellaError, match=refusal):
        fuse_snella(pipe)
    unload_snella_weights(pipe)
    assert not snella_layers(model)
    for name, module in model.named_modules():
        if name in linears:
            assert module is linears[name]
            for key, tensor in original[name].items():
                assert torch.equal(stored_bytes(module.weight)[key], tensor)
    with torch.no_grad():
        assert torch.equal(call(), base_output)


def test_remove_snella_gives_back_the_quantized_module_untouched():
    model, call, layers = adapted("fp8", torch.float32)
    before = snapshot(model)
    bases = {name: layer.base_layer for name, layer in layers.items()}
    with torch.no_grad():
        call()
    remove_snella(model)
    for name, base in bases.items():
        assert model.get_submodule(name) is base
        assert base_quantization(base) == "float8 storage"
        for key, tensor in before[name].items():
            assert torch.equal(stored_bytes(base.weight)[key], tensor)


class PackedWeight(Tensor):
    """An unknown packed weight format: a tensor subclass no backend here knows."""


def test_unknown_packed_types_are_refused_by_name():
    unknown = nn.Linear(8, 8)
    unknown.weight = nn.Parameter(torch.zeros(8, 8).as_subclass(PackedWeight), requires_grad=False)
    with pytest.raises(SnellaError, match=r"layer '0' is a quantized linear, Linear \(weight PackedWeight\)"):
        apply_snella(nn.Sequential(unknown), SnellaConfig(rank=2, target_modules=["0"]))
    integer = nn.Linear(8, 8)
    integer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SnellaError, match=r"layer '0' is a quantized linear, Linear \(weight dtype torch.int8\)"):
        apply_snella(nn.Sequential(integer), SnellaConfig(rank=2, target_modules=["0"]))


def test_inference_delta_follows_the_autocast_dtype_over_float8_storage():
    model, call, layers = adapted("fp8", torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        call()
    assert {layer._delta_cache[1].dtype for layer in layers.values()} == {torch.bfloat16}
    with torch.no_grad():
        call()
    assert {layer._delta_cache[1].dtype for layer in layers.values()} == {torch.float32}


def test_float_weights_keep_the_merged_path():
    linear = nn.Linear(8, 6)
    layer = SnellaLinear(linear, SnellaConfig(rank=2, target_modules=["0"]))
    assert layer.base_quantization is None
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = linear(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer(x)
    assert layer._delta_cache[1].dtype == torch.float32


# --- the DreamBooth script's --quantize_base ----------------------------------------------------

@pytest.mark.slow
def test_script_trains_over_an_fp8_base_and_the_adapter_loads_unquantized(tmp_path, caplog):
    from snella_diffusion import load_snella, read_snella_file
    from snella_diffusion.training.data import synthetic_instance_images, write_images

    pipe_folder, images = tmp_path / "flux", tmp_path / "images"
    tiny_flux_pipeline(0).save_pretrained(pipe_folder)
    write_images(synthetic_instance_images(count=2, size=64, seed=0), images, "instance")
    with caplog.at_level("INFO"):
        adapter = run_dreambooth([*tiny_flux_flags(pipe_folder, images, tmp_path / "out"), "--quantize_base", "fp8"])
    assert "the denoiser's 25 linears stored as fp8 (diffusers), computed in torch.float32" in caplog.text
    assert (tmp_path / "out" / "validation" / "step_2.png").is_file()
    stored = read_snella_file(adapter)
    assert len(stored.layers["transformer"]) == 17
    unquantized = tiny_flux_pipeline(0).transformer  # the weights the run quantized, in float32
    call = flux_call(unquantized, torch.float32)
    with torch.no_grad():
        before = call()
        layers = load_snella(unquantized, adapter)
        after = call()
    assert len(layers) == 17 and all(layer.base_quantization is None for layer in layers.values())
    assert float((after - before).abs().max()) > 1e-5


def _flag_error(*flags: str, cuda: bool = False, monkeypatch=None) -> str:
    from snella_diffusion.training import run_checks
    from train_scripts.train_dreambooth_snella import parse_args

    settings = parse_args(["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "images",
                           "--instance_prompt", "sks", *flags])
    with pytest.raises(run_checks.TrainingSetupError) as error:
        run_checks.check_quantization_settings(settings.quantization, settings.adapter.method.snella_layers, cuda)
    return str(error.value)


def test_quantize_flags_are_checked_with_one_line_errors(monkeypatch):
    from snella_diffusion.training import run_checks

    assert _flag_error("--quantize_base", "nf4", cuda=False) == (
        "--quantize_base=nf4: bitsandbytes 4-bit training needs a CUDA GPU and this run has none; use fp8 or int8")
    assert _flag_error("--quantize_base", "int8", "--quantize_backend", "bitsandbytes") == (
        "--quantize_backend=bitsandbytes: cannot do --quantize_base=int8 (use torchao or quanto)")
    assert _flag_error("--quantize_backend", "torchao") == (
        "--quantize_backend=torchao: needs --quantize_base or --quantize_text_encoder")
    assert _flag_error("--quantize_base", "fp8", "--adapter", "full") == (
        "--quantize_base=fp8: only SNELLA adapters train beside a quantized base (--adapter snella)")
    monkeypatch.setattr(run_checks, "_installed", lambda module: module != "optimum.quanto")
    assert _flag_error("--quantize_base", "int8", "--quantize_backend", "quanto") == (
        "--quantize_base=int8: the quanto backend is not installed (pip install 'snella-diffusion[quantization]')")
    settings = run_checks.QuantizationSettings(quantize_base="int8")
    assert settings.backend == "torchao"
    run_checks.check_quantization_settings(settings, True, False)  # torchao int8 runs on the CPU


def test_snella_linear_applies_float8_weights_beside_delta_and_refuses_packed_ones():
    from snella_diffusion.layer import snella_linear

    layer = SnellaLinear(nn.Linear(8, 6), SnellaConfig(rank=2, target_modules=["0"]))
    adapter = layer.adapters["default"]
    stored = layer.base_layer.weight.detach().to(torch.float8_e4m3fn)
    bytes_before = stored.view(torch.uint8).clone()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = x @ (stored.float() + layer.delta_weight()).T
    # float32 products over a float8 weight: no W0 + ΔW sum in the float8 dtype (it used to fail
    # with "Promotion for Float8 Types is not supported")
    output = snella_linear(x, adapter, stored)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    output.sum().backward()
    assert adapter.in_factors.grad is not None
    assert torch.equal(stored.view(torch.uint8), bytes_before)
    packed = torch.zeros(6, 8).as_subclass(PackedWeight)
    with pytest.raises(SnellaError, match=r"snella_linear: the base weight is packed \(PackedWeight"):
        snella_linear(x, adapter, packed)

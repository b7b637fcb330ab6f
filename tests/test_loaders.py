"""Pipeline loaders: load / weight / fuse / unfuse / disable / unload on tiny SD and SDXL
pipelines, the custom pipeline, and every error case leaving the pipeline untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from snella_diffusion import SnellaConfig, SnellaError, SnellaFormatError, apply_snella, save_snella
from snella_diffusion import loaders
from snella_diffusion.layer import SnellaAdapter, SnellaLinear, snella_layers
from snella_diffusion.loaders import (
    disable_snella,
    enable_snella,
    fuse_snella,
    get_active_snella_adapters,
    load_snella_weights,
    set_snella_adapters,
    unfuse_snella,
    unload_snella_weights,
)
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

CUSTOM_PIPELINE = str(Path(__file__).resolve().parents[1] / "pipelines" / "snella_pipeline")


pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed_adapter(models: dict, path: Path, seed: int, rank: int = 4) -> Path:
    """apply_snella on each component, random perturbations of the factors, save_snella."""
    generator = torch.Generator().manual_seed(seed)
    for component, model in models.items():
        preset = "unet" if component == "unet" else "text_encoder"
        layers = apply_snella(model, SnellaConfig(rank=rank, target_modules=preset, init_sparsity=0.4))
        with torch.no_grad():
            for layer in layers.values():
                for factors in (layer.in_factors, layer.out_factors):
                    factors.add_(torch.randn(factors.shape, generator=generator))
    return save_snella(models, path, base_model="tiny-sd")


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    sd, sd2, sdxl = tiny_sd_pipeline(0), tiny_sd_pipeline(0), tiny_sdxl_pipeline(0)
    return {
        "a": perturbed_adapter({"unet": sd.unet, "text_encoder": sd.text_encoder}, folder / "a.safetensors", 1),
        "b": perturbed_adapter({"unet": sd2.unet}, folder / "b" / "snella_weights.safetensors", 2),
        "xl": perturbed_adapter(
            {"unet": sdxl.unet, "text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2},
            folder / "xl.safetensors", 3,
        ),
    }


@pytest.fixture
def pipe():
    pipeline = tiny_sd_pipeline(0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


INPUT_GENERATOR = torch.Generator().manual_seed(123)
LATENTS = torch.randn(1, 4, 16, 16, generator=INPUT_GENERATOR)
CONTEXT = torch.randn(1, 7, 32, generator=INPUT_GENERATOR)
TOKENS = torch.tensor([[0, 70, 71, 72, 1, 1, 1]])


@torch.no_grad()
def outputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet noise prediction and text-encoder hidden states on fixed inputs."""
    dtype = pipeline.unet.dtype
    noise = pipeline.unet(LATENTS.to(dtype), 10, CONTEXT.to(dtype)).sample
    hidden = pipeline.text_encoder(TOKENS).last_hidden_state
    return noise.float(), hidden.float()


def generate(pipeline, steps: int = 2):
    generator = torch.Generator().manual_seed(0)
    return pipeline("a cat", num_inference_steps=steps, height=32, width=32, generator=generator, output_type="np").images


def snapshot(pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every component, plus the module layout and requires_grad flags."""
    state = {}
    for name in ("unet", "text_encoder", "vae"):
        model = getattr(pipeline, name)
        state[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state[name + ".modules"] = [(n, type(m).__name__) for n, m in model.named_modules()]
        state[name + ".grad"] = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return state


def assert_same_state(pipeline, expected) -> None:
    current = snapshot(pipeline)
    assert current.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert current[key].keys() == value.keys(), key
            for name, tensor in value.items():
                assert current[key][name].dtype == tensor.dtype
                assert torch.equal(current[key][name], tensor), f"{key}.{name} changed"
        else:
            assert current[key] == value, key


def test_load_fuse_unfuse_unload_round_trip(pipe, adapter_files):
    state = snapshot(pipe)
    base_noise, base_hidden = outputs(pipe)
    base_image = generate(pipe)

    name = load_snella_weights(pipe, adapter_files["a"])
    assert name == "default_0" and get_active_snella_adapters(pipe) == ["default_0"]
    assert len(snella_layers(pipe.unet)) == 60 and len(snella_layers(pipe.text_encoder)) == 12
    noise, hidden = outputs(pipe)
    assert (noise - base_noise).abs().max() > 1e-3 and (hidden - base_hidden).abs().max() > 1e-3
    image = generate(pipe)
    assert abs(image - base_image).max() > 1e-3

    for _ in range(3):
        assert fuse_snella(pipe) == 72
        fused_noise, fused_hidden = outputs(pipe)
        torch.testing.assert_close(fused_noise, noise, rtol=0, atol=1e-5)
        torch.testing.assert_close(fused_hidden, hidden, rtol=0, atol=1e-5)
        assert unfuse_snella(pipe) == 72
        for key, layer in snella_layers(pipe.unet).items():
            assert torch.equal(layer.base_layer.weight, state["unet"][key + ".weight"])
        assert torch.equal(outputs(pipe)[0], noise)
    assert abs(generate(pipe) - image).max() == 0

    fuse_snella(pipe)
    unload_snella_weights(pipe)
    assert_same_state(pipe, state)
    assert torch.equal(outputs(pipe)[0], base_noise) and torch.equal(outputs(pipe)[1], base_hidden)
    assert abs(generate(pipe) - base_image).max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fuse_unfuse_unload_bit_exact(adapter_files, dtype):
    pipeline = tiny_sd_pipeline(0).to(dtype)
    state = snapshot(pipeline)
    base_noise = outputs(pipeline)[0]
    load_snella_weights(pipeline, adapter_files["a"], adapter_name="a")
    layer = next(iter(snella_layers(pipeline.unet).values()))
    assert layer.adapters["a"].in_factors.dtype == torch.float32
    unfused = outputs(pipeline)[0]
    assert (unfused - base_noise).abs().max() > 1e-2
    for _ in range(3):
        fuse_snella(pipeline, scale=0.7)
        assert layer.base_layer.weight.dtype == dtype
        unfuse_snella(pipeline)
    for key, layer in snella_layers(pipeline.unet).items():
        assert torch.equal(layer.base_layer.weight, state["unet"][key + ".weight"])
    fuse_snella(pipeline)
    torch.testing.assert_close(outputs(pipeline)[0], unfused, rtol=0.05, atol=0.05)
    unload_snella_weights(pipeline)
    assert_same_state(pipeline, state)
    assert torch.equal(outputs(pipeline)[0], base_noise)


def test_two_adapters_weights_combine_linearly(pipe, adapter_files):
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    alone = outputs(pipe)
    load_snella_weights(pipe, adapter_files["b"].parent, adapter_name="b")
    assert get_active_snella_adapters(pipe) == ["a", "b"]

    set_snella_adapters(pipe, ["a", "b"], [1.0, 0.0])
    for got, want in zip(outputs(pipe), alone):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    set_snella_adapters(pipe, ["a", "b"], [0.5, 0.5])
    averaged = outputs(pipe)
    reference = tiny_sd_pipeline(0)
    with torch.no_grad():
        for component in ("unet", "text_encoder"):
            for key, layer in snella_layers(getattr(pipe, component)).items():
                delta = sum(0.5 * layer.delta_weight(n) for n in ("a", "b") if n in layer.adapters)
                getattr(reference, component).get_submodule(key).weight.add_(delta)
    for got, want in zip(averaged, outputs(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    set_snella_adapters(pipe, "b")
    assert get_active_snella_adapters(pipe) == ["b"]
    torch.testing.assert_close(outputs(pipe)[1], outputs(tiny_sd_pipeline(0))[1], rtol=0, atol=0)


def test_fusing_again_adds_each_delta_once(pipe, adapter_files):
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    assert fuse_snella(pipe, scale=0.5) == 72
    once = snapshot(pipe)
    assert fuse_snella(pipe, scale=0.5) == 0
    assert_same_state(pipe, once)
    load_snella_weights(pipe, adapter_files["b"], adapter_name="b")
    assert fuse_snella(pipe) == 60
    unfused = tiny_sd_pipeline(0)
    load_snella_weights(unfused, adapter_files["a"], adapter_name="a")
    load_snella_weights(unfused, adapter_files["b"], adapter_name="b")
    set_snella_adapters(unfused, ["a", "b"], [0.5, 1.0])
    for got, want in zip(outputs(pipe), outputs(unfused)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_switching_weights_reads_no_file_and_caches_delta_per_layer(pipe, adapter_files, monkeypatch):
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    load_snella_weights(pipe, adapter_files["b"], adapter_name="b")
    calls = []
    original = SnellaAdapter.delta_weight

    def counting(self):
        calls.append(self)
        return original(self)

    def no_file(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(SnellaAdapter, "delta_weight", counting)
    monkeypatch.setattr(loaders, "read_snella_file", no_file)
    monkeypatch.setattr("snella_diffusion.io.safe_open", no_file)
    set_snella_adapters(pipe, ["a", "b"], [0.3, 0.9])
    generate(pipe, steps=3)
    # 60 UNet layers hold a and b, 12 text-encoder layers hold a: each ΔW is built once for
    # the whole generation (3 UNet calls, 2 text-encoder calls).
    assert len(calls) == 60 * 2 + 12
    calls.clear()
    set_snella_adapters(pipe, ["a", "b"], [0.6, 0.9])
    generate(pipe, steps=2)
    assert len(calls) == 60 * 2 + 12


def test_unload_by_name_leaves_no_trace(pipe, adapter_files):
    for name in ("a", "b", "c"):
        load_snella_weights(pipe, adapter_files["b"], adapter_name=name)
    set_snella_adapters(pipe, ["a", "b", "c"], [1.0, 1.0, 0.5])
    outputs(pipe)
    unload_snella_weights(pipe, ["a", "b"])
    for layer in snella_layers(pipe.unet).values():
        assert list(layer.adapters) == ["c"] and list(layer.configs) == ["c"]
        assert list(layer.adapter_weights) == ["c"] and layer.active_adapters == ["c"]
        assert layer._delta_cache is None
    assert not [k for k in pipe.unet.state_dict() if ".adapters.a." in k or ".adapters.b." in k]
    assert sum(".adapters.c." in k for k in pipe.unet.state_dict()) == 60 * 8
    set_snella_adapters(pipe, "c", 0.5)
    solo = tiny_sd_pipeline(0)
    load_snella_weights(solo, adapter_files["b"], adapter_name="c")
    set_snella_adapters(solo, "c", 0.5)
    assert torch.equal(outputs(pipe)[0], outputs(solo)[0])


def test_disable_enable_is_exact(pipe, adapter_files):
    base = outputs(pipe)
    load_snella_weights(pipe, adapter_files["a"])
    loaded = outputs(pipe)
    disable_snella(pipe)
    assert all(torch.equal(g, w) for g, w in zip(outputs(pipe), base))
    enable_snella(pipe)
    assert all(torch.equal(g, w) for g, w in zip(outputs(pipe), loaded))
    disable_snella(pipe)
    with pytest.raises(SnellaError, match="enable_snella"):
        fuse_snella(pipe)
    enable_snella(pipe)
    fuse_snella(pipe)
    with pytest.raises(SnellaError, match="unfuse_snella"):
        disable_snella(pipe)
    with pytest.raises(SnellaError, match="unfuse_snella"):
        set_snella_adapters(pipe, "default_0", 0.5)


def test_sdxl_adapter_reaches_both_text_encoders_and_unloads_exactly(adapter_files):
    pipeline = tiny_sdxl_pipeline(0)
    state = {k: v.clone() for k, v in pipeline.text_encoder_2.state_dict().items()}
    tokens = TOKENS
    with torch.no_grad():
        base = pipeline.text_encoder_2(tokens).text_embeds
        name = load_snella_weights(pipeline, adapter_files["xl"])
        assert [len(snella_layers(getattr(pipeline, c))) for c in ("text_encoder", "text_encoder_2")] == [12, 12]
        assert (pipeline.text_encoder_2(tokens).text_embeds - base).abs().max() > 1e-3
        fuse_snella(pipeline)
        unload_snella_weights(pipeline)
        assert torch.equal(pipeline.text_encoder_2(tokens).text_embeds, base)
    assert name == "default_0"
    assert pipeline.text_encoder_2.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in pipeline.text_encoder_2.state_dict().items())


@pytest.mark.slow
def test_custom_pipeline_from_local_folder_generates_with_adapter(tmp_path, adapter_files):
    from diffusers import DiffusionPipeline

    base = tiny_sd_pipeline(0)
    base.save_pretrained(tmp_path / "base")
    pipeline = DiffusionPipeline.from_pretrained(
        tmp_path / "base", custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True,
        snella_weights={"a": adapter_files["a"]},
    )
    pipeline.set_progress_bar_config(disable=True)
    base.set_progress_bar_config(disable=True)
    assert type(pipeline).__name__ == "SnellaStableDiffusionPipeline" and not pipeline.is_sdxl
    assert pipeline.get_active_snella_adapters() == ["a"]
    load_snella_weights(base, adapter_files["a"], adapter_name="a")
    with_adapter = generate(pipeline)
    assert abs(with_adapter - generate(base)).max() < 1e-6
    pipeline.set_snella_adapters("a", 0.0)
    unload_snella_weights(base)
    assert abs(generate(pipeline) - generate(base)).max() < 1e-6
    assert abs(with_adapter - generate(base)).max() > 1e-3

    shared = type(pipeline).from_pipe(base, snella_weights=adapter_files["b"])
    assert shared.unet is base.unet and shared.get_active_snella_adapters() == ["default_0"]
    assert shared.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.in_factors.dtype == torch.float32


@pytest.mark.slow
def test_custom_pipeline_sdxl_folder(tmp_path, adapter_files):
    from diffusers import DiffusionPipeline

    base = tiny_sdxl_pipeline(0)
    base.save_pretrained(tmp_path / "xl")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "xl", custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    base.set_progress_bar_config(disable=True)
    assert pipeline.is_sdxl
    before = generate(pipeline)
    assert abs(before - generate(base)).max() == 0
    pipeline.load_snella_weights(adapter_files["xl"])
    assert len(snella_layers(pipeline.text_encoder_2)) == 12
    assert abs(generate(pipeline) - before).max() > 1e-3


# ---- errors: each names the file and key, and leaves the pipeline exactly as it was ----


def rewrite(source: Path, destination: Path, tensors=None, metadata=None) -> Path:
    with safe_open(str(source), framework="pt") as handle:
        data = {k: handle.get_tensor(k) for k in handle.keys()}
        header = dict(handle.metadata())
    data.update(tensors or {})
    header.update(metadata or {})
    save_file(data, str(destination), metadata=header)
    return destination


def first_key(path: Path, suffix: str) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return next(k for k in handle.keys() if k.endswith(suffix))


@pytest.fixture
def loaded_pipe(pipe, adapter_files):
    """A pipeline already holding adapter 'old' (UNet and text encoder), fused, so a rollback
    must spare both the adapter and the fused weights."""
    load_snella_weights(pipe, adapter_files["a"], adapter_name="old")
    fuse_snella(pipe, scale=0.5)
    return pipe


def bad_files(tmp_path: Path, adapter_files) -> dict[str, tuple[Path, str, type]]:
    a = adapter_files["a"]
    cases = {}
    cases["missing"] = (tmp_path / "nothing.safetensors", r"nothing\.safetensors: no such adapter file", SnellaFormatError)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    cases["folder without file"] = (empty_folder, r"empty/snella_weights\.safetensors: no such adapter file", SnellaFormatError)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    cases["not safetensors"] = (junk, "junk.safetensors: not a safetensors file", SnellaFormatError)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.1.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.1.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, str(lora))
    cases["lora"] = (lora, r"lora\.safetensors: not a SNELLA adapter: a LoRA file: load it with pipe\.load_lora_weights", SnellaFormatError)
    lycoris = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_1_attn1_to_q.hada_w1_a": torch.zeros(4, 32)}, str(lycoris))
    cases["lycoris"] = (lycoris, r"loha\.safetensors: not a SNELLA adapter: a LyCORIS", SnellaFormatError)
    version = rewrite(a, tmp_path / "v99.safetensors", metadata={"format_version": "99"})
    cases["version"] = (version, r"v99\.safetensors: header 'format_version' is '99'", SnellaFormatError)
    key = first_key(a, ".snella.out_factors")
    with safe_open(str(a), framework="pt") as handle:
        poisoned = handle.get_tensor(key).clone()
    poisoned[0, 0, 0] = float("nan")
    nan = rewrite(a, tmp_path / "nan.safetensors", tensors={key: poisoned})
    cases["non-finite"] = (nan, rf"nan\.safetensors: key {key} holds non-finite values", SnellaFormatError)
    return cases


@pytest.mark.parametrize("case", ["missing", "folder without file", "not safetensors", "lora", "lycoris", "version", "non-finite"])
def test_bad_file_raises_and_leaves_pipeline_unchanged(loaded_pipe, adapter_files, tmp_path, case):
    path, message, error = bad_files(tmp_path, adapter_files)[case]
    state = snapshot(loaded_pipe)
    with pytest.raises(error, match=message):
        load_snella_weights(loaded_pipe, path)
    assert_same_state(loaded_pipe, state)
    assert get_active_snella_adapters(loaded_pipe) == ["old"]


def test_adapter_for_another_base_names_first_mismatching_layer(loaded_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
        attention_head_dim=8,
    )
    path = perturbed_adapter({"unet": other}, tmp_path / "other.safetensors", 4)
    shapes = json.loads(safe_open(str(path), framework="pt").metadata()["shapes"])
    mine = {f"unet.{n}": [m.out_features, m.in_features] for n, m in snella_layers(loaded_pipe.unet).items()}
    first = next(k for k in sorted(shapes) if shapes[k] != mine[k])
    assert first == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    state = snapshot(loaded_pipe)
    with pytest.raises(SnellaFormatError, match=rf"other\.safetensors: layer {first} is 64x32 in the model but \[64, 48\]"):
        load_snella_weights(loaded_pipe, path)
    assert_same_state(loaded_pipe, state)


def test_sdxl_adapter_into_sd_pipeline_names_missing_component(loaded_pipe, adapter_files):
    state = snapshot(loaded_pipe)
    with pytest.raises(SnellaFormatError, match=r"xl\.safetensors: key text_encoder_2\.\S+: the pipeline .* has no component 'text_encoder_2'"):
        load_snella_weights(loaded_pipe, adapter_files["xl"])
    assert_same_state(loaded_pipe, state)


def test_duplicate_adapter_name(loaded_pipe, adapter_files):
    state = snapshot(loaded_pipe)
    with pytest.raises(SnellaError, match=r"b/snella_weights\.safetensors: adapter name 'old' is already loaded \(layer text_encoder\."):
        load_snella_weights(loaded_pipe, adapter_files["b"], adapter_name="old")
    assert_same_state(loaded_pipe, state)


def test_failure_in_second_component_rolls_back_first(loaded_pipe, adapter_files, monkeypatch):
    import snella_diffusion.io as io_module

    state = snapshot(loaded_pipe)
    real_load_layer = io_module.AppliedLoad.load_layer
    seen = []

    def fail_in_unet(self, layer):
        seen.append(layer.component)
        if layer.component == "unet":
            raise SnellaFormatError(f"simulated failure in component {layer.component}")
        return real_load_layer(self, layer)

    monkeypatch.setattr(io_module.AppliedLoad, "load_layer", fail_in_unet)
    with pytest.raises(SnellaFormatError, match="simulated failure"):
        load_snella_weights(loaded_pipe, adapter_files["a"], adapter_name="new")
    assert seen == ["text_encoder"] * 12 + ["unet"]
    assert_same_state(loaded_pipe, state)
    for component in (loaded_pipe.unet, loaded_pipe.text_encoder):
        assert all(list(layer.adapters) == ["old"] for layer in snella_layers(component).values())


def test_hub_id_that_cannot_be_fetched_fails_clearly(pipe):
    state = snapshot(pipe)
    with pytest.raises(SnellaFormatError, match=r"no-such-user/no-such-adapter: not a local file or folder.*snella_weights\.safetensors"):
        load_snella_weights(pipe, "no-such-user/no-such-adapter", local_files_only=True)
    assert_same_state(pipe, state)


def test_bad_adapter_names_and_weights(pipe, adapter_files):
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    with pytest.raises(SnellaError, match=r"cannot activate adapter 'zzz': not loaded \(loaded: \['a'\]\)"):
        set_snella_adapters(pipe, ["a", "zzz"])
    with pytest.raises(SnellaError, match="weights has 2 entries for 1 adapter names"):
        set_snella_adapters(pipe, ["a"], [1.0, 2.0])
    with pytest.raises(SnellaError, match="cannot fuse adapter 'zzz'"):
        fuse_snella(pipe, adapter_names=["zzz"])
    assert get_active_snella_adapters(pipe) == ["a"]
    assert all(not layer.fused_adapters for layer in snella_layers(pipe.unet).values())
    assert all(isinstance(m, SnellaLinear) for m in snella_layers(pipe.unet).values())


def test_dit_transformer_component(tmp_path):
    """A DiT-style holder (``transformer`` attribute, no ``components``) loads like a UNet."""
    from types import SimpleNamespace

    from diffusers import SD3Transformer2DModel

    def transformer():
        torch.manual_seed(0)
        return SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
        )

    source = transformer()
    apply_snella(source, SnellaConfig(rank=4, target_modules="dit"))
    path = save_snella(source, tmp_path / "dit.safetensors")
    holder = SimpleNamespace(transformer=transformer())
    state = {k: v.clone() for k, v in holder.transformer.state_dict().items()}
    load_snella_weights(holder, path, adapter_name="dit")
    assert len(snella_layers(holder.transformer)) == len(snella_layers(source)) > 0
    fuse_snella(holder)
    layer_key, layer = next(iter(snella_layers(holder.transformer).items()))
    assert not torch.equal(layer.base_layer.weight, state[layer_key + ".weight"])
    unfuse_snella(holder)
    unload_snella_weights(holder)
    assert holder.transformer.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in holder.transformer.state_dict().items())

"""DreamBooth on DiT pipelines (SD3, Flux, PixArt): tiny pipelines built from configs, saved to
a folder and loaded by path; family detection, the flow-matching loss going down on a fixed
batch, validation from cached prompt embeddings, and full runs of the training script whose
adapter reloads with ``load_snella`` and changes the transformer's output."""

import argparse
import shutil

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, load_snella, read_snella_file
from snella_diffusion.testing.tiny_dit_models import TINY_DIT_BUILDERS, tiny_t5_tokenizer
from snella_diffusion.families import FamilySettings, detect_family
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.training.objectives import weighted_mse

PROMPT = "a photo of sks dog"
FAMILY_NAMES = {
    "sd3": "stable-diffusion-3",
    "flux": "flux",
    "pixart": "pixart",
    "pixart-sigma": "pixart",
    "qwen-image": "qwen-image",
    "z-image": "z-image",
    "flux2-klein": "flux2-klein",
    "chroma": "chroma",
    "flux2": "flux2",
    "krea2": "krea2",
    "lumina2": "lumina2",
    "sana": "sana",
    "hidream": "hidream",
}
# HiDream's pipeline samples at its native area (128 × the VAE factor, squared) whatever the size asked
SAMPLED_SIDES = {"hidream": 256}


@pytest.fixture(scope="session")
def dit_folders(tmp_path_factory):
    """Each tiny DiT pipeline saved with ``save_pretrained`` (seed 0)."""
    root = tmp_path_factory.mktemp("dit-pipelines")
    folders = {}
    for name, build in TINY_DIT_BUILDERS.items():
        folders[name] = root / name
        build(0).save_pretrained(folders[name])
    return folders


def _dit_args(*flags: str) -> FamilySettings:
    parser = argparse.ArgumentParser()
    DiTFlags.add_arguments(parser)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_text_encoder", action="store_true")
    parsed = vars(parser.parse_args(list(flags)))
    return FamilySettings(dit=DiTFlags.from_flags(parsed), train_text_encoder=parsed["train_text_encoder"],
                          resolution=parsed["resolution"])


def _call_kwargs(name: str) -> dict:
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": 16}
    if name.startswith("pixart") or name == "sana":
        kwargs["use_resolution_binning"] = False
    return kwargs


def test_t5_tokenizer_reloads_identically(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tiny_t5_tokenizer()
    text = "A photo of sks dog, 42 times!"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert tokenizer(PROMPT).input_ids == [4, 5, 6, 7, 8, 1]  # whole-word pieces, then </s>
    assert len(tokenizer) <= 128
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", sorted(TINY_DIT_BUILDERS))
def test_tiny_pipeline_reloads_by_path_and_samples_the_same(dit_folders, name):
    from diffusers import DiffusionPipeline

    built = TINY_DIT_BUILDERS[name](0)
    loaded = DiffusionPipeline.from_pretrained(dit_folders[name])
    assert type(loaded) is type(built)
    images = [
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **_call_kwargs(name)).images
        for pipe in (built, loaded)
    ]
    side = SAMPLED_SIDES.get(name, 32)
    assert images[0].shape == (1, side, side, 3)
    assert abs(images[0] - images[1]).max() < 1e-5
    family, _ = detect_family(str(dit_folders[name]))
    assert family.name == FAMILY_NAMES[name]


def _loaded(folder, *flags):
    family, index = detect_family(str(folder))
    components = family.load(str(folder), index)
    family.configure(components, _dit_args(*flags))
    return family, components


def _pipeline_embeddings(name, pipeline):
    """The pipeline's own prompt encoding of PROMPT (16 T5 tokens), as a dict."""
    if name.startswith("sd3"):
        embeds, _, pooled, _ = pipeline.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=16)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if name == "flux":
        embeds, pooled, _ = pipeline.encode_prompt(PROMPT, None, max_sequence_length=16)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    embeds, mask, _, _ = pipeline.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=16, clean_caption=False)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


@pytest.mark.parametrize("name", ["sd3", "sd3-without-t5", "flux", "pixart"])
def test_prompt_encoding_matches_the_pipeline(dit_folders, tmp_path, name):
    folder = dit_folders[name.split("-")[0]]
    if name == "sd3-without-t5":
        from diffusers import StableDiffusion3Pipeline

        full = StableDiffusion3Pipeline.from_pretrained(folder)
        StableDiffusion3Pipeline(**{**full.components, "text_encoder_3": None, "tokenizer_3": None}).save_pretrained(tmp_path)
        folder = tmp_path
    family, components = _loaded(folder, "--max_sequence_length", "16")
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT], torch.device("cpu"))
        theirs = _pipeline_embeddings(name, family.pipeline(components))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.allclose(ours[key].float(), theirs[key].float(), atol=1e-6), key
    if name == "sd3-without-t5":
        assert components.text_encoder_components == ("text_encoder", "text_encoder_2")
        assert ours["prompt_embeds"][:, 77:].abs().max() == 0  # T5 slots are zeros


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_loss_decreases_on_a_fixed_batch(dit_folders, name):
    family, components = _loaded(dit_folders[name], "--max_sequence_length", "8", "--weighting_scheme", "logit_normal")
    apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
    cpu = torch.device("cpu")
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT] * 2, cpu)
    generator = torch.Generator().manual_seed(0)
    latents = family.encode_latents(components, torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, generator)
    batch = family.objective(components).prepare(latents, torch.randn(latents.shape, generator=generator), generator)
    assert batch.noisy_latents.shape == latents.shape == (2, 4, 16, 16)
    trainable = [p for p in components.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(30):
        prediction = family.predict(components, batch.noisy_latents, batch.timesteps, conditioning, {})
        loss = weighted_mse(prediction, batch.target, batch.weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_validation_samples_from_cached_embeddings_after_freeing_encoders(dit_folders, name):
    family, components = _loaded(dit_folders[name], "--max_sequence_length", "16")
    generator = torch.Generator().manual_seed(0)
    kwargs = {k: v for k, v in _call_kwargs(name).items() if k not in ("max_sequence_length", "use_resolution_binning")}
    with_prompt = family.pipeline(components)(
        **family.validation_inputs(components, PROMPT), generator=generator, **kwargs
    ).images
    family.release_text_encoders(components, PROMPT, torch.device("cpu"))
    assert all(components.modules[n] is None for n in components.text_encoder_components)
    inputs = family.validation_inputs(components, PROMPT)
    assert "prompt" not in inputs and "prompt_embeds" in inputs
    cached = family.pipeline(components)(**inputs, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(cached - with_prompt).max() < 1e-4
    with pytest.raises(Exception, match="was not cached"):
        family.validation_inputs(components, "another prompt")


VALIDATION = ("--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "2")


def _run_script(folder, output_dir, *flags: str):
    from snella_diffusion.training.data import synthetic_instance_images, write_images
    from train_scripts.train_dreambooth_snella import main, parse_args

    instance_dir = output_dir / "instance-images"
    write_images(synthetic_instance_images(count=4, size=64, seed=0), instance_dir, "instance")
    return main(parse_args([
        "--pretrained_model_name_or_path", str(folder), "--output_dir", str(output_dir),
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", PROMPT, "--resolution", "32", "--max_train_steps", "2",
        "--train_batch_size", "1", "--rank", "4", "--learning_rate", "1e-2", "--checkpointing_steps", "100",
        "--max_sequence_length", "16", "--report_to", "none", "--seed", "1", *flags,
    ]))


def _transformer_output(family, components, transformer):
    """The transformer's prediction on fixed latents, timesteps and cached prompt embeddings."""
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], torch.device("cpu"))
        return family.predict(components, latents, torch.tensor([500]), conditioning, {}, denoiser=transformer)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_script_trains_saves_and_the_adapter_changes_the_transformer(dit_folders, tmp_path, name):
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    adapter = _run_script(dit_folders[name], tmp_path, *VALIDATION)
    assert adapter == tmp_path / "snella_weights.safetensors"
    for output in ("README.md", "allocation.png", "allocation.json", "loss.png", "validation/step_2.png"):
        assert (tmp_path / output).is_file(), output
    stored = read_snella_file(adapter)
    assert list(stored.layers) == ["transformer"]

    family, index = detect_family(str(dit_folders[name]))
    components = family.load(str(dit_folders[name]), index)
    family.configure(components, _dit_args("--max_sequence_length", "16"))
    transformer_class = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel, "pixart": PixArtTransformer2DModel}[name]
    transformer = transformer_class.from_pretrained(dit_folders[name], subfolder="transformer")
    expected_layers = sorted(apply_snella(transformer_class.from_pretrained(dit_folders[name], subfolder="transformer"),
                                          SnellaConfig(rank=4, target_modules="dit")))
    assert sorted(stored.layers["transformer"]) == expected_layers

    before = _transformer_output(family, components, transformer)
    layers = load_snella(transformer, adapter)
    assert len(layers) == len(expected_layers)
    after = _transformer_output(family, components, transformer)
    assert before.shape == after.shape == (1, 4, 16, 16)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_flux_memory_options_and_block_filter(dit_folders, tmp_path):
    """bf16 base weights with float32 adapters, gradient checkpointing, cached latents,
    offloaded text encoders, cosmap weighting and only the double-stream blocks adapted."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        adapter = _run_script(
            dit_folders["flux"], tmp_path, "--mixed_precision", "bf16", "--gradient_checkpointing",
            "--cache_latents", "--offload_text_encoders", "--target_modules", "dit@double",
            "--weighting_scheme", "cosmap", "--train_batch_size", "2", *VALIDATION,
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    stored = read_snella_file(adapter)
    names = sorted(stored.layers["transformer"])
    assert len(names) == 12 and all(n.startswith("transformer_blocks.0.") for n in names)
    params = stored.layers["transformer"]["transformer_blocks.0.attn.to_q"]
    assert params["in_factors"].dtype == torch.float32
    assert (tmp_path / "validation" / "step_2.png").is_file()


@pytest.mark.slow
def test_flux_resume_from_checkpoint_is_exact(dit_folders, tmp_path):
    """Flow-matching σ draws come from the checkpointed noise generator, so a run resumed at
    step 2 of 4 ends with the same adapter and allocator state as the straight run."""
    from safetensors.torch import load_file

    flags = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--weighting_scheme", "logit_normal",
             "--target_sparsity", "0.5", "--allocator_warmup_steps", "1", "--allocator_final_steps", "1",
             "--allocator_interval", "1")
    straight = _run_script(dit_folders["flux"], tmp_path / "straight", *flags)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = _run_script(dit_folders["flux"], tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    tensors = [load_file(path) for path in (straight, resumed)]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key
    sparsities = [v for k, v in tensors[0].items() if k.endswith(".sparsity")]
    assert len({round(float(v), 6) for v in sparsities}) > 1  # the allocator did reallocate


def test_script_rejects_bad_dit_flags(dit_folders, tmp_path):
    from snella_diffusion import SnellaError

    with pytest.raises(SnellaError, match="--resolution=34: Flux needs a multiple of 4"):
        _run_script(dit_folders["flux"], tmp_path, "--resolution", "34")
    with pytest.raises(SnellaError, match="--cache_text_embeddings cannot be combined with --train_text_encoder"):
        _run_script(dit_folders["sd3"], tmp_path, "--cache_text_embeddings", "--train_text_encoder")
    with pytest.raises(SnellaError, match="--snr_gamma"):
        _run_script(dit_folders["sd3"], tmp_path, "--snr_gamma", "5")
    with pytest.raises(SnellaError, match="--weighting_scheme applies to flow-matching models"):
        _run_script(dit_folders["pixart"], tmp_path, "--weighting_scheme", "logit_normal")
    with pytest.raises(SnellaError, match="--offload_text_encoders works on cached text embeddings"):
        _run_script(dit_folders["flux"], tmp_path, "--offload_text_encoders", "--no-cache_text_embeddings")
    with pytest.raises(SnellaError, match="--max_sequence_length=0"):
        _run_script(dit_folders["flux"], tmp_path, "--max_sequence_length", "0")
    with pytest.raises(SnellaError, match="--logit_std=0.0"):
        _run_script(dit_folders["sd3"], tmp_path, "--logit_std", "0")

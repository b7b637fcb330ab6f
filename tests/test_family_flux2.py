"""Flux.2 klein (``Flux2KleinPipeline``): a tiny pipeline of the real diffusers/transformers
classes (27-layer Qwen3ForCausalLM with a chat template, AutoencoderKLFlux2 with batch-norm
statistics, Flux2Transformer2DModel) saved and loaded by path; prompt encoding, latents, the
model call and σ sampling against the pipeline's and the diffusers example's conventions; the
loss falling on a fixed batch; the DreamBooth script's SNELLA adapter reloading and unloading
exactly; its LoRA A/B file loading with ``load_lora_weights``; adapted-layer counts of the
published klein-4B config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, read_snella_file
from snella_diffusion.families import FamilySettings, detect_family
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.testing.tiny_dit_models import (
    TINY_FLUX2_BN_MEAN,
    TINY_FLUX2_BN_VAR,
    tiny_flux2_klein_pipeline,
)
from snella_diffusion.training.batch_loss import training_loss

PROMPT = "a photo of sks dog"
LONGER = "a photo of sks dog on the grass with a red ball"
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
LENGTH = 32


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux2-klein") / "pipeline"
    tiny_flux2_klein_pipeline(0).save_pretrained(folder)
    return folder


def _settings(*flags: str, resolution: int = 32, train_text_encoder: bool = False) -> FamilySettings:
    import argparse

    parser = argparse.ArgumentParser()
    DiTFlags.add_arguments(parser)
    return FamilySettings(dit=DiTFlags.from_flags(vars(parser.parse_args(list(flags)))),
                          train_text_encoder=train_text_encoder, resolution=resolution)


def _loaded(folder, *flags):
    family, index = detect_family(str(folder))
    components = family.load(str(folder), index)
    family.configure(components, _settings("--max_sequence_length", str(LENGTH), *flags))
    return family, components


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(klein_folder):
    from diffusers import DiffusionPipeline, Flux2KleinPipeline

    built, loaded = tiny_flux2_klein_pipeline(0), DiffusionPipeline.from_pretrained(klein_folder)
    assert type(loaded) is Flux2KleinPipeline
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": LENGTH}
    images = [pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images for pipe in (built, loaded)]
    assert images[0].shape == (1, 32, 32, 3)
    assert abs(images[0] - images[1]).max() < 1e-5
    family, _ = detect_family(str(klein_folder))
    assert family.name == "flux2-klein"


def test_prompt_encoding_matches_the_pipeline(klein_folder):
    family, components = _loaded(klein_folder)
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        theirs, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape == theirs.shape == (2, LENGTH, 3 * 16)
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-6)
    from snella_diffusion.families.flux2 import text_position_ids

    assert torch.equal(text_position_ids(2, LENGTH), text_ids)


def test_latents_are_patchified_and_batch_normalised(klein_folder):
    from diffusers import Flux2KleinPipeline

    family, components = _loaded(klein_folder)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 16, 8, 8) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        mode = components.vae.encode(pixels).latent_dist.mode()
    expected = (Flux2KleinPipeline._patchify_latents(mode) - TINY_FLUX2_BN_MEAN) / (TINY_FLUX2_BN_VAR + 1e-4) ** 0.5
    assert torch.allclose(latents, expected, atol=1e-5)


def test_model_call_matches_the_pipelines_conventions(klein_folder):
    """predict == the transformer called with the pipeline's own packing, ids and unpacking,
    timestep t/1000, no guidance."""
    from diffusers import Flux2KleinPipeline

    family, components = _loaded(klein_folder)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
        ids = Flux2KleinPipeline._prepare_latent_ids(latents)
        output = components.denoiser(hidden_states=Flux2KleinPipeline._pack_latents(latents), timestep=timesteps / 1000,
                                     guidance=None, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                     return_dict=False)[0]
        theirs = Flux2KleinPipeline._unpack_latents_with_ids(output, ids)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sigmas_are_the_schedulers_table(klein_folder):
    family, components = _loaded(klein_folder)
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    expected = components.noise_scheduler.sigmas[(u * 1000).long()]
    assert torch.allclose(family.objective(components).schedule.sigmas_for(u), expected, atol=1e-6)


def test_loss_falls_in_20_steps_on_a_fixed_batch(klein_folder):
    family, components = _loaded(klein_folder, "--weighting_scheme", "logit_normal")
    apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
    objective = family.objective(components)
    optimizer = torch.optim.AdamW([p for p in components.denoiser.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(21):
        loss = training_loss(family, components, objective, {"num_instance": 2}, latents, conditioning,
                             components.denoiser, torch.Generator().manual_seed(5), prior_loss_weight=1.0)
        assert torch.isfinite(loss)
        losses.append(loss.item())
        if step < 20:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    # small steps on the tiny model: the loss falls at every step, by 1-2% in 20
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[20] < 0.99 * losses[0], losses


def test_configure_rejects_what_klein_cannot_do(klein_folder):
    from snella_diffusion import SnellaError

    family, index = detect_family(str(klein_folder))
    components = family.load(str(klein_folder), index)
    with pytest.raises(SnellaError, match="--train_text_encoder: Flux.2 klein trains the transformer only"):
        family.configure(components, _settings(train_text_encoder=True))
    with pytest.raises(SnellaError, match="--resolution=34: Flux.2 needs a multiple of 4"):
        family.configure(components, _settings(resolution=34))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(klein_folder, guidance_scale):
    family, components = _loaded(klein_folder)
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np",
              "guidance_scale": guidance_scale}
    with_prompt = family.pipeline(components)(**family.validation_inputs(components, PROMPT),
                                              generator=torch.Generator().manual_seed(0), **kwargs).images
    family.release_text_encoders(components, PROMPT, CPU)
    assert components.modules["text_encoder"] is None
    inputs = family.validation_inputs(components, PROMPT)
    assert "prompt" not in inputs and "prompt_embeds" in inputs
    cached = family.pipeline(components)(**inputs, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(cached - with_prompt).max() < 1e-4


def _run_script(folder, output_dir, *flags):
    from snella_diffusion.training.data import synthetic_instance_images, write_images
    from train_scripts.train_dreambooth_snella import main, parse_args

    instance_dir = output_dir / "instance-images"
    write_images(synthetic_instance_images(count=2, size=48, seed=0), instance_dir, "instance")
    return main(parse_args([
        "--pretrained_model_name_or_path", str(folder), "--output_dir", str(output_dir),
        "--instance_data_dir", str(instance_dir), "--instance_prompt", PROMPT, "--resolution", "32",
        "--max_train_steps", "3", "--train_batch_size", "1", "--rank", "4", "--learning_rate", "1e-2",
        "--checkpointing_steps", "100", "--max_sequence_length", str(LENGTH), "--report_to", "none", "--seed", "1",
        *flags,
    ]))


def _denoiser_output(family, components, transformer):
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        return family.predict(components, latents, torch.tensor([600.0]), conditioning, {}, denoiser=transformer)


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(klein_folder, tmp_path, monkeypatch):
    import train_scripts.train_dreambooth_snella as script
    from diffusers import Flux2KleinPipeline

    from snella_diffusion.loaders import load_snella_weights, unload_snella_weights

    seen = {}
    run_validation, write_outputs = script.run_validation, script.write_outputs

    def recording_validation(settings, accelerator, family, components, trained, *rest):
        seen["transformer"] = trained["transformer"]
        return run_validation(settings, accelerator, family, components, trained, *rest)

    def recording_outputs(settings, family, config, allocator, rank_drops, losses, *rest):
        seen["losses"] = [loss for _, loss in losses]
        return write_outputs(settings, family, config, allocator, rank_drops, losses, *rest)

    monkeypatch.setattr(script, "run_validation", recording_validation)
    monkeypatch.setattr(script, "write_outputs", recording_outputs)
    adapter = _run_script(klein_folder, tmp_path, "--validation_prompt", PROMPT, "--num_validation_images", "1",
                          "--validation_inference_steps", "2")
    assert len(seen["losses"]) == 3 and all(torch.isfinite(torch.tensor(seen["losses"])))
    assert (tmp_path / "validation" / "step_3.png").is_file()
    assert len(read_snella_file(adapter).layers["transformer"]) == 12 + 2  # 1 double + 1 single block

    family, components = _loaded(klein_folder)
    trained = _denoiser_output(family, components, seen["transformer"])
    pipeline = Flux2KleinPipeline.from_pretrained(klein_folder)
    base = _denoiser_output(family, components, pipeline.transformer)
    load_snella_weights(pipeline, adapter)
    reloaded = _denoiser_output(family, components, pipeline.transformer)
    assert (trained - base).abs().max() > 1e-4
    assert torch.equal(reloaded, trained)
    unload_snella_weights(pipeline)
    assert torch.equal(_denoiser_output(family, components, pipeline.transformer), base)


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(klein_folder, tmp_path):
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    _run_script(klein_folder, tmp_path, "--adapter", "lora")
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert saved and all(key.startswith("transformer.") for key in saved)
    family, components = _loaded(klein_folder)
    pipeline = Flux2KleinPipeline.from_pretrained(klein_folder)
    before = _denoiser_output(family, components, pipeline.transformer)
    pipeline.load_lora_weights(str(tmp_path))
    loaded = [p.detach() for name, p in pipeline.transformer.named_parameters() if "lora_" in name]
    assert len(loaded) == len(saved) == (12 + 2) * 2
    for key, tensor in saved.items():
        assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in loaded), key
    assert (_denoiser_output(family, components, pipeline.transformer) - before).abs().max() > 0


def _walked_count(transformer) -> int:
    """Linear layers of every double block's attention and two MLPs, and of every single
    block's attention (its fused qkv+MLP input and its output projection)."""
    double = sum(
        sum(isinstance(m, torch.nn.Linear) for part in (block.attn, block.ff, block.ff_context) for m in part.modules())
        for block in transformer.transformer_blocks
    )
    single = sum(sum(isinstance(m, torch.nn.Linear) for m in block.attn.modules())
                 for block in transformer.single_transformer_blocks)
    return double + single


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.testing.reference_configs import build_reference_model

    output = tmp_path / "counts.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_adapted_layers.py"), "--model", "flux2-klein",
                    "--json", str(output)], check=True, capture_output=True, cwd=REPO)
    (counted,) = json.loads(output.read_text())
    walked = _walked_count(build_reference_model("flux2-klein", device="meta"))
    assert counted["adapted_layers"] == walked == 5 * 12 + 20 * 2
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 3.88
    from snella_diffusion.families.dit import expand_block_filters

    single_only = apply_snella(build_reference_model("flux2-klein", device="meta"),
                               SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@single"])))
    assert len(single_only) == 20 * 2

"""Flux.2 dev (``Flux2Pipeline``): a tiny pipeline of the real diffusers/transformers classes
(30-layer Mistral3ForConditionalGeneration behind a Mistral-3-shaped chat template,
AutoencoderKLFlux2 with batch-norm statistics, Flux2Transformer2DModel with a guidance
embedding) saved and loaded by path; prompt encoding and the model call against the pipeline's
and the diffusers example's conventions; the loss falling on a fixed batch; the DreamBooth
script's SNELLA adapter reloading and unloading exactly; its LoRA A/B file loading with
``load_lora_weights``; adapted-layer counts of the published FLUX.2-dev config. Latents and σ
are klein's code (tests/test_family_flux2.py checks them); here they are checked equal to it."""

import pytest
import torch

from family_runs import (
    CPU,
    LONGER,
    PROMPT,
    check_exported_lora_loads,
    family_settings,
    published_count,
    saved_family_run,
    walked_linear_count,
)
from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.testing.tiny_dit_models import tiny_flux2_dev_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 192  # --max_sequence_length: the system message and the longer prompt (152 byte-level tokens) fit


@pytest.fixture(scope="module")
def dev_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_flux2_dev_pipeline, "Flux2Pipeline", (16, 8, 8), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(dev_run):
    loaded, images = dev_run.check_saved_pipeline_samples_as_built(tiny_flux2_dev_pipeline, "flux2",
                                                                   max_sequence_length=LENGTH)
    assert loaded.transformer.config.guidance_embeds and images.shape == (1, 32, 32, 3)


def test_prompt_encoding_matches_the_pipeline(dev_run):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from snella_diffusion.families.flux2 import text_position_ids

    family, components = dev_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER + " [IMG]"], CPU)
        theirs, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER + " [IMG]"], CPU,
                                                                     max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape == theirs.shape == (2, LENGTH, 3 * 16)
    assert torch.allclose(ours["prompt_embeds"], theirs, atol=1e-6)
    assert torch.equal(text_position_ids(2, LENGTH), text_ids)
    # the system message and the whole prompt fit in LENGTH tokens (so the equality covers the prompt)
    tokenizer = components.modules["tokenizer"]
    text = f"[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{LONGER}[/INST]"
    assert len(tokenizer(text).input_ids) < LENGTH


def test_latents_and_sigmas_are_klein_s(dev_run):
    from snella_diffusion.families import Flux2KleinFamily

    family, components = dev_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(family.encode_latents(components, pixels), Flux2KleinFamily().encode_latents(components, pixels))
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    expected = components.noise_scheduler.sigmas[(u * 1000).long()]
    assert torch.allclose(family.objective(components).schedule.sigmas_for(u), expected, atol=1e-6)


def test_model_call_matches_the_examples_conventions(dev_run):
    """predict == the transformer called with the pipeline's packing, ids and unpacking,
    timestep t/1000 and the guidance vector ``--guidance_scale`` (3.5 by default, as the example)."""
    from diffusers import Flux2Pipeline

    family, components = dev_run.loaded()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])

    def theirs(guidance: float) -> torch.Tensor:
        embeds, text_ids = family.pipeline(components).encode_prompt([PROMPT, LONGER], CPU, max_sequence_length=LENGTH)
        ids = Flux2Pipeline._prepare_latent_ids(latents)
        output = components.denoiser(hidden_states=Flux2Pipeline._pack_latents(latents), timestep=timesteps / 1000,
                                     guidance=torch.full((2,), guidance), encoder_hidden_states=embeds,
                                     txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        return Flux2Pipeline._unpack_latents_with_ids(output, ids)

    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        assert torch.allclose(ours, theirs(3.5), atol=1e-6)
        assert (ours - theirs(1.0)).abs().max() > 1e-6  # the guidance input takes part
        _, guided = dev_run.loaded("--guidance_scale", "1.0")
        assert torch.allclose(family.predict(guided, latents, timesteps, conditioning, {}), theirs(1.0), atol=1e-6)


def test_loss_falls_in_20_steps_on_a_fixed_batch(dev_run):
    losses = dev_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.99 * losses[0], losses


def test_configure_rejects_what_flux2_dev_cannot_do(dev_run):
    dev_run.check_configure_refuses({
        "--train_text_encoder: Flux.2 dev trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=34: Flux.2 needs a multiple of 4": family_settings(resolution=34),
    })


def test_validation_samples_from_cached_embeddings_after_freeing_the_encoder(dev_run):
    sampled = dev_run.check_validation_from_cached_embeddings()
    assert sampled.prompted_inputs["guidance_scale"] == 3.5
    assert "negative_prompt_embeds" not in sampled.cached_inputs  # guidance-distilled: no negative


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(dev_run, tmp_path, monkeypatch):
    stored = dev_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 12 + 2  # 1 double + 1 single block


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(dev_run, tmp_path):
    assert dev_run.check_lora_file_loads(tmp_path) == (12 + 2) * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(dev_run, tmp_path, monkeypatch):
    dev_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("flux2", tmp_path)
    transformer = build_reference_model("flux2", device="meta")
    walked = (walked_linear_count(transformer.transformer_blocks, ("attn", "ff", "ff_context"))
              + walked_linear_count(transformer.single_transformer_blocks, ("attn",)))
    assert counted["adapted_layers"] == walked == 8 * 12 + 48 * 2
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 32.22
    double_only = apply_snella(build_reference_model("flux2", device="meta"),
                               SnellaConfig(rank=4, target_modules=expand_block_filters(["dit@double"])))
    assert len(double_only) == 8 * 12


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(dev_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(dev_run, tmp_path)

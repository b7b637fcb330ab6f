"""Ideogram 4 (``Ideogram4Pipeline``): a tiny pipeline of the real diffusers/transformers classes
(a 36-layer Qwen3VLModel read at the pipeline's 13 tapped layers, the Flux.2 VAE with batch-norm
statistics, conditional and unconditional Ideogram4Transformer2DModel) saved and loaded by path;
prompt encoding, the sequence layout, latents, the model call and σ sampling against the
pipeline's and the diffusers example's conventions; the loss falling on a fixed batch; the
DreamBooth script's SNELLA adapter reloading and unloading exactly; its LoRA A/B file loading
with ``load_lora_weights``; adapted-layer counts of the published config."""

import math

import pytest
import torch

from family_runs import CPU, LONGER, PROMPT, FamilyRun, family_settings, published_count, walked_linear_count
from snella_diffusion import SnellaConfig, SnellaError, apply_snella
from snella_diffusion.families import detect_family
from snella_diffusion.families.ideogram4 import sequence_layout
from snella_diffusion.testing.tiny_dit_models import (
    TINY_FLUX2_BN_MEAN,
    TINY_FLUX2_BN_VAR,
    TINY_IDEOGRAM4_TEXT_WIDTH,
    tiny_ideogram4_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 64  # --max_sequence_length: the longer prompt with its chat template (40 byte-level tokens) fits
FLAGS = ("--max_sequence_length", str(LENGTH), "--logit_std", "1.5")
SAMPLE = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": LENGTH,
          "guidance_scale": 7.0, "guidance_schedule": None}


@pytest.fixture(scope="module")
def ideogram_run(tmp_path_factory):
    from diffusers import Ideogram4Pipeline

    folder = tmp_path_factory.mktemp("ideogram4") / "pipeline"
    tiny_ideogram4_pipeline(0).save_pretrained(folder)
    return FamilyRun(folder, Ideogram4Pipeline, latent_shape=(16, 8, 8), flags=FLAGS)


def _chat_lengths(tokenizer, prompts):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                           add_generation_prompt=True, tokenize=False) for prompt in prompts]
    return [len(tokenizer(chat, add_special_tokens=False).input_ids) for chat in chats]


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(ideogram_run):
    from diffusers import DiffusionPipeline, Ideogram4Pipeline

    built, loaded = tiny_ideogram4_pipeline(0), DiffusionPipeline.from_pretrained(ideogram_run.folder)
    assert type(loaded) is Ideogram4Pipeline
    images = [pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLE).images for pipe in (built, loaded)]
    assert images[0].shape == (1, 32, 32, 3)
    assert abs(images[0] - images[1]).max() < 1e-5
    family, _ = detect_family(str(ideogram_run.folder))
    assert family.name == "ideogram4"
    # training holds one transformer; the pipeline the family builds loads the unconditional one from the folder
    _, components = ideogram_run.loaded()
    assert "unconditional_transformer" not in components.modules
    pipeline = family.pipeline(components)
    for name, parameter in loaded.unconditional_transformer.state_dict().items():
        assert torch.equal(pipeline.unconditional_transformer.state_dict()[name], parameter), name
    # in the dtype the run loads its modules in (--mixed_precision)
    family, index = detect_family(str(ideogram_run.folder))
    in_bf16 = family.load(str(ideogram_run.folder), index, dtype=torch.bfloat16)
    assert family.pipeline(in_bf16).unconditional_transformer.dtype == torch.bfloat16


def test_prompt_encoding_and_layout_match_the_pipeline(ideogram_run):
    from diffusers.models.transformers import transformer_ideogram4 as model
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

    family, components = ideogram_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        embeds, positions, segments, roles = family.pipeline(components).encode_prompt([PROMPT, LONGER], 8, 8, LENGTH, CPU)
    width = len(QWEN3_VL_ACTIVATION_LAYERS) * TINY_IDEOGRAM4_TEXT_WIDTH
    assert ours["prompt_embeds"].shape == (2, LENGTH, width) and embeds.shape == (2, LENGTH + 64, width)
    assert ours["prompt_embeds"].dtype == torch.float32
    assert torch.equal(ours["prompt_embeds"], embeds[:, :LENGTH])
    # left padding: each prompt's chat-template tokens end the text region
    lengths = _chat_lengths(components.modules["tokenizer"], [PROMPT, LONGER])
    assert lengths == [22, 40]
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == lengths
    assert ours["prompt_embeds_mask"][0, -22:].all() and not ours["prompt_embeds_mask"][0, :-22].any()
    assert ours["prompt_embeds"][0, :-22].abs().max() == 0
    layout = sequence_layout(ours["prompt_embeds_mask"].sum(dim=1), LENGTH, 8, 8)
    for mine, theirs in zip(layout, (positions, segments, roles)):
        assert torch.equal(mine, theirs)
    assert (model.SEQUENCE_PADDING_INDICATOR, model.OUTPUT_IMAGE_INDICATOR, model.LLM_TOKEN_INDICATOR,
            model.IMAGE_POSITION_OFFSET) == (-1, 2, 3, 65536)
    # a prompt the pipeline refuses is refused before the encoder runs, naming the flag
    short_family, short_components = ideogram_run.loaded("--max_sequence_length", "30")
    with pytest.raises(SnellaError, match="40 tokens with the chat template: more than --max_sequence_length=30"):
        short_family.encode_prompt(short_components, [LONGER], CPU)


def test_latents_are_patchified_as_the_example_and_normalised_by_batch_norm(ideogram_run):
    family, components = ideogram_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels)
    assert latents.shape == (2, 16, 8, 8) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        raw = components.vae.encode(pixels).latent_dist.mode()
    # the example's patchify: (B, C, h, 2, w, 2) → tokens of (row in patch, column in patch, channel)
    tokens = raw.view(2, 4, 8, 2, 8, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 16)
    expected = (tokens - TINY_FLUX2_BN_MEAN) / math.sqrt(TINY_FLUX2_BN_VAR + components.vae.config.batch_norm_eps)
    assert torch.allclose(latents.flatten(2).transpose(1, 2), expected, atol=1e-6)


def test_model_call_matches_the_examples_conventions(ideogram_run):
    """predict == minus the transformer's image-token output on the example's packed sequence
    (text region of --max_sequence_length, model time 1 - σ); the family trims the text region to
    the batch's longest prompt, which leaves the image tokens' output unchanged."""
    family, components = ideogram_run.loaded()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        embeds, positions, segments, roles = family.pipeline(components).encode_prompt([PROMPT, LONGER], 8, 8, LENGTH, CPU)
        tokens = latents.flatten(2).transpose(1, 2)
        output = components.denoiser(
            hidden_states=torch.cat([torch.zeros(2, LENGTH, 16), tokens], dim=1), timestep=1 - timesteps / 1000,
            encoder_hidden_states=embeds, position_ids=positions, segment_ids=segments, indicator=roles,
            return_dict=False)[0]
    theirs = -output[:, LENGTH:].transpose(1, 2).reshape(2, 16, 8, 8)
    assert ours.shape == latents.shape and theirs.abs().mean() > 0.1
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sigmas_are_drawn_directly_with_the_resolution_shifted_logit_mean(ideogram_run):
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu

    family, components = ideogram_run.loaded("--logit_mean", "0.25")
    objective = family.objective(components)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sample = objective.prepare(latents, noise, torch.Generator().manual_seed(6))
    # 32 px: mean 0.25 + ½·log(32² / 512²) = 0.25 - 2.7726, as the pipeline shifts its schedule
    mean = 0.25 + 0.5 * math.log(32 * 32 / 512 ** 2)
    assert mean == pytest.approx(_resolution_aware_mu(32, 32, base_mu=0.25)) == pytest.approx(-2.5226, abs=1e-4)
    sigmas = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(6)) * 1.5 + mean)
    assert torch.allclose(sample.timesteps / 1000, sigmas, atol=1e-7)
    # σ is continuous (no table of 1000 entries), not rounded to a multiple of 1/1000
    assert (sample.timesteps - sample.timesteps.round()).abs().max() > 1e-3
    sigma = sigmas.view(4, 1, 1, 1)
    assert torch.allclose(sample.noisy_latents, (1 - sigma) * latents + sigma * noise, atol=1e-6)
    assert torch.equal(sample.target, noise - latents) and sample.weights is None
    assert family.options(components).weighting_scheme == "logit_normal"


def test_loss_falls_in_20_steps_on_a_fixed_batch(ideogram_run):
    losses = ideogram_run.losses_on_a_fixed_batch()
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_ideogram4_cannot_do(ideogram_run):
    family, index = detect_family(str(ideogram_run.folder))
    components = family.load(str(ideogram_run.folder), index)
    with pytest.raises(SnellaError, match="--train_text_encoder: Ideogram 4 trains the transformer only"):
        family.configure(components, family_settings(train_text_encoder=True))
    with pytest.raises(SnellaError, match="--resolution=34: Ideogram 4 needs a multiple of 4"):
        family.configure(components, family_settings(resolution=34))


def test_validation_samples_from_cached_features_after_freeing_the_encoder(ideogram_run):
    family, components = ideogram_run.loaded()
    kwargs = {key: SAMPLE[key] for key in ("num_inference_steps", "height", "width", "output_type")}
    inputs = family.validation_inputs(components, PROMPT)
    assert inputs == {"prompt": PROMPT, "max_sequence_length": LENGTH, "guidance_scale": 7.0, "guidance_schedule": None}
    with_encoder = family.pipeline(components)(**inputs, generator=torch.Generator().manual_seed(0), **kwargs).images
    family.release_text_encoders(components, PROMPT, CPU)
    assert components.modules["text_encoder"] is None
    cached = family.pipeline(components)(**family.validation_inputs(components, PROMPT),
                                         generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(cached - with_encoder).max() < 1e-5
    with pytest.raises(SnellaError, match="'a cat' was not cached before the text encoder was freed"):
        family.validation_inputs(components, "a cat")


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(ideogram_run, tmp_path, monkeypatch):
    stored = ideogram_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(stored.layers["transformer"]) == 2 * 7  # 2 blocks of q, k, v, out, w1, w2, w3


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(ideogram_run, tmp_path):
    assert ideogram_run.check_lora_file_loads(tmp_path) == 2 * 7 * 2


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("ideogram4", tmp_path)
    transformer = build_reference_model("ideogram4", device="meta")
    assert counted["adapted_layers"] == walked_linear_count(transformer.layers, ("attention", "feed_forward")) == 34 * 7
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 9.28
    first_half = apply_snella(build_reference_model("ideogram4", device="meta"),
                              SnellaConfig(rank=4, target_modules=expand_block_filters([r"dit@layers\.(?:[0-9]|1[0-6])"])))
    assert len(first_half) == 17 * 7 and all(int(name.split(".")[1]) < 17 for name in first_half)

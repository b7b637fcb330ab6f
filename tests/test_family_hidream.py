"""HiDream-I1 (``HiDreamImagePipeline``): a tiny pipeline of the real diffusers/transformers classes
(two CLIPs with projection, T5, a Llama encoder, AutoencoderKL, HiDreamImageTransformer2DModel
with mixture-of-experts MLPs) saved and loaded by path; the four-encoder prompt encoding, latents,
the model call and σ sampling against the pipeline's and the example's conventions; the loss
falling on a fixed batch; the DreamBooth script's SNELLA adapter reloading and unloading exactly;
its LoRA A/B file loading with ``load_lora_weights``; adapted-layer counts of the published
HiDream-I1 config."""

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
from snella_diffusion import SnellaConfig, SnellaError, apply_snella
from snella_diffusion.families import detect_family
from snella_diffusion.testing.tiny_dit_models import (
    TINY_HIDREAM_VAE_SCALE,
    TINY_HIDREAM_VAE_SHIFT,
    tiny_hidream_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
LENGTH = 32  # --max_sequence_length: every encoder's tokens of LONGER fit


@pytest.fixture(scope="module")
def hidream_run(tmp_path_factory):
    return saved_family_run(tmp_path_factory, tiny_hidream_pipeline, "HiDreamImagePipeline", (4, 16, 16), LENGTH)


def test_tiny_pipeline_reloads_by_path_samples_the_same_and_is_detected(hidream_run):
    _, images = hidream_run.check_saved_pipeline_samples_as_built(tiny_hidream_pipeline, "hidream",
                                                                  max_sequence_length=LENGTH)
    # the pipeline rescales any size to its native area: (128 × VAE factor 2)² here
    assert images.shape == (1, 256, 256, 3)


def test_prompt_encoding_matches_the_pipeline(hidream_run):
    family, components = hidream_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        t5, negative_t5, llama, negative_llama, pooled, negative_pooled = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], device=CPU, do_classifier_free_guidance=True, max_sequence_length=LENGTH)
        ours_negative = family.negative_prompt_inputs(components, CPU)
    assert ours["pooled_prompt_embeds"].shape == pooled.shape == (2, 64)
    assert ours["prompt_embeds_t5"].shape == t5.shape == (2, LENGTH, 64)
    # the pipeline stacks the 2 Llama layers first; the family keeps the batch first
    assert llama.shape == (2, 2, LENGTH, 16) and ours["prompt_embeds_llama3"].shape == (2, 2, LENGTH, 16)
    assert torch.allclose(ours["pooled_prompt_embeds"], pooled, atol=1e-6)
    assert torch.allclose(ours["prompt_embeds_t5"], t5, atol=1e-6)
    assert torch.allclose(ours["prompt_embeds_llama3"].transpose(0, 1), llama, atol=1e-6)
    assert (ours["prompt_embeds_llama3"][0] - ours["prompt_embeds_llama3"][1]).abs().max() > 1e-3
    assert torch.allclose(ours_negative["negative_pooled_prompt_embeds"], negative_pooled[:1], atol=1e-6)
    assert torch.allclose(ours_negative["negative_prompt_embeds_t5"], negative_t5[:1], atol=1e-6)
    assert torch.allclose(ours_negative["negative_prompt_embeds_llama3"].transpose(0, 1), negative_llama[:, :1],
                          atol=1e-6)


def test_latents_are_the_shifted_scaled_sample(hidream_run):
    family, components = hidream_run.loaded()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(2))
    assert latents.shape == (2, 4, 16, 16) and family.pixel_multiple(components) == 4
    with torch.no_grad():
        sample = components.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(2))
    assert torch.allclose(latents, (sample - TINY_HIDREAM_VAE_SHIFT) * TINY_HIDREAM_VAE_SCALE, atol=1e-6)


def test_model_call_matches_the_examples_conventions(hidream_run):
    """predict == -transformer(x, timesteps = t, t5, Llama layers first, pooled), the example's
    call, with the transformer in training mode on its inference path (as the example loads it)."""
    family, components = hidream_run.loaded()
    transformer = components.denoiser
    assert transformer.config.force_inference_output
    transformer.train()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        ours = family.predict(components, latents, timesteps, conditioning, {})
        t5, _, llama, _, pooled, _ = family.pipeline(components).encode_prompt(
            [PROMPT, LONGER], device=CPU, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
        theirs = -transformer(hidden_states=latents, encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama,
                              pooled_embeds=pooled, timesteps=timesteps, return_dict=False)[0]
        transformer.eval()
        evaluated = family.predict(components, latents, timesteps, conditioning, {})
    assert ours.shape == latents.shape
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours, evaluated, atol=1e-6)  # training and inference paths agree


def test_non_square_latents_keep_their_shape(hidream_run):
    family, components = hidream_run.loaded()
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        conditioning = family.encode_prompt(components, [PROMPT], CPU)
        output = family.predict(components, latents, torch.tensor([500.0]), conditioning, {})
    assert output.shape == latents.shape and torch.isfinite(output).all()


def test_sigmas_are_the_examples_shift_3_table(hidream_run):
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, components = hidream_run.loaded()
    example = FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config, shift=3.0)
    u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
    schedule = family.objective(components).schedule
    assert schedule.shift == 3.0
    assert torch.allclose(schedule.sigmas_for(u), example.sigmas[(u * 1000).long()], atol=1e-6)
    plain = 1 - torch.floor(u * 1000) / 1000
    assert torch.allclose(schedule.sigmas_for(u), 3 * plain / (1 + 2 * plain), atol=1e-6)


def test_loss_falls_in_20_steps_on_a_fixed_batch(hidream_run):
    losses = hidream_run.losses_on_a_fixed_batch("--weighting_scheme", "logit_normal")
    assert losses[20] < 0.95 * losses[0], losses


def test_configure_rejects_what_hidream_cannot_do(hidream_run):
    hidream_run.check_configure_refuses({
        "--train_text_encoder: HiDream trains the transformer only": family_settings(train_text_encoder=True),
        "--resolution=34: HiDream needs a multiple of 4": family_settings(resolution=34),
    })


# per block: attention q/k/v/out (and the text stream's in double blocks), the shared expert
# and the routed experts (3 linears each), the double blocks' text MLP
TINY_LAYERS = (8 + 3 * 3 + 3) + (4 + 3 * 3)


@pytest.mark.slow
def test_script_adapter_reloads_exactly_and_unloads_exactly(hidream_run, tmp_path, monkeypatch):
    adapter = hidream_run.check_script_adapter_reloads_and_unloads(tmp_path, monkeypatch)
    assert len(adapter.layers["transformer"]) == TINY_LAYERS


@pytest.mark.slow
def test_lora_ab_file_loads_with_the_pipelines_load_lora_weights(hidream_run, tmp_path):
    assert hidream_run.check_lora_file_loads(tmp_path) == TINY_LAYERS * 2


@pytest.mark.slow
def test_captions_buckets_ema_prodigy_prior_config_and_caches_train_and_resume_exactly(hidream_run, tmp_path,
                                                                                        monkeypatch):
    hidream_run.check_training_features(tmp_path, monkeypatch, pixel_multiple=4)


def test_published_config_layer_count_matches_a_walk_of_the_module_tree(tmp_path):
    from snella_diffusion.families.dit import expand_block_filters
    from snella_diffusion.testing.reference_configs import build_reference_model

    counted = published_count("hidream", tmp_path)
    model = build_reference_model("hidream", device="meta")
    double = walked_linear_count([b.block for b in model.double_stream_blocks], ("attn1", "ff_i", "ff_t"))
    single = walked_linear_count([b.block for b in model.single_stream_blocks], ("attn1", "ff_i"))
    assert double == 16 * (8 + 5 * 3 + 3) and single == 32 * (4 + 5 * 3)
    assert counted["adapted_layers"] == double + single
    assert round(counted["denoiser_parameters"] / 1e9, 2) == 17.11
    doubles = expand_block_filters([r"dit@double_stream_blocks"])
    doubles_only = apply_snella(model, SnellaConfig(rank=4, target_modules=doubles))
    assert len(doubles_only) == double


def test_validation_samples_from_cached_embeddings_after_freeing_the_encoders(hidream_run):
    """With guidance (the negative embeddings cached too); the pipeline samples at its 256 px area."""
    sampled = hidream_run.check_validation_from_cached_embeddings(num_inference_steps=1, output_type="latent",
                                                                  guidance_scale=5.0)
    assert sampled.cached_inputs["prompt_embeds_llama3"].shape == (2, 1, LENGTH, 16)


def test_a_folder_without_the_llama_encoder_loads_it_from_the_default_source(hidream_run, tmp_path, monkeypatch):
    """Published HiDream folders leave text_encoder_4/tokenizer_4 out (null in model_index.json):
    the family loads them from LLAMA_SOURCE (the example's default), here a local copy."""
    import json
    import shutil

    import snella_diffusion.families.hidream as hidream

    folder = tmp_path / "no-llama"
    shutil.copytree(hidream_run.folder, folder)
    llama = tmp_path / "llama"
    for component in ("text_encoder_4", "tokenizer_4"):
        shutil.copytree(folder / component, llama, dirs_exist_ok=True)
        shutil.rmtree(folder / component)
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"text_encoder_4": [None, None], "tokenizer_4": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index))

    monkeypatch.setattr(hidream, "LLAMA_SOURCE", str(tmp_path / "missing"))
    family, index = detect_family(str(folder))
    with pytest.raises(SnellaError, match="has no text_encoder_4/tokenizer_4, and HiDream's Llama encoder could not"):
        family.load(str(folder), index)
    monkeypatch.setattr(hidream, "LLAMA_SOURCE", str(llama))
    components = family.load(str(folder), index)
    family.configure(components, family_settings("--max_sequence_length", str(LENGTH)))
    _, full = hidream_run.loaded()
    with torch.no_grad():
        ours = family.encode_prompt(components, [LONGER], CPU)["prompt_embeds_llama3"]
        theirs = family.encode_prompt(full, [LONGER], CPU)["prompt_embeds_llama3"]
    assert torch.equal(ours, theirs)


def _comfyui_hidream_names(double: int, single: int, experts: int) -> set[str]:
    """The tiny model's adapted modules as ComfyUI's HiDream model names them
    (``comfy/ldm/hidream/model.py``: ``HiDreamAttention`` to_q/to_k/to_v/to_out and the text
    stream's ``*_t``, ``MOEFeedForwardSwiGLU`` shared_experts/experts, ``ff_t``; ``comfy/lora.py``
    maps ``transformer.<name>`` onto ``diffusion_model.<name>.weight``)."""
    swiglu = ("w1", "w2", "w3")
    mlp = [f"ff_i.shared_experts.{w}" for w in swiglu]
    mlp += [f"ff_i.experts.{index}.{w}" for index in range(experts) for w in swiglu]
    names = set()
    for index in range(double):
        attention = [f"attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")]
        names |= {f"double_stream_blocks.{index}.block.{p}" for p in attention + mlp + [f"ff_t.{w}" for w in swiglu]}
    for index in range(single):
        attention = [f"attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out")]
        names |= {f"single_stream_blocks.{index}.block.{p}" for p in attention + mlp}
    return names


@pytest.mark.slow
@pytest.mark.parametrize("to", ["diff", "lora", "comfyui"])
def test_export_keys_map_onto_comfyuis_hidream_names(hidream_run, tmp_path, to):
    from family_runs import exported_key_prefixes

    prefixes = exported_key_prefixes(hidream_run, to, tmp_path)
    assert all(prefix.startswith("transformer.") for prefix in prefixes)
    expected = _comfyui_hidream_names(double=1, single=1, experts=2)
    assert len(expected) == TINY_LAYERS
    assert {prefix.removeprefix("transformer.") for prefix in prefixes} == expected


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(hidream_run, tmp_path):
    """snella-export --to lora at full rank: the pipeline's own load_lora_weights reproduces the
    SNELLA adapter's denoiser output."""
    check_exported_lora_loads(hidream_run, tmp_path)

"""DreamBooth on DiT pipelines (SD3, Flux, PixArt): tiny pipelines built from configs, saved to
a folder and loaded by path; family detection, the flow-matching loss going down on a fixed
batch, validation from cached prompt embeddings, and full runs of the training script whose
adapter reloads with ``load_snella`` and changes the transformer's output."""

import argparse

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, load_snella, read_snella_file
from snella_diffusion.tiny_dit_models import TINY_DIT_BUILDERS, tiny_t5_tokenizer
from snella_diffusion.training.dit_families import add_dit_arguments
from snella_diffusion.training.families import detect_family
from snella_diffusion.training.objectives import weighted_mse

PROMPT = "a photo of sks dog"
FAMILY_NAMES = {
    "sd3": "stable-diffusion-3",
    "flux": "flux",
    "pixart": "pixart",
    "pixart-sigma": "pixart",
}


@pytest.fixture(scope="session")
def dit_folders(tmp_path_factory):
    """Each tiny DiT pipeline saved with ``save_pretrained`` (seed 0)."""
    root = tmp_path_factory.mktemp("dit-pipelines")
    folders = {}
    for name, build in TINY_DIT_BUILDERS.items():
        folders[name] = root / name
        build(0).save_pretrained(folders[name])
    return folders


def _dit_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dit_arguments(parser)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_text_encoder", action="store_true")
    return parser.parse_args(list(flags))


def _call_kwargs(name: str) -> dict:
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np", "max_sequence_length": 16}
    if name.startswith("pixart"):
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
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **_call_kwargs(name)).images
        for pipe in (built, loaded)
    ]
    assert images[0].shape == (1, 32, 32, 3)
    assert abs(images[0] - images[1]).max() < 1e-5
    family, _ = detect_family(str(dit_folders[name]))
    assert family.name == FAMILY_NAMES[name]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_loss_decreases_on_a_fixed_batch(dit_folders, name):
    family, index = detect_family(str(dit_folders[name]))
    components = family.load(str(dit_folders[name]), index)
    family.configure(components, _dit_args("--max_sequence_length", "8", "--weighting_scheme", "logit_normal"))
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
    family, index = detect_family(str(dit_folders[name]))
    components = family.load(str(dit_folders[name]), index)
    family.configure(components, _dit_args("--max_sequence_length", "16"))
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

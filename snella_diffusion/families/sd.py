"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``)."""

from __future__ import annotations

from . import tokens
from .base import ModelFamily


class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon or v-prediction."""

    name = "stable-diffusion"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_prompt(self, components, prompts, device):
        encoder = components.modules["text_encoder"]
        ids = tokens.tokenize(components.modules["tokenizer"], prompts).to(device)
        return {"prompt_embeds": encoder(ids)[0]}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        unet = denoiser or components.denoiser
        return unet(noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample

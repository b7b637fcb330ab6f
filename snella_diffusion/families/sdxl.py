"""Stable Diffusion XL (``StableDiffusionXLPipeline``)."""

from __future__ import annotations

import torch

from . import tokens
from .base import ModelFamily


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated), the pooled embedding
    of the second, and added time ids (original size, crop corner, target size)."""

    name = "stable-diffusion-xl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    pipeline_kwargs = {}

    def encode_prompt(self, components, prompts, device):
        hidden_states, pooled = [], None
        for encoder_name, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            ids = tokens.tokenize(components.modules[tokenizer_name], prompts).to(device)
            output = components.modules[encoder_name](ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        unet = denoiser or components.denoiser
        factor = self.vae_scale_factor(components)
        # target_size is the (height, width) trained at: the bucket's size with aspect-ratio buckets
        size = torch.tensor([noisy_latents.shape[-2] * factor, noisy_latents.shape[-1] * factor])
        count = noisy_latents.shape[0]
        original = batch.get("original_sizes")
        crops = batch.get("crop_top_lefts")
        if original is None:
            original = size.repeat(count, 1)
        if crops is None:
            crops = torch.zeros((count, 2))
        target = size.repeat(count, 1)
        time_ids = torch.cat([original, crops, target], dim=1).to(noisy_latents.device, noisy_latents.dtype)
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": time_ids}
        return unet(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"],
            added_cond_kwargs=added,
        ).sample

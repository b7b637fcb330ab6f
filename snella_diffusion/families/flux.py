"""Flux.1 dev and schnell (``FluxPipeline``)."""

from __future__ import annotations

from ..training.flow_matching import guidance_vector, latent_image_ids, pack_latents, text_ids, unpack_latents
from . import tokens
from .dit import FlowMatchingFamily


class FluxFamily(FlowMatchingFamily):
    """Flux.1 (dev, schnell): double- and single-stream blocks, CLIP-L pooled + T5-XXL,
    packed 2×2 latents with position ids, distilled guidance embedding (dev)."""

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        """512 for Flux.1-dev, 256 for the guidance-free Flux.1-schnell."""
        return 512 if components.denoiser.config.guidance_embeds else 256

    def pixel_multiple(self, components):
        """VAE factor × the 2×2 latent packing."""
        return 2 * self.vae_scale_factor(components)

    def configure(self, components, settings):
        super().configure(components, settings)
        self.check_resolution(components, settings, "Flux", "VAE downsampling × 2×2 latent packing")

    def encode_prompt(self, components, prompts, device):
        modules = components.modules
        tokenizer = modules["tokenizer"]
        ids, _ = tokens.padded_tokens(tokenizer, prompts, tokens.clip_max_length(tokenizer), device)
        pooled = modules["text_encoder"](ids, output_hidden_states=False).pooler_output
        ids, _ = tokens.padded_tokens(modules["tokenizer_2"], prompts, self.options(components).max_sequence_length, device)
        return {"prompt_embeds": modules["text_encoder_2"](ids)[0], "pooled_prompt_embeds": pooled}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, _, height, width = noisy_latents.shape
        prompt_embeds = conditioning["prompt_embeds"]
        device, dtype = noisy_latents.device, noisy_latents.dtype
        guidance_enabled = bool(components.denoiser.config.guidance_embeds)
        guidance = guidance_vector(self.options(components).guidance_scale, batch_size, guidance_enabled, device)
        output = transformer(
            hidden_states=pack_latents(noisy_latents),
            # the transformer multiplies timestep (and guidance) by 1000 itself
            timestep=(self.sigmas_of(components, timesteps)).to(dtype),
            guidance=None if guidance is None else guidance.to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids(prompt_embeds.shape[1], device, dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        inputs["guidance_scale"] = self.options(components).guidance_scale
        return inputs

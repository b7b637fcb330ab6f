"""PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import SnellaError
from ..training.objectives import NoiseObjective
from . import tokens
from .dit import DiTFamily


class PixArtFamily(DiTFamily):
    """PixArt-α / PixArt-Σ: DiT with cross-attention to T5 (masked), DDPM epsilon or v
    objective; learned-variance channels of the output are dropped."""

    name = "pixart"
    pipeline_class_names = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    text_encoder_components = ("text_encoder",)

    def default_sequence_length(self, components):
        return 300 if components.pipeline_class_name == "PixArtSigmaPipeline" else 120

    def configure(self, components, settings):
        if settings.dit.weighting_scheme is not None:
            raise SnellaError("--weighting_scheme applies to flow-matching models (SD3, Flux); PixArt "
                              "trains with the DDPM objective of its scheduler (see --snr_gamma)")
        super().configure(components, settings)

    def objective(self, components, snr_gamma=None):
        """DDPM on the pipeline scheduler's betas and prediction type (the pipeline ships a
        DPM-Solver for sampling; its ``add_noise`` indexes sigmas, not training timesteps)."""
        from diffusers import DDPMScheduler

        return NoiseObjective(DDPMScheduler.from_config(components.noise_scheduler.config), snr_gamma=snr_gamma)

    def encode_prompt(self, components, prompts, device):
        ids, mask = tokens.padded_tokens(components.modules["tokenizer"], prompts, self.options(components).max_sequence_length, device)
        embeds = components.modules["text_encoder"](ids, attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {
            "negative_prompt": None,  # the pipeline's default "" would clash with the embeddings
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_prompt_attention_mask": negative["prompt_attention_mask"],
        }

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        added: dict[str, Optional[Tensor]] = {"resolution": None, "aspect_ratio": None}
        if components.denoiser.use_additional_conditions:
            count, _, height, width = noisy_latents.shape
            factor = self.vae_scale_factor(components)
            size = torch.tensor([height * factor, width * factor], dtype=noisy_latents.dtype, device=noisy_latents.device)
            added = {"resolution": size.repeat(count, 1), "aspect_ratio": (size[0] / size[1]).repeat(count, 1)}
        output = transformer(
            noisy_latents, encoder_hidden_states=conditioning["prompt_embeds"], timestep=timesteps,
            added_cond_kwargs=added, encoder_attention_mask=conditioning["prompt_attention_mask"],
            return_dict=False,
        )[0]
        channels = noisy_latents.shape[1]
        if output.shape[1] == 2 * channels:
            output = output[:, :channels]
        return output

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        inputs["use_resolution_binning"] = False
        return inputs

"""Chroma (``ChromaPipeline``: Chroma1-HD, Chroma1-Base), trained as its pipeline samples it
(diffusers ships no DreamBooth example for Chroma; the pieces below follow
``pipeline_chroma.py`` and, where it is silent, the Flux.1 example it derives from).

- Prompts: T5-XXL alone (no CLIP, no pooled embedding), ``--max_sequence_length`` tokens
  (default 512, at most 512) padded, encoded *with* the tokenizer's attention mask. The
  transformer's text mask keeps every real token and the first padding token
  (``prompt_attention_mask``, in the embeddings' dtype as the pipeline makes it); the image
  tokens are appended unmasked at the model call.
- Latents: the Flux VAE's ``(z - shift_factor)·scaling_factor``, packed 2×2 with Flux.1's
  3-axis position ids (text ids all zero).
- Model call: ``timestep = σ`` (the transformer scales by 1000); no guidance input (Chroma's
  guidance is real classifier-free guidance at sampling, with an empty negative prompt).
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table
  (unshifted under the published scheduler's dynamic shifting, as for Flux.1).
- Text-encoder training is not offered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SnellaError
from ..training.flow_matching import latent_image_ids, pack_latents, text_ids, unpack_latents
from .dit import FlowMatchingFamily

MAX_SEQUENCE_LENGTH = 512


def chroma_text_mask(token_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The transformer's text mask from the tokenizer's ``(B, L)`` attention mask: 1 for each
    real token and for the first padding token after it, 0 for the rest, in ``dtype``."""
    lengths = token_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(token_mask.shape[1], device=token_mask.device).unsqueeze(0)
    return (positions <= lengths).to(dtype)


class ChromaFamily(FlowMatchingFamily):
    """Chroma: Flux.1-schnell's double- and single-stream blocks with the modulation computed
    by a small approximator network (no CLIP, no guidance embedding), T5-XXL with a masked
    prompt, Flux VAE, 2×2 packed latents."""

    name = "chroma"
    pipeline_class_names = ("ChromaPipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        return MAX_SEQUENCE_LENGTH

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Chroma", "its T5-XXL encoder stays frozen")
        super().configure(components, settings)
        length = self.options(components).max_sequence_length
        if length > MAX_SEQUENCE_LENGTH:
            raise SnellaError(f"--max_sequence_length={length}: Chroma takes at most {MAX_SEQUENCE_LENGTH} tokens")
        self.check_resolution(components, settings, "Chroma", "VAE downsampling × 2×2 latent packing")

    def pixel_multiple(self, components):
        """VAE factor × the 2×2 latent packing."""
        return 2 * self.vae_scale_factor(components)

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)`` and ``prompt_attention_mask`` ``(B, L)`` (embeddings'
        dtype), L = ``--max_sequence_length``."""
        modules = components.modules
        tokens = modules["tokenizer"](prompts, padding="max_length", max_length=self.options(components).max_sequence_length,
                                      truncation=True, return_tensors="pt").to(device)
        embeds = modules["text_encoder"](tokens.input_ids, output_hidden_states=False,
                                         attention_mask=tokens.attention_mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": chroma_text_mask(tokens.attention_mask, embeds.dtype)}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, noisy_latents.dtype
        embeds = conditioning["prompt_embeds"].to(dtype)
        image_tokens = (height // 2) * (width // 2)
        # the text mask followed by the (unmasked) image tokens, as the pipeline extends it
        mask = torch.cat([conditioning["prompt_attention_mask"].to(dtype),
                          torch.ones(batch_size, image_tokens, device=device, dtype=dtype)], dim=1)
        output = transformer(
            hidden_states=pack_latents(noisy_latents),
            timestep=self.sigmas_of(components, timesteps).to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=text_ids(embeds.shape[1], device, dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {"negative_prompt_embeds": negative["prompt_embeds"],
                "negative_prompt_attention_mask": negative["prompt_attention_mask"]}

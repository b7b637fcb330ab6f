"""Qwen-Image 2.1 (``QwenImage21Pipeline``), text to image, as its pipeline encodes and samples
(diffusers ships no DreamBooth example for 2.1; the rest follows
``train_dreambooth_lora_qwen_image.py``, as for Qwen-Image).

- Prompts: the pipeline's text-to-image chat template (:data:`PROMPT_TEMPLATE`, an empty prompt
  read as one space), tokenized by the processor's tokenizer with left padding; the
  Qwen3-VL text model's last decoder layer *before* its final norm (what the transformer was
  trained on, as the pipeline reads it); each prompt's tokens from the end of the system block
  on, right-padded with zeros to ``--max_sequence_length`` (default 512) with
  ``prompt_embeds_mask``. A prompt longer than that is refused. ``predict`` trims the batch to
  its longest prompt, as the pipeline pads a batch: the padding is masked, but the image's rotary
  frame position follows the text length.
- Latents: the pipeline's 16× VAE reads RGBA, so the pixels get an opaque alpha channel
  (1 in [-1, 1]); one frame is encoded, sampled, and normalised per channel,
  ``(z - latents_mean) / latents_std``. The transformer takes the latents unpatched: one token
  per latent pixel, row-major; each 2×2 group of tokens takes one image slot of the joint
  sequence (``img_mask``), so sides are multiples of 32 pixels.
- Model call: ``timestep = σ`` (the pipeline passes t / 1000), one ``(1, h, w)`` image shape per
  sample, the text mask only when some token is padding (as the pipeline); the output's last
  h·w tokens are the velocity.
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table,
  unshifted under the published scheduler's dynamic shifting (as the Qwen-Image example).
- Text-encoder training is not offered; condition images (the edit mode) are not trained.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SnellaError
from .base import TrainingComponents
from .dit import VALIDATION_KEY, FlowMatchingFamily
from .qwen_image import trim_prompt_padding

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_BLOCK = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
PROMPT_TEMPLATE = SYSTEM_BLOCK + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Latent tokens per image slot of the encoder's sequence (a 2×2 group).
TOKENS_PER_SLOT = 4


class QwenImage21Family(FlowMatchingFamily):
    """Qwen-Image 2.1: one sequence of text and image tokens through 32 single-stream
    block-causal blocks (q/k/v/out attention, SwiGLU ``img_mlp``, one shared modulation), a
    Qwen3-VL encoder behind a processor, a 64-channel 16× VAE over RGBA."""

    name = "qwen-image-2.1"
    pipeline_class_names = ("QwenImage21Pipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"
    guidance_argument = "true_cfg_scale"

    def default_sequence_length(self, components):
        return 512

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Qwen-Image 2.1",
                                          "its Qwen3-VL encoder stays frozen, as in diffusers' Qwen-Image example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Qwen-Image 2.1", "the VAE's 16× × 2×2 token slots")

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return int(components.vae.config.scale_factor_spatial)

    def pixel_multiple(self, components: TrainingComponents) -> int:
        return 2 * self.vae_scale_factor(components)

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → normalised latents ``(B, C, H/16, W/16)`` float32
        (the VAE sees one opaque RGBA frame, ``(B, 4, 1, H, W)``)."""
        vae = components.vae
        rgba = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        latents = vae.encode(rgba.unsqueeze(2).to(vae.dtype)).latent_dist.sample(generator)[:, :, 0].float()
        config = vae.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) / std

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)`` (zeros after each prompt's end) and
        ``prompt_embeds_mask`` ``(B, L)`` int64, L = ``--max_sequence_length``."""
        modules = components.modules
        tokenizer, encoder = modules["processor"].tokenizer, modules["text_encoder"]
        length = self.options(components).max_sequence_length
        system_tokens = len(tokenizer(SYSTEM_BLOCK).input_ids)
        tokens = tokenizer([PROMPT_TEMPLATE.format(prompt or " ") for prompt in prompts], padding=True,
                           padding_side="left", return_tensors="pt").to(device)
        body = getattr(encoder, "model", encoder)  # the model without its LM head
        language_model = getattr(body, "language_model", body)
        captured: list[Tensor] = []
        # the last decoder layer's output: the hidden state before the final norm
        hook = language_model.layers[-1].register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            body(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        finally:
            hook.remove()
        hidden = captured[-1]
        embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            states = hidden[row][tokens.attention_mask[row].bool()][system_tokens:]
            if states.shape[0] > length:
                raise SnellaError(f"prompt {prompt!r} is {states.shape[0]} tokens with the chat template: more than "
                                  f"--max_sequence_length={length}")
            embeds[row, : states.shape[0]] = states
            mask[row, : states.shape[0]] = 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, channels, height, width = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        embeds, mask = trim_prompt_padding(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        tokens = height * width
        slots = torch.cat([torch.zeros(batch_size, embeds.shape[1], dtype=torch.bool, device=device),
                           torch.ones(batch_size, tokens // TOKENS_PER_SLOT, dtype=torch.bool, device=device)], dim=1)
        output = transformer(
            hidden_states=noisy_latents.flatten(2).transpose(1, 2),
            encoder_hidden_states=embeds.to(dtype),
            # no mask when no token is padding, as the pipeline calls it
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            # σ: the pipeline passes t / 1000
            timestep=self.sigmas_of(components, timesteps).to(dtype),
            img_shapes=[[(1, height, width)]] * batch_size,
            img_mask=slots,
            return_dict=False,
        )[0]
        return output[:, -tokens:].transpose(1, 2).reshape(batch_size, channels, height, width)

    def validation_inputs(self, components, prompt):
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None and cached[0] == prompt:
            return dict(cached[1])
        if components.modules.get("text_encoder") is None:
            raise SnellaError(f"validation prompt {prompt!r} was not cached before the text encoder was freed")
        return {"prompt": prompt}

    def release_text_encoders(self, components, validation_prompt, device):
        super().release_text_encoders(components, validation_prompt, device)
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None:
            prompt, inputs = cached
            embeds, mask = trim_prompt_padding(inputs["prompt_embeds"], inputs["prompt_embeds_mask"])
            components.extra[VALIDATION_KEY] = (prompt, {"prompt_embeds": embeds, "prompt_embeds_mask": mask})

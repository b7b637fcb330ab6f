"""Flux.2: klein (``Flux2KleinPipeline``) and dev (``Flux2Pipeline``), as diffusers'
``train_dreambooth_lora_flux2_klein.py`` and ``train_dreambooth_lora_flux2.py`` train them. Both
share the transformer class (``Flux2Transformer2DModel``), the VAE and everything after the text
encoder; they differ in the encoder and, for dev, a distilled guidance input.

- Prompts, klein: the tokenizer's chat template (one user message, generation prompt, thinking
  off), ``--max_sequence_length`` tokens (default 512) padded, and the Qwen3 encoder's hidden
  states of layers :data:`TEXT_ENCODER_LAYERS` concatenated per token (width 3 × hidden).
- Prompts, dev: the processor's chat template over diffusers' Flux.2 system message and one user
  message (``[IMG]`` removed from the prompt, no generation prompt), ``--max_sequence_length``
  tokens (default 512) padded, and the Mistral-3 encoder's hidden states of layers
  :data:`DEV_TEXT_ENCODER_LAYERS` concatenated per token.
- Latents: the distribution's mode, patchified 2×2 into 4× the channels (128 for the
  published VAE) and normalised with the VAE's batch-norm statistics,
  ``(z - running_mean) / sqrt(running_var + eps)``; tokens are the patchified pixels in
  row-major order with 4-axis position ids ``(0, row, column, 0)``, text ids ``(0, 0, 0, i)``.
- Model call: ``timestep = σ`` (the transformer scales by 1000); guidance input only when the
  transformer has a guidance embedding (``--guidance_scale``, default 3.5 as the examples; dev
  has one, klein none).
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table.
- Text-encoder training is not offered (nor is it by the examples).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..training.flow_matching import guidance_vector
from .base import TrainingComponents
from .dit import FlowMatchingFamily

TEXT_ENCODER_LAYERS = (9, 18, 27)
DEV_TEXT_ENCODER_LAYERS = (10, 20, 30)


def patchify_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, 4C, H/2, W/2)``: each 2×2 patch's pixels become channels
    (channel-major: channel c of patch offset (i, j) goes to 4c + 2i + j)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * 4, height // 2, width // 2)


def position_ids(batch: int, height: int, width: int, device=None) -> Tensor:
    """Flux.2 image-token ids ``(B, H·W, 4)`` int64: ``(0, row, column, 0)``, row-major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    columns = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).expand(batch, -1, -1)


def text_position_ids(batch: int, length: int, device=None) -> Tensor:
    """Flux.2 text-token ids ``(B, L, 4)`` int64: ``(0, 0, 0, i)``."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1)


class Flux2Family(FlowMatchingFamily):
    """What Flux.2 klein and dev share: double- and single-stream blocks (fused single-block
    projections), a text encoder read at three depths, the 32-channel VAE patchified to 128
    with batch-norm statistics. Subclasses set the names and ``encode_prompt``."""

    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"
    display_name = "Flux.2"
    frozen_encoder = "its text encoder stays frozen, as in diffusers' example"

    def default_sequence_length(self, components):
        return 512

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, self.display_name, self.frozen_encoder)
        super().configure(components, settings)
        self.check_resolution(components, settings, "Flux.2", "VAE downsampling × 2×2 patches")

    def pixel_multiple(self, components: TrainingComponents) -> int:
        return 2 * self.vae_scale_factor(components)

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → normalised patchified latents
        ``(B, 4C, H/2f, W/2f)`` float32 (the distribution's mode: ``generator`` is unused)."""
        vae = components.vae
        latents = patchify_latents(vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float())
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return (latents - mean) / std

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, channels, height, width = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        embeds = conditioning["prompt_embeds"]
        guidance_enabled = bool(components.denoiser.config.guidance_embeds)
        guidance = guidance_vector(self.options(components).guidance_scale, batch_size, guidance_enabled, device)
        output = transformer(
            hidden_states=noisy_latents.reshape(batch_size, channels, height * width).transpose(1, 2),
            timestep=self.sigmas_of(components, timesteps).to(dtype),
            guidance=guidance,
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=text_position_ids(batch_size, embeds.shape[1], device),
            img_ids=position_ids(batch_size, height, width, device),
            return_dict=False,
        )[0]
        return output.transpose(1, 2).reshape(batch_size, channels, height, width)


class Flux2KleinFamily(Flux2Family):
    """Flux.2 klein: Qwen3 text encoder read at layers 9, 18, 27; no guidance embedding."""

    name = "flux2-klein"
    pipeline_class_names = ("Flux2KleinPipeline",)
    display_name = "Flux.2 klein"
    frozen_encoder = "its Qwen3 encoder stays frozen, as in diffusers' example"

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, 3·D)``, L = ``--max_sequence_length`` (padding included, as
        the pipeline passes it)."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
            for prompt in prompts
        ]
        tokens = tokenizer(texts, padding="max_length", max_length=self.options(components).max_sequence_length,
                           truncation=True, return_tensors="pt").to(device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True, use_cache=False).hidden_states
        return {"prompt_embeds": torch.cat([hidden[layer] for layer in TEXT_ENCODER_LAYERS], dim=-1)}

    def negative_prompt_inputs(self, components, device):
        return {"negative_prompt_embeds": self.encode_prompt(components, [""], device)["prompt_embeds"]}


def dev_chat(prompt: str) -> list[dict]:
    """The Flux.2 dev conversation of one prompt: diffusers' Flux.2 system message, then the
    prompt (``[IMG]`` removed, as the pipeline does) as the user's text."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]


class Flux2DevFamily(Flux2Family):
    """Flux.2 dev: Mistral-3 (Small 3.1) text encoder read at layers 10, 20, 30 through its
    processor's chat template; guidance-distilled (``--guidance_scale``)."""

    name = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    display_name = "Flux.2 dev"
    frozen_encoder = "its Mistral-3 encoder stays frozen, as in diffusers' example"

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, 3·D)``, L = ``--max_sequence_length`` (padding included, as
        the pipeline passes it)."""
        modules = components.modules
        tokens = modules["tokenizer"].apply_chat_template(
            [dev_chat(prompt) for prompt in prompts], add_generation_prompt=False, tokenize=True, return_dict=True,
            return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.options(components).max_sequence_length,
        )
        hidden = modules["text_encoder"](input_ids=tokens["input_ids"].to(device),
                                         attention_mask=tokens["attention_mask"].to(device),
                                         output_hidden_states=True, use_cache=False).hidden_states
        return {"prompt_embeds": torch.cat([hidden[layer] for layer in DEV_TEXT_ENCODER_LAYERS], dim=-1)}

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        inputs.setdefault("guidance_scale", self.options(components).guidance_scale)
        return inputs

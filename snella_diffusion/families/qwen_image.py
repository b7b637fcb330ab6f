"""Qwen-Image (``QwenImagePipeline``), as diffusers' ``train_dreambooth_lora_qwen_image.py``
trains it.

- Prompts: the Qwen2.5-VL chat template below, the last hidden layer of ``text_encoder``, the
  template's first :data:`TEMPLATE_PREFIX_TOKENS` tokens dropped, padding masked
  (``prompt_embeds_mask``); ``--max_sequence_length`` tokens (default 512, at most 1024).
  Embeddings are stored padded to that length and trimmed to the longest prompt of a batch in
  ``predict`` (the masked padding changes no output: text RoPE positions follow the image's).
- Latents: the video VAE (``AutoencoderKLQwenImage``) encodes one frame; the latents are
  normalised per channel, ``(z - latents_mean) / latents_std``, and packed 2×2 like Flux.1.
- Model call: ``timestep = σ`` (the transformer scales by 1000), ``img_shapes`` = one
  ``(1, h/2, w/2)`` frame per sample for its 3-axis RoPE; no guidance input.
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table,
  unshifted since the published scheduler shifts dynamically only at inference (the example
  overrides ``shift=3.0``, which only acts on schedulers without dynamic shifting).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SnellaError
from ..training.flow_matching import FlowMatchSchedule, pack_latents, unpack_latents
from .base import TrainingComponents
from .dit import VALIDATION_KEY, FlowMatchingFamily

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Tokens of the template before the prompt (system message and user header), dropped from the
# embeddings; the count is that of the published Qwen2.5-VL tokenizer, as the pipeline's.
TEMPLATE_PREFIX_TOKENS = 34
MAX_SEQUENCE_LENGTH = 1024
# The example loads its scheduler with shift=3.0 (inactive under dynamic shifting).
TRAINING_SHIFT = 3.0


def trim_prompt_padding(prompt_embeds: Tensor, prompt_embeds_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the padding columns every prompt of the batch has: ``(B, L, D)``, ``(B, L)`` →
    ``(B, L', D)``, ``(B, L')`` with L' the longest prompt of the batch (at least 1)."""
    length = max(int(prompt_embeds_mask.sum(dim=1).max()), 1)
    return prompt_embeds[:, :length], prompt_embeds_mask[:, :length]


class QwenImageFamily(FlowMatchingFamily):
    """Qwen-Image: 60 double-stream MMDiT blocks (image and text streams with their own MLPs,
    joint attention), Qwen2.5-VL text encoder, 16-channel video VAE with per-channel latent
    statistics, 2×2 packed latents."""

    name = "qwen-image"
    pipeline_class_names = ("QwenImagePipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        return 512

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Qwen-Image",
                                          "its 7B Qwen2.5-VL encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        length = self.options(components).max_sequence_length
        if length > MAX_SEQUENCE_LENGTH:
            raise SnellaError(f"--max_sequence_length={length}: Qwen-Image takes at most {MAX_SEQUENCE_LENGTH} tokens")
        self.check_resolution(components, settings, "Qwen-Image", "VAE downsampling × 2×2 latent packing")

    def objective(self, components, snr_gamma=None):
        objective = super().objective(components, snr_gamma)
        config = components.noise_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            objective.schedule = FlowMatchSchedule(objective.schedule.num_train_timesteps, TRAINING_SHIFT)
        return objective

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        """8 for the published VAE: one 2× downsampling per ``temperal_downsample`` entry."""
        return 2 ** len(components.vae.config.temperal_downsample)

    def latent_statistics(self, components: TrainingComponents, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, std)`` of the VAE's latents, each ``(1, C, 1, 1)`` on ``like``'s
        device, float32."""
        config = components.vae.config
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → normalised latents ``(B, C, H/8, W/8)`` float32
        (the VAE sees one frame, ``(B, 3, 1, H, W)``)."""
        vae = components.vae
        latents = vae.encode(pixels.unsqueeze(2).to(vae.dtype)).latent_dist.sample(generator)[:, :, 0].float()
        mean, std = self.latent_statistics(components, latents)
        return (latents - mean) / std

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)`` (zeros after each prompt's end) and
        ``prompt_embeds_mask`` ``(B, L)`` int64, L = ``--max_sequence_length``."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        length = self.options(components).max_sequence_length
        tokens = tokenizer(
            [PROMPT_TEMPLATE.format(prompt) for prompt in prompts], max_length=MAX_SEQUENCE_LENGTH + TEMPLATE_PREFIX_TOKENS,
            padding=True, truncation=True, return_tensors="pt",
        ).to(device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        for row in range(len(prompts)):
            prompt_states = hidden[row][tokens.attention_mask[row].bool()][TEMPLATE_PREFIX_TOKENS:][:length]
            embeds[row, : prompt_states.shape[0]] = prompt_states
            mask[row, : prompt_states.shape[0]] = 1
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, _, height, width = noisy_latents.shape
        embeds, mask = trim_prompt_padding(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        dtype = noisy_latents.dtype
        output = transformer(
            hidden_states=pack_latents(noisy_latents),
            encoder_hidden_states=embeds.to(dtype),
            # no mask when no token is padding, as the pipeline calls it
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            # σ: the transformer multiplies by 1000 itself
            timestep=self.sigmas_of(components, timesteps).to(dtype),
            img_shapes=[(1, height // 2, width // 2)] * batch_size,
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def release_text_encoders(self, components, validation_prompt, device):
        super().release_text_encoders(components, validation_prompt, device)
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None:
            prompt, inputs = cached
            embeds, mask = trim_prompt_padding(inputs["prompt_embeds"], inputs["prompt_embeds_mask"])
            components.extra[VALIDATION_KEY] = (prompt, {"prompt_embeds": embeds, "prompt_embeds_mask": mask})

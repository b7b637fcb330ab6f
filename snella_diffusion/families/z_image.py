"""Z-Image (``ZImagePipeline``: Z-Image and Z-Image-Turbo), as diffusers'
``train_dreambooth_lora_z_image.py`` trains it.

- Prompts: the tokenizer's chat template (one user message, generation prompt, thinking on),
  ``--max_sequence_length`` tokens (default 512), the second-to-last hidden layer of the Qwen3
  ``text_encoder``; the transformer takes each prompt's unpadded tokens. They are stored
  padded with a mask (``prompt_embeds``, ``prompt_embeds_mask``) and unpadded in ``predict``.
- Latents: the Flux VAE's ``(z - shift_factor)·scaling_factor`` of the distribution's mode (the
  example encodes with ``latent_dist.mode()``), unpacked: the transformer patchifies 2×2 itself
  and takes a list of ``(C, 1, H, W)`` frames.
- Model call: timestep ``1 - σ`` (the transformer scales by ``t_scale``), and the velocity is the
  negated output (the model predicts x0 - ε).
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table, shifted
  by its ``shift`` (3.0 on Z-Image-Turbo).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TrainingComponents
from .dit import VALIDATION_KEY, FlowMatchingFamily


def unpadded_prompts(prompt_embeds: Tensor, prompt_embeds_mask: Tensor) -> list[Tensor]:
    """``(B, L, D)`` padded embeddings and their ``(B, L)`` mask → B tensors ``(L_i, D)`` of the
    real tokens (the list the Z-Image transformer and pipeline take)."""
    return [embeds[mask.bool()] for embeds, mask in zip(prompt_embeds, prompt_embeds_mask)]


class ZImageFamily(FlowMatchingFamily):
    """Z-Image: single-stream DiT (30 blocks, with 2 noise-refiner and 2 context-refiner
    blocks), Qwen3 text encoder, Flux VAE."""

    name = "z-image"
    pipeline_class_names = ("ZImagePipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"
    # the 30 main blocks (the small refiner blocks before them stay on the device)
    block_lists = ("layers",)

    def default_sequence_length(self, components):
        return 512

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Z-Image",
                                          "its Qwen3 encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Z-Image", "VAE downsampling × the transformer's 2×2 patches")

    def pixel_multiple(self, components: TrainingComponents) -> int:
        """VAE factor × the transformer's patch size (16 for Z-Image)."""
        return self.vae_scale_factor(components) * int(components.denoiser.config.all_patch_size[0])

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → ``(mode - shift_factor)·scaling_factor``,
        ``(B, 16, H/8, W/8)``; deterministic, so ``generator`` is unused."""
        vae = components.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)`` and ``prompt_embeds_mask`` ``(B, L)`` int64, L =
        ``--max_sequence_length`` (zeros where the mask is 0)."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True)
            for prompt in prompts
        ]
        tokens = tokenizer(texts, padding="max_length", max_length=self.options(components).max_sequence_length,
                           truncation=True, return_tensors="pt").to(device)
        mask = tokens.attention_mask.long()
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=mask.bool(),
                         output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype), "prompt_embeds_mask": mask}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        dtype = noisy_latents.dtype
        prompts = [embeds.to(dtype) for embeds in unpadded_prompts(conditioning["prompt_embeds"],
                                                                   conditioning["prompt_embeds_mask"])]
        frames = list(noisy_latents.unsqueeze(2).unbind(dim=0))
        outputs = transformer(frames, (1.0 - self.sigmas_of(components, timesteps)).to(dtype), prompts,
                              return_dict=False)[0]
        return -torch.stack(outputs, dim=0).squeeze(2)

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {"negative_prompt_embeds": unpadded_prompts(negative["prompt_embeds"], negative["prompt_embeds_mask"])}

    def release_text_encoders(self, components, validation_prompt, device):
        super().release_text_encoders(components, validation_prompt, device)
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None:
            prompt, inputs = cached
            embeds = unpadded_prompts(inputs.pop("prompt_embeds"), inputs.pop("prompt_embeds_mask"))
            components.extra[VALIDATION_KEY] = (prompt, {**inputs, "prompt_embeds": embeds})

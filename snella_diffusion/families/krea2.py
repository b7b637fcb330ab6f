"""Krea 2 (``Krea2Pipeline``: Krea 2 and Krea 2 Turbo), as diffusers'
``train_dreambooth_lora_krea2.py`` trains it.

- Prompts: Qwen-Image's chat template (``qwen_image.PROMPT_TEMPLATE``) laid out as one
  fixed-length block ``[prefix | prompt | padding | suffix]``: prefix and prompt padded to
  ``--max_sequence_length`` + 34 - 5 tokens, then the 5 suffix tokens. The Qwen3-VL encoder sees
  position ids that count only real tokens (padding takes no position, on all three M-RoPE
  axes); its hidden states at the pipeline's ``text_encoder_select_layers`` are stacked per
  token, ``(B, L, layers, D)``, and the 34 prefix tokens dropped, with the boolean mask.
- Latents: the Qwen-Image VAE's one-frame sample normalised per channel (as
  ``qwen_image.QwenImageFamily.encode_latents``), packed into ``patch_size``² patches (2 on the
  published model) like Flux.1's.
- Model call: ``timestep = t / 1000 = σ``, 3-axis position ids for the ``[text, image]``
  sequence (text at the origin, image tokens ``(0, row, column)``), the text mask; no guidance
  input (the base model samples with real classifier-free guidance, Turbo without).
- σ sampling: ``--weighting_scheme`` (default none) over the scheduler's training table
  (unshifted under the published scheduler's dynamic shifting, as the example loads it).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..training.flow_matching import pack_latents, unpack_latents
from .base import TrainingComponents
from .dit import FlowMatchingFamily
from .qwen_image import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS, QwenImageFamily

TEMPLATE_PREFIX, TEMPLATE_SUFFIX = PROMPT_TEMPLATE.split("{}")
# Tokens of the template's suffix ("<|im_end|>", "\n", "<|im_start|>", "assistant", "\n").
TEMPLATE_SUFFIX_TOKENS = 5
# Krea2Pipeline's defaults for the pipeline settings stored in model_index.json.
DEFAULT_SELECT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
DEFAULT_PATCH_SIZE = 2
PIPELINE_SETTINGS_KEY = "krea2_pipeline_settings"
PIPELINE_SETTINGS = ("text_encoder_select_layers", "is_distilled", "patch_size")
_QWEN_IMAGE = QwenImageFamily()


def sequence_position_ids(text_length: int, grid_height: int, grid_width: int, device=None) -> Tensor:
    """Rotary ids of the ``[text, image]`` sequence, ``(L + h·w, 3)`` float32: text tokens at
    the origin, image tokens ``(0, row, column)`` in row-major order."""
    rows = torch.arange(grid_height, device=device, dtype=torch.float32).repeat_interleave(grid_width)
    columns = torch.arange(grid_width, device=device, dtype=torch.float32).repeat(grid_height)
    image = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1)
    return torch.cat([torch.zeros(text_length, 3, device=device), image], dim=0)


class Krea2Family(FlowMatchingFamily):
    """Krea 2: single-stream DiT (28 blocks of gated attention with grouped key/values and a
    SwiGLU MLP) behind a text-fusion transformer over 12 tapped Qwen3-VL-4B layers, the
    Qwen-Image VAE, 2×2 patches."""

    name = "krea2"
    pipeline_class_names = ("Krea2Pipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"

    def load(self, source, model_index, revision=None, variant=None, dtype=None, denoiser_file=None):
        """The components, plus the pipeline settings ``model_index.json`` holds (the tapped
        layers, the patch size, distilled or not) in ``extra``."""
        components = super().load(source, model_index, revision=revision, variant=variant, dtype=dtype,
                                   denoiser_file=denoiser_file)
        components.extra[PIPELINE_SETTINGS_KEY] = {
            key: model_index[key] for key in PIPELINE_SETTINGS if model_index.get(key) is not None
        }
        return components

    def pipeline_settings(self, components: TrainingComponents) -> dict[str, Any]:
        return dict(components.extra.get(PIPELINE_SETTINGS_KEY, {}))

    def select_layers(self, components: TrainingComponents) -> tuple[int, ...]:
        return tuple(self.pipeline_settings(components).get("text_encoder_select_layers", DEFAULT_SELECT_LAYERS))

    def patch_size(self, components: TrainingComponents) -> int:
        return int(self.pipeline_settings(components).get("patch_size", DEFAULT_PATCH_SIZE))

    def default_sequence_length(self, components):
        return 512

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Krea 2", "its Qwen3-VL encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Krea 2", "VAE downsampling × the latent patches")

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return _QWEN_IMAGE.vae_scale_factor(components)

    def pixel_multiple(self, components: TrainingComponents) -> int:
        return self.vae_scale_factor(components) * self.patch_size(components)

    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → ``(z - latents_mean) / latents_std`` per channel,
        ``(B, C, H/8, W/8)`` float32 (Qwen-Image's VAE and statistics)."""
        return _QWEN_IMAGE.encode_latents(components, pixels, generator)

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, layers, D)`` and ``prompt_embeds_mask`` ``(B, L)`` bool, L =
        ``--max_sequence_length`` (the last 5 are the template's suffix)."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        length = self.options(components).max_sequence_length
        head = tokenizer([TEMPLATE_PREFIX + prompt for prompt in prompts], truncation=True, padding="max_length",
                         max_length=length + TEMPLATE_PREFIX_TOKENS - TEMPLATE_SUFFIX_TOKENS, return_tensors="pt")
        tail = tokenizer([TEMPLATE_SUFFIX] * len(prompts), return_tensors="pt")
        input_ids = torch.cat([head.input_ids, tail.input_ids], dim=1).to(device)
        mask = torch.cat([head.attention_mask, tail.attention_mask], dim=1).bool().to(device)
        # padding takes no position: each token's position counts the real tokens before it
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
        hidden = encoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         output_hidden_states=True).hidden_states
        stacked = torch.stack([hidden[layer] for layer in self.select_layers(components)], dim=2)
        return {"prompt_embeds": stacked[:, TEMPLATE_PREFIX_TOKENS:],
                "prompt_embeds_mask": mask[:, TEMPLATE_PREFIX_TOKENS:]}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        _, _, height, width = noisy_latents.shape
        patch = self.patch_size(components)
        dtype, device = noisy_latents.dtype, noisy_latents.device
        embeds = conditioning["prompt_embeds"]
        output = transformer(
            hidden_states=pack_latents(noisy_latents, patch),
            encoder_hidden_states=embeds.to(dtype),
            # σ: the example passes timesteps / 1000
            timestep=self.sigmas_of(components, timesteps).to(dtype),
            position_ids=sequence_position_ids(embeds.shape[1], height // patch, width // patch, device),
            encoder_attention_mask=conditioning["prompt_embeds_mask"].bool(),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width, patch)

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {"negative_prompt_embeds": negative["prompt_embeds"],
                "negative_prompt_embeds_mask": negative["prompt_embeds_mask"]}

    def pipeline_config(self, components: TrainingComponents) -> dict[str, Any]:
        return self.pipeline_settings(components)

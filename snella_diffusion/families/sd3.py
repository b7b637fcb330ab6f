"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..training.flow_matching import precondition_outputs
from . import tokens
from .base import ModelFamily, TrainingComponents
from .dit import FlowMatchingFamily


class SD3Family(FlowMatchingFamily):
    """Stable Diffusion 3 / 3.5: MMDiT, CLIP-L + CLIP-G (+ optional T5-XXL), flow matching."""

    name = "stable-diffusion-3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_weighting_scheme = "logit_normal"

    def load(self, source, model_index, revision=None, variant=None, dtype=None,
             denoiser_file=None) -> TrainingComponents:
        """As the base loader; ``text_encoder_3`` (T5) may be absent (null in model_index.json)."""
        family = self
        spec = model_index.get("text_encoder_3")
        if not (isinstance(spec, (list, tuple)) and spec and spec[0] is not None):
            family = copy.copy(self)
            family.text_encoder_components = ("text_encoder", "text_encoder_2")
        return ModelFamily.load(family, source, model_index, revision, variant, dtype, denoiser_file)

    def uses_preconditioning(self, components):
        return self.options(components).precondition_outputs

    def encode_prompt(self, components, prompts, device):
        modules = components.modules
        clip_states, pooled = [], []
        for encoder_name, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            tokenizer = modules[tokenizer_name]
            ids, _ = tokens.padded_tokens(tokenizer, prompts, tokens.clip_max_length(tokenizer), device)
            output = modules[encoder_name](ids, output_hidden_states=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output[0])
        clip_embeds = torch.cat(clip_states, dim=-1)
        joint_dim = int(components.denoiser.config.joint_attention_dim)
        length = self.options(components).max_sequence_length
        if "text_encoder_3" in components.text_encoder_components:
            ids, _ = tokens.padded_tokens(modules["tokenizer_3"], prompts, length, device)
            t5_embeds = modules["text_encoder_3"](ids)[0]
        else:
            t5_embeds = clip_embeds.new_zeros(len(prompts), length, joint_dim)
        clip_embeds = nn.functional.pad(clip_embeds, (0, joint_dim - clip_embeds.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_embeds, t5_embeds.to(clip_embeds.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        }

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        output = transformer(
            hidden_states=noisy_latents, timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False,
        )[0]
        if self.uses_preconditioning(components):
            return precondition_outputs(output, noisy_latents, self.sigmas_of(components, timesteps))
        return output

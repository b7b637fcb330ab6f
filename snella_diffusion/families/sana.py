"""Sana (``SanaPipeline``), as diffusers' ``train_dreambooth_lora_sana.py`` trains it.

- Prompts: lower-cased and stripped (the pipeline's preprocessing without caption cleaning),
  right-padded to ``--max_sequence_length`` Gemma-2 tokens (default 300), the encoder's last
  hidden state and the attention mask (``prompt_embeds``, ``prompt_attention_mask``). No
  complex human instruction by default, as in the example, so validation passes
  ``complex_human_instruction=None`` too (the pipeline's own default would prepend one).
  ``--complex_human_instruction`` (alone: the pipeline's own, else the given text) puts one
  before every prompt as the pipeline does: the instruction's tokens + ``--max_sequence_length``
  - 2 are encoded and the first token and the last ``--max_sequence_length`` - 1 kept.
- Latents: the deep-compression autoencoder (``AutoencoderDC``, 32× downsampling, 32
  channels): ``latent·scaling_factor``, deterministic; the transformer patchifies itself
  (patch 1 on the published models).
- Model call: ``timestep = σ·1000`` (times the transformer's ``timestep_scale``, 1 on Sana 1.x),
  the prompt's attention mask; the output is the velocity ``ε - x0`` (the learned-σ half is
  dropped where ``out_channels`` is twice the latent channels, as in the pipeline).
- σ sampling: ``--weighting_scheme`` (default none) over the training table of a
  ``FlowMatchEulerDiscreteScheduler`` built from the published scheduler config (a
  flow-DPM-Solver's: its ``flow_shift`` is not a training shift, so the table is unshifted, as
  in the example).
- Validation samples at the training resolution (``use_resolution_binning=False``).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from .base import TrainingComponents
from .dit import PIPELINE_INSTRUCTION, VALIDATION_KEY, FlowMatchingFamily

INSTRUCTION_KEY = "sana_complex_human_instruction"


def pipeline_instruction() -> list[str]:
    """SanaPipeline's default ``complex_human_instruction`` (the default of its ``__call__``)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaFamily(FlowMatchingFamily):
    """Sana: linear-attention DiT blocks (self-attention, cross-attention to the prompt,
    convolutional GLU MLP), Gemma-2 text encoder, 32× DC-AE."""

    name = "sana"
    pipeline_class_names = ("SanaPipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        return 300

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Sana", "its Gemma-2 encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Sana", "the DC-AE's downsampling × the transformer's patch")
        given = settings.dit.complex_human_instruction
        components.extra[INSTRUCTION_KEY] = (
            None if given is None else pipeline_instruction() if given == PIPELINE_INSTRUCTION else [given])

    def instruction(self, components: TrainingComponents) -> Optional[list[str]]:
        """The complex human instruction's lines (None: none, the example's default)."""
        return components.extra.get(INSTRUCTION_KEY)

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        """32 for the published DC-AE: one 2× downsampling per encoder level after the first."""
        return 2 ** (len(components.vae.config.encoder_block_out_channels) - 1)

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → ``latent·scaling_factor`` ``(B, 32, H/32, W/32)``;
        deterministic, so ``generator`` is unused."""
        vae = components.vae
        return vae.encode(pixels.to(vae.dtype)).latent * vae.config.scaling_factor

    def gemma_states(self, components: TrainingComponents, prompts: list[str], device: torch.device,
                     instruction: Optional[list[str]] = None) -> dict[str, Tensor]:
        """``prompt_embeds`` ``(B, L, D)`` (last hidden state) and ``prompt_attention_mask``
        ``(B, L)`` int64 of the lower-cased, stripped prompts, L = ``--max_sequence_length``;
        behind ``instruction`` (its lines joined by newlines) when given, of which the first
        token and the last L - 1 positions are kept."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        length = self.options(components).max_sequence_length
        texts, padded = [prompt.lower().strip() for prompt in prompts], length
        if instruction:
            prefix = "\n".join(instruction)
            texts = [prefix + text for text in texts]
            padded = len(tokenizer.encode(prefix)) + length - 2
        tokens = tokenizer(texts, padding="max_length", max_length=padded, truncation=True,
                           add_special_tokens=True, padding_side="right", return_tensors="pt").to(device)
        hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        mask = tokens.attention_mask.long()
        if instruction:
            kept = [0, *range(-length + 1, 0)]
            hidden, mask = hidden[:, kept], mask[:, kept]
        return {"prompt_embeds": hidden, "prompt_attention_mask": mask}

    def encode_prompt(self, components, prompts, device):
        return self.gemma_states(components, prompts, device, self.instruction(components))

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        config = components.denoiser.config
        dtype = noisy_latents.dtype
        output = transformer(
            hidden_states=noisy_latents,
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            encoder_attention_mask=conditioning["prompt_attention_mask"],
            timestep=(timesteps.float() * float(config.timestep_scale)).to(dtype),
            return_dict=False,
        )[0]
        if config.out_channels == 2 * noisy_latents.shape[1]:
            output = output.chunk(2, dim=1)[0]
        return output

    def negative_prompt_inputs(self, components, device):
        negative = self.gemma_states(components, [""], device)
        # negative_prompt=None: the pipeline's default "" may not come with negative embeddings
        return {"negative_prompt": None, "negative_prompt_embeds": negative["prompt_embeds"],
                "negative_prompt_attention_mask": negative["prompt_attention_mask"]}

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        extra = {"use_resolution_binning": False}
        if components.extra.get(VALIDATION_KEY) is None:
            extra["complex_human_instruction"] = self.instruction(components)
        return {**inputs, **extra}

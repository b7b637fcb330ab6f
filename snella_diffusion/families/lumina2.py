"""Lumina-Image 2.0 (``Lumina2Pipeline``), as diffusers' ``train_dreambooth_lora_lumina2.py``
trains it.

- Prompts: the system prompt + ``" <Prompt Start> "`` + the prompt (``--system_prompt``, by
  default :data:`SYSTEM_PROMPT`, the pipeline's, as in the example; validation passes the same
  one to the pipeline), padded on the
  right to ``--max_sequence_length`` Gemma-2 tokens (default 256, at most 512); the
  second-to-last hidden layer of ``text_encoder`` and the attention mask
  (``prompt_embeds``, ``prompt_attention_mask``). The empty negative prompt of validation has
  no system prompt, as in the pipeline.
- Latents: the Flux-style VAE's ``(z - shift_factor)·scaling_factor`` of a sample, unpacked
  (the transformer patchifies 2×2 itself).
- Model call: Lumina counts time from noise (0) to image (1): the transformer gets ``1 - σ``
  and predicts ``x0 - ε``, so the velocity ``ε - x0`` is its negated output (as the pipeline
  negates it).
- σ sampling: the example reads σ from the scheduler's (shifted) training table and uses it as
  Lumina's own time, i.e. the noise level is ``1 - σ_table`` (:class:`ReversedFlowMatchSchedule`);
  ``--weighting_scheme`` (default none) draws the table index. ``sigma_sqrt`` weights by the
  noise level here (the example weights by ``σ_table``; ``cosmap`` is the same either way).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SnellaError
from ..training.flow_matching import FlowMatchSchedule
from .base import TrainingComponents
from .dit import FlowMatchingFamily

SYSTEM_PROMPT_KEY = "lumina2_system_prompt"
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                 "image-text alignment based on textual prompts or user prompts.")
PROMPT_SEPARATOR = " <Prompt Start> "
MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class ReversedFlowMatchSchedule:
    """A flow-matching training table read in Lumina's time direction: the noise level of index
    i is ``1 - σ_i`` of ``schedule``'s table (σ_i descending from 1, so the levels ascend from 0).

    Same interface as :class:`~snella_diffusion.training.flow_matching.FlowMatchSchedule`
    (``sigmas_for``, ``sample``) so :class:`FlowMatchingObjective` uses it unchanged."""

    schedule: FlowMatchSchedule

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def shift(self) -> float:
        return self.schedule.shift

    def sigmas_for(self, u: Tensor) -> Tensor:
        """Noise level ``1 - σ`` of the table index ⌊u·N⌋ for each u ∈ [0, 1), float32."""
        return 1.0 - self.schedule.sigmas_for(u)

    def sample(self, scheme, batch_size, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=None,
               device=None) -> tuple[Tensor, Tensor]:
        """``(noise levels, timesteps = level·N)``, each float32 ``(batch_size,)``."""
        sigmas, _ = self.schedule.sample(scheme, batch_size, logit_mean, logit_std, mode_scale, generator, device)
        levels = 1.0 - sigmas
        return levels, levels * self.num_train_timesteps



class Lumina2Family(FlowMatchingFamily):
    """Lumina-Image 2.0: a single-stream DiT (26 blocks, with 2 noise- and 2 context-refiner
    blocks, grouped-query attention, SwiGLU MLPs), Gemma-2 text encoder, Flux VAE."""

    name = "lumina2"
    pipeline_class_names = ("Lumina2Pipeline",)
    block_lists = ("layers",)  # after the noise and context refiners, which stay resident
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        return 256

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Lumina2",
                                          "its Gemma-2 encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        length = self.options(components).max_sequence_length
        if length > MAX_SEQUENCE_LENGTH:
            raise SnellaError(f"--max_sequence_length={length}: Lumina2 takes at most {MAX_SEQUENCE_LENGTH} tokens")
        self.check_resolution(components, settings, "Lumina2", "VAE downsampling × the transformer's 2×2 patches")
        given = settings.dit.system_prompt
        components.extra[SYSTEM_PROMPT_KEY] = SYSTEM_PROMPT if given is None else given

    def system_prompt(self, components: TrainingComponents) -> str:
        """``--system_prompt``, or the pipeline's default :data:`SYSTEM_PROMPT`."""
        return components.extra.get(SYSTEM_PROMPT_KEY, SYSTEM_PROMPT)

    def objective(self, components, snr_gamma=None):
        objective = super().objective(components, snr_gamma)
        objective.schedule = ReversedFlowMatchSchedule(objective.schedule)
        return objective

    def gemma_states(self, components: TrainingComponents, texts: list[str], device: torch.device) -> dict[str, Tensor]:
        """``texts`` as given → ``prompt_embeds`` ``(B, L, D)`` (hidden layer -2) and
        ``prompt_attention_mask`` ``(B, L)`` int64, right-padded to ``--max_sequence_length``."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        tokens = tokenizer(texts, padding="max_length", max_length=self.options(components).max_sequence_length,
                           truncation=True, padding_side="right", return_tensors="pt").to(device)
        hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden, "prompt_attention_mask": tokens.attention_mask.long()}

    def encode_prompt(self, components, prompts, device):
        """The prompts behind the system prompt: see :meth:`gemma_states`."""
        system = self.system_prompt(components)
        return self.gemma_states(components, [system + PROMPT_SEPARATOR + prompt for prompt in prompts], device)

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        dtype = noisy_latents.dtype
        output = transformer(
            hidden_states=noisy_latents,
            timestep=(1.0 - self.sigmas_of(components, timesteps)).to(dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            encoder_attention_mask=conditioning["prompt_attention_mask"],
            return_dict=False,
        )[0]
        return -output

    def negative_prompt_inputs(self, components, device):
        negative = self.gemma_states(components, [""], device)
        return {"negative_prompt_embeds": negative["prompt_embeds"],
                "negative_prompt_attention_mask": negative["prompt_attention_mask"]}

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        if "prompt" in inputs:  # encoded by the pipeline: give it the run's system prompt
            inputs["system_prompt"] = self.system_prompt(components)
        return inputs

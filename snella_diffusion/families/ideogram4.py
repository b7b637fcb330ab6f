"""Ideogram 4 (``Ideogram4Pipeline``), as diffusers' ``train_dreambooth_lora_ideogram4.py``
trains it.

- Prompts: one user message (a list of one text part) through the tokenizer's chat template with
  the generation prompt, left-padded to ``--max_sequence_length`` tokens (default 2048, the
  example's); the Qwen3-VL text model sees positions ``0..n-1`` for a prompt of n tokens, and
  the outputs of its decoder layers :data:`ACTIVATION_LAYERS` (before the final norm) are
  interleaved per token into one feature vector of 13 × width, zero on the padding
  (``prompt_embeds`` float32, ``prompt_embeds_mask``). A prompt longer than
  ``--max_sequence_length`` is refused, as the pipeline refuses it.
- Latents: the Flux.2 VAE's mode, cut into 2×2 patches whose channels are ordered
  (row, column, channel) as the pipeline unpacks them, normalised with the VAE's batch-norm
  statistics; kept as an image ``(B, 4C, H/2f, W/2f)``, one token per latent pixel, row-major.
- Model call: one packed sequence ``[text | image]``: the text region is zero in the latent
  input and carries the prompt features, the image region the reverse; 3-axis position ids
  (text ``(i, i, i)``, image ``(0, row, column)`` shifted by the transformer's image offset),
  segment ids that keep padding apart, and role indicators. Ideogram counts time from noise
  (0) to image (1): the transformer gets ``1 - σ`` and predicts ``x0 - ε``, so the velocity
  ``ε - x0`` is its negated output (as the pipeline steps with ``-v``). The text region is
  trimmed to the batch's longest prompt (padding sits in its own attention segment, so the
  image tokens' output does not depend on it).
- σ sampling: σ itself is drawn from ``--weighting_scheme`` (default ``logit_normal``; no
  scheduler table), with the logit mean shifted by resolution, ``--logit_mean`` +
  ½·log(H·W / 512²), as the pipeline's sampling schedule (:class:`Ideogram4Objective`). The
  example's ``--logit_std`` is 1.5 (the pipeline's), so the recipe passes it.
- Only ``transformer`` is trained. The ``unconditional_transformer`` (the asymmetric guidance
  branch, same size) is not loaded for training; validation loads it for its samples.
- Validation: constant guidance (:data:`VALIDATION_GUIDANCE_SCALE` unless
  ``--validation_guidance_scale``); after the text encoder is freed, the validation prompt's
  cached features stand in for it (:func:`cached_prompt_pipeline`).
- Text-encoder training is not offered (nor is it by the example).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import SnellaError
from ..training.flow_matching import (
    FlowMatchingObjective,
    add_flow_noise,
    flow_target,
    loss_weighting,
    sample_density,
)
from ..training.objectives import ObjectiveBatch
from .base import TrainingComponents
from .dit import VALIDATION_KEY, FlowMatchingFamily

# Decoder layers of Qwen3-VL-8B whose outputs make the text features (the pipeline's
# QWEN3_VL_ACTIVATION_LAYERS).
ACTIVATION_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
# Ideogram4Transformer2DModel's token roles and the offset of image positions.
PADDING_SEGMENT = -1
IMAGE_ROLE = 2
TEXT_ROLE = 3
IMAGE_POSITION_OFFSET = 65536
PATCH = 2
# The resolution the logit-normal mean refers to, in pixels per side.
BASE_RESOLUTION = 512
VALIDATION_GUIDANCE_SCALE = 7.0
UNCONDITIONAL = "unconditional_transformer"
SOURCE_KEY = "ideogram4_unconditional_source"


def resolution_logit_mean(logit_mean: float, height: int, width: int) -> float:
    """The logit-normal mean at an ``height × width`` pixel image: ``logit_mean`` + ½·log(H·W / 512²)."""
    return logit_mean + 0.5 * math.log(height * width / BASE_RESOLUTION ** 2)


def patchify(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, 4C, H/2, W/2)``: channel ``(2i + j)·C + c`` holds channel c of
    the patch pixel (i, j), the order in which the pipeline unpacks its tokens."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return patches.permute(0, 3, 5, 1, 2, 4).reshape(batch, PATCH * PATCH * channels, height // PATCH, width // PATCH)


def sequence_layout(text_lengths: Tensor, text_length: int, grid_height: int, grid_width: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Position ids ``(B, T, 3)``, segment ids ``(B, T)`` and role indicators ``(B, T)`` (int64)
    of the packed ``[text | image]`` sequence, T = ``text_length`` + h·w. Prompt b's
    ``text_lengths[b]`` tokens end the left-padded text region at positions ``(i, i, i)``; image
    token (row, column) is at ``(0, row, column)`` + offset; padding has segment -1 and role 0."""
    device = text_lengths.device
    batch = text_lengths.shape[0]
    rows = torch.arange(grid_height, device=device).repeat_interleave(grid_width)
    columns = torch.arange(grid_width, device=device).repeat(grid_height)
    image = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1) + IMAGE_POSITION_OFFSET
    slots = torch.arange(text_length, device=device)
    start = (text_length - text_lengths).unsqueeze(1)
    is_text = slots.unsqueeze(0) >= start
    text = ((slots.unsqueeze(0) - start) * is_text).unsqueeze(-1).expand(batch, text_length, 3)
    positions = torch.cat([text, image.unsqueeze(0).expand(batch, -1, -1)], dim=1)
    image_ones = torch.ones(batch, rows.shape[0], dtype=torch.long, device=device)
    segments = torch.cat([torch.where(is_text, 1, PADDING_SEGMENT), image_ones], dim=1)
    roles = torch.cat([is_text.long() * TEXT_ROLE, image_ones * IMAGE_ROLE], dim=1)
    return positions, segments, roles


class Ideogram4Objective(FlowMatchingObjective):
    """Flow matching with σ drawn directly from the ``--weighting_scheme`` density (continuous,
    no scheduler table), the logit-normal mean shifted by each batch's resolution
    (:func:`resolution_logit_mean`); timesteps are σ·N as elsewhere.

    Args:
        pixels_per_latent: image pixels per latent pixel along a side (VAE factor × patch).
    """

    def __init__(self, schedule, pixels_per_latent: int, **options: Any) -> None:
        super().__init__(schedule, **options)
        self.pixels_per_latent = pixels_per_latent

    def prepare(self, latents: Tensor, noise: Tensor, generator: Optional[torch.Generator] = None,
                input_noise: Optional[Tensor] = None) -> ObjectiveBatch:
        height, width = (side * self.pixels_per_latent for side in latents.shape[-2:])
        mean = resolution_logit_mean(self.logit_mean, height, width)
        sigmas = sample_density(self.weighting_scheme, latents.shape[0], mean, self.logit_std, self.mode_scale,
                                generator=generator).to(latents.device)
        noisy = add_flow_noise(latents, noise if input_noise is None else input_noise, sigmas)
        weights = loss_weighting(self.weighting_scheme, sigmas) if self.weighting_scheme in ("sigma_sqrt", "cosmap") else None
        return ObjectiveBatch(noisy, sigmas * self.schedule.num_train_timesteps, flow_target(latents, noise), weights)


@functools.cache
def cached_prompt_pipeline() -> type:
    """``Ideogram4Pipeline`` whose ``encode_prompt`` reads the features of the prompts in its
    ``cached_prompts`` (``{prompt: (features (1, L, F), mask (1, L))}``, as
    :meth:`Ideogram4Family.encode_prompt` returns them) when its text encoder is None."""
    from diffusers import Ideogram4Pipeline

    class CachedPromptIdeogram4Pipeline(Ideogram4Pipeline):
        cached_prompts: dict[str, tuple[Tensor, Tensor]] = {}

        def encode_prompt(self, prompt, grid_h, grid_w, max_sequence_length, device):
            if self.text_encoder is not None:
                return super().encode_prompt(prompt, grid_h, grid_w, max_sequence_length, device)
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            missing = [text for text in prompts if text not in self.cached_prompts]
            if missing:
                raise SnellaError(f"prompt {missing[0]!r} was not cached before the text encoder was freed")
            features = torch.cat([self.cached_prompts[text][0] for text in prompts]).to(device)
            mask = torch.cat([self.cached_prompts[text][1] for text in prompts]).to(device)
            if features.shape[1] != max_sequence_length:
                raise SnellaError(f"cached prompts have {features.shape[1]} tokens, the call asks for "
                                  f"max_sequence_length={max_sequence_length}")
            positions, segments, roles = sequence_layout(mask.sum(dim=1), max_sequence_length, grid_h, grid_w)
            image = features.new_zeros(features.shape[0], grid_h * grid_w, features.shape[-1])
            return torch.cat([features, image], dim=1), positions, segments, roles

    return CachedPromptIdeogram4Pipeline


class Ideogram4Family(FlowMatchingFamily):
    """Ideogram 4: a single-stream DiT (34 blocks of q/k/v/out attention with q/k RMSNorm and a
    SwiGLU MLP ``w1/w2/w3``, AdaLN from the time alone) over one packed text+image sequence,
    text features from 13 layers of Qwen3-VL-8B, the Flux.2 VAE in 2×2 patches; sampled with
    a second, unconditional transformer for asymmetric guidance."""

    name = "ideogram4"
    pipeline_class_names = ("Ideogram4Pipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "logit_normal"
    block_lists = ("layers",)

    def load(self, source, model_index, revision=None, variant=None, dtype=None, denoiser_file=None):
        """Every component but the unconditional transformer (validation loads it when it samples)."""
        index = {key: value for key, value in model_index.items() if key != UNCONDITIONAL}
        components = super().load(source, index, revision=revision, variant=variant, dtype=dtype,
                                  denoiser_file=denoiser_file)
        components.extra[SOURCE_KEY] = {"revision": revision, "variant": variant, "torch_dtype": dtype}
        return components

    def default_sequence_length(self, components):
        return 2048

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Ideogram 4",
                                          "its Qwen3-VL encoder stays frozen, as in diffusers' example")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Ideogram 4", "VAE downsampling × 2×2 patches")

    def objective(self, components, snr_gamma=None):
        base = super().objective(components, snr_gamma)
        options = self.options(components)
        return Ideogram4Objective(base.schedule, self.pixel_multiple(components),
                                  weighting_scheme=options.weighting_scheme, logit_mean=options.logit_mean,
                                  logit_std=options.logit_std, mode_scale=options.mode_scale)

    def pixel_multiple(self, components: TrainingComponents) -> int:
        return PATCH * self.vae_scale_factor(components)

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, H, W)`` in [-1, 1] → normalised patchified latents
        ``(B, 4C, H/2f, W/2f)`` float32 (the distribution's mode: ``generator`` is unused)."""
        vae = components.vae
        latents = patchify(vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float())
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return (latents - mean) / std

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, 13·D)`` float32, left-padded with zeros, and
        ``prompt_embeds_mask`` ``(B, L)`` int64, L = ``--max_sequence_length``."""
        modules = components.modules
        tokenizer, encoder = modules["tokenizer"], modules["text_encoder"]
        length = self.options(components).max_sequence_length
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            chat = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            if len(ids) > length:
                raise SnellaError(f"prompt {prompt!r} is {len(ids)} tokens with the chat template: more than "
                                  f"--max_sequence_length={length}")
            input_ids[row, length - len(ids):] = ids
            mask[row, length - len(ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        language_model = encoder.language_model
        outputs: dict[int, Tensor] = {}
        hooks = [language_model.layers[layer].register_forward_hook(
                     lambda module, inputs, output, layer=layer: outputs.__setitem__(layer, output))
                 for layer in ACTIVATION_LAYERS]
        try:
            language_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        # per token: width-major, the 13 layers innermost, as the pipeline concatenates them
        features = torch.stack([outputs[layer] for layer in ACTIVATION_LAYERS], dim=-1).flatten(2)
        return {"prompt_embeds": (features * mask.unsqueeze(-1).to(features.dtype)).float(),
                "prompt_embeds_mask": mask}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, channels, height, width = noisy_latents.shape
        dtype = noisy_latents.dtype
        lengths = conditioning["prompt_embeds_mask"].sum(dim=1)
        text_length = max(int(lengths.max()), 1)
        features = conditioning["prompt_embeds"][:, -text_length:].to(dtype)
        tokens = noisy_latents.flatten(2).transpose(1, 2)
        positions, segments, roles = sequence_layout(lengths, text_length, height, width)
        output = transformer(
            hidden_states=torch.cat([tokens.new_zeros(batch_size, text_length, channels), tokens], dim=1),
            # Ideogram's time runs from noise (0) to image (1)
            timestep=(1.0 - self.sigmas_of(components, timesteps)).to(dtype),
            encoder_hidden_states=torch.cat([features, features.new_zeros(batch_size, height * width,
                                                                           features.shape[-1])], dim=1),
            position_ids=positions, segment_ids=segments, indicator=roles, return_dict=False,
        )[0]
        # the transformer predicts x0 - ε
        return -output[:, text_length:].transpose(1, 2).reshape(batch_size, channels, height, width)

    def validation_inputs(self, components, prompt):
        cached = components.extra.get(VALIDATION_KEY)
        if components.modules.get("text_encoder") is None and (cached is None or cached[0] != prompt):
            raise SnellaError(f"validation prompt {prompt!r} was not cached before the text encoder was freed")
        return {"prompt": prompt, "max_sequence_length": self.options(components).max_sequence_length,
                "guidance_scale": VALIDATION_GUIDANCE_SCALE, "guidance_schedule": None}

    def pipeline(self, components, modules=None):
        """The pipeline with the unconditional transformer loaded from the source (in the dtype
        ``load`` was given, on the transformer's device); with the text encoder freed, one that
        reads the cached validation prompt (:func:`cached_prompt_pipeline`)."""
        from diffusers import Ideogram4Transformer2DModel

        parts = dict(modules or {})
        if UNCONDITIONAL not in parts:
            loaded_as = {key: value for key, value in components.extra.get(SOURCE_KEY, {}).items() if value is not None}
            parts[UNCONDITIONAL] = Ideogram4Transformer2DModel.from_pretrained(
                components.source, subfolder=UNCONDITIONAL, **loaded_as,
            ).to(components.denoiser.input_proj.weight.device).requires_grad_(False)
        pipeline = super().pipeline(components, parts)
        cached = components.extra.get(VALIDATION_KEY)
        if cached is None:
            return pipeline
        reader = cached_prompt_pipeline()(**pipeline.components)
        prompt, inputs = cached
        reader.cached_prompts = {prompt: (inputs["prompt_embeds"], inputs["prompt_embeds_mask"])}
        return reader

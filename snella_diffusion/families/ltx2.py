"""LTX-2 text-to-video (``LTX2Pipeline``), the video stream only, trained on clips and images
(``training/video_dataset.py``).

- Prompts: the Gemma-3 tokenizer padded on the left to ``--max_sequence_length`` tokens
  (default 1024, the pipeline's), every hidden state of the encoder (embeddings and each layer)
  stacked on a last axis and flattened, ``(B, L, D·(layers + 1))``, with the attention mask: the
  pipeline's ``prompt_embeds`` / ``prompt_attention_mask``. The frozen ``connectors`` turn them
  into the transformer's caption tokens at each step, as the pipeline does before denoising.
  Gemma stays frozen.
- Latents: ``(B, 3, F, H, W)`` pixels in [-1, 1] → the video VAE's distribution mode,
  normalised per channel as ``(z - latents_mean)·scaling_factor / latents_std`` (the VAE's
  buffers; the pipeline denormalises before decoding): ``(B, C, (F-1)/8 + 1, H/32, W/32)`` for
  the published VAE, so clips of 8k+1 frames.
- Model call: the latents packed into ``(B, F'·H'·W', C)`` tokens (patches 1 × 1 × 1),
  ``timestep = sigma = σ·1000`` (the scheduler's timesteps, which the pipeline passes as both),
  RoPE positions at 24 fps (the pipeline's default ``frame_rate``), the velocity ε - x0 unpacked
  back to ``(B, C, F', H', W')``.
- Audio: out of scope. As in the LTX-2 trainer's video-only mode (its ``with_audio: false``
  runs no audio modality, so no audio-to-video attention), the transformer is called with
  ``isolate_modalities=True``: the audio-to-video and video-to-audio attentions are skipped and
  the video output does not depend on the audio stream, whose input is one zero latent token
  (the class needs one) and whose output is dropped. The ``dit`` preset adapts the video
  stream's ``attn1``, ``attn2`` and ``ff``; no audio layer is adapted. Validation runs the
  pipeline as it ships (it denoises an audio track beside the video); the .mp4 holds the video.
- σ: by default the LTX-2 trainer's ``shifted_logit_normal`` sampler: z ~ N(μ, 1) with μ
  interpolated from the sample's token count as the pipeline's inference shift (0.95 at 1024
  tokens, 2.05 at 4096, the scheduler's ``base_shift``/``max_shift``), σ = sigmoid(z)
  stretched between its 0.5 % and 99.9 % points, reflected above 1e-3, and a uniform σ for
  10 % of samples. An explicit ``--weighting_scheme`` draws over the unshifted training table
  instead (the scheduler shifts dynamically, as Flux.1's does).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..training.flow_matching import FlowMatchingObjective, FlowMatchSchedule, add_flow_noise, flow_target
from ..training.objectives import ObjectiveBatch
from .base import TrainingComponents
from .dit import FlowMatchingFamily

SAMPLER_KEY = "ltx2_trainer_sampler"
# The frame rate the transformer's RoPE positions are conditioned on (the pipeline's default).
FRAME_RATE = 24.0
# The pipeline's own check: height and width multiples of 32.
PIPELINE_PIXEL_MULTIPLE = 32
# Components of an LTX-2 folder a training run does not need (prompt enhancement).
UNUSED_COMPONENTS = ("processor", "prompt_enhancer")


def token_shift(tokens: int, base_tokens: int = 1024, max_tokens: int = 4096, base_shift: float = 0.95,
                max_shift: float = 2.05) -> float:
    """μ for ``tokens`` video tokens: the line through (base_tokens, base_shift) and
    (max_tokens, max_shift), extended beyond them (the pipeline's inference shift)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


class ShiftedLogitNormalObjective(FlowMatchingObjective):
    """Flow matching with σ from the LTX-2 trainer's shifted logit-normal sampler (see the
    module docstring); μ from the token count of the latents ``prepare`` receives.

    Args:
        schedule: the σ → timestep scale (``num_train_timesteps``).
        shift_line: ``(base_tokens, max_tokens, base_shift, max_shift)`` of :func:`token_shift`.
        patches: ``(patch_t, patch)`` of the transformer, to count tokens from latent sizes.
        std: standard deviation of z.
        uniform_fraction: share of samples with a uniform σ instead.
        eps: the smallest σ (smaller stretched values are reflected above it).
    """

    # z quantiles the stretch maps to 0 and 1 (0.5 % and 99.9 % of a standard normal).
    LOW_QUANTILE, HIGH_QUANTILE = -2.5758, 3.0902

    def __init__(self, schedule: FlowMatchSchedule, shift_line: tuple[int, int, float, float],
                 patches: tuple[int, int] = (1, 1), std: float = 1.0, uniform_fraction: float = 0.1,
                 eps: float = 1e-3) -> None:
        super().__init__(schedule, weighting_scheme="none")
        self.shift_line = shift_line
        self.patches = patches
        self.std = std
        self.uniform_fraction = uniform_fraction
        self.eps = eps

    def tokens_of(self, latents: Tensor) -> int:
        """Transformer tokens of one sample of ``latents`` ``(B, C, F', H', W')``."""
        patch_t, patch = self.patches
        frames, height, width = latents.shape[2:]
        return (frames // patch_t) * (height // patch) * (width // patch)

    def draw_sigmas_for(self, batch_size: int, tokens: int,
                        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``(sigmas, timesteps)``, float32 ``(batch_size,)`` on the CPU: z, then the uniform
        draws, then the branch choice, each ``batch_size`` values from ``generator`` in that order."""
        mu = token_shift(tokens, *self.shift_line)
        z = torch.randn(batch_size, generator=generator) * self.std + mu
        low = torch.sigmoid(torch.tensor(mu + self.LOW_QUANTILE * self.std))
        high = torch.sigmoid(torch.tensor(mu + self.HIGH_QUANTILE * self.std))
        stretched = (torch.sigmoid(z) - low) / (high - low)
        stretched = torch.where(stretched >= self.eps, stretched, 2 * self.eps - stretched).clamp(0.0, 1.0)
        uniform = (1 - self.eps) * torch.rand(batch_size, generator=generator) + self.eps
        pick_uniform = torch.rand(batch_size, generator=generator) < self.uniform_fraction
        sigmas = torch.where(pick_uniform, uniform, stretched)
        return sigmas, sigmas * self.schedule.num_train_timesteps

    def prepare(self, latents: Tensor, noise: Tensor, generator: Optional[torch.Generator] = None,
                input_noise: Optional[Tensor] = None) -> ObjectiveBatch:
        """x_σ = (1 - σ)·x0 + σ·ε (``input_noise`` in place of ε with ``--input_perturbation``),
        the timesteps σ·1000 and the target ε - x0; uniform loss weights."""
        sigmas, timesteps = self.draw_sigmas_for(latents.shape[0], self.tokens_of(latents), generator)
        sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
        noisy = add_flow_noise(latents, noise if input_noise is None else input_noise, sigmas)
        return ObjectiveBatch(noisy, timesteps, flow_target(latents, noise), None)


def pack_video(latents: Tensor, patch: int = 1, patch_t: int = 1) -> Tensor:
    """``(B, C, F, H, W)`` → ``(B, (F/pt)·(H/p)·(W/p), C·pt·p·p)``: one token per patch, frames
    outermost, then rows, then columns; a token's features channel-major (the pipeline's order)."""
    batch, channels, frames, height, width = latents.shape
    grid = latents.reshape(batch, channels, frames // patch_t, patch_t, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(
        batch, (frames // patch_t) * (height // patch) * (width // patch), channels * patch_t * patch * patch)


def unpack_video(tokens: Tensor, frames: int, height: int, width: int, patch: int = 1, patch_t: int = 1) -> Tensor:
    """Inverse of :func:`pack_video`; ``frames``, ``height``, ``width`` count patches."""
    batch = tokens.shape[0]
    grid = tokens.reshape(batch, frames, height, width, -1, patch_t, patch, patch)
    return grid.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames * patch_t, height * patch, width * patch)


class LTX2Family(FlowMatchingFamily):
    """LTX-2: an audio-video DiT of ``transformer_blocks.N`` (video self-attention ``attn1``, text
    cross-attention ``attn2``, GELU ``ff``, and their audio and audio↔video counterparts), a
    Gemma-3 encoder with text connectors, a causal 3D VAE."""

    name = "ltx2"
    pipeline_class_names = ("LTX2Pipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"
    is_video = True
    video_fps = 24.0  # the pipeline's default frame_rate
    block_lists = ("transformer_blocks",)
    native_side = 512

    def load(self, source, model_index, revision=None, variant=None, dtype=None, denoiser_file=None):
        """The components (not the prompt enhancer), the pipeline-module classes
        (``["ltx2", "LTX2TextConnectors"]``) read from ``diffusers.pipelines.ltx2``; the
        tokenizer set to pad on the left, as the pipeline does for Gemma."""
        index = {}
        for component, spec in model_index.items():
            if component in UNUSED_COMPONENTS:
                continue
            if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] not in (None, "diffusers", "transformers"):
                spec = [f"diffusers.pipelines.{spec[0]}", spec[1]]
            index[component] = spec
        components = super().load(source, index, revision, variant, dtype, denoiser_file=denoiser_file)
        tokenizer = components.modules["tokenizer"]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return components

    def default_sequence_length(self, components):
        return 1024

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "LTX-2", "Gemma-3 and its connectors stay frozen")
        if settings.wan_expert:
            raise SnellaError(f"--wan_expert={settings.wan_expert}: applies to Wan 2.2 A14B; LTX-2 has one transformer")
        super().configure(components, settings)
        self.check_resolution(components, settings, "LTX-2", "the pipeline's multiple of 32 and the VAE factor")
        components.extra[SAMPLER_KEY] = settings.dit.weighting_scheme is None

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return int(components.vae.spatial_compression_ratio)

    def temporal_factor(self, components: TrainingComponents) -> int:
        """Frames per latent frame after the first (8 for the published VAE)."""
        return int(components.vae.temporal_compression_ratio)

    def default_num_frames(self, components: TrainingComponents) -> int:
        """121: the pipeline's default (5 s at 24 fps)."""
        return 121

    def pixel_multiple(self, components: TrainingComponents) -> int:
        """The least common multiple of 32 (the pipeline's check) and VAE factor × patch (32 × 1)."""
        patch = int(components.denoiser.config.patch_size)
        return math.lcm(PIPELINE_PIXEL_MULTIPLE, self.vae_scale_factor(components) * patch)

    def native_resolution(self, components: TrainingComponents) -> int:
        """512: the shorter side of the pipeline's default 768 × 512."""
        return self.native_side

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, F, H, W)`` (or ``(B, 3, H, W)``, one frame) in [-1, 1] →
        ``(mode - latents_mean)·scaling_factor / latents_std`` ``(B, C, F', H/s, W/s)``; deterministic."""
        vae = components.vae
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        channels = (1, -1, 1, 1, 1)
        mean = vae.latents_mean.to(latents).view(channels)
        std = vae.latents_std.to(latents).view(channels)
        return (latents - mean) * float(vae.config.scaling_factor) / std

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D·(layers + 1))`` (every Gemma hidden state, stacked last and
        flattened) and ``prompt_attention_mask`` ``(B, L)``, left-padded to ``--max_sequence_length``."""
        tokenizer, encoder = components.modules["tokenizer"], components.modules["text_encoder"]
        tokens = tokenizer([prompt.strip() for prompt in prompts], padding="max_length",
                           max_length=self.options(components).max_sequence_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        # the decoder stack without the language-model head: the same hidden states, no logits
        backbone = getattr(encoder, "model", encoder)
        hidden = backbone(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = torch.stack(hidden, dim=-1).flatten(2, 3).to(encoder.dtype)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def negative_prompt_inputs(self, components, device):
        encoded = self.encode_prompt(components, [""], device)
        return {"negative_prompt_embeds": encoded["prompt_embeds"],
                "negative_prompt_attention_mask": encoded["prompt_attention_mask"]}

    def objective(self, components, snr_gamma=None):
        """The LTX-2 trainer's shifted logit-normal σ (no ``--weighting_scheme`` given), else the
        generic flow-matching objective on the unshifted table."""
        if snr_gamma is not None:
            raise SnellaError("--snr_gamma applies to DDPM models; flow-matching models use --weighting_scheme")
        if not components.extra.get(SAMPLER_KEY, True):
            return super().objective(components, snr_gamma)
        config = components.noise_scheduler.config
        line = (int(config.get("base_image_seq_len", 1024)), int(config.get("max_image_seq_len", 4096)),
                float(config.get("base_shift", 0.95)), float(config.get("max_shift", 2.05)))
        transformer = components.denoiser.config
        return ShiftedLogitNormalObjective(FlowMatchSchedule(int(config.get("num_train_timesteps", 1000))), line,
                                           (int(transformer.patch_size_t), int(transformer.patch_size)))

    def caption_tokens(self, components: TrainingComponents, conditioning: dict[str, Tensor],
                       dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The connectors' ``(video captions, audio captions, mask)`` of the encoded prompts, as
        the pipeline computes them before denoising (left padding)."""
        connectors = components.modules["connectors"]
        embeds = conditioning["prompt_embeds"].to(connectors.dtype)
        video, audio, mask = connectors(embeds, conditioning["prompt_attention_mask"], padding_side="left")
        return video.to(dtype), audio.to(dtype), mask

    def call_transformer(self, transformer: nn.Module, latents: Tensor, timesteps: Tensor, captions: Tensor,
                         audio_captions: Tensor, mask: Tensor) -> Tensor:
        """One video-only transformer call: ``(B, C, F', H', W')`` latents → the velocity, same shape."""
        config = transformer.config
        patch, patch_t = int(config.patch_size), int(config.patch_size_t)
        frames, height, width = latents.shape[2] // patch_t, latents.shape[3] // patch, latents.shape[4] // patch
        audio = latents.new_zeros(latents.shape[0], 1, int(config.audio_in_channels))
        timestep = timesteps.float()
        video = transformer(
            hidden_states=pack_video(latents, patch, patch_t), audio_hidden_states=audio,
            encoder_hidden_states=captions, audio_encoder_hidden_states=audio_captions, timestep=timestep,
            sigma=timestep, encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=frames,
            height=height, width=width, fps=FRAME_RATE, audio_num_frames=1, isolate_modalities=True,
            use_cross_timestep=True, return_dict=False,
        )[0]
        return unpack_video(video, frames, height, width, patch, patch_t)

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        """The velocity of each sample from the (trained) transformer, video stream only."""
        captions, audio_captions, mask = self.caption_tokens(components, conditioning, noisy_latents.dtype)
        return self.call_transformer(denoiser or components.denoiser, noisy_latents, timesteps, captions,
                                     audio_captions, mask)

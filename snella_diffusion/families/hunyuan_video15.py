"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``), trained on clips and images
(``training/video_dataset.py``) as the pipeline samples and the authors' ``train.py`` trains.

- Prompts, two frozen encoders, as the pipeline encodes them:

  * Qwen2.5-VL: the prompt as the user turn of a chat after the pipeline's fixed system message
    (``<|im_start|>system … <|im_end|> <|im_start|>user`` is 108 tokens with the published
    tokenizer), padded to 108 + ``--max_sequence_length`` tokens (default 1000, the pipeline's);
    the hidden state 2 layers before the last, its first 108 positions (the template) cropped,
    with the tokenizer's attention mask cropped the same way.
  * ByT5 (glyph encoder): the text between quotes in the prompt ("…" or “…”) as
    ``Text "…". `` sentences, padded to 256 bytes, its last hidden state and mask; a prompt with
    no quoted text gives 256 zero vectors, all masked.

- Latents: ``(B, 3, F, H, W)`` pixels in [-1, 1] → the VAE's distribution mode × its
  ``scaling_factor`` (the pipeline decodes ``z / scaling_factor``); ``(B, C, (F-1)/4 + 1, H/16,
  W/16)`` for the published VAE. Clips have 4k+1 frames (121 by default, the pipeline's).
- Model call: the transformer reads ``[z_σ, condition latents, condition mask]`` on the channel
  axis (``in_channels`` = 2C + 1); text-to-video conditions on zeros there and on all-zero
  SigLIP ``image_embeds`` (the transformer masks them out), ``timestep = σ·1000``; it returns the
  velocity ε - x0 (the pipeline's Euler steps ``x + (σ' - σ)·v``).
- Context padding: the transformer puts the valid text tokens first and masks the rest (Qwen
  padding, an empty ByT5 block, the 729 zero image tokens), so masked positions change nothing in
  the output. Training passes each sequence only up to its last valid position in the batch and
  one zero image token: the same velocity (tests check it against the pipeline's full-length
  call) at a fraction of the context tokens.
- σ: ``--weighting_scheme`` (default logit_normal, the authors' "lognorm") over the scheduler's
  training table shifted by its ``shift`` (the sampling shift the model ships with; the authors'
  ``train.py`` trains at 3.0).
- Text-encoder training is not offered (neither encoder is trained by the authors' script).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from .base import TrainingComponents
from .dit import FlowMatchingFamily


@dataclass(frozen=True)
class PipelineDefaults:
    """Constants of the installed ``HunyuanVideo15Pipeline``: the defaults of its
    ``_get_mllm_prompt_embeds`` / ``_get_byt5_prompt_embeds`` (the values its ``encode_prompt``
    uses) and of its ``__call__``.

    Attributes:
        system_message: the chat's system turn before every prompt.
        template_tokens: leading template positions cropped from the Qwen hidden states (108).
        qwen_length: Qwen tokens kept after the crop (1000).
        skipped_layers: hidden layers skipped from the top (2: ``hidden_states[-3]``).
        glyph_length: ByT5 bytes per prompt (256).
        num_frames: frames the pipeline samples by default (121).
    """

    system_message: str
    template_tokens: int
    qwen_length: int
    skipped_layers: int
    glyph_length: int
    num_frames: int


@lru_cache(maxsize=1)
def pipeline_defaults() -> PipelineDefaults:
    """:class:`PipelineDefaults` read from the installed diffusers' ``HunyuanVideo15Pipeline``."""
    from diffusers import HunyuanVideo15Pipeline

    qwen = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    byt5 = inspect.signature(HunyuanVideo15Pipeline._get_byt5_prompt_embeds).parameters
    call = inspect.signature(HunyuanVideo15Pipeline.__call__).parameters
    return PipelineDefaults(
        system_message=qwen["system_message"].default, template_tokens=int(qwen["crop_start"].default),
        qwen_length=int(qwen["tokenizer_max_length"].default),
        skipped_layers=int(qwen["num_hidden_layers_to_skip"].default),
        glyph_length=int(byt5["tokenizer_max_length"].default), num_frames=int(call["num_frames"].default),
    )


def trim_padding(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``embeds`` ``(B, L, D)`` and ``mask`` ``(B, L)`` cut after the last position valid in any
    sample (at least one position kept): the masked tail the transformer ignores."""
    valid = mask.bool().any(dim=0).nonzero()
    keep = int(valid[-1]) + 1 if len(valid) else 1
    return embeds[:, :keep], mask[:, :keep]


class HunyuanVideo15Family(FlowMatchingFamily):
    """HunyuanVideo 1.5: 54 double-stream blocks (``transformer_blocks.N``: joint attention with
    separate text projections, GELU MLPs for both streams) behind a 2-block token refiner over
    Qwen2.5-VL-7B states, a ByT5 glyph projection, a 16× spatial / 4× temporal VAE of 32 channels,
    1×1×1 patches."""

    name = "hunyuan-video-1.5"
    guidance_argument = None  # the pipeline's ``guider`` component sets its guidance
    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    default_weighting_scheme = "logit_normal"
    is_video = True
    video_fps = 24.0  # the published releases' rate
    block_lists = ("transformer_blocks",)

    def default_sequence_length(self, components):
        """1000 Qwen tokens after the template crop (the pipeline's ``tokenizer_max_length``)."""
        return pipeline_defaults().qwen_length

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "HunyuanVideo 1.5",
                                          "its Qwen2.5-VL and ByT5 encoders stay frozen, as in the authors' train.py")
        super().configure(components, settings)
        self.check_resolution(components, settings, "HunyuanVideo 1.5", "VAE downsampling × the transformer's patches")

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return int(components.vae.config.spatial_compression_ratio)

    def temporal_factor(self, components: TrainingComponents) -> int:
        """Frames per latent frame after the first (4 for the published VAE)."""
        return int(components.vae.config.temporal_compression_ratio)

    def default_num_frames(self, components: TrainingComponents) -> int:
        """121 (the pipeline's default: 5 s at 24 fps)."""
        return pipeline_defaults().num_frames

    def pixel_multiple(self, components: TrainingComponents) -> int:
        """VAE factor × the transformer's spatial patch (16 × 1 published)."""
        return self.vae_scale_factor(components) * int(components.denoiser.config.patch_size)

    def native_resolution(self, components: TrainingComponents) -> int:
        """The shorter side of the pipeline's default 16:9 size for the transformer's
        ``target_size`` (480 for the 480p release's 640, 720 for 720p's 960)."""
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.vae_scale_factor(components))
        height, width = processor.calculate_default_height_width(9, 16, int(components.denoiser.config.target_size))
        return int(min(height, width))

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, F, H, W)`` (or ``(B, 3, H, W)``, one frame) in [-1, 1] → the mode ×
        ``scaling_factor``, ``(B, C, (F-1)/f + 1, H/s, W/s)``; deterministic. One sample per VAE
        call: diffusers 0.42's AutoencoderKLHunyuanVideo15 mid-block attention fails on batches
        of more than one (its causal mask misses the head axis, diffusers PR #13133)."""
        vae = components.vae
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        modes = [vae.encode(sample.to(vae.dtype)).latent_dist.mode() for sample in pixels.split(1)]
        return torch.cat(modes) * vae.config.scaling_factor

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)`` and ``prompt_embeds_mask`` ``(B, L)`` (Qwen, L =
        ``--max_sequence_length``), ``prompt_embeds_2`` ``(B, 256, D2)`` and
        ``prompt_embeds_mask_2`` ``(B, 256)`` (ByT5); masks int64, 1 on valid tokens."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        defaults = pipeline_defaults()
        tokenizer, encoder = components.modules["tokenizer"], components.modules["text_encoder"]
        length = self.options(components).max_sequence_length + defaults.template_tokens
        tokens = tokenizer.apply_chat_template(
            format_text_input(prompts, defaults.system_message), add_generation_prompt=True, tokenize=True,
            return_dict=True, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-(defaults.skipped_layers + 1)]
        crop = defaults.template_tokens
        glyphs, glyph_mask = self.encode_glyphs(components, prompts, device)
        return {"prompt_embeds": hidden[:, crop:], "prompt_embeds_mask": mask[:, crop:],
                "prompt_embeds_2": glyphs, "prompt_embeds_mask_2": glyph_mask}

    def encode_glyphs(self, components: TrainingComponents, prompts: list[str],
                      device: torch.device) -> tuple[Tensor, Tensor]:
        """ByT5 states ``(B, 256, D2)`` and mask ``(B, 256)`` of each prompt's quoted text; zeros
        (all masked) for a prompt without any."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

        tokenizer, encoder = components.modules["tokenizer_2"], components.modules["text_encoder_2"]
        length = pipeline_defaults().glyph_length
        states, masks = [], []
        for prompt in prompts:
            text = extract_glyph_texts(prompt)
            if text is None:
                states.append(torch.zeros(1, length, encoder.config.d_model, device=device, dtype=encoder.dtype))
                masks.append(torch.zeros(1, length, device=device, dtype=torch.int64))
                continue
            tokens = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").to(device)
            states.append(encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.float())[0])
            masks.append(tokens.attention_mask)
        return torch.cat(states), torch.cat(masks)

    def negative_prompt_inputs(self, components, device):
        """The empty negative prompt's four tensors under the pipeline's ``negative_*`` names."""
        negative = self.encode_prompt(components, [""], device)
        return {f"negative_{key}": value for key, value in negative.items()}

    def validation_inputs(self, components: TrainingComponents, prompt: str) -> dict[str, Any]:
        """The cached embeddings when the encoders were released, else the prompt (the pipeline
        takes no sequence length)."""
        inputs = super().validation_inputs(components, prompt)
        inputs.pop("max_sequence_length", None)
        return inputs

    def call_transformer(self, transformer: nn.Module, latents: Tensor, timesteps: Tensor,
                         conditioning: dict[str, Tensor]) -> Tensor:
        """One text-to-video transformer call on ``(B, C, F', h, w)`` latents at model timesteps
        ``(B,)`` (σ·1000): the velocity, same shape. Zero condition latents and mask channels, one
        zero image token, the text sequences cut after their last valid position."""
        dtype = latents.dtype
        embeds, mask = trim_padding(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        glyphs, glyph_mask = trim_padding(conditioning["prompt_embeds_2"], conditioning["prompt_embeds_mask_2"])
        batch, channels = latents.shape[:2]
        condition = latents.new_zeros(batch, channels + 1, *latents.shape[2:])
        image_embeds = latents.new_zeros(batch, 1, int(transformer.config.image_embed_dim))
        return transformer(
            hidden_states=torch.cat([latents, condition], dim=1), timestep=timesteps.float(),
            encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask,
            encoder_hidden_states_2=glyphs.to(dtype), encoder_attention_mask_2=glyph_mask,
            image_embeds=image_embeds, return_dict=False,
        )[0]

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        return self.call_transformer(denoiser or components.denoiser, noisy_latents, timesteps, conditioning)

"""Tiny Wan pipelines built from configs (no hub): ``WanPipeline`` with a 2-block
``WanTransformer3DModel``, a 2-level ``AutoencoderKLWan`` (spatial factor 4, temporal factor 4,
so clips of 4k+1 frames) and a 1-layer UMT5 encoder with the code-built T5 tokenizer of
``tiny_dit_models``. Weights are random but seeded: two builds with the same seed are identical.
The A14B layout (two transformers and a ``boundary_ratio``) and the TI2V-5B layout
(``expand_timesteps``) are options of the same builder."""

from __future__ import annotations

from typing import Optional

import torch

from .tiny_dit_models import TINY_T5_DIM, TINY_T5_VOCAB, tiny_t5_tokenizer

TINY_WAN_LATENT_CHANNELS = 4
# Non-trivial per-channel statistics, so a test sees whether they are applied.
TINY_WAN_LATENTS_MEAN = (0.25, -0.5, 0.1, 0.3)
TINY_WAN_LATENTS_STD = (1.5, 0.8, 2.0, 1.2)
TINY_WAN_SPATIAL_FACTOR = 4
TINY_WAN_TEMPORAL_FACTOR = 4


def tiny_umt5_encoder(seed: int = 0, d_model: int = TINY_T5_DIM):
    """A 1-layer UMT5 encoder (vocab 128 ≥ the tiny tokenizer's pieces)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=TINY_T5_VOCAB, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(config).eval()


def tiny_wan_vae(seed: int = 0):
    """An AutoencoderKLWan of 4 latent channels: two downsampling levels, both temporal, so
    ``(B, 3, 4k+1, H, W)`` → ``(B, 4, k+1, H/4, W/4)``."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=TINY_WAN_LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[True, True], latents_mean=list(TINY_WAN_LATENTS_MEAN),
        latents_std=list(TINY_WAN_LATENTS_STD), scale_factor_temporal=TINY_WAN_TEMPORAL_FACTOR,
        scale_factor_spatial=TINY_WAN_SPATIAL_FACTOR,
    ).eval()


def tiny_wan_transformer(seed: int = 0):
    """A WanTransformer3DModel with 2 blocks of 2 heads of width 8, patches (1, 2, 2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=TINY_WAN_LATENT_CHANNELS,
        out_channels=TINY_WAN_LATENT_CHANNELS, text_dim=TINY_T5_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
        rope_max_seq_len=64,
    )


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False, boundary_ratio: Optional[float] = 0.875,
                      flow_shift: float = 3.0, expand_timesteps: bool = False):
    """A WanPipeline (Wan 2.1 layout); ``two_experts``: Wan 2.2 A14B's layout, a second
    transformer (``transformer_2``, the low-noise expert) and ``boundary_ratio``."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(max_length=512), text_encoder=tiny_umt5_encoder(seed + 2),
        vae=tiny_wan_vae(seed), scheduler=scheduler, transformer=tiny_wan_transformer(seed),
        transformer_2=tiny_wan_transformer(seed + 5) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None, expand_timesteps=expand_timesteps,
    )


SQUARE_COLOUR = (230, 40, 30)
BACKGROUND_COLOUR = (40, 60, 90)


def moving_square_frames(frames: int, height: int = 32, width: int = 48, side: int = 8, step: int = 2):
    """A synthetic clip ``(frames, height, width, 3)`` uint8: a red square of ``side`` pixels on a
    blue-grey background, its left edge at column ``step·i`` in frame ``i`` (top at height/4)."""
    import numpy as np

    if (frames - 1) * step + side > width:
        raise ValueError(f"a {side}px square moving {step}px per frame leaves a {width}px frame after "
                         f"{(width - side) // step + 1} frames")
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUND_COLOUR
    top = height // 4
    for index in range(frames):
        video[index, top:top + side, index * step:index * step + side] = SQUARE_COLOUR
    return video


def _tiny_a14b_pipeline(seed: int = 0):
    return tiny_wan_pipeline(seed, two_experts=True)


# name -> builder(seed), as tiny_dit_models.TINY_DIT_BUILDERS
TINY_VIDEO_BUILDERS = {
    "wan": tiny_wan_pipeline,
    "wan-a14b": _tiny_a14b_pipeline,
}

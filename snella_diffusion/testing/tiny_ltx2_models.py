"""Tiny LTX-2 pipelines built from configs (no hub): ``LTX2Pipeline`` with a 2-block
``LTX2VideoTransformer3DModel`` (video width 16, audio width 8), ``LTX2TextConnectors`` of one
layer per modality, a 3-level ``AutoencoderKLLTX2Video`` (spatial factor 8, temporal factor 4,
so clips of 4k+1 frames; the published VAE's are 32 and 8), a tiny ``AutoencoderKLLTX2Audio`` and
``LTX2Vocoder``, a 2-layer ``Gemma3ForConditionalGeneration`` (its vision tower one layer wide
enough to build) with the code-built Gemma tokenizer of ``tiny_dit_models``, and the published
scheduler settings (dynamic shift 0.95 → 2.05 over 1024 → 4096 tokens, terminal σ 0.1).
Weights are random but seeded: two builds with the same seed are identical."""

from __future__ import annotations

import torch

from .tiny_dit_models import TINY_GEMMA_HIDDEN, TINY_GEMMA_VOCAB, tiny_gemma_tokenizer

TINY_LTX2_LATENT_CHANNELS = 4
# Non-trivial per-channel statistics (the VAE's latents_mean / latents_std buffers), so a test
# sees whether they are applied.
TINY_LTX2_LATENTS_MEAN = (0.25, -0.5, 0.1, 0.3)
TINY_LTX2_LATENTS_STD = (1.5, 0.8, 2.0, 1.2)
TINY_LTX2_SPATIAL_FACTOR = 8
TINY_LTX2_TEMPORAL_FACTOR = 4
TINY_GEMMA3_LAYERS = 2
# LTX-2's published scheduler_config.json (diffusers' scripts/convert_ltx2_to_diffusers.py).
LTX2_SCHEDULER_CONFIG = {"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05,
                         "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift_terminal": 0.1}


def tiny_gemma3_encoder(seed: int = 0):
    """A Gemma3ForConditionalGeneration: 2 text layers of width 32 (2 heads of 16, 1 key/value
    head, vocabulary 512 ≥ the tiny tokenizer's ids) and a 1-layer SigLIP tower of width 16
    (unused by text prompts; the class needs one). ``hidden_states`` has 3 entries of width 32."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=TINY_GEMMA_VOCAB, hidden_size=TINY_GEMMA_HIDDEN, intermediate_size=48,
                num_hidden_layers=TINY_GEMMA3_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=16, max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=TINY_GEMMA_VOCAB - 1, boi_token_index=TINY_GEMMA_VOCAB - 2,
                          eoi_token_index=TINY_GEMMA_VOCAB - 3)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_ltx2_vae(seed: int = 0):
    """An AutoencoderKLLTX2Video of 4 latent channels: one spatial and two spatiotemporal
    downsampling levels, so ``(B, 3, 4k+1, H, W)`` → ``(B, 4, k+1, H/8, W/8)``; latents_mean/std set to
    :data:`TINY_LTX2_LATENTS_MEAN` / :data:`TINY_LTX2_LATENTS_STD`."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=TINY_LTX2_LATENT_CHANNELS, block_out_channels=(8, 8, 8),
        down_block_types=("LTX2VideoDownBlock3D",) * 3, decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False,) * 4, downsample_type=("spatial", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatial"), upsample_residual=(False,) * 3,
        upsample_factor=(1, 1, 1),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        spatial_compression_ratio=TINY_LTX2_SPATIAL_FACTOR, temporal_compression_ratio=TINY_LTX2_TEMPORAL_FACTOR,
    )
    with torch.no_grad():
        vae.latents_mean.copy_(torch.tensor(TINY_LTX2_LATENTS_MEAN))
        vae.latents_std.copy_(torch.tensor(TINY_LTX2_LATENTS_STD))
    return vae.eval()


def tiny_ltx2_transformer(seed: int = 0):
    """An LTX2VideoTransformer3DModel: 2 blocks, video 2 heads of 8 (width 16), audio 2 heads of 4
    (width 8), patches 1 × 1 × 1, captions of width 32 (the connectors' output)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=TINY_LTX2_LATENT_CHANNELS, out_channels=TINY_LTX2_LATENT_CHANNELS, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
        num_layers=2, caption_channels=TINY_GEMMA_HIDDEN, rope_double_precision=False, rope_type="split",
    )


def tiny_ltx2_connectors(seed: int = 0):
    """LTX2TextConnectors over the tiny Gemma-3's 3 stacked hidden states (width 32): one layer
    of 4 heads of 8 per modality, no learnable registers."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    torch.manual_seed(seed)
    return LTX2TextConnectors(
        caption_channels=TINY_GEMMA_HIDDEN, text_proj_in_factor=TINY_GEMMA3_LAYERS + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False,
        rope_type="split",
    )


def tiny_ltx2_audio(seed: int = 0):
    """``(audio_vae, vocoder)``: an AutoencoderKLLTX2Audio of 2 latent channels over 8 mel bins
    and an LTX2Vocoder reading its 2 × 8 channels (the pipeline decodes audio beside the video)."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )
    torch.manual_seed(seed + 1)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    return audio_vae.eval(), vocoder.eval()


def tiny_ltx2_pipeline(seed: int = 0):
    """An LTX2Pipeline of the tiny components above and LTX-2's scheduler settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    audio_vae, vocoder = tiny_ltx2_audio(seed + 3)
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER_CONFIG), vae=tiny_ltx2_vae(seed),
        audio_vae=audio_vae, text_encoder=tiny_gemma3_encoder(seed + 1), tokenizer=tiny_gemma_tokenizer(),
        connectors=tiny_ltx2_connectors(seed + 2), transformer=tiny_ltx2_transformer(seed), vocoder=vocoder,
    )


# name -> builder(seed), as tiny_dit_models.TINY_DIT_BUILDERS
TINY_LTX2_BUILDERS = {"ltx2": tiny_ltx2_pipeline}

"""Published model configs, for building real-shape models with random weights (no hub).

Values are those of the public ``config.json`` files named beside each dict; only the keys that
change the architecture are listed, the rest take the diffusers/transformers defaults. Use them
with ``build_reference_model(name, device="meta")`` for counting without allocating weights,
or on CPU/GPU for memory and speed benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

# Qwen/Qwen-Image, transformer/config.json (20.4 B parameters)
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json
Z_IMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}

# black-forest-labs/FLUX.2-klein-4B, transformer/config.json (the architecture keys as other
# projects' fixtures quote that file: 24 heads of 128, 5 double and 20 single blocks, text width
# 3 × 2560 of Qwen3-4B; the rest are the Flux2Transformer2DModel defaults)
FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "guidance_embeds": False,
}

# lodestones/Chroma1-HD, transformer: the ChromaTransformer2DModel defaults, which diffusers'
# single-file loader uses for Chroma1-HD.safetensors (docs/source/en/api/pipelines/chroma.md):
# 19 double and 38 single blocks of 24 heads × 128, T5-XXL width 4096, a 5-layer approximator
# of width 5120 in place of Flux.1's modulation inputs
CHROMA1_HD_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "axes_dims_rope": [16, 56, 56],
    "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
}

# black-forest-labs/FLUX.2-dev, transformer (diffusers' scripts/convert_flux2_to_diffusers.py
# "flux2-dev" config, also the Flux2Transformer2DModel defaults): 8 double and 48 single blocks
# of 48 heads × 128, text width 3 × 5120 of Mistral-Small-3.1, a guidance embedding
FLUX2_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": True,
}

# krea/Krea-2-Raw (and Krea-2-Turbo, the same architecture), transformer: the
# Krea2Transformer2DModel defaults, whose docstring describes the released model (28 blocks of
# 48 heads × 128 with 12 key/value heads, SwiGLU 16384; text fusion over 12 tapped layers of
# Qwen3-VL-4B, width 2560)
KREA2_TRANSFORMER: dict[str, Any] = {
    "in_channels": 64,
    "num_layers": 28,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "num_key_value_heads": 12,
    "intermediate_size": 16384,
    "timestep_embed_dim": 256,
    "text_hidden_dim": 2560,
    "num_text_layers": 12,
    "text_num_attention_heads": 20,
    "text_num_key_value_heads": 20,
    "text_intermediate_size": 6912,
    "num_layerwise_text_blocks": 2,
    "num_refiner_text_blocks": 2,
    "axes_dims_rope": [32, 48, 48],
    "rope_theta": 1000.0,
    "norm_eps": 1e-5,
}
# Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json (each of Wan2.2-T2V-A14B's two
# experts, transformer and transformer_2, has this architecture); the Wan authors' config:
# dim 5120, ffn 13824, 40 heads, 40 layers, text 4096, patches (1, 2, 2)
WAN21_14B_TRANSFORMER: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "rope_max_seq_len": 1024,
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json: dim 1536, ffn 8960, 12 heads, 30 layers
WAN21_1_3B_TRANSFORMER: dict[str, Any] = {**WAN21_14B_TRANSFORMER, "num_attention_heads": 12, "ffn_dim": 8960,
                                          "num_layers": 30}

# Wan-AI/Wan2.2-TI2V-5B-Diffusers, transformer/config.json: dim 3072, ffn 14336, 24 heads, 30
# layers, 48 latent channels (the Wan 2.2 VAE, 16× spatial)
WAN22_5B_TRANSFORMER: dict[str, Any] = {**WAN21_14B_TRANSFORMER, "num_attention_heads": 24, "ffn_dim": 14336,
                                        "num_layers": 30, "in_channels": 48, "out_channels": 48}

# Alpha-VLLM/Lumina-Image-2.0, transformer/config.json (2.6 B parameters: 26 blocks of width
# 2304, 24 heads with 8 key/value heads, 2 noise- and 2 context-refiner blocks; captions are the
# 2304-wide hidden states of Gemma-2-2B; the rest are the Lumina2Transformer2DModel defaults)
LUMINA2_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "hidden_size": 2304,
    "num_layers": 26,
    "num_refiner_layers": 2,
    "num_attention_heads": 24,
    "num_kv_heads": 8,
    "multiple_of": 256,
    "norm_eps": 1e-05,
    "axes_dim_rope": [32, 32, 32],
    "axes_lens": [300, 512, 512],
    "cap_feat_dim": 2304,
}

# Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json (the
# SanaMS_1600M_P1_D20 keys of diffusers' scripts/convert_sana_to_diffusers.py at 1024 px: 20
# blocks of 70 heads × 32, cross-attention 20 heads × 112, Gemma-2-2B captions of width 2304)
SANA_1600M_TRANSFORMER: dict[str, Any] = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "attention_bias": False,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
}

# HiDream-ai/HiDream-I1-Full, transformer/config.json (17.1 B parameters: 16 double- and 32
# single-stream blocks of 20 heads × 128, MoE MLPs of 4 routed experts with 2 active; each block
# reads one Llama-3.1-8B layer, 0-31 and then layer 31 again)
HIDREAM_I1_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 16,
    "num_single_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 20,
    "caption_channels": [4096, 4096],
    "text_emb_dim": 2048,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128],
    "llama_layers": list(range(32)) + [31] * 16,
}

# Lightricks/LTX-2, transformer/config.json (the "2.0" config of diffusers'
# scripts/convert_ltx2_to_diffusers.py): 48 audio-video blocks, video 32 heads × 128 (text
# width 4096), audio 32 heads × 64 (2048), 128 latent channels each, Gemma-3-12B captions of
# width 3840; the rest are the LTX2VideoTransformer3DModel defaults
LTX2_TRANSFORMER: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "num_layers": 48,
    "caption_channels": 3840,
    "gated_attn": False,
    "cross_attn_mod": False,
    "rope_type": "split",
    "use_prompt_embeddings": True,
}

# google/vit-base-patch16-224-in21k, config.json
VIT_B16: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}

# ideogram-ai/ideogram-v4, transformer (and its unconditional twin): the
# Ideogram4Transformer2DModel defaults, whose docstring describes the released model (34 blocks
# of 18 heads × 256, SwiGLU 12288, AdaLN width 512; text features of 13 tapped layers of
# Qwen3-VL-8B, 13 × 4096 = 53248; the Flux.2 VAE's 32 channels in 2×2 patches, 128)
IDEOGRAM4_TRANSFORMER: dict[str, Any] = {
    "in_channels": 128,
    "num_layers": 34,
    "attention_head_dim": 256,
    "num_attention_heads": 18,
    "intermediate_size": 12288,
    "adaln_dim": 512,
    "llm_features_dim": 53248,
    "rope_theta": 5_000_000,
    "mrope_section": (24, 20, 20),
    "norm_eps": 1e-5,
}

# Qwen/Qwen-Image-2.1, transformer: the QwenImage21Transformer2DModel defaults, whose docstring
# describes the released model (32 single-stream blocks of 32 heads × 128, SwiGLU ×3, text width
# 4096 from Qwen3-VL-8B, the VAE's 64 channels unpatched)
QWEN_IMAGE21_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "context_in_dim": 4096,
    "mlp_ratio": 3,
    "axes_dims_rope": (16, 56, 56),
    "causal_condition": True,
}

# hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v, transformer/config.json as diffusers'
# scripts/convert_hunyuan_video1_5_to_diffusers.py writes it (8.3 B parameters: 54 double-stream
# blocks of 16 heads × 128, a 2-block token refiner over Qwen2.5-VL-7B's 3584-wide states, ByT5
# glyph states of width 1472, SigLIP image tokens of width 1152; the 720p release differs only in
# target_size 960; the conversion stores task_type "i2v" for this T2V release, which builds the
# same modules)
HUNYUAN_VIDEO15_480P_TRANSFORMER: dict[str, Any] = {
    "in_channels": 65,
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "image_embed_dim": 1152,
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "target_size": 640,
    "task_type": "i2v",
    "use_meanflow": False,
}


REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15_UNET,
    "sdxl": SDXL_UNET,
    "sd3": SD3_MEDIUM_TRANSFORMER,
    "flux": FLUX_DEV_TRANSFORMER,
    "qwen-image": QWEN_IMAGE_TRANSFORMER,
    "z-image": Z_IMAGE_TRANSFORMER,
    "flux2-klein": FLUX2_KLEIN_4B_TRANSFORMER,
    "chroma": CHROMA1_HD_TRANSFORMER,
    "flux2": FLUX2_DEV_TRANSFORMER,
    "krea2": KREA2_TRANSFORMER,
    "wan2.1-1.3b": WAN21_1_3B_TRANSFORMER,
    "wan2.1-14b": WAN21_14B_TRANSFORMER,
    "wan2.2-5b": WAN22_5B_TRANSFORMER,
    "vit-b16": VIT_B16,
    "lumina2": LUMINA2_TRANSFORMER,
    "sana": SANA_1600M_TRANSFORMER,
    "hidream": HIDREAM_I1_TRANSFORMER,
    "ideogram4": IDEOGRAM4_TRANSFORMER,
    "qwen-image-2.1": QWEN_IMAGE21_TRANSFORMER,
    "ltx2": LTX2_TRANSFORMER,
    "hunyuan-video1.5": HUNYUAN_VIDEO15_480P_TRANSFORMER,
}


MODEL_CLASSES: dict[str, str] = {
    "sd15": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "qwen-image": "QwenImageTransformer2DModel",
    "z-image": "ZImageTransformer2DModel",
    "flux2-klein": "Flux2Transformer2DModel",
    "flux2": "Flux2Transformer2DModel",
    "chroma": "ChromaTransformer2DModel",
    "krea2": "Krea2Transformer2DModel",
    "lumina2": "Lumina2Transformer2DModel",
    "sana": "SanaTransformer2DModel",
    "hidream": "HiDreamImageTransformer2DModel",
    "wan2.1-1.3b": "WanTransformer3DModel",
    "wan2.1-14b": "WanTransformer3DModel",
    "wan2.2-5b": "WanTransformer3DModel",
    "ideogram4": "Ideogram4Transformer2DModel",
    "qwen-image-2.1": "QwenImage21Transformer2DModel",
    "ltx2": "LTX2VideoTransformer3DModel",
    "hunyuan-video1.5": "HunyuanVideo15Transformer3DModel",
}
"""The diffusers class of each reference model but the ViT (transformers)."""


def build_reference_model(name: str, device: str | torch.device = "meta", **overrides: Any) -> nn.Module:
    """Instantiate a reference architecture with random weights on ``device``.

    Args:
        name: one of ``REFERENCE_CONFIGS`` ("sd15", "sdxl", "sd3", "flux", "qwen-image", "z-image",
            "flux2-klein", "flux2", "chroma", "krea2", "lumina2", "sana", "hidream", "wan2.1-1.3b",
            "wan2.1-14b" (also each Wan 2.2 A14B expert), "wan2.2-5b", "vit-b16", "ideogram4", "qwen-image-2.1",
            "ltx2", "hunyuan-video1.5" (HunyuanVideo 1.5 480p and 720p)).
        device: "meta" allocates nothing (parameter counting, injection counts).
        overrides: config keys to change (e.g. ``num_layers=2`` for a few real-size blocks).
    """
    if name not in REFERENCE_CONFIGS:
        raise KeyError(f"unknown reference model {name!r}; known: {sorted(REFERENCE_CONFIGS)}")
    config = {**REFERENCE_CONFIGS[name], **overrides}
    with torch.device(device):
        if name == "vit-b16":
            from transformers import ViTConfig, ViTForImageClassification

            return ViTForImageClassification(ViTConfig(**config))
        import diffusers

        return getattr(diffusers, MODEL_CLASSES[name])(**config)

"""Tiny diffusers pipelines built from configs (no hub), for tests, demos and the embedded
default of the training scripts. Shapes follow ENVIRONMENT.md; weights are random but
seeded, so two builds with the same seed are identical."""

from __future__ import annotations

from typing import Any

import torch

TINY_CLIP_HIDDEN = 32


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes: printable Latin-1 bytes stand
    for themselves, the others are shifted to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


def byte_level_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer needing no files: the 256 byte symbols (plain and with ``</w>``) and the
    two special tokens, 514 entries, no merges."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip_text_encoder(seed: int = 0, with_projection: bool = False, hidden_size: int = TINY_CLIP_HIDDEN):
    """A 2-layer CLIP text encoder (vocab 1000 >= the tokenizer's 514 entries)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden_size,
    )
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_vae(seed: int = 0, **overrides: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
        block_out_channels=[32, 64], latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=32,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def tiny_ddpm_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, steps_offset=1, clip_sample=False,
    )


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with a 2-level UNet (32/64 channels), 32 px samples."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY_CLIP_HIDDEN,
        norm_num_groups=32, attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(seed), text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=byte_level_clip_tokenizer(), scheduler=tiny_ddpm_scheduler(prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline: two CLIP encoders (the second with projection), pooled
    embeddings and added time ids, 32 px samples."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(seed), scheduler=tiny_ddpm_scheduler(),
        text_encoder=tiny_clip_text_encoder(seed), tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 1, with_projection=True),
        tokenizer_2=byte_level_clip_tokenizer(),
    )

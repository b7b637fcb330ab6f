"""Tiny transformer-based (DiT) diffusers pipelines built from configs (no hub): SD3, Flux and
PixArt, each with a tiny T5 encoder whose tokenizer is built in code. Weights are random but
seeded, so two builds with the same seed are identical. Images are 32 px (16 px latents with
the tiny 2-level VAE of ``tiny_models``)."""

from __future__ import annotations

import functools
import string

import torch

from .tiny_models import TINY_CLIP_HIDDEN, byte_level_clip_tokenizer, tiny_clip_text_encoder, tiny_vae

TINY_T5_VOCAB = 128
TINY_T5_DIM = 64
TINY_IMAGE_SIZE = 32
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_WORDS = ("a", "photo", "of", "sks", "dog", "cat", "person", "the", "in", "on", "with")


def tiny_t5_pieces() -> list[tuple[str, float]]:
    """Unigram (piece, log-probability) pairs: <pad>=0, </s>=1, <unk>=2, "▁", a few whole
    words (so common prompts tokenize to few pieces), then single characters."""
    pieces = [(token, 0.0) for token in _T5_SPECIALS] + [("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in _T5_WORDS]
    characters = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-"
    pieces += [(character, -5.0) for character in characters]
    if len(pieces) > TINY_T5_VOCAB:
        raise ValueError(f"{len(pieces)} tokenizer pieces exceed the T5 vocab of {TINY_T5_VOCAB}")
    return pieces


def tiny_t5_tokenizer(max_length: int = 77):
    """A T5TokenizerFast with no files: a Unigram model over ``tiny_t5_pieces`` and a Metaspace
    pre-tokenizer. Unigram (not WordLevel) because the T5 tokenizer class rebuilds a Unigram
    model when it is loaded back from a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(tiny_t5_pieces(), unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=backend, extra_ids=0, eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=max_length,
    )


def tiny_t5_encoder(seed: int = 0, d_model: int = TINY_T5_DIM):
    """A 1-layer T5 encoder (vocab 128 >= the tokenizer's pieces)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=TINY_T5_VOCAB, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def tiny_flow_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline: MMDiT with 2 joint blocks (inner width 32), two CLIP
    encoders with projection (pooled 32 + 32 = 64) and a T5 encoder (width 64 = the joint
    attention width, >= the two CLIP widths concatenated)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2, patch_size=1, in_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=TINY_T5_DIM, pooled_projection_dim=2 * TINY_CLIP_HIDDEN,
        out_channels=4, pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=tiny_flow_scheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=0.0),
        text_encoder=tiny_clip_text_encoder(seed, with_projection=True),
        tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 1, with_projection=True),
        tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 2), tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline: 1 double-stream and 1 single-stream block (2 heads of width 16, RoPE
    axes 4 + 6 + 6), a guidance embedding like Flux.1-dev, CLIP (pooled 32) and T5 (width 64).
    Latents are packed 2×2, so the transformer sees 16 channels for the VAE's 4."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TINY_T5_DIM,
        pooled_projection_dim=TINY_CLIP_HIDDEN, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        transformer=transformer, scheduler=tiny_flow_scheduler(),
        vae=tiny_vae(seed, shift_factor=0.0),
        text_encoder=tiny_clip_text_encoder(seed), tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 2), tokenizer_2=tiny_t5_tokenizer(),
    )


def tiny_pixart_pipeline(seed: int = 0, sigma: bool = False):
    """A PixArtAlphaPipeline (or PixArtSigmaPipeline): a 2-block PixArt transformer (2 heads
    of width 8, learned variance so 8 output channels for 4 latent channels), T5 captions of
    width 64, a DPM-Solver scheduler for inference (training uses DDPM, epsilon)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=TINY_IMAGE_SIZE // 2, patch_size=2,
        caption_channels=TINY_T5_DIM, norm_num_groups=1, use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon",
    )
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return pipeline_class(
        tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_t5_encoder(seed + 2),
        vae=tiny_vae(seed), transformer=transformer, scheduler=scheduler,
    )


TINY_DIT_BUILDERS = {
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "pixart": tiny_pixart_pipeline,
    "pixart-sigma": functools.partial(tiny_pixart_pipeline, sigma=True),
}

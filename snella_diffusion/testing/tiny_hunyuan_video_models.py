"""A tiny ``HunyuanVideo15Pipeline`` built from configs (no hub): a 2-block
``HunyuanVideo15Transformer3DModel`` (text-to-video, 4 latent channels so 4 + 4 + 1 = 9 input
channels), a 2-level ``AutoencoderKLHunyuanVideo15`` (spatial factor 4, temporal factor 4, so
clips of 4k+1 frames), a 3-layer ``Qwen2_5_VLTextModel`` with a byte-level ``Qwen2Tokenizer``
built in code, and a 1-layer ByT5-shaped ``T5EncoderModel`` with transformers' file-free
``ByT5Tokenizer``. Weights are random but seeded: two builds with the same seed are identical.

The tokenizer turns every piece of the pipeline's chat template (system message, role names,
newlines) into one token, as the published Qwen2.5-VL tokenizer does, so the template's prefix is
the 108 tokens the pipeline crops."""

from __future__ import annotations

import inspect

import torch

from .tiny_models import byte_symbols

TINY_HY15_LATENT_CHANNELS = 4
TINY_HY15_SCALING_FACTOR = 0.7  # not 1, so a test sees whether it is applied
TINY_HY15_SPATIAL_FACTOR = 4
TINY_HY15_TEMPORAL_FACTOR = 4
TINY_HY15_QWEN_HIDDEN = 16
TINY_HY15_QWEN_VOCAB = 1024  # >= the byte symbols, the template merges and the 3 specials
TINY_HY15_BYT5_DIM = 32
TINY_HY15_BYT5_VOCAB = 384  # ByT5Tokenizer: 3 specials, 256 bytes, 125 extra ids
TINY_HY15_IMAGE_EMBED_DIM = 12
TINY_HY15_SHIFT = 5.0
TINY_HY15_GUIDANCE_SCALE = 6.0
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# One-turn chat template in the shape of Qwen2.5-VL's for text messages.
TINY_QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pipeline_system_message() -> str:
    """The system message ``HunyuanVideo15Pipeline`` puts before every prompt (the default of
    its ``_get_mllm_prompt_embeds``)."""
    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def _piece_merges(pieces: list[str], symbols: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges that make each of ``pieces`` (byte-symbol strings) one token: while
    the merges so far split a piece, join its tokens left to right (later merges rank lower, so
    they join what the earlier ones left, e.g. "ĠĠ ĠĠ ĠĠ ĠĠ" → one 8-space token)."""
    from tokenizers import models

    merges: list[tuple[str, str]] = []
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for _ in range(max(len(piece) for piece in pieces)):
        bpe = models.BPE(vocab=dict(vocab), merges=list(merges))
        split = {piece: [token.value for token in bpe.tokenize(piece)] for piece in pieces}
        if all(len(tokens) == 1 for tokens in split.values()):
            return merges
        for tokens in split.values():
            joined = tokens[0]
            for token in tokens[1:]:
                if (joined, token) not in merges:
                    merges.append((joined, token))
                    vocab.setdefault(joined + token, len(vocab))
                joined += token
    raise ValueError("the template pieces did not become single tokens")


def tiny_hunyuan_qwen2_tokenizer():
    """A Qwen2Tokenizer needing no files: the 256 byte symbols (id = byte value), merges making
    each pre-tokenized piece of the pipeline's template (system message, "system", "user",
    "assistant", newline) one token, the specials ``<|endoftext|>`` (also padding),
    ``<|im_start|>``, ``<|im_end|>``, and a Qwen2.5-style chat template."""
    from transformers import Qwen2Tokenizer

    symbols = byte_symbols()
    plain = Qwen2Tokenizer(vocab={symbol: index for index, symbol in enumerate(symbols)}, merges=[],
                           unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    split = plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    text = "\n".join(("system", pipeline_system_message(), "user", "assistant"))
    pieces = list(dict.fromkeys(piece for piece, _ in split(text)))
    merges = _piece_merges(pieces, symbols)
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) + len(_SPECIALS) > TINY_HY15_QWEN_VOCAB:
        raise ValueError(f"{len(vocab) + len(_SPECIALS)} tokens exceed the tiny Qwen vocab of {TINY_HY15_QWEN_VOCAB}")
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIALS[1:])})
    tokenizer.chat_template = TINY_QWEN25_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen25_vl_text_encoder(seed: int = 0):
    """A Qwen2_5_VLTextModel of 3 layers (width 16, 2 heads of 8, M-RoPE sections 1+1+2 = half
    the head width): the pipeline reads the hidden state 2 layers before the last."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    endoftext = tiny_hunyuan_qwen2_tokenizer().convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = Qwen2_5_VLTextConfig(
        vocab_size=TINY_HY15_QWEN_VOCAB, hidden_size=TINY_HY15_QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=endoftext, eos_token_id=endoftext,
        pad_token_id=endoftext, rope_theta=1000000.0,
        rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},
    )
    return Qwen2_5_VLTextModel(config).eval()


def tiny_byt5_encoder(seed: int = 0):
    """A 1-layer T5 encoder over ByT5's 384 ids (the glyph encoder's place)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=TINY_HY15_BYT5_VOCAB, d_model=TINY_HY15_BYT5_DIM, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval()


def tiny_hunyuan_video15_vae(seed: int = 0):
    """An AutoencoderKLHunyuanVideo15 of 4 latent channels: two levels, each downsampling space
    and time by 2, so ``(B, 3, 4k+1, H, W)`` → ``(B, 4, k+1, H/4, W/4)``; scaling factor 0.7."""
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo15(
        latent_channels=TINY_HY15_LATENT_CHANNELS, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=TINY_HY15_SPATIAL_FACTOR, temporal_compression_ratio=TINY_HY15_TEMPORAL_FACTOR,
        downsample_match_channel=False, upsample_match_channel=False, scaling_factor=TINY_HY15_SCALING_FACTOR,
    ).eval()


def tiny_hunyuan_video15_transformer(seed: int = 0):
    """A HunyuanVideo15Transformer3DModel (text-to-video): 2 double-stream blocks and 1 text
    refiner block of 2 heads × 8, 1×1×1 patches, RoPE axes 2 + 2 + 4; 9 input channels
    (latents, image-condition latents, mask) and 4 out."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * TINY_HY15_LATENT_CHANNELS + 1, out_channels=TINY_HY15_LATENT_CHANNELS, num_attention_heads=2,
        attention_head_dim=8, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=TINY_HY15_QWEN_HIDDEN, text_embed_2_dim=TINY_HY15_BYT5_DIM,
        image_embed_dim=TINY_HY15_IMAGE_EMBED_DIM, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    )


def tiny_hunyuan_video15_pipeline(seed: int = 0):
    """A HunyuanVideo15Pipeline of the tiny parts above, a FlowMatchEulerDiscreteScheduler of
    shift 5 and classifier-free guidance 6."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer

    return HunyuanVideo15Pipeline(
        text_encoder=tiny_qwen25_vl_text_encoder(seed + 1), tokenizer=tiny_hunyuan_qwen2_tokenizer(),
        transformer=tiny_hunyuan_video15_transformer(seed), vae=tiny_hunyuan_video15_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=TINY_HY15_SHIFT),
        text_encoder_2=tiny_byt5_encoder(seed + 2), tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=TINY_HY15_GUIDANCE_SCALE),
    )


# name -> builder(seed), as tiny_video_models.TINY_VIDEO_BUILDERS
TINY_HUNYUAN_VIDEO_BUILDERS = {
    "hunyuan-video15": tiny_hunyuan_video15_pipeline,
}

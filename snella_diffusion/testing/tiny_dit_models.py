"""Tiny transformer-based (DiT) diffusers pipelines built from configs (no hub): SD3, Flux and
PixArt, each with a tiny T5 encoder whose tokenizer is built in code, Qwen-Image with a tiny
Qwen2.5-VL encoder and Z-Image with a tiny Qwen3, both with a byte-level Qwen2 tokenizer. Weights are random but
seeded, so two builds with the same seed are identical. Images are 32 px (16 px latents with
the tiny 2-level VAE of ``tiny_models``)."""

from __future__ import annotations

import functools
import re
import string

import torch

from .tiny_models import TINY_CLIP_HIDDEN, byte_symbols, byte_level_clip_tokenizer, tiny_clip_text_encoder, tiny_vae

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


TINY_QWEN_HIDDEN = 32
TINY_QWEN_VOCAB = 384  # >= the 367 ids of byte_level_qwen2_tokenizer, and the 4 vision ids
TINY_QWEN_ENDOFTEXT = 364  # <|endoftext|>: after the 256 bytes and the 108 template merges
# Per-channel latent statistics of the tiny Qwen-Image VAE (not 0/1, so normalisation shows).
TINY_QWEN_LATENTS_MEAN = (0.25, -0.5, 0.1, 0.0)
TINY_QWEN_LATENTS_STD = (1.5, 0.75, 2.0, 1.0)


def _qwen_template_merges(symbols: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges that make each word of Qwen-Image's prompt template one token
    (left to right: "s y", "sy s", ...; a leading space is the byte symbol of 32), so the
    template's prefix is 34 tokens as with the published tokenizer."""
    from ..families.qwen_image import PROMPT_TEMPLATE

    text = PROMPT_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "")
    merges, known = [], set(symbols)
    for word in sorted(set(re.findall(r" ?[A-Za-z]+", text))):
        word = word.replace(" ", symbols[32])
        for end in range(1, len(word)):
            if word[: end + 1] not in known:
                merges.append((word[:end], word[end]))
                known.add(word[: end + 1])
    return merges


def byte_level_qwen2_tokenizer():
    """A Qwen2Tokenizer needing no files: the 256 byte symbols (id = byte value), merges that
    make each word of Qwen-Image's template one token (ids from 256), then the chat-template
    specials ``<|endoftext|>`` (also padding), ``<|im_start|>``, ``<|im_end|>``; 367 ids."""
    from transformers import Qwen2Tokenizer

    symbols = byte_symbols()
    merges = _qwen_template_merges(symbols)
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwen25_vl_encoder(seed: int = 0, hidden_size: int = TINY_QWEN_HIDDEN):
    """A Qwen2_5_VLForConditionalGeneration with 1 text layer (width 32, 2 heads of 16, M-RoPE
    sections 2+3+3 = half the head width) and a 1-block vision tower (unused for text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": TINY_QWEN_VOCAB, "hidden_size": hidden_size, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": TINY_QWEN_ENDOFTEXT, "eos_token_id": TINY_QWEN_ENDOFTEXT,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": hidden_size},
        vocab_size=TINY_QWEN_VOCAB, image_token_id=370, video_token_id=371, vision_start_token_id=372,
        vision_end_token_id=373, bos_token_id=TINY_QWEN_ENDOFTEXT, eos_token_id=TINY_QWEN_ENDOFTEXT,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_vae(seed: int = 0):
    """An AutoencoderKLQwenImage of 4 latent channels and spatial factor 4 (two levels, one
    temporal downsampling flag each), with the non-trivial latent statistics above."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=list(TINY_QWEN_LATENTS_MEAN), latents_std=list(TINY_QWEN_LATENTS_STD),
    ).eval()


def tiny_qwen_image_pipeline(seed: int = 0):
    """A QwenImagePipeline: 2 double-stream blocks (2 heads of width 16, RoPE axes 4 + 6 + 6),
    text width 32, 4 latent channels packed 2×2 into 16; the published scheduler's dynamic
    shifting. 32 px images are 8×8 latents, 16 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TINY_QWEN_HIDDEN, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    return QwenImagePipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_qwen_image_vae(seed),
        text_encoder=tiny_qwen25_vl_encoder(seed + 1), tokenizer=byte_level_qwen2_tokenizer(),
    )


# A chat template in the shape of Qwen3's for one-turn prompts: user turn, then the assistant
# header; with enable_thinking false an empty think block follows, as Qwen3's does.
TINY_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
TINY_Z_IMAGE_VAE_SHIFT = 0.125
TINY_Z_IMAGE_VAE_SCALE = 0.5


def tiny_qwen3_encoder(seed: int = 0, hidden_size: int = TINY_QWEN_HIDDEN):
    """A Qwen3Model with 2 layers (width 32, 2 heads of 16, 1 key/value head): Z-Image reads its
    second-to-last hidden layer."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=TINY_QWEN_VOCAB, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=TINY_QWEN_ENDOFTEXT,
        eos_token_id=TINY_QWEN_ENDOFTEXT, pad_token_id=TINY_QWEN_ENDOFTEXT,
    )
    return Qwen3Model(config).eval()


def tiny_z_image_pipeline(seed: int = 0):
    """A ZImagePipeline: 2 main blocks and 1 noise- and 1 context-refiner block (width 32, 2
    heads of 16, RoPE axes 4 + 6 + 6), caption width 32 from a tiny Qwen3, the 4-channel tiny
    VAE with shift 0.125 and scale 0.5, the Turbo scheduler's static shift 3. 32 px images are
    16×16 latents, 8×8 patches."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=TINY_QWEN_HIDDEN, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    )
    tokenizer = byte_level_qwen2_tokenizer()
    tokenizer.chat_template = TINY_QWEN3_CHAT_TEMPLATE
    return ZImagePipeline(
        transformer=transformer, scheduler=tiny_flow_scheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=TINY_Z_IMAGE_VAE_SHIFT, scaling_factor=TINY_Z_IMAGE_VAE_SCALE),
        text_encoder=tiny_qwen3_encoder(seed + 1), tokenizer=tokenizer,
    )


TINY_FLUX2_BN_MEAN = 0.2
TINY_FLUX2_BN_VAR = 2.25


def tiny_flux2_vae():
    """An AutoencoderKLFlux2 of 4 latent channels (16 after 2×2 patchifying), factor 2, whose
    batch-norm statistics are set to mean 0.2, variance 2.25 (drawn from the current RNG state)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    vae.bn.running_mean.fill_(TINY_FLUX2_BN_MEAN)
    vae.bn.running_var.fill_(TINY_FLUX2_BN_VAR)
    return vae.eval()


def tiny_flux2_klein_pipeline(seed: int = 0):
    """A Flux2KleinPipeline: 1 double- and 1 single-stream block (2 heads of 16, RoPE axes 4 × 4),
    a 27-layer Qwen3ForCausalLM of width 16 (klein reads hidden layers 9, 18, 27: text width 48),
    an AutoencoderKLFlux2 of 4 latent channels (16 after 2×2 patchifying) whose batch-norm
    statistics are set to mean 0.2, variance 2.25. 32 px images are 8×8 patchified latents."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = tiny_flux2_vae()
    config = Qwen3Config(
        vocab_size=TINY_QWEN_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, bos_token_id=TINY_QWEN_ENDOFTEXT,
        eos_token_id=TINY_QWEN_ENDOFTEXT, pad_token_id=TINY_QWEN_ENDOFTEXT,
    )
    tokenizer = byte_level_qwen2_tokenizer()
    tokenizer.chat_template = TINY_QWEN3_CHAT_TEMPLATE
    return Flux2KleinPipeline(
        scheduler=tiny_flow_scheduler(), vae=vae.eval(), text_encoder=Qwen3ForCausalLM(config).eval(),
        tokenizer=tokenizer, transformer=transformer,
    )


TINY_CHROMA_VAE_SHIFT = 0.125
TINY_CHROMA_VAE_SCALE = 0.5


def tiny_chroma_pipeline(seed: int = 0):
    """A ChromaPipeline: 1 double- and 1 single-stream block (2 heads of 16, RoPE axes 4 + 6 + 6),
    a 1-layer approximator of width 32 for the modulations, the tiny T5 (width 64), the 4-channel
    tiny VAE with shift 0.125 and scale 0.5, a dynamically shifting scheduler like Flux.1's. 32 px
    images are 16×16 latents, 8×8 packed tokens of 16 channels."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TINY_T5_DIM, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    return ChromaPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=tiny_vae(seed, shift_factor=TINY_CHROMA_VAE_SHIFT, scaling_factor=TINY_CHROMA_VAE_SCALE),
        text_encoder=tiny_t5_encoder(seed + 2), tokenizer=tiny_t5_tokenizer(max_length=512),
    )


# A chat template in the shape of Mistral-3's for a system and a user message whose contents
# are lists of text parts (as Flux2Pipeline formats them); no generation prompt.
TINY_MISTRAL3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/INST]"
    "{% endif %}{% endfor %}"
)
TINY_MISTRAL3_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")


def tiny_mistral3_tokenizer():
    """The byte-level tokenizer with Mistral-3's image and chat specials (374 ids) and the chat
    template above. The published FLUX.2-dev ships a PixtralProcessor (which needs torchvision);
    Flux2Pipeline only calls its ``apply_chat_template``, which the tokenizer alone provides."""
    tokenizer = byte_level_qwen2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(TINY_MISTRAL3_SPECIALS)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = TINY_MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def tiny_mistral3_encoder(seed: int, image_token_id: int):
    """A Mistral3ForConditionalGeneration with a 30-layer Mistral text model of width 16 (Flux.2
    dev reads hidden layers 10, 20, 30: text width 48) and a 1-layer Pixtral vision tower
    (unused for text)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": TINY_QWEN_VOCAB, "hidden_size": 16, "intermediate_size": 24,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "pad_token_id": TINY_QWEN_ENDOFTEXT},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 4},
        image_token_index=image_token_id, spatial_merge_size=1,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_flux2_dev_pipeline(seed: int = 0):
    """A Flux2Pipeline: the klein builder's transformer with a guidance embedding (as FLUX.2-dev)
    and the same VAE, a tiny Mistral-3 encoder and the byte-level tokenizer with Mistral-3's chat
    specials. 32 px images are 8×8 patchified latents."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )
    vae = tiny_flux2_vae()
    tokenizer = tiny_mistral3_tokenizer()
    return Flux2Pipeline(
        scheduler=tiny_flow_scheduler(), vae=vae, transformer=transformer, tokenizer=tokenizer,
        text_encoder=tiny_mistral3_encoder(seed + 1, tokenizer.convert_tokens_to_ids("[IMG]")),
    )


TINY_KREA2_SELECT_LAYERS = (1, 2)


def tiny_qwen3_vl_encoder(seed: int = 0, hidden_size: int = TINY_QWEN_HIDDEN):
    """A Qwen3VLModel with 2 text layers (width 32, 2 heads of 16, 1 key/value head, M-RoPE
    sections 2+3+3 = half the head width) and a 1-block vision tower (unused for text)."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": TINY_QWEN_VOCAB, "hidden_size": hidden_size, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "bos_token_id": TINY_QWEN_ENDOFTEXT,
            "eos_token_id": TINY_QWEN_ENDOFTEXT, "pad_token_id": TINY_QWEN_ENDOFTEXT,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": hidden_size, "deepstack_visual_indexes": []},
        image_token_id=370, video_token_id=371, vision_start_token_id=372, vision_end_token_id=373,
    )
    return Qwen3VLModel(config).eval()


def tiny_krea2_pipeline(seed: int = 0):
    """A Krea2Pipeline: 2 single-stream blocks (2 heads of 16, 1 key/value head, RoPE axes
    4 + 6 + 6), a text fusion of 1 layer-wise and 1 refiner block over the 2 tapped layers
    (:data:`TINY_KREA2_SELECT_LAYERS`) of a tiny Qwen3-VL, the tiny Qwen-Image VAE (factor 4,
    non-trivial per-channel statistics) and the byte-level tokenizer whose template prefix is
    34 tokens as the published one's; dynamic shifting like the published scheduler. 32 px
    images are 8×8 latents, 4×4 tokens of 16 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=48, timestep_embed_dim=32, text_hidden_dim=TINY_QWEN_HIDDEN,
        num_text_layers=len(TINY_KREA2_SELECT_LAYERS), text_num_attention_heads=2, text_num_key_value_heads=2,
        text_intermediate_size=48, num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    return Krea2Pipeline(
        scheduler=scheduler, vae=tiny_qwen_image_vae(seed), text_encoder=tiny_qwen3_vl_encoder(seed + 1),
        tokenizer=byte_level_qwen2_tokenizer(), transformer=transformer,
        text_encoder_select_layers=TINY_KREA2_SELECT_LAYERS,
    )


TINY_DIT_BUILDERS = {
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
    "pixart": tiny_pixart_pipeline,
    "pixart-sigma": functools.partial(tiny_pixart_pipeline, sigma=True),
    "qwen-image": tiny_qwen_image_pipeline,
    "z-image": tiny_z_image_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "chroma": tiny_chroma_pipeline,
    "flux2": tiny_flux2_dev_pipeline,
    "krea2": tiny_krea2_pipeline,
}


TINY_GEMMA_VOCAB = 512  # >= the 445 ids of tiny_gemma_tokenizer
TINY_GEMMA_HIDDEN = 32
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
TINY_LUMINA2_VAE_SHIFT = 0.125
TINY_LUMINA2_VAE_SCALE = 0.5


def _word_merges(texts: tuple[str, ...], known: set[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word (letters only) of ``texts`` one token, built left to right
    ("s y", "sy s", ...), skipping words already in ``known`` (which this extends)."""
    merges = []
    for word in sorted({word for text in texts for word in re.findall(r"[A-Za-z]+", text)}):
        for end in range(1, len(word)):
            if word[: end + 1] not in known:
                merges.append((word[:end], word[end]))
                known.add(word[: end + 1])
    return merges


def tiny_gemma_tokenizer():
    """A GemmaTokenizer needing no files: the specials <pad>=0, <eos>=1, <bos>=2, <unk>=3,
    <mask>=4, the word boundary "▁", letters, digits and a little punctuation, the 256
    byte-fallback pieces ``<0xNN>``, then merges that make each word of Lumina2's system prompt
    and of the test prompts one token (so prompts stay short)."""
    from transformers import GemmaTokenizer

    from ..families.lumina2 import PROMPT_SEPARATOR, SYSTEM_PROMPT

    characters = string.ascii_letters + string.digits + ".,!?'-:<>"
    pieces = [*_GEMMA_SPECIALS, "▁", *characters, *(f"<0x{value:02X}>" for value in range(256))]
    merges = _word_merges((SYSTEM_PROMPT, PROMPT_SEPARATOR, " ".join(_T5_WORDS), "grass red ball"), set(pieces))
    vocab = {piece: index for index, piece in enumerate(pieces)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges)


def tiny_gemma2_encoder(seed: int = 0, hidden_size: int = TINY_GEMMA_HIDDEN):
    """A Gemma2Model with 2 layers (width 32, 2 heads of 16, 1 key/value head); Lumina2 reads
    its second-to-last hidden layer, Sana its last."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=TINY_GEMMA_VOCAB, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma2Model(config).eval()


def tiny_lumina2_pipeline(seed: int = 0):
    """A Lumina2Pipeline: 2 main blocks and 1 noise- and 1 context-refiner block (width 32, 2
    heads of 16 with 1 key/value head, RoPE axes 4 + 6 + 6), caption width 32 from a tiny
    Gemma-2, a 4-level VAE (factor 8, as the pipeline assumes) with shift 0.125 and scale 0.5,
    scheduler shift 6. 32 px images are 4×4 latents, 2×2 patches."""
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 32, 32),
        cap_feat_dim=TINY_GEMMA_HIDDEN,
    )
    vae = tiny_vae(seed, block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   shift_factor=TINY_LUMINA2_VAE_SHIFT, scaling_factor=TINY_LUMINA2_VAE_SCALE)
    return Lumina2Pipeline(
        transformer=transformer, scheduler=tiny_flow_scheduler(shift=6.0), vae=vae.eval(),
        text_encoder=tiny_gemma2_encoder(seed + 1), tokenizer=tiny_gemma_tokenizer(),
    )




TINY_SANA_VAE_SCALE = 0.5


def tiny_dc_autoencoder(seed: int = 0):
    """An AutoencoderDC of 4 latent channels and factor 4 (three levels of ResBlocks, 8, 16 and
    16 channels, no attention), scaling factor 0.5."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()), decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=TINY_SANA_VAE_SCALE,
    ).eval()


def tiny_sana_pipeline(seed: int = 0):
    """A SanaPipeline: 2 linear-attention blocks (2 heads of 8; cross-attention 2 heads of 8),
    caption width 32 from a tiny Gemma-2, the tiny DC-AE (factor 4), a flow DPM-Solver scheduler
    with flow_shift 3 like the published one. 32 px images are 8×8 latents."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TINY_GEMMA_HIDDEN, sample_size=8, patch_size=1,
    )
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaPipeline(
        tokenizer=tiny_gemma_tokenizer(), text_encoder=tiny_gemma2_encoder(seed + 1), vae=tiny_dc_autoencoder(seed),
        transformer=transformer, scheduler=scheduler,
    )



TINY_HIDREAM_VAE_SHIFT = 0.125
TINY_HIDREAM_VAE_SCALE = 0.5
TINY_LLAMA_HIDDEN = 16


def tiny_hidream_pipeline(seed: int = 0):
    """A HiDreamImagePipeline: 1 double- and 1 single-stream block (2 heads of 8, RoPE axes
    4 + 2 + 2, 2 routed experts with 1 active plus the shared one), two CLIP encoders with
    projection (pooled 32 + 32 = 64), the tiny T5 (width 64), a 2-layer LlamaForCausalLM of width
    16 with the byte-level tokenizer (both Llama layers feed the two blocks), the 4-channel tiny
    VAE with shift 0.125 and scale 0.5, a scheduler of shift 3. 32 px images are 16×16 latents,
    8×8 patches."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[TINY_T5_DIM, TINY_LLAMA_HIDDEN], text_emb_dim=2 * TINY_CLIP_HIDDEN,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
        llama_layers=(0, 1),
    ).eval()
    torch.manual_seed(seed + 3)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=TINY_QWEN_VOCAB, hidden_size=TINY_LLAMA_HIDDEN, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        bos_token_id=TINY_QWEN_ENDOFTEXT, eos_token_id=TINY_QWEN_ENDOFTEXT, pad_token_id=TINY_QWEN_ENDOFTEXT,
    ))
    return HiDreamImagePipeline(
        scheduler=tiny_flow_scheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=TINY_HIDREAM_VAE_SHIFT, scaling_factor=TINY_HIDREAM_VAE_SCALE),
        text_encoder=tiny_clip_text_encoder(seed, with_projection=True), tokenizer=byte_level_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(seed + 1, with_projection=True), tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 2), tokenizer_3=tiny_t5_tokenizer(),
        text_encoder_4=llama.eval(), tokenizer_4=byte_level_qwen2_tokenizer(), transformer=transformer,
    )

TINY_DIT_BUILDERS.update({
    "lumina2": tiny_lumina2_pipeline,
    "sana": tiny_sana_pipeline,
    "hidream": tiny_hidream_pipeline,
})


TINY_IDEOGRAM4_TEXT_WIDTH = 16
# A chat template in the shape of Qwen3-VL's for one-turn prompts whose content is a list of
# typed parts (the Ideogram 4 pipeline's messages), or a plain string.
TINY_QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_ideogram4_pipeline(seed: int = 0):
    """An Ideogram4Pipeline: conditional and unconditional transformers of 2 blocks each (2 heads
    of 16, MRoPE sections 2 + 2 + 2), a 36-layer Qwen3-VL text model of width 16 (the pipeline
    taps 13 of its layers: text features of width 13 × 16 = 208), the tiny Flux.2 VAE (factor 2,
    4 channels, 16 after 2×2 patches, batch-norm mean 0.2, variance 2.25). 32 px images are 8×8
    tokens of 16 channels."""
    from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS
    from transformers import Qwen3VLConfig, Qwen3VLModel

    def transformer():
        return Ideogram4Transformer2DModel(
            in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=48,
            adaln_dim=32, llm_features_dim=len(QWEN3_VL_ACTIVATION_LAYERS) * TINY_IDEOGRAM4_TEXT_WIDTH,
            rope_theta=10000, mrope_section=(2, 2, 2),
        )

    torch.manual_seed(seed)
    conditional, unconditional = transformer(), transformer()
    vae = tiny_flux2_vae()
    torch.manual_seed(seed + 1)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": TINY_QWEN_VOCAB, "hidden_size": TINY_IDEOGRAM4_TEXT_WIDTH, "intermediate_size": 24,
            "num_hidden_layers": max(QWEN3_VL_ACTIVATION_LAYERS) + 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "bos_token_id": TINY_QWEN_ENDOFTEXT,
            "eos_token_id": TINY_QWEN_ENDOFTEXT, "pad_token_id": TINY_QWEN_ENDOFTEXT,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": TINY_IDEOGRAM4_TEXT_WIDTH, "deepstack_visual_indexes": []},
        image_token_id=370, video_token_id=371, vision_start_token_id=372, vision_end_token_id=373,
    )
    tokenizer = byte_level_qwen2_tokenizer()
    tokenizer.chat_template = TINY_QWEN3_VL_CHAT_TEMPLATE
    return Ideogram4Pipeline(
        scheduler=tiny_flow_scheduler(), vae=vae, text_encoder=Qwen3VLModel(config).eval(), tokenizer=tokenizer,
        transformer=conditional, unconditional_transformer=unconditional,
    )


TINY_QWEN21_LATENTS_MEAN = TINY_QWEN_LATENTS_MEAN
TINY_QWEN21_LATENTS_STD = TINY_QWEN_LATENTS_STD
# The vision specials Qwen-Image 2.1's pipeline looks up (after the 370 ids of the chat tokenizer).
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def tiny_qwen21_processor():
    """A stand-in for Qwen3VLProcessor, which transformers cannot build without torchvision (its
    video processor): a LlavaProcessor (PIL image processor, no torchvision) over the byte-level
    tokenizer with the vision specials and a Qwen3-VL-shaped chat template. Text-to-image reads
    only its tokenizer and chat template, as it reads Qwen3VLProcessor's."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = byte_level_qwen2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]})
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer,
                          chat_template=TINY_QWEN3_VL_CHAT_TEMPLATE, image_token="<|image_pad|>", patch_size=14)


def tiny_qwen21_pipeline(seed: int = 0):
    """A QwenImage21Pipeline: 2 single-stream block-causal blocks (2 heads of 16, RoPE axes
    4 + 6 + 6, text width 32), a 2-layer Qwen3VLForConditionalGeneration, an
    AutoencoderKLQwenImage21 of 4 latent channels and the pipeline's spatial factor 16 (five
    levels) with non-trivial per-channel statistics, the stand-in processor of
    :func:`tiny_qwen21_processor`; dynamic shifting like the published scheduler. 32 px images
    are 2×2 latents: 4 tokens, one 2×2 slot of the encoder's sequence."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = tiny_qwen21_processor()
    vision_ids = processor.tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=TINY_QWEN_HIDDEN, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        latents_mean=list(TINY_QWEN21_LATENTS_MEAN), latents_std=list(TINY_QWEN21_LATENTS_STD),
    ).eval()
    torch.manual_seed(seed + 1)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": TINY_QWEN_VOCAB, "hidden_size": TINY_QWEN_HIDDEN, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "bos_token_id": TINY_QWEN_ENDOFTEXT, "eos_token_id": TINY_QWEN_ENDOFTEXT, "pad_token_id": TINY_QWEN_ENDOFTEXT,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                       "out_hidden_size": TINY_QWEN_HIDDEN, "deepstack_visual_indexes": []},
        vision_start_token_id=vision_ids[0], vision_end_token_id=vision_ids[1], image_token_id=vision_ids[2],
        video_token_id=TINY_QWEN_VOCAB - 1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    return QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen3VLForConditionalGeneration(config).eval(),
                               processor=processor, transformer=transformer)

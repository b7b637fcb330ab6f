"""The lab's base model: a real ``StableDiffusionPipeline`` built in code (no hub).

- tokenizer: a word-level ``CLIPTokenizer`` whose vocabulary is the world's words plus ``sks``,
  ``orange`` and ``purple`` (each word one token, built from character merges), prompts padded
  to 8 tokens;
- text encoder: a 2-layer ``CLIPTextModel`` (hidden 64), trained jointly with the UNet;
- VAE: an ``AutoencoderKL`` with one block, so it does not downsample: 16 px images map to
  16×16×4 latents. It is trained here to be near the identity on the first three latent
  channels (latent ≈ pixels in [-1, 1], fourth channel ≈ 0) and its posterior is made
  deterministic (log-variance fixed at diffusers' floor, -30);
- UNet: ``UNet2DConditionModel`` at 16×16, channels 32/64/64, one layer per block, cross
  attention at the 8×8 and 4×4 levels and in the middle block (about 1.7 M parameters);
- scheduler: ``DDIMScheduler``, v-prediction, cosine betas (``squaredcos_cap_v2``),
  ``trailing`` timestep spacing so 25 steps start from pure noise.

The base generates at 16 px: the world (defined at 32 px) downsampled by 2 with area averaging.
"""

from __future__ import annotations

from typing import Any

import torch

from snella_diffusion.lab.world import COLORS, CONCEPT_COLORS, CONCEPT_TOKEN, SHAPES, SIZE_SIDES

BASE_RESOLUTION = 16
TEXT_HIDDEN = 64
MAX_PROMPT_TOKENS = 8
LATENT_CHANNELS = 4
LOGVAR_FLOOR = -30.0
# The guidance scale the lab samples at. ENVIRONMENT.md measured a similar base fall apart
# under CFG (all-correct 84 % at 1, 47 % at 2, 16 % at 3); the shipped base (2,906 steps) does
# the opposite: all three attributes right in 69 % / 82 % / 91 % of 192 samples at 1 / 2 / 3
# (colour 99.5 % / 100 % / 100 %), so the lab samples at 3.
BASE_GUIDANCE_SCALE = 3.0
BASE_INFERENCE_STEPS = 25


def vocabulary_words() -> list[str]:
    """Every word the tokenizer knows as one token."""
    return ["a", *SIZE_SIDES, *COLORS, *SHAPES, CONCEPT_TOKEN, *CONCEPT_COLORS]


def word_level_clip_tokenizer():
    """A CLIPTokenizer (no files) that turns each vocabulary word into one token: its BPE merges
    join any two adjacent pieces of a word; single characters stay in the vocabulary, so an
    unknown word still tokenizes (character by character)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    letters = sorted({c for word in vocabulary_words() for c in word} | set("abcdefghijklmnopqrstuvwxyz"))
    for letter in letters:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    # Every split of every substring of every word is a merge, so whichever pair BPE merges
    # first, a word always ends as one token.
    for word in vocabulary_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for start in range(len(symbols)):
            for end in range(start + 2, len(symbols) + 1):
                for split in range(start + 1, end):
                    merge = ("".join(symbols[start:split]), "".join(symbols[split:end]))
                    if merge not in seen:
                        seen.add(merge)
                        merges.append(merge)
                    vocab.setdefault("".join(symbols[start:end]), len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(config)


def identity_vae(seed: int = 0):
    """The non-downsampling AutoencoderKL (untrained; ``pretrain.train_vae`` trains it)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=[32], layers_per_block=1, latent_channels=LATENT_CHANNELS,
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], norm_num_groups=8,
        sample_size=BASE_RESOLUTION, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def fix_posterior_logvar(vae: Any) -> None:
    """Makes the VAE's posterior deterministic: the log-variance half of ``conv_out`` outputs
    the floor diffusers clamps to (-30, so the sample's std is 3e-7)."""
    with torch.no_grad():
        weight, bias = vae.encoder.conv_out.weight, vae.encoder.conv_out.bias
        weight[LATENT_CHANNELS:] = 0.0
        bias[LATENT_CHANNELS:] = LOGVAR_FLOOR


def unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=BASE_RESOLUTION, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False)


def sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def build_pipeline(seed: int = 0):
    """An untrained base pipeline (the pretraining script's starting point)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = word_level_clip_tokenizer()
    vae = identity_vae(seed)
    fix_posterior_logvar(vae)
    return StableDiffusionPipeline(
        unet=unet(seed), vae=vae, text_encoder=text_encoder(len(tokenizer), seed), tokenizer=tokenizer,
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )

"""Per-image captions: sidecar caption files, the caption transforms people know from kohya's
sd-scripts (trigger prefix, tag shuffling with fixed leading tokens, caption dropout), and a
prompt-embedding cache for the training loop.

A caption is turned into the training prompt of one draw by :meth:`CaptionOptions.prompt_for`:

1. the image's caption, or the fallback prompt (``--instance_prompt``) for an image without one;
2. ``--shuffle_caption``: the comma-separated tags after the first ``--keep_tokens`` are shuffled;
3. ``--caption_prefix``: the prefix (the trigger word) is put in front of a caption, ``"<prefix>, <caption>"``;
4. ``--caption_dropout p``: with probability p the prompt is the empty string (for classifier-free guidance).

Every random choice comes from the generator passed in, which the dataset derives from
(seed, epoch, index): a resumed run sees the prompts a straight run sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import SnellaError

logger = logging.getLogger(__name__)

MISSING_CAPTION_POLICIES = ("error", "instance_prompt")
TAG_SEPARATOR = ","


class CaptionError(SnellaError):
    """Caption files are missing or a caption setting cannot be applied."""


def caption_path(image_path: Path, extension: str) -> Path:
    """The sidecar caption file of ``image_path``: same folder and stem, ``extension`` (".txt")."""
    suffix = extension if extension.startswith(".") else f".{extension}"
    return image_path.with_suffix(suffix)


def read_caption_file(path: Path) -> str:
    """The caption in ``path`` (UTF-8), its lines joined by spaces and outer whitespace stripped."""
    return " ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines()).strip()


def read_sidecar_captions(
    image_paths: Sequence[Path],
    extension: str,
    missing_policy: str,
    fallback_prompt: Optional[str],
    flag: str = "--caption_extension",
) -> list[Optional[str]]:
    """The caption of each image, in order; None for an image without a caption file when
    ``missing_policy`` is "instance_prompt" (the fallback prompt is then used, with one warning).

    Raises:
        CaptionError: images without a caption file under the "error" policy (all are named),
            or the "instance_prompt" policy without a fallback prompt.
    """
    if missing_policy not in MISSING_CAPTION_POLICIES:
        raise CaptionError(f"--missing_caption={missing_policy}: expected one of {MISSING_CAPTION_POLICIES}")
    captions: list[Optional[str]] = []
    missing: list[str] = []
    for image_path in image_paths:
        sidecar = caption_path(image_path, extension)
        if sidecar.is_file():
            captions.append(read_caption_file(sidecar))
        else:
            captions.append(None)
            missing.append(image_path.name)
    if missing:
        names = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        folder = image_paths[0].parent
        if missing_policy == "error":
            raise CaptionError(
                f"{flag}={extension}: {len(missing)} image(s) in {folder} have no caption file: {names}; "
                "write them, or pass --missing_caption instance_prompt to train those on --instance_prompt"
            )
        if fallback_prompt is None:
            raise CaptionError(
                f"--missing_caption instance_prompt: {len(missing)} image(s) in {folder} have no caption "
                f"file ({names}) and no --instance_prompt is given"
            )
        logger.warning("%s: %d image(s) without a caption file use --instance_prompt %r: %s",
                       flag, len(missing), fallback_prompt, names)
    return captions


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """kohya's ``--shuffle_caption``: split ``caption`` at commas, keep the first ``keep_tokens``
    tags in place, shuffle the others; tags are re-joined with ", "."""
    tags = [tag.strip() for tag in caption.split(TAG_SEPARATOR)]
    tags = [tag for tag in tags if tag]
    fixed, moving = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(moving))
    return ", ".join(fixed + [moving[i] for i in order])


@dataclass(frozen=True)
class CaptionOptions:
    """How captions become prompts (see the module docstring for the order of the steps).

    Attributes:
        fallback_prompt: the prompt of images without a caption (``--instance_prompt``).
        prefix: put in front of every caption (not of the fallback prompt), or None.
        dropout: probability of the empty prompt, in [0, 1).
        shuffle: shuffle the comma-separated tags.
        keep_tokens: leading tags that ``shuffle`` leaves in place.
    """

    fallback_prompt: Optional[str] = None
    prefix: Optional[str] = None
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    def prompt_for(self, caption: Optional[str], rng: np.random.Generator) -> str:
        """The prompt of one draw for an image with ``caption`` (None: the fallback prompt)."""
        text = caption if caption is not None else self.fallback_prompt
        if text is None:
            raise CaptionError("an image has no caption and no --instance_prompt is given")
        if self.shuffle:
            text = shuffle_tags(text, self.keep_tokens, rng)
        if self.prefix and caption is not None:
            text = f"{self.prefix}, {text}" if text else self.prefix
        if self.dropout > 0.0 and rng.random() < self.dropout:
            return ""
        return text

    def possible_prompts(self, captions: Iterable[Optional[str]]) -> Optional[set[str]]:
        """Every prompt :meth:`prompt_for` can return for these captions, or None when the set
        is unbounded (shuffled tags): the training loop then encodes prompts batch by batch."""
        if self.shuffle:
            return None
        rng = np.random.default_rng(0)
        unchanged = CaptionOptions(self.fallback_prompt, self.prefix, 0.0, False, 0)
        prompts = {unchanged.prompt_for(caption, rng) for caption in captions}
        if self.dropout > 0.0:
            prompts.add("")
        return prompts


class PromptEmbeddingCache:
    """Prompt embeddings for the training loop: prompts known in advance are encoded once
    (in chunks of ``chunk_size``); others are encoded when a batch asks for them. With
    ``trainable`` text encoders nothing is cached (each batch is encoded with gradients).

    ``encode(prompts) -> {name: tensor (B, ...)}`` is the family's ``encode_prompt``.
    """

    def __init__(self, encode: Any, trainable: bool, chunk_size: int = 8) -> None:
        self.encode = encode
        self.trainable = trainable
        self.chunk_size = chunk_size
        self.cached: dict[str, dict[str, Tensor]] = {}

    def precompute(self, prompts: Iterable[str]) -> None:
        """Encode ``prompts`` (without gradients) and keep one ``(1, ...)`` slice per prompt."""
        pending = sorted(set(prompts) - set(self.cached))
        with torch.no_grad():
            for start in range(0, len(pending), self.chunk_size):
                chunk = pending[start:start + self.chunk_size]
                encoded = self.encode(chunk)
                for row, prompt in enumerate(chunk):
                    self.cached[prompt] = {key: value[row:row + 1] for key, value in encoded.items()}

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        """Embeddings of ``prompts``, batch-first, in order."""
        if self.trainable:
            return self.encode(prompts)
        if any(prompt not in self.cached for prompt in prompts):
            with torch.no_grad():
                return self.encode(prompts)
        keys = self.cached[prompts[0]].keys()
        return {key: torch.cat([self.cached[prompt][key] for prompt in prompts]) for key in keys}

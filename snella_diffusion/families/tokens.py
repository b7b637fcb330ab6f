"""Prompt tokenization shared by the families: CLIP ids padded like diffusers pipelines, and
ids with attention masks padded to a given length (T5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def tokenize(tokenizer: Any, prompts: list[str]) -> Tensor:
    """Token ids ``(B, model_max_length)``, padded and truncated like diffusers pipelines."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids


def padded_tokens(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask ``(B, max_length)``, padded to ``max_length``."""
    encoded = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return encoded.input_ids.to(device), encoded.attention_mask.to(device)


def clip_max_length(tokenizer: Any) -> int:
    """A CLIP tokenizer's length, at most 77."""
    return min(int(tokenizer.model_max_length), 77)

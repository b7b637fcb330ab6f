"""Sampling a pipeline on world prompts and scoring the images with the exact decoders."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS
from snella_diffusion.lab.decode import Decoded, decode, matches_prompt


@torch.no_grad()
def sample(pipeline: Any, prompts: Sequence[str], seed: int, guidance_scale: float = BASE_GUIDANCE_SCALE,
           steps: int = BASE_INFERENCE_STEPS, batch_size: int = 64) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for ``prompts``; image i uses the generator seeded
    ``seed + i``, so a sample does not depend on the batch it falls in."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                       output_type="np")
        images.append(out.images)
    return np.concatenate(images).astype(np.float32)


def score_prompts(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Fractions of images right in colour, shape, size and all three, plus the fraction
    showing the concept (loose and strict) and the fraction empty."""
    decoded: list[Decoded] = [decode(image) for image in images]
    matches = [matches_prompt(d, p) for d, p in zip(decoded, prompts)]
    result = {key: float(np.mean([m[key] for m in matches])) for key in ("color", "shape", "size", "all")}
    result["concept_loose"] = float(np.mean([d.concept_loose for d in decoded]))
    result["concept_strict"] = float(np.mean([d.concept_strict for d in decoded]))
    result["empty"] = float(np.mean([d.shape is None for d in decoded]))
    return result


def random_prompts(count: int, seed: int) -> list[str]:
    """``count`` full prompts ``"a {size} {color} {shape}"`` drawn uniformly (seeded)."""
    from snella_diffusion.lab.world import base_prompts

    prompts = base_prompts()
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.integers(len(prompts), size=count)]

"""Sampling a pipeline on world prompts and scoring the images with the exact decoders."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

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


def score_prompts(images: np.ndarray, prompts: Sequence[str],
                  decoder: Callable[[np.ndarray], Decoded] = decode) -> dict[str, float]:
    """Fractions of images right in colour, shape, size and all three, plus the fraction
    showing the concept (loose and strict) and the fraction empty; ``decoder`` reads the
    images (default ``decode``: the sks concept; ``decode_zxc`` for zxc)."""
    decoded: list[Decoded] = [decoder(image) for image in images]
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


ACCEPTANCE_SAMPLES = 192
ACCEPTANCE_SEED = 7


def acceptance(pipeline: Any, count: int = ACCEPTANCE_SAMPLES, steps: int = BASE_INFERENCE_STEPS,
               guidance_scale: float = BASE_GUIDANCE_SCALE) -> dict[str, float]:
    """Issue 16's acceptance measurement: ``count`` samples of random full prompts (seeded),
    ``steps`` steps of the pipeline's own sampler, scored by the decoders."""
    prompts = random_prompts(count, seed=ACCEPTANCE_SEED)
    return score_prompts(sample(pipeline, prompts, seed=ACCEPTANCE_SEED * 1000, guidance_scale=guidance_scale,
                                steps=steps), prompts)


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m snella_diffusion.lab.evaluate <pipeline folder> [--guidance 1 2 3]``: prints
    the acceptance scores as JSON, one line per guidance scale."""
    import argparse
    import json

    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=cli.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--guidance", nargs="+", type=float, default=[BASE_GUIDANCE_SCALE])
    parser.add_argument("--steps", type=int, default=BASE_INFERENCE_STEPS)
    parser.add_argument("--count", type=int, default=ACCEPTANCE_SAMPLES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    for guidance in args.guidance:
        scores = acceptance(pipeline, args.count, args.steps, guidance)
        print(json.dumps({"guidance_scale": guidance, "steps": args.steps, "samples": args.count, **scores}), flush=True)


if __name__ == "__main__":
    cli()

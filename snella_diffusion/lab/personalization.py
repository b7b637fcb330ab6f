"""Personalization metrics of issue 16, computed with the exact decoders on fixed seeds.

For a pipeline (the base, or the base with an adapter):

- fidelity: fraction of ``FIDELITY_SAMPLES`` samples of ``"a sks square"`` that decode as the
  concept, strict (a square whose four quadrants hold the checkerboard colours) and loose
  (≥ 20 % of foreground pixels nearest orange and ≥ 20 % nearest purple);
- editability: size accuracy over ``EDIT_SAMPLES`` samples each of ``"a small sks square"`` and
  ``"a large sks square"`` (and the loose concept rate on them);
- prior leak: fraction of ``LEAK_SAMPLES`` samples of ``"a square"`` showing the concept
  (loose and strict; lower is better);
- drift: on ``DRIFT_SAMPLES`` samples of the 48 base prompts (each twice), colour accuracy and
  all-attribute accuracy, and the fraction showing the concept (loose). ``drift_from`` turns
  these into differences from the base's values.

Every prompt group uses its own fixed seed range, so two pipelines are compared on the same
initial noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS
from snella_diffusion.lab.evaluate import sample, score_prompts
from snella_diffusion.lab.world import CLASS_PROMPT, INSTANCE_PROMPT, SIZED_INSTANCE_PROMPTS, base_prompts

FIDELITY_SAMPLES = 64
EDIT_SAMPLES = 32
LEAK_SAMPLES = 64
DRIFT_SAMPLES = 96
SEEDS = {"fidelity": 100_000, "edit": 200_000, "leak": 300_000, "drift": 400_000}


def evaluation_prompts(scale: float = 1.0) -> dict[str, list[str]]:
    """The prompt list of each metric group; ``scale`` < 1 shrinks every group (for tests)."""
    def count(n: int) -> int:
        return max(2, int(round(n * scale)))

    drift = base_prompts() * (DRIFT_SAMPLES // len(base_prompts()))
    return {
        "fidelity": [INSTANCE_PROMPT] * count(FIDELITY_SAMPLES),
        "edit": [SIZED_INSTANCE_PROMPTS[0]] * count(EDIT_SAMPLES) + [SIZED_INSTANCE_PROMPTS[1]] * count(EDIT_SAMPLES),
        "leak": [CLASS_PROMPT] * count(LEAK_SAMPLES),
        "drift": drift[: count(DRIFT_SAMPLES)] if scale < 1 else drift,
    }


def evaluate_pipeline(pipeline: Any, scale: float = 1.0, steps: int = BASE_INFERENCE_STEPS,
                      guidance_scale: float = BASE_GUIDANCE_SCALE) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """All metrics of one pipeline, and the sampled images (N, H, W, 3) of each group."""
    metrics: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    for group, prompts in evaluation_prompts(scale).items():
        images[group] = sample(pipeline, prompts, seed=SEEDS[group], guidance_scale=guidance_scale, steps=steps)
        scores = score_prompts(images[group], prompts)
        if group == "fidelity":
            metrics["fidelity_strict"] = scores["concept_strict"]
            metrics["fidelity_loose"] = scores["concept_loose"]
        elif group == "edit":
            metrics["edit_size_accuracy"] = scores["size"]
            metrics["edit_concept_loose"] = scores["concept_loose"]
        elif group == "leak":
            metrics["leak_loose"] = scores["concept_loose"]
            metrics["leak_strict"] = scores["concept_strict"]
        else:
            metrics["drift_color_accuracy"] = scores["color"]
            metrics["drift_all_accuracy"] = scores["all"]
            metrics["drift_concept_loose"] = scores["concept_loose"]
    return metrics, images


def drift_from(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Differences from the base (negative: the adapter lost accuracy on ordinary prompts)."""
    return {
        "drift_color": metrics["drift_color_accuracy"] - base["drift_color_accuracy"],
        "drift_all": metrics["drift_all_accuracy"] - base["drift_all_accuracy"],
    }

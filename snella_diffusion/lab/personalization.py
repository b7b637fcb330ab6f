"""Personalization metrics of issues 16 and 26, computed with the exact decoders on fixed seeds.

For a pipeline (the base, or the base with one or several adapters) and a concept (``sks``, the
default, or ``zxc``; ``world.CONCEPTS``), with that concept's decoder:

- fidelity: fraction of ``FIDELITY_SAMPLES`` samples of the instance prompt (``"a sks square"``)
  that decode as the concept, strict (sks: a square whose four quadrants hold the checkerboard
  colours; zxc: a circle teal above, white below) and loose (≥ 20 % of foreground pixels nearest
  each of the concept's two colours);
- editability: size accuracy over ``EDIT_SAMPLES`` samples each of the sized instance prompts
  (``"a small sks square"``, ``"a large sks square"``) and the loose concept rate on them;
- prior leak: fraction of ``LEAK_SAMPLES`` samples of the class prompt (``"a square"``) showing
  the concept (loose and strict; lower is better);
- specificity (issue 26): the concept's rate on ``SPECIFICITY_SAMPLES`` samples of each other
  class's prompt (sks: ``"a circle"``, ``"a triangle"``, ``"a cross"``) and of the other
  concept's instance prompt (``"a zxc circle"``): ``specificity_loose`` / ``_strict`` is the mean
  over those prompts (lower is better), ``cross_loose[<prompt>]`` each prompt's rate;
- drift: on ``DRIFT_SAMPLES`` samples of the 48 base prompts (each twice), colour accuracy and
  all-attribute accuracy (read by the world decoder), and the fraction showing the concept
  (loose). ``drift_from`` turns these into differences from the base's values.

Every prompt group uses its own fixed seed range, so two pipelines are compared on the same
initial noise. The sks metrics are the ones issue 16 measured (same prompts, seeds, decoder).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from snella_diffusion.lab.base import BASE_GUIDANCE_SCALE, BASE_INFERENCE_STEPS
from snella_diffusion.lab.decode import decoder_for
from snella_diffusion.lab.evaluate import sample, score_prompts
from snella_diffusion.lab.world import CONCEPT_TOKEN, CONCEPTS, SHAPES, base_prompts

FIDELITY_SAMPLES = 64
EDIT_SAMPLES = 32
LEAK_SAMPLES = 64
DRIFT_SAMPLES = 96
SPECIFICITY_SAMPLES = 32
SEEDS = {"fidelity": 100_000, "edit": 200_000, "leak": 300_000, "drift": 400_000, "specificity": 500_000}
GROUPS = ("fidelity", "edit", "leak", "drift", "specificity")


def specificity_prompts(concept: str = CONCEPT_TOKEN) -> list[str]:
    """The other classes' prompts and the other concepts' instance prompts, for ``concept``."""
    own = CONCEPTS[concept]
    others = [f"a {shape}" for shape in SHAPES if shape != own.shape]
    return others + [c.instance_prompt for token, c in CONCEPTS.items() if token != concept]


def evaluation_prompts(scale: float = 1.0, concept: str = CONCEPT_TOKEN) -> dict[str, list[str]]:
    """The prompt list of each metric group for ``concept``; ``scale`` < 1 shrinks every group
    (for tests)."""
    def count(n: int) -> int:
        return max(2, int(round(n * scale)))

    chosen = CONCEPTS[concept]
    drift = base_prompts() * (DRIFT_SAMPLES // len(base_prompts()))
    small, large = chosen.sized_prompts
    return {
        "fidelity": [chosen.instance_prompt] * count(FIDELITY_SAMPLES),
        "edit": [small] * count(EDIT_SAMPLES) + [large] * count(EDIT_SAMPLES),
        "leak": [chosen.class_prompt] * count(LEAK_SAMPLES),
        "drift": drift[: count(DRIFT_SAMPLES)] if scale < 1 else drift,
        "specificity": [p for p in specificity_prompts(concept) for _ in range(count(SPECIFICITY_SAMPLES))],
    }


def evaluate_pipeline(pipeline: Any, scale: float = 1.0, steps: int = BASE_INFERENCE_STEPS,
                      guidance_scale: float = BASE_GUIDANCE_SCALE, concept: str = CONCEPT_TOKEN,
                      groups: Optional[Sequence[str]] = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The metrics of ``groups`` (default all of ``GROUPS``) of one pipeline for ``concept``,
    and the sampled images (N, H, W, 3) of each group."""
    decoder = decoder_for(concept)
    metrics: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    for group, prompts in evaluation_prompts(scale, concept).items():
        if groups is not None and group not in groups:
            continue
        images[group] = sample(pipeline, prompts, seed=SEEDS[group], guidance_scale=guidance_scale, steps=steps)
        scores = score_prompts(images[group], prompts, decoder)
        if group == "fidelity":
            metrics["fidelity_strict"] = scores["concept_strict"]
            metrics["fidelity_loose"] = scores["concept_loose"]
        elif group == "edit":
            metrics["edit_size_accuracy"] = scores["size"]
            metrics["edit_concept_loose"] = scores["concept_loose"]
        elif group == "leak":
            metrics["leak_loose"] = scores["concept_loose"]
            metrics["leak_strict"] = scores["concept_strict"]
        elif group == "specificity":
            metrics.update(specificity_scores(images[group], prompts, concept))
        else:
            world_scores = score_prompts(images[group], prompts)
            metrics["drift_color_accuracy"] = world_scores["color"]
            metrics["drift_all_accuracy"] = world_scores["all"]
            metrics["drift_concept_loose"] = scores["concept_loose"]
    return metrics, images


def specificity_scores(images: np.ndarray, prompts: Sequence[str], concept: str = CONCEPT_TOKEN) -> dict[str, float]:
    """``cross_loose[<prompt>]`` / ``cross_strict[<prompt>]``: the concept's rate on each prompt's
    images, and ``specificity_loose`` / ``specificity_strict``: their mean over the prompts."""
    decoder = decoder_for(concept)
    result: dict[str, float] = {}
    for prompt in dict.fromkeys(prompts):
        chosen = np.array([p == prompt for p in prompts])
        scores = score_prompts(images[chosen], [prompt] * int(chosen.sum()), decoder)
        result[f"cross_loose[{prompt}]"] = scores["concept_loose"]
        result[f"cross_strict[{prompt}]"] = scores["concept_strict"]
    for kind in ("loose", "strict"):
        values = [v for k, v in result.items() if k.startswith(f"cross_{kind}[")]
        result[f"specificity_{kind}"] = float(np.mean(values))
    return result


def drift_from(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Differences from the base (negative: the adapter lost accuracy on ordinary prompts)."""
    return {
        "drift_color": metrics["drift_color_accuracy"] - base["drift_color_accuracy"],
        "drift_all": metrics["drift_all_accuracy"] - base["drift_all_accuracy"],
    }


def retention(stacked: dict[str, float], alone: dict[str, float]) -> dict[str, float]:
    """Stacked fidelity over the adapter's own (strict and loose; NaN where alone is 0)."""
    return {f"retention_{kind}": (stacked[f"fidelity_{kind}"] / alone[f"fidelity_{kind}"]
                                  if alone[f"fidelity_{kind}"] > 0 else float("nan"))
            for kind in ("strict", "loose")}

"""The paper's per-dataset SNELLA settings and its published ViT-B/16 accuracies (METHOD.md §5).

Accuracies are test top-1 (%) of ViT-B/16 pretrained supervised on ImageNet-21k. The papers'
reference training loop (NOAH/SNELL lineage) evaluates the test split after every epoch and
reports the best epoch's top-1; the entry reports both the best-epoch and the final-epoch value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import SnellaConfigError

PAPER_ACCURACY_KIND = "best-epoch test top-1 (%), ViT-B/16 ImageNet-21k"


@dataclass(frozen=True)
class DatasetPreset:
    """SNELLA-32 settings of one dataset: AdamW + cosine, 100 epochs (METHOD.md §5)."""

    group: str
    target_sparsity: float
    init_sparsity: float
    rank: int = 32
    learning_rate: float = 1e-3
    epochs: int = 100


def _fgvc(target: float) -> DatasetPreset:
    return DatasetPreset("fgvc", target_sparsity=target, init_sparsity=0.0)


def _vtab(target: float) -> DatasetPreset:
    return DatasetPreset("vtab", target_sparsity=target, init_sparsity=0.01)


PRESETS: dict[str, DatasetPreset] = {
    "cub": _fgvc(0.30),
    "nabirds": _fgvc(0.16),
    "flowers": _fgvc(0.61),
    "dogs": _fgvc(0.24),
    "cifar100": _vtab(0.80),
    "dtd": _vtab(0.93),
    "flowers102": _vtab(0.40),
    "pets": _vtab(0.55),
    "camelyon": _vtab(0.76),
    "retinopathy": _vtab(0.20),
    "smallnorb_ele": _vtab(0.63),
}

# Common folder names of the prepared datasets, mapped onto the names above.
ALIASES: dict[str, str] = {
    "cub_200_2011": "cub", "cub200": "cub", "oxfordflower": "flowers", "oxford_flowers": "flowers",
    "stanforddogs": "dogs", "stanford_dogs": "dogs", "stanfordcars": "cars", "stanford_cars": "cars",
    "cifar": "cifar100", "oxford_flowers102": "flowers102", "oxford_iiit_pet": "pets",
    "patch_camelyon": "camelyon", "diabetic_retinopathy": "retinopathy",
}

# Published per-dataset top-1 (SNELL Table 1): method name here → accuracy.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "cub": {"snell": 89.9, "full": 87.3},
    "nabirds": {"snell": 87.0, "full": 82.7},
    "flowers": {"snell": 99.4, "full": 98.8},
    "dogs": {"snell": 92.0, "full": 89.4},
    "cars": {"snell": 90.5, "full": 84.5},
}

# Means over the five FGVC datasets (SNELLA abstract; SNELL Table 1).
FGVC_MEAN_RESULTS: dict[str, float] = {
    "snella": 91.9, "snell": 91.8, "lora": 86.0, "full": 88.5, "SPT-LoRA": 90.1,
}
VTAB_GROUP_MEANS_SNELL: dict[str, float] = {"natural": 82.7, "specialized": 86.1, "structured": 61.8}


def canonical_name(name: Optional[str]) -> Optional[str]:
    """The paper's name for a dataset name or folder name, or None when it is not one of them."""
    if not name:
        return None
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    return key if key in PRESETS or key in PAPER_RESULTS else None


def preset_for(name: str) -> DatasetPreset:
    """The SNELLA settings of a paper dataset; SnellaConfigError naming --preset otherwise."""
    key = canonical_name(name)
    if key not in PRESETS:
        raise SnellaConfigError(f"--preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[key]


def paper_numbers(name: Optional[str]) -> dict[str, float]:
    """Published per-method top-1 for the dataset ({} when the paper lists none for it)."""
    key = canonical_name(name)
    return dict(PAPER_RESULTS.get(key, {})) if key else {}

"""The paper's per-dataset SNELLA settings and its published ViT-B/16 accuracies (docs/METHOD.md §5).

Accuracies are test top-1 (%) of ViT-B/16 pretrained supervised on ImageNet-21k. The papers'
reference training loop (NOAH/SNELL lineage) evaluates the test split after every epoch and
reports the best epoch's top-1; the entry reports both the best-epoch and the final-epoch value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import SnellaConfigError

PAPER_ACCURACY_KIND = "best-epoch test top-1 (%), ViT-B/16 ImageNet-21k"


REFERENCE_REPOSITORY = "github.com/ssfgunner/SNELL"


@dataclass(frozen=True)
class DatasetPreset:
    """The SNELLA-32 recipe of one dataset, as the authors' script for it sets it.

    Per dataset (``source`` names the script in ``REFERENCE_REPOSITORY``): batch size, AdamW
    lr and weight decay, s_init (``init_thres``) and s_target (``target_ratio``). Shared by
    every script: 100 epochs, cosine schedule with 10 warm-up epochs, allocator warm-ups
    t_i = t_f = 0 (``init_warmup``/``final_warmup``), reallocation every epoch, the parallel
    block (``--block=BlockSNELLParallel``: input dropout 0.1, DropPath 0.1 on the adapter
    branch), no weight decay on 1-D parameters and biases and the cls token trained with the
    head (``train_alloc*.py``, ``lib/utils.py``). FGVC (``train_alloc_ema.py``) also trains
    with ColorJitter 0.4 (``lib/datasets.py``: timm ``create_transform`` defaults) and keeps a
    model EMA (``--model-ema-decay=0.9999``), reporting model and EMA; VTAB
    (``train_alloc.py --no_aug --direct_resize``) does neither. At sparsity 0 (Stanford Cars)
    the update is dense, ΔW = M (``MethodSettings.zero_sparsity_update``).
    """

    group: str
    target_sparsity: float
    init_sparsity: float
    train_batch_size: int
    weight_decay: float
    source: str
    learning_rate: float = 1e-3
    rank: int = 32
    epochs: int = 100
    warmup_epochs: int = 10
    allocator_warmup_epochs: int = 0
    allocator_final_epochs: int = 0
    forward_mode: str = "parallel"
    adapter_dropout: float = 0.1
    drop_path: float = 0.1
    weight_decay_1d: bool = False
    train_cls_token: bool = True
    color_jitter: float = 0.0
    model_ema_decay: float = 0.0


def _fgvc(target: float, batch_size: int, weight_decay: float, script: str, learning_rate: float = 1e-3) -> DatasetPreset:
    return DatasetPreset("fgvc", target_sparsity=target, init_sparsity=0.0, train_batch_size=batch_size,
                         weight_decay=weight_decay, learning_rate=learning_rate,
                         source=f"scripts/fgvc/snella32/{script}.sh", color_jitter=0.4, model_ema_decay=0.9999)


def _vtab(target: float, batch_size: int, weight_decay: float, script: str) -> DatasetPreset:
    return DatasetPreset("vtab", target_sparsity=target, init_sparsity=0.01, train_batch_size=batch_size,
                         weight_decay=weight_decay, source=f"scripts/vtab/snella32/{script}.sh")


PRESETS: dict[str, DatasetPreset] = {
    "cub": _fgvc(0.30, 16, 0.05, "cub"),
    "nabirds": _fgvc(0.16, 32, 5e-4, "nabirds"),
    "flowers": _fgvc(0.61, 16, 1e-3, "flowers"),
    "dogs": _fgvc(0.24, 32, 5e-3, "dogs", learning_rate=1e-4),
    "cars": _fgvc(0.0, 16, 0.05, "cars"),
    "cifar100": _vtab(0.80, 8, 0.05, "cifar"),
    "dtd": _vtab(0.93, 8, 5e-3, "dtd"),
    "flowers102": _vtab(0.40, 8, 1e-3, "flowers"),
    "pets": _vtab(0.55, 16, 0.05, "pets"),
    "camelyon": _vtab(0.76, 8, 5e-4, "camelyon"),
    "retinopathy": _vtab(0.20, 32, 0.05, "retino"),
    "smallnorb_ele": _vtab(0.63, 32, 1e-3, "snorb_ele"),
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

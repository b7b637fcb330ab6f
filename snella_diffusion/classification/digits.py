"""The embedded default: real handwritten digits, a small ViT pretrained on 0-4, few-shot on 5-9.

scikit-learn ships 1,797 8×8 digit scans (``sklearn.datasets.load_digits``). They are upscaled
to the ViT's resolution; a ViT built from a config is pretrained here on digits 0-4 (the
"upstream" task, cached in the output folder) and each fine-tuning method then adapts it to
digits 5-9 from ``shots`` images per class (the VTAB-1k regime), testing on all the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from ..errors import SnellaError
from ..files import replace_folder_atomically

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
UPSTREAM_DIGITS = (0, 1, 2, 3, 4)
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH_SIZE = 32
DOWNSTREAM_DIGITS = (5, 6, 7, 8, 9)


def digits_vit_config(image_size: int = 16) -> ViTConfig:
    """A 4-layer, 64-wide ViT with 4×4 patches for 5 classes."""
    return ViTConfig(
        image_size=image_size, patch_size=4, num_channels=3, hidden_size=64,
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=5,
    )


def load_digit_images(image_size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(N, 3, S, S)`` float32 normalised to [-1, 1], and ``(N,)`` int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SnellaError(
            "the embedded default needs scikit-learn (pip install 'snella-diffusion[classification]'), "
            "or pass --dataset_dir"
        ) from error
    digits = load_digits()
    scans = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    upscaled = np.stack(
        [np.asarray(Image.fromarray(s).resize((image_size, image_size), Image.BILINEAR)) for s in scans]
    )
    pixels = torch.from_numpy(upscaled.astype(np.float32) / 255.0)
    pixels = pixels[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def _select(images: Tensor, labels: Tensor, digits: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Images of ``digits``, relabelled 0..len(digits)-1 in the given order."""
    keep = torch.isin(labels, torch.tensor(digits))
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[torch.tensor(digits)] = torch.arange(len(digits))
    return images[keep], relabel[labels[keep]]


def few_shot_split(
    images: Tensor, labels: Tensor, shots: int, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Digits 5-9 (relabelled 0-4): ``shots`` random training images per class, the rest for test."""
    train, test = few_shot_indices(labels, shots, seed)
    relabelled = downstream_labels(labels)
    return (images[train], relabelled[train]), (images[test], relabelled[test])


def downstream_labels(labels: Tensor) -> Tensor:
    """Digit labels ``(N,)`` mapped to 0-4 for digits 5-9 and -1 for the others."""
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[torch.tensor(DOWNSTREAM_DIGITS)] = torch.arange(len(DOWNSTREAM_DIGITS))
    return relabel[labels]


def _per_class_sample(index: Tensor, classes: Tensor, count: int, generator: torch.Generator,
                      flag: str) -> tuple[Tensor, Tensor]:
    """(``count`` random entries of ``index`` per class, class after class; the rest, in order)."""
    chosen = []
    for cls in range(len(DOWNSTREAM_DIGITS)):
        members = index[classes[index] == cls]
        if count >= len(members):
            raise SnellaError(f"{flag} {count}: class {DOWNSTREAM_DIGITS[cls]} has only {len(members)} images")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    picked = torch.cat(chosen)
    rest = index[~torch.isin(index, picked)]
    return picked, rest


def few_shot_indices(labels: Tensor, shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) indices into the full digits arrays: ``shots`` random images per class of
    digits 5-9 for training, every other 5-9 image for test."""
    classes = downstream_labels(labels)
    downstream = torch.nonzero(classes >= 0).flatten()
    return _per_class_sample(downstream, classes, shots, torch.Generator().manual_seed(seed), "--shots")


def validation_indices(train_index: Tensor, labels: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, validation) indices carved from ``train_index`` alone: ``per_class`` images of each
    class go to validation, the rest are fitted (the learning-rate sweep never sees the test
    split)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    validation, fit = _per_class_sample(train_index, downstream_labels(labels), per_class, generator, "--val_shots")
    return fit, validation


class DigitSubset(torch.utils.data.Dataset):
    """``(pixels (3, H, W), label 0-4)`` of the digits at ``indices`` (into the full arrays)."""

    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor) -> None:
        self.images, self.labels, self.indices = images, downstream_labels(labels), indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        index = int(self.indices[position])
        return self.images[index], self.labels[index]


def pretrain_digits_vit(
    cache_dir: Path, epochs: int, seed: int = 0, image_size: int = 16, show_progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the upstream ViT on digits 0-4; returns its folder and a summary.

    The model is saved with ``save_pretrained`` into ``cache_dir`` (written to a temporary
    folder and renamed, so an interrupted run leaves no half-written cache). The cache is reused
    when its ``pretraining.json`` records the same settings.
    """
    cache_dir = Path(cache_dir)
    settings = {"epochs": epochs, "seed": seed, "image_size": image_size, "digits": list(UPSTREAM_DIGITS),
                "learning_rate": PRETRAIN_LR, "batch_size": PRETRAIN_BATCH_SIZE}
    summary_file = cache_dir / "pretraining.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("settings") == settings:
            return cache_dir, summary

    images, labels = load_digit_images(image_size)
    images, labels = _select(images, labels, UPSTREAM_DIGITS)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    held_out = order[: len(order) // 10]
    train = order[len(order) // 10 :]

    torch.manual_seed(seed)
    model = ViTForImageClassification(digits_vit_config(image_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.05)
    batch_size = PRETRAIN_BATCH_SIZE
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN_LR, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    with tqdm(total=steps, desc="pretraining ViT on digits 0-4", disable=not show_progress) as bar:
        for _ in range(epochs):
            for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
                logits = model(pixel_values=images[batch]).logits
                loss = torch.nn.functional.cross_entropy(logits, labels[batch])
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        predictions = model(pixel_values=images[held_out]).logits.argmax(-1)
    summary = {
        "settings": settings,
        "held_out_accuracy": float((predictions == labels[held_out]).float().mean()),
        "seconds": round(time.perf_counter() - start, 2),
    }

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        (staging / "pretraining.json").write_text(json.dumps(summary, indent=2))

    return replace_folder_atomically(cache_dir, write), summary

"""The embedded digits default picks each method's lr on validation data carved from the training
shots, never from the test split (issue 11, item 3)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import ViTForImageClassification

import train_scripts.train_classification_snella as script
from snella_diffusion.classification.digits import (
    DigitSubset, digits_vit_config, downstream_labels, few_shot_indices, load_digit_images, validation_indices,
)


@pytest.fixture(scope="module")
def digits():
    return load_digit_images(16)


def test_validation_is_carved_from_the_training_shots(digits):
    _, labels = digits
    train, test = few_shot_indices(labels, shots=20, seed=1)
    fit, validation = validation_indices(train, labels, per_class=5, seed=1)
    train_set, test_set = set(train.tolist()), set(test.tolist())
    assert len(train_set) == 100 and not train_set & test_set
    assert set(fit.tolist()) | set(validation.tolist()) == train_set
    assert not set(fit.tolist()) & set(validation.tolist())
    assert torch.bincount(downstream_labels(labels)[validation], minlength=5).tolist() == [5] * 5
    downstream = int((downstream_labels(labels) >= 0).sum())
    assert len(train_set) + len(test_set) == downstream


def test_the_lr_choice_never_reads_the_test_split(digits, monkeypatch):
    images, labels = digits
    read: list[int] = []
    original = DigitSubset.__getitem__

    def recording(self, position):
        read.append(int(self.indices[position]))
        return original(self, position)

    monkeypatch.setattr(DigitSubset, "__getitem__", recording)
    args = script.parse_args(["--method", "snella", "--epochs", "1", "--lr_grid", "1e-3", "3e-3", "1e-2",
                              "--shots", "10", "--val_shots", "3", "--train_batch_size", "10"])
    torch.manual_seed(0)
    backbone = ViTForImageClassification(digits_vit_config(16))

    def sweep_splits(seed):
        train, _ = few_shot_indices(labels, args.shots, seed)
        fit, validation = validation_indices(train, labels, args.val_shots, seed)
        return DigitSubset(images, labels, fit), DigitSubset(images, labels, validation)

    sweep = script.choose_learning_rate(args, Accelerator(cpu=True), "snella", backbone, 5, sweep_splits)
    train, test = few_shot_indices(labels, args.shots, 0)
    _, validation = validation_indices(train, labels, args.val_shots, 0)
    assert read and set(read) <= set(train.tolist())
    assert not set(read) & set(test.tolist())
    assert set(validation.tolist()) <= set(read)  # the choice did score on validation
    assert sorted(sweep["validation_top1"]) == [1e-3, 3e-3, 1e-2] and sweep["chosen"] in (1e-3, 3e-3, 1e-2)


def test_the_best_validation_rate_wins_and_ties_go_to_the_smaller(monkeypatch):
    scores = {1e-3: 60.0, 3e-3: 80.0, 1e-2: 80.0, 3e-2: 40.0, 1e-1: 20.0}
    seen = []

    def fake_train_one(args, accelerator, method, seed, backbone, num_labels, fit, validation, lr):
        seen.append((seed, lr, fit, validation))
        return {"top1_final": scores[lr] + seed}

    monkeypatch.setattr(script, "train_one", fake_train_one)
    args = script.parse_args(["--sweep_seeds", "0", "1"])
    assert args.lr_grid == list(script.DEFAULT_LR_GRID) and len(args.lr_grid) >= 3
    sweep = script.choose_learning_rate(args, None, "lora", None, 5, lambda seed: (f"fit{seed}", f"val{seed}"))
    assert sweep["chosen"] == 3e-3
    assert sweep["validation_top1"][3e-3] == pytest.approx(80.5)
    assert all(fit == f"fit{seed}" and validation == f"val{seed}" for seed, _, fit, validation in seen)
    assert len(seen) == 2 * len(script.DEFAULT_LR_GRID)  # every rate, each sweep seed


def test_an_explicit_rate_turns_the_sweep_off(tmp_path):
    assert script.parse_args(["--learning_rate", "1e-3"]).lr_grid == []
    assert script.parse_args(["--method_learning_rate", "full=1e-4"]).lr_grid == []
    assert script.parse_args(["--dataset_dir", str(tmp_path)]).lr_grid == []
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset_dir", str(tmp_path), "--lr_grid", "1e-3"])

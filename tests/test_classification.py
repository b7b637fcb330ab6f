"""ViT classification entry: dataset layouts, transforms, presets, methods and end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from snella_diffusion import SnellaConfig, apply_snella
from snella_diffusion.classification.data import (
    DatasetLayoutError, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, detect_layout, load_splits,
)
from snella_diffusion.classification.methods import METHODS, MethodSettings, prepare_method
from snella_diffusion.classification.paper import paper_numbers, preset_for
from snella_diffusion.testing.reference_configs import build_reference_model
from train_scripts.train_classification_snella import main, parse_args

COLORS = [(220, 30, 30), (30, 200, 40), (40, 50, 230)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; one avoids oversubscribing the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _image(cls: int, index: int) -> Image.Image:
    """A 20×24 image whose colour encodes the class, with a little per-image noise."""
    rng = np.random.default_rng(100 * cls + index)
    base = np.array(COLORS[cls], dtype=np.float32)
    pixels = base + rng.normal(0, 12, size=(24, 20, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_images(folder: Path, per_class: int, offset: int) -> list[tuple[str, int]]:
    entries = []
    for cls in range(len(COLORS)):
        for index in range(per_class):
            relative = f"class{cls}/img{offset + index}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            _image(cls, offset + index).save(folder / relative)
            entries.append((relative, cls))
    return entries


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The same 3-class data (4 train, 2 test images per class) in all three layouts."""
    root = tmp_path_factory.mktemp("classification-data")
    vtab = root / "vtab"
    train = _write_images(vtab / "images", 4, 0)
    test = _write_images(vtab / "images", 2, 10)
    for name, entries in (("train800val200", train), ("train800", train[:6]), ("val200", train[6:]), ("test", test)):
        (vtab / f"{name}.txt").write_text("".join(f"images/{p} {c}\n" for p, c in entries))

    fgvc = root / "fgvc"
    train = _write_images(fgvc / "images", 4, 0)
    test = _write_images(fgvc / "images", 2, 10)
    # FGVC ids are often 1-based: the loader maps them onto 0..C-1.
    for name, entries in (("train", train), ("val", test), ("test", test)):
        (fgvc / f"{name}.json").write_text(json.dumps({p: c + 1 for p, c in entries}))

    folder = root / "folder"
    _write_images(folder / "train", 4, 0)
    _write_images(folder / "test", 2, 10)
    return {"vtab": vtab, "fgvc": fgvc, "folder": folder}


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=2)
    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def tiny_model(num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=num_labels)
    return ViTForImageClassification(config)


@pytest.mark.parametrize("layout", ["vtab", "fgvc", "folder"])
def test_layouts_read_the_same_labels(datasets, layout):
    assert detect_layout(datasets[layout]) == layout
    splits = load_splits(datasets[layout])
    assert splits.num_classes == 3
    assert sorted(label for _, label in splits.train) == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(label for _, label in splits.test) == [0] * 2 + [1] * 2 + [2] * 2
    for path, label in splits.train + splits.test:
        assert f"class{label}" in str(path) and path.is_file()


def test_vtab_train_split_choice_and_errors_name_the_file(datasets, tmp_path):
    assert len(load_splits(datasets["vtab"], train_splits=["train800"]).train) == 6
    with pytest.raises(DatasetLayoutError, match="nosuch.txt"):
        load_splits(datasets["vtab"], train_splits=["nosuch"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.txt").write_text("images/missing.png 0\n")
    (bad / "train800val200.txt").write_text("no_label_here\n")
    with pytest.raises(DatasetLayoutError, match=r"train800val200.txt:1"):
        load_splits(bad)
    (bad / "train800val200.txt").write_text("images/missing.png 0\n")
    with pytest.raises(DatasetLayoutError, match="do not exist.*missing.png"):
        load_splits(bad)
    with pytest.raises(DatasetLayoutError, match="--dataset_dir"):
        detect_layout(tmp_path)


def test_transforms_shapes_and_normalisation():
    image = Image.new("RGB", (40, 30), (255, 0, 128))
    expected = torch.tensor([(255 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
                             (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                             (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]])
    for mode in ImageTransform.MODES:
        pixels = ImageTransform(mode, 16)(image)
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    # Test-time crop keeps the centre: a left/right split image stays split down the middle.
    half = np.zeros((64, 128, 3), dtype=np.uint8)
    half[:, 64:] = 255
    centre = ImageTransform("fgvc_test", 32)(Image.fromarray(half))
    assert centre[:, :, :14].max() < 0 < centre[:, :, 18:].min()
    # Training crops differ between draws (random resized crop + flip), seeded by torch.
    torch.manual_seed(0)
    first = ImageTransform("fgvc_train", 16)(Image.fromarray(half))
    second = ImageTransform("fgvc_train", 16)(Image.fromarray(half))
    torch.manual_seed(0)
    assert torch.equal(first, ImageTransform("fgvc_train", 16)(Image.fromarray(half)))
    assert not torch.equal(first, second)


def test_preset_fills_paper_settings_and_flags_win(datasets):
    args = parse_args(["--dataset_dir", str(datasets["vtab"]), "--preset", "dtd"])
    assert (args.rank, args.learning_rate, args.epochs) == (32, 1e-3, 100)
    assert (args.init_sparsity, args.target_sparsity) == (0.01, 0.93)
    assert args.pretrained_model_name_or_path == "google/vit-base-patch16-224-in21k"
    args = parse_args(["--dataset_dir", str(datasets["fgvc"]), "--preset", "cub", "--target_sparsity", "0.5"])
    assert (args.init_sparsity, args.target_sparsity) == (0.0, 0.5)
    assert paper_numbers("CUB_200_2011") == {"snell": 89.9, "full": 87.3}
    assert preset_for("nabirds").target_sparsity == 0.16
    with pytest.raises(SystemExit):
        parse_args(["--dataset_dir", str(datasets["vtab"]), "--preset", "imagenet"])


def test_vit_preset_adapts_72_layers_on_vit_b16():
    model = build_reference_model("vit-b16", device="meta")
    layers = apply_snella(model, SnellaConfig(rank=32, target_modules="vit"))
    assert len(layers) == 72
    assert sum(1 for name in layers if name.endswith(("fc1", "fc2"))) == 24


@pytest.mark.parametrize("method", ["snella", "snell", "lora", "linear"])
def test_only_adapter_and_head_parameters_train(method):
    model = tiny_model()
    prepared = prepare_method(model, method, MethodSettings(rank=4, lora_rank=4, total_steps=10))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {"classifier.weight", "classifier.bias"}
    assert head <= trainable
    body = trainable - head
    if method == "linear":
        assert body == set()
    else:
        marker = ".lora_" if method == "lora" else ".adapters."
        assert body and all(marker in name for name in body)
    in_groups = {id(p) for group in prepared.param_groups for p in group["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert prepared.trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method in ("snella", "snell"):
        assert prepared.details["layers"] == 12
        # SNELLA-r has LoRA-r's factor count r·(n+m) plus three scalars per layer.
        factor_count = sum(4 * (m + n) + 3 for m, n in [(32, 32)] * 8 + [(48, 32), (32, 48)] * 2)
        assert prepared.trainable_count == factor_count + 3 * 32 + 3
    assert (prepared.allocator is not None) == (method == "snella")


def test_masked_sparse_through_the_entry_keeps_untouched_entries_bit_identical():
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 3, 16, 16, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)

    prepared = prepare_method(model, "masked_sparse", MethodSettings(target_sparsity=0.9, calibration_batches=2), loss)
    masked = prepared.masked
    before = {name: w.detach().clone() for name, w in masked.weights.items()}
    optimizer = torch.optim.AdamW(prepared.param_groups, lr=1e-2, weight_decay=0.1)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(w) in held for w in masked.weights.values())
    losses = []
    for _ in range(5):
        value = loss()
        losses.append(value.item())
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    for name, weight in masked.weights.items():
        mask = masked.masks[name]
        assert optimizer.state[weight]["exp_avg"].shape == weight.shape
        assert torch.equal(weight.detach()[~mask], before[name][~mask])
        assert (weight.detach()[mask] != before[name][mask]).any()
    density = masked.masked_count() / sum(w.numel() for w in masked.weights.values())
    assert abs(density - 0.1) < 0.01
    assert prepared.trainable_count == masked.masked_count() + 3 * 32 + 3


@pytest.mark.parametrize("layout", ["vtab", "fgvc", "folder"])
def test_every_method_trains_one_epoch_and_writes_results(datasets, tiny_vit_dir, tmp_path, layout):
    out = tmp_path / "out"
    args = parse_args([
        "--pretrained_model_name_or_path", str(tiny_vit_dir), "--dataset_dir", str(datasets[layout]),
        "--method", "all", "--epochs", "1", "--seeds", "0", "--train_batch_size", "4",
        "--rank", "4", "--lora_rank", "4", "--target_sparsity", "0.5", "--calibration_batches", "2",
        "--output_dir", str(out),
        *(["--dataset_name", "CUB_200_2011"] if layout == "fgvc" else []),
    ])
    payload = main(args)
    written = json.loads((out / "results.json").read_text())
    assert written["layout"] == layout and written["num_train"] == 12 and written["num_test"] == 6
    rows = {row["method"]: row for row in written["rows"]}
    assert list(rows) == list(METHODS) == [row["method"] for row in payload["rows"]]
    for row in rows.values():
        run = row["runs"][0]
        assert len(run["top1_per_epoch"]) == 1 and run["steps"] == 3
        assert 0.0 <= row["top1_best_mean"] <= 100.0 and row["top1_best_mean"] == row["top1_final_mean"]
        assert row["peak_memory_mb"] > 0 and math.isfinite(row["time_per_step_s"])
    head = 32 * 3 + 3
    assert rows["linear"]["trainable_params"] == head
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in tiny_model().parameters())
    assert head < rows["lora"]["trainable_params"] < rows["snella"]["trainable_params"] * 2
    assert rows["masked_sparse"]["trainable_params"] < rows["full"]["trainable_params"]
    # Full fine-tuning holds gradients and Adam moments for every weight: the largest account.
    assert rows["full"]["peak_memory_mb"] > rows["lora"]["peak_memory_mb"]
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    if layout == "fgvc":  # one of the paper's datasets: its numbers sit beside ours
        assert written["paper_dataset"] == "cub"
        assert (rows["snell"]["paper_top1"], rows["full"]["paper_top1"]) == (89.9, 87.3)
        assert rows["lora"]["paper_top1"] is None
        assert "| 89.9 |" in table and "best-epoch" in table
    else:
        assert all(row["paper_top1"] is None for row in rows.values()) and "best-epoch" not in table


@pytest.mark.slow
def test_embedded_default_beats_chance(tmp_path):
    out = tmp_path / "embedded"
    args = parse_args(["--output_dir", str(out), "--seeds", "0", "--pretrain_epochs", "6",
                       "--epochs", "8", "--method", "snella", "lora", "linear",
                       "--learning_rate", "5e-3"])  # one lr: the sweep has its own tests (test_toy_sweep.py)
    payload = main(args)
    assert (out / "pretrained_digits_vit" / "config.json").is_file()
    assert payload["pretraining"]["held_out_accuracy"] > 0.5
    rows = {row["method"]: row for row in payload["rows"]}
    assert list(rows) == ["snella", "lora", "linear"]
    for row in rows.values():
        assert row["top1_best_mean"] > 20.0 + 10.0  # five classes: chance is 20 %
        assert row["runs"][0]["steps"] == 8 * 4  # 100 images, batch 25
    table = (out / "results.md").read_text()
    assert "digits 5-9" in table and "| snella |" in table and "| linear |" in table

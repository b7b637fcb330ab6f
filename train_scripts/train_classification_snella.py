"""ViT image classification with SNELLA and the usual alternatives, for parity with the paper.

Trains ``transformers.ViTForImageClassification`` with each requested method (snella, snell,
lora, full, linear, masked_sparse) and the same head and optimizer settings, over one or more
seeds, and writes ``results.json`` and ``results.md`` (best-epoch and final-epoch test top-1,
trainable parameters, peak memory, time per step) beside the paper's published numbers.

Paper scale (VTAB-1k / FGVC folders, ViT-B/16 ImageNet-21k)::

    accelerate launch train_scripts/train_classification_snella.py \\
        --pretrained_model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_dir data/vtab-1k/dtd --preset dtd --method snella lora --output_dir out/dtd

Embedded default (no model, no data given): handwritten digits, a small ViT pretrained here on
digits 0-4 and adapted few-shot to digits 5-9 with every method, 3 seeds::

    accelerate launch --cpu --num_processes 1 train_scripts/train_classification_snella.py
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import ViTForImageClassification

from snella_diffusion.classification.data import ImageListDataset, load_splits, transforms_for
from snella_diffusion.classification.digits import (
    DigitSubset, few_shot_indices, load_digit_images, pretrain_digits_vit, validation_indices,
)
from snella_diffusion.classification.ema import ParameterEma
from snella_diffusion.classification.memory import SavedTensorMeter, training_state_bytes
from snella_diffusion.classification.methods import METHODS, MethodSettings, prepare_method, weight_decay_groups
from snella_diffusion.classification.paper import canonical_name, paper_numbers, preset_for
from snella_diffusion.classification.report import (
    markdown_table, results_payload, summarize_method, write_json_atomic, write_text_atomic,
)
from snella_diffusion.errors import SnellaConfigError

logger = get_logger(__name__)

DEFAULT_MODEL = "google/vit-base-patch16-224-in21k"
DEFAULT_LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

# Settings used when neither a flag nor a preset gives one: (paper-scale, embedded default).
FALLBACKS: dict[str, tuple[Any, Any]] = {
    "epochs": (100, 25),
    "learning_rate": (1e-3, 5e-3),
    "rank": (32, 8),
    "lora_rank": (8, 8),
    "init_sparsity": (0.0, 0.0),
    "target_sparsity": (0.8, 0.5),
    "train_batch_size": (64, 25),
    "warmup_epochs": (10, 2),
    "seeds": ([0], [0, 1, 2]),
    "method": (["snella"], list(METHODS)),
    "weight_decay": (1e-4, 1e-4),
    # The reference scripts' shared settings at paper scale; the embedded toy keeps the merged
    # forward without regularisers.
    "forward_mode": ("parallel", "merged"),
    "adapter_dropout": (0.1, 0.0),
    "drop_path": (0.1, 0.0),
    "weight_decay_1d": (False, True),
    "train_cls_token": (True, False),
    "color_jitter": (0.0, 0.0),
    "model_ema_decay": (0.0, 0.0),
}

# What a --preset fills (DatasetPreset fields of the same name), unless the flag is given.
PRESET_FLAGS = (
    "rank", "learning_rate", "epochs", "target_sparsity", "init_sparsity", "train_batch_size", "weight_decay",
    "warmup_epochs", "allocator_warmup_epochs", "allocator_final_epochs", "forward_mode", "adapter_dropout",
    "drop_path", "weight_decay_1d", "train_cls_token", "color_jitter", "model_ema_decay",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model and data")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help=f"hub id or local folder of a ViT (default {DEFAULT_MODEL} when "
                            "--dataset_dir is given; the embedded digits ViT otherwise)")
    model.add_argument("--dataset_dir", type=Path, default=None,
                       help="VTAB-1k folder (train800val200.txt, test.txt), FGVC folder "
                            "(train.json, test.json) or class folders (train/, test/); omit for "
                            "the embedded digits default")
    model.add_argument("--dataset_layout", choices=("vtab", "fgvc", "folder"), default=None,
                       help="override layout detection")
    model.add_argument("--dataset_name", default=None,
                       help="name used to look up the paper's numbers (default: --preset or the folder name)")
    model.add_argument("--train_split", nargs="+", default=None,
                       help="training index names (default train800val200 for VTAB, train otherwise)")
    model.add_argument("--test_split", default=None, help="evaluation index name (default test)")
    model.add_argument("--augmentation", choices=("vtab", "fgvc"), default=None,
                       help="vtab: plain resize; fgvc: random resized crop + flip / resize + centre crop "
                            "(default: by layout)")
    model.add_argument("--preset", default=None,
                       help="fill the reference recipe of this dataset (the authors' snella32 script, "
                            "see README): cub, nabirds, flowers, dogs, cars, cifar100, dtd, flowers102, "
                            "pets, camelyon, retinopathy, smallnorb_ele; explicit flags still win")

    run = parser.add_argument_group("methods and training")
    run.add_argument("--method", nargs="+", choices=(*METHODS, "all"), default=None,
                     help="methods to compare (default: snella with a dataset, all on the embedded default)")
    run.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0; 0 1 2 embedded)")
    run.add_argument("--epochs", type=int, default=None)
    run.add_argument("--train_batch_size", type=int, default=None, help="per process")
    run.add_argument("--eval_batch_size", type=int, default=256)
    run.add_argument("--learning_rate", type=float, default=None, help="AdamW peak lr, cosine schedule")
    run.add_argument("--method_learning_rate", nargs="+", default=[], metavar="METHOD=LR",
                     help="per-method lr overrides, e.g. full=1e-4")
    run.add_argument("--weight_decay", type=float, default=None,
                     help="AdamW weight decay (default: the preset's, else 1e-4)")
    run.add_argument("--weight_decay_1d", action=argparse.BooleanOptionalAction, default=None,
                     help="also decay 1-D parameters, 0-d scalars (alpha, gamma, beta) and biases "
                          "(default: no at paper scale, as the reference; yes on the embedded default)")
    run.add_argument("--train_cls_token", action=argparse.BooleanOptionalAction, default=None,
                     help="train the ViT cls token with the head (not for full/linear; default: yes at "
                          "paper scale, as the reference; no on the embedded default)")
    run.add_argument("--forward_mode", choices=("merged", "parallel"), default=None,
                     help="snella/snell: one GEMM on W0 + ΔW, or the reference's parallel adapter branch "
                          "(default: parallel at paper scale, merged on the embedded default)")
    run.add_argument("--adapter_dropout", type=float, default=None,
                     help="input dropout on the parallel adapter branch (default 0.1 at paper scale)")
    run.add_argument("--drop_path", type=float, default=None,
                     help="DropPath on the parallel adapter branch's output (default 0.1 at paper scale)")
    run.add_argument("--zero_sparsity_update", choices=("dense", "square"), default="dense",
                     help="at sparsity 0 throughout: dense ΔW = M (K for snell), as the reference, or M·|M|")
    run.add_argument("--color_jitter", type=float, default=None,
                     help="FGVC training augmentation: brightness/contrast/saturation jitter (FGVC presets: 0.4)")
    run.add_argument("--model_ema_decay", type=float, default=None,
                     help="keep a model EMA with this decay and report its accuracy too; 0 = off "
                          "(FGVC presets: 0.9999)")
    run.add_argument("--warmup_epochs", type=float, default=None, help="linear lr warmup")
    run.add_argument("--rank", type=int, default=None, help="SNELLA/SNELL rank r")
    run.add_argument("--lora_rank", type=int, default=None)
    run.add_argument("--lora_alpha", type=float, default=None, help="default: the LoRA rank")
    run.add_argument("--init_sparsity", type=float, default=None, help="SNELLA s_init")
    run.add_argument("--target_sparsity", type=float, default=None,
                     help="SNELLA s_target; SNELL's fixed sparsity")
    run.add_argument("--masked_density", type=float, default=None,
                     help="masked_sparse: fraction of each weight trained (default 1 - target_sparsity)")
    run.add_argument("--calibration_batches", type=int, default=4,
                     help="masked_sparse: training batches whose |grad| picks the trained entries")
    run.add_argument("--allocator_warmup_epochs", type=int, default=None,
                     help="SNELLA t_i in epochs (reallocation runs once per epoch; presets: 0 as the "
                          "reference, else 10%% of epochs)")
    run.add_argument("--allocator_final_epochs", type=int, default=None,
                     help="SNELLA t_f in epochs (presets: 0, else 30%% of epochs)")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    run.add_argument("--dataloader_num_workers", type=int, default=0)
    run.add_argument("--num_threads", type=int, default=None,
                     help="torch intra-op CPU threads (default: 1 on the embedded default, whose tiny "
                          "ViT loses more to thread overhead than it gains; torch's default otherwise)")

    embedded = parser.add_argument_group("embedded digits default")
    embedded.add_argument("--shots", type=int, default=20, help="training images per class (digits 5-9)")
    embedded.add_argument("--pretrain_epochs", type=int, default=15, help="upstream epochs on digits 0-4")
    embedded.add_argument("--digits_image_size", type=int, default=16)
    embedded.add_argument("--lr_grid", nargs="*", type=float, default=None,
                          help="learning rates each method chooses from on a validation split carved from "
                               "the training shots, before its test runs (default 1e-3 3e-3 1e-2 3e-2 1e-1; an "
                               "empty list, --learning_rate or --method_learning_rate turn it off)")
    embedded.add_argument("--val_shots", type=int, default=5,
                          help="training images per class held out for the lr choice (fitted on the rest)")
    embedded.add_argument("--sweep_seeds", nargs="+", type=int, default=[0],
                          help="seeds whose validation top-1 (final epoch, averaged) picks the lr")

    parser.add_argument("--output_dir", type=Path, default=Path("snella-classification"))
    args = parser.parse_args(argv)
    _resolve(args, parser)
    return args


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill unset flags from the preset, then from the paper-scale or embedded fallbacks."""
    args.embedded = args.dataset_dir is None
    if args.embedded and args.pretrained_model_name_or_path is not None:
        parser.error("--pretrained_model_name_or_path needs --dataset_dir (the embedded default builds its own ViT)")
    if args.embedded and args.preset:
        parser.error("--preset needs --dataset_dir")
    if args.lr_grid is None:
        explicit_lr = args.learning_rate is not None or args.method_learning_rate
        args.lr_grid = [] if explicit_lr or not args.embedded else list(DEFAULT_LR_GRID)
    if args.lr_grid and not args.embedded:
        parser.error("--lr_grid needs the embedded default (no --dataset_dir): paper-scale presets set the lr")
    preset = None
    if args.preset:
        try:
            preset = preset_for(args.preset)
        except SnellaConfigError as error:
            parser.error(str(error))
        for name in PRESET_FLAGS:
            if getattr(args, name) is None:
                setattr(args, name, getattr(preset, name))
    for name, (paper_scale, embedded) in FALLBACKS.items():
        if getattr(args, name) is None:
            setattr(args, name, copy.copy(embedded if args.embedded else paper_scale))
    if "all" in args.method:
        args.method = list(METHODS)
    if not args.embedded and args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = DEFAULT_MODEL
    if args.dataset_name is None:
        args.dataset_name = "digits 5-9 (embedded)" if args.embedded else (args.preset or args.dataset_dir.name)
    args.method_lr = {}
    for item in args.method_learning_rate:
        method, _, value = item.partition("=")
        if method not in METHODS:
            parser.error(f"--method_learning_rate {item!r}: method must be one of {METHODS}")
        try:
            args.method_lr[method] = float(value)
        except ValueError:
            parser.error(f"--method_learning_rate {item!r}: expected METHOD=LR")
    if args.lr_grid and not 1 <= args.val_shots < args.shots:
        parser.error(f"--val_shots {args.val_shots}: must lie in [1, --shots)")
    for name in ("epochs", "train_batch_size", "shots", "pretrain_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.num_threads is None and args.embedded:
        args.num_threads = 1
    if args.allocator_warmup_epochs is None:
        args.allocator_warmup_epochs = int(0.1 * args.epochs)
    if args.allocator_final_epochs is None:
        args.allocator_final_epochs = int(0.3 * args.epochs)


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fresh_head(model: nn.Module, num_labels: int, seed: int) -> None:
    """A newly initialised classifier (seeded) so every method starts from the same head."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    model.classifier = nn.Linear(hidden, num_labels)
    torch.random.set_rng_state(generator_state)
    model.config.num_labels = num_labels


def _evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Top-1 accuracy (%) over the whole (sharded) loader."""
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for pixels, labels in loader:
            with accelerator.autocast():
                predictions = model(pixel_values=pixels).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
            correct += int((predictions == labels).sum())
            total += labels.numel()
    return 100.0 * correct / max(1, total)


def train_one(
    args: argparse.Namespace,
    accelerator: Accelerator,
    method: str,
    seed: int,
    backbone: nn.Module,
    num_labels: int,
    train_data: Dataset,
    test_data: Dataset,
    learning_rate: Optional[float] = None,
) -> dict[str, Any]:
    """Fine-tune a copy of ``backbone`` with ``method`` (at ``learning_rate``, default the
    flags'), evaluating on ``test_data`` after every epoch; return its per-seed result."""
    set_seed(seed)
    model = copy.deepcopy(backbone)
    _fresh_head(model, num_labels, seed)
    model.to(accelerator.device)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_data, batch_size=args.train_batch_size, shuffle=True, generator=generator,
                              num_workers=args.dataloader_num_workers)
    test_loader = DataLoader(test_data, batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers)
    train_loader, test_loader = accelerator.prepare(train_loader, test_loader)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * args.epochs

    calibration_batches = iter(_cycle(train_loader))

    def calibration_loss() -> torch.Tensor:
        pixels, labels = next(calibration_batches)
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)

    settings = MethodSettings(
        rank=args.rank, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        init_sparsity=args.init_sparsity, target_sparsity=args.target_sparsity,
        masked_density=args.masked_density, calibration_batches=args.calibration_batches,
        total_steps=total_steps,
        allocator_warmup_steps=args.allocator_warmup_epochs * steps_per_epoch,
        allocator_final_steps=args.allocator_final_epochs * steps_per_epoch,
        allocator_interval=steps_per_epoch,
        forward_mode=args.forward_mode, adapter_dropout=args.adapter_dropout, drop_path=args.drop_path,
        train_cls_token=args.train_cls_token, zero_sparsity_update=args.zero_sparsity_update,
    )
    model.train()
    prepared = prepare_method(model, method, settings, calibration_loss)
    lr = learning_rate if learning_rate is not None else args.method_lr.get(method, args.learning_rate)
    groups = weight_decay_groups(model, prepared.param_groups, args.weight_decay, args.weight_decay_1d)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    ema = None
    if args.model_ema_decay:
        ema = ParameterEma([p for group in groups for p in group["params"]], args.model_ema_decay)
    scheduler = _cosine_with_warmup(optimizer, int(args.warmup_epochs * steps_per_epoch), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    meter = SavedTensorMeter(accelerator.unwrap_model(model))
    accuracies: list[float] = []
    ema_accuracies: list[float] = []
    step_times: list[float] = []
    peak_bytes = 0
    global_step = 0
    progress = tqdm(total=total_steps, desc=f"{method} seed {seed}", disable=not accelerator.is_local_main_process,
                    leave=False)
    for epoch in range(args.epochs):
        model.train()
        for pixels, labels in train_loader:
            first = global_step == 0
            started = time.perf_counter()
            with accelerator.autocast():
                if first and not on_cuda:
                    with meter.recording():
                        logits = model(pixel_values=pixels).logits
                else:
                    logits = model(pixel_values=pixels).logits
                loss = nn.functional.cross_entropy(logits, labels)
            accelerator.backward(loss)
            optimizer.step()
            if prepared.allocator is not None:
                prepared.allocator.step(skipped=accelerator.optimizer_step_was_skipped)
            scheduler.step()
            if ema is not None:
                ema.update()
            if first and not on_cuda:
                peak_bytes = meter.bytes + training_state_bytes(model, optimizer) + prepared.state_bytes
            optimizer.zero_grad(set_to_none=True)
            if not first:
                step_times.append(time.perf_counter() - started)
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
        accuracies.append(_evaluate(model, test_loader, accelerator))
        if ema is not None:
            with ema.applied():
                ema_accuracies.append(_evaluate(model, test_loader, accelerator))
    progress.close()
    if on_cuda:
        peak_bytes = torch.cuda.max_memory_allocated(accelerator.device)
    best_epoch = max(range(len(accuracies)), key=accuracies.__getitem__)
    result = {
        "seed": seed,
        "top1_best": accuracies[best_epoch],
        "best_epoch": best_epoch + 1,
        "top1_final": accuracies[-1],
        "top1_per_epoch": accuracies,
        "trainable_params": prepared.trainable_count,
        "peak_memory_mb": peak_bytes / 2**20,
        "memory_source": "torch.cuda.max_memory_allocated" if on_cuda else
        "tensor account (params + grads + optimizer state + saved activations + method state)",
        "time_per_step_s": sum(step_times) / len(step_times) if step_times else float("nan"),
        "learning_rate": lr,
        "steps": total_steps,
        "details": prepared.details,
    }
    if ema is not None:
        result.update(top1_per_epoch_ema=ema_accuracies, top1_best_ema=max(ema_accuracies),
                      top1_final_ema=ema_accuracies[-1], model_ema_decay=args.model_ema_decay)
    if prepared.allocator is not None:
        kept = prepared.allocator.keep_counts()
        result["final_kept_fraction"] = sum(kept.values()) / sum(prepared.allocator.capacities)
    logger.info(f"{method} seed {seed}: best {result['top1_best']:.2f} final {result['top1_final']:.2f}")
    # The accelerator keeps references to everything it prepared; drop this run's model.
    accelerator.free_memory()
    return result


def choose_learning_rate(args: argparse.Namespace, accelerator: Accelerator, method: str, backbone: nn.Module,
                         num_labels: int, sweep_splits) -> dict[str, Any]:
    """Train ``method`` at every rate of ``args.lr_grid`` on the fit part of the training shots
    and pick the rate with the best final-epoch top-1 on the held-out part (mean over
    ``args.sweep_seeds``; ties go to the smaller rate). ``sweep_splits(seed)`` gives
    (fit, validation), both carved from the training shots: the test split is never read.

    Returns:
        ``{"chosen": lr, "validation_top1": {lr: mean top-1 (%)}, "seeds": [...]}``.
    """
    scores: dict[float, float] = {}
    for lr in sorted(args.lr_grid):
        top1 = []
        for seed in args.sweep_seeds:
            fit_set, validation_set = sweep_splits(seed)
            run = train_one(args, accelerator, method, seed, backbone, num_labels, fit_set, validation_set, lr)
            top1.append(run["top1_final"])
        scores[lr] = sum(top1) / len(top1)
    chosen = max(scores, key=lambda lr: (scores[lr], -lr))
    logger.info(f"{method}: lr {chosen:g} chosen on validation ({scores})")
    return {"chosen": chosen, "validation_top1": scores, "seeds": list(args.sweep_seeds)}


def _cycle(loader: DataLoader):
    while True:
        yield from loader


def load_data(args: argparse.Namespace, accelerator: Accelerator):
    """(backbone model, num_labels, train dataset, test dataset factory by seed, extras)."""
    if args.embedded:
        cache = args.output_dir / "pretrained_digits_vit"
        with accelerator.main_process_first():
            path, summary = pretrain_digits_vit(
                cache, epochs=args.pretrain_epochs, image_size=args.digits_image_size,
                show_progress=accelerator.is_local_main_process,
            )
        backbone = ViTForImageClassification.from_pretrained(path)
        images, labels = load_digit_images(args.digits_image_size)

        def splits(seed: int) -> tuple[Dataset, Dataset]:
            train, test = few_shot_indices(labels, args.shots, seed)
            return DigitSubset(images, labels, train), DigitSubset(images, labels, test)

        def sweep_splits(seed: int) -> tuple[Dataset, Dataset]:
            train, _ = few_shot_indices(labels, args.shots, seed)
            fit, validation = validation_indices(train, labels, args.val_shots, seed)
            return DigitSubset(images, labels, fit), DigitSubset(images, labels, validation)

        return backbone, 5, splits, {"pretraining": summary, "sweep_splits": sweep_splits}

    data = load_splits(args.dataset_dir, args.dataset_layout, args.train_split, args.test_split)
    backbone = ViTForImageClassification.from_pretrained(args.pretrained_model_name_or_path)
    train_tf, test_tf = transforms_for(data.layout, backbone.config.image_size, args.augmentation, args.color_jitter)
    train_set, test_set = ImageListDataset(data.train, train_tf), ImageListDataset(data.test, test_tf)
    extras = {"layout": data.layout, "num_train": len(data.train), "num_test": len(data.test)}
    return backbone, data.num_classes, (lambda seed: (train_set, test_set)), extras


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (method, seed), write results.json / results.md; returns the results payload."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    backbone, num_labels, splits, extras = load_data(args, accelerator)
    sweep_splits = extras.pop("sweep_splits", None)
    backbone.requires_grad_(True)
    paper = paper_numbers(args.dataset_name)
    rows = []
    for method in args.method:
        sweep = None
        if args.lr_grid:
            sweep = choose_learning_rate(args, accelerator, method, backbone, num_labels, sweep_splits)
        runs = []
        for seed in args.seeds:
            train_set, test_set = splits(seed)
            runs.append(train_one(args, accelerator, method, seed, backbone, num_labels, train_set, test_set,
                                  None if sweep is None else sweep["chosen"]))
        row = summarize_method(method, runs, paper)
        if sweep is not None:
            row["lr_sweep"] = sweep
        rows.append(row)
    settings = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items() if key != "method_learning_rate"
    }
    payload = results_payload(rows, args.dataset_name, settings,
                              {"paper_dataset": canonical_name(args.dataset_name), **extras})
    table = markdown_table(rows, args.dataset_name, paper_known=bool(paper))
    if accelerator.is_main_process:
        write_json_atomic(args.output_dir / "results.json", payload)
        write_text_atomic(args.output_dir / "results.md", table)
        accelerator.print(table)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return payload


def cli() -> None:
    main(parse_args())


if __name__ == "__main__":
    cli()

"""Energy a LoRA export keeps at ranks 16/32/64, on an adapter trained here, and file sizes.

1. Builds a small Stable Diffusion pipeline (UNet 64/128 channels, attention width 128,
   CLIP width 128, random seeded weights: no pretrained weights exist offline), saves it.
2. Trains a SNELLA adapter (rank 32, target sparsity 0.8, bi-level allocator) on it with the
   project's DreamBooth script, on 8 real handwritten digits (scikit-learn) at 32 px.
3. Exports the trained adapter (and an untrained one at sparsity 0.8, for comparison) with
   ``snella-export --to lora --rank R`` and ``--energy E`` and records the kept energy.
4. Counts the exact sizes of diff / LoRA / SNELLA files for the real SD 1.5 and SDXL UNets
   (``reference_configs`` on the ``meta`` device, the ``unet`` target preset).

Writes ``benchmarks/results/export_energy.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from snella_diffusion import SnellaConfig, apply_snella, save_snella
from snella_diffusion.export import export_snella
from snella_diffusion.testing.reference_configs import build_reference_model
from snella_diffusion.testing.tiny_models import (
    byte_level_clip_tokenizer, tiny_clip_text_encoder, tiny_ddpm_scheduler, tiny_vae,
)

ROOT = Path(__file__).resolve().parents[1]
RANKS = (16, 32, 64)
ENERGIES = (0.5, 0.8, 0.9)


def small_sd_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
        norm_num_groups=32, attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(seed), text_encoder=tiny_clip_text_encoder(seed, hidden_size=128),
        tokenizer=byte_level_clip_tokenizer(), scheduler=tiny_ddpm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_digits(folder: Path, digit: int = 3, count: int = 8) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    images = data.images[data.target == digit][:count]
    for index, image in enumerate(images):
        gray = (255 * image / 16.0).astype(np.uint8)
        Image.fromarray(gray).resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{index}.png")


def unet_sizes(name: str) -> dict[str, float]:
    """Exact tensor bytes of a diff (fp16), a rank-16/32/64 LoRA (fp16) and a rank-32 SNELLA
    file (float32 factors), over the layers the ``unet`` preset adapts; MB = 10^6 bytes."""
    unet = build_reference_model(name, device="meta")
    layers = apply_snella(unet, SnellaConfig(rank=32, target_modules="unet"))
    shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
    sizes = {"layers": len(shapes), "diff_fp16_MB": sum(m * n for m, n in shapes) * 2 / 1e6}
    for rank in RANKS:
        sizes[f"lora_r{rank}_fp16_MB"] = sum(rank * (m + n) for m, n in shapes) * 2 / 1e6
    sizes["snella_r32_MB"] = sum(32 * (m + n) for m, n in shapes) * 4 / 1e6
    return sizes


def energies(adapter: Path, base: Path, folder: Path) -> dict[str, object]:
    result: dict[str, object] = {}
    for rank in RANKS:
        report = export_snella([adapter], base, folder / f"r{rank}.safetensors", to="lora", rank=rank,
                               overwrite=True)
        # Layers the allocator left empty (sparsity 1, ΔW = 0) export nothing and are not counted.
        per_layer = [record["energy"] for record in report.layers.values() if record["norm"] > 0]
        result[f"rank{rank}"] = {"overall": report.energy, "nonzero_layers": len(per_layer),
                                 "layers": len(report.layers), "min_layer": min(per_layer),
                                 "median_layer": float(np.median(per_layer)),
                                 "bytes": (folder / f"r{rank}.safetensors").stat().st_size}
    for energy in ENERGIES:
        report = export_snella([adapter], base, folder / f"e{energy}.safetensors", to="lora", energy=energy,
                               overwrite=True)
        ranks = [record["rank"] for record in report.layers.values() if record["norm"] > 0]
        result[f"energy{energy}"] = {"overall": report.energy, "mean_rank_nonzero_layers": float(np.mean(ranks)),
                                     "max_rank": max(ranks),
                                     "bytes": (folder / f"e{energy}.safetensors").stat().st_size}
    export_snella([adapter], base, folder / "diff.safetensors", to="diff", overwrite=True)
    result["diff_bytes"] = (folder / "diff.safetensors").stat().st_size
    result["snella_bytes"] = adapter.stat().st_size
    return result


def train(base: Path, work: Path, out: Path, steps: int) -> None:
    """The project's DreamBooth script, SNELLA rank 32, target sparsity 0.8, latents cached."""
    subprocess.run([
        sys.executable, str(ROOT / "train_scripts" / "train_dreambooth_snella.py"),
        "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(work / "digits"),
        "--instance_prompt", "a photo of sks digit", "--resolution", "32", "--train_batch_size", "4",
        "--max_train_steps", str(steps), "--rank", "32", "--target_sparsity", "0.8",
        "--learning_rate", "1e-3", "--cache_latents", "--output_dir", str(out), "--seed", "0",
    ], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/snella-export-energy")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    work = Path(args.work_dir)
    base = work / "small-sd"
    if not base.exists():
        small_sd_pipeline().save_pretrained(base)
    write_digits(work / "digits")
    out = work / "train"
    timing = work / "train_seconds.txt"
    if not (out / "snella_weights.safetensors").is_file():
        started = time.time()
        train(base, work, out, args.steps)
        timing.write_text(f"{time.time() - started:.0f}")
    train_seconds = float(timing.read_text()) if timing.is_file() else float("nan")
    trained = out / "snella_weights.safetensors"

    untrained_pipe = small_sd_pipeline()
    apply_snella(untrained_pipe.unet, SnellaConfig(rank=32, target_modules="unet", init_sparsity=0.8))
    untrained = save_snella(untrained_pipe.unet, work / "untrained.safetensors")
    results = {
        "setup": "small SD UNet (64/128 channels, attention only at width 128, cross-attention 128), random seeded "
                 f"base; SNELLA rank 32, target sparsity 0.8, {args.steps} DreamBooth steps on 8 sklearn "
                 f"digits at 32 px, batch 4, lr 1e-3 ({train_seconds:.0f} s on this CPU)",
        "trained_file": str(trained.relative_to(work)),
        "trained_layer_sparsity": sorted(round(float(value), 3) for key, value in load_file(str(trained)).items()
                                         if key.endswith(".snella.sparsity")),
        "untrained": "the initial adapter (kaiming factors), every layer at sparsity 0.8",
        "trained": energies(trained, base, work / "export-trained"),
        "untrained_energies": energies(untrained, base, work / "export-untrained"),
        "sizes_sd15": unet_sizes("sd15"),
        "sizes_sdxl": unet_sizes("sdxl"),
    }
    target = ROOT / "benchmarks" / "results" / "export_energy.json"
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Adapter loading and inference in a diffusers pipeline: SNELLA vs diffusers' own LoRA path.

Measured in one process on one UNet (random weights, no hub):
  1. load+fuse: ``load_snella_weights`` + ``fuse_snella`` of a SNELLA file vs diffusers'
     ``pipe.load_lora_weights`` + ``pipe.fuse_lora`` of a LoRA file of the same rank on the
     same layers (load alone is timed too; fuse = the difference), and unfuse;
  2. a denoising loop of UNet calls (classifier-free-guidance batch of 2): base pipeline vs
     SNELLA fused vs SNELLA unfused (ΔW cached per layer) vs diffusers LoRA unfused.
Times are medians over ``--repeats`` runs after one warm-up; ratios are against the LoRA
path (1) and against the base UNet (2).

    python benchmarks/bench_loading.py                     # tiny 2-level UNet, seconds
    python benchmarks/bench_loading.py --model sd15 --latent-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from snella_diffusion import SnellaConfig, apply_snella, remove_snella, save_snella
from snella_diffusion.testing.benchmarking import TINY_UNET_OVERRIDES
from snella_diffusion.inject import find_target_linears
from snella_diffusion.loaders import fuse_snella, load_snella_weights, unfuse_snella, unload_snella_weights
from snella_diffusion.testing.reference_configs import build_reference_model
from snella_diffusion.testing.tiny_models import byte_level_clip_tokenizer, tiny_clip_text_encoder, tiny_ddpm_scheduler, tiny_vae

# SD1.5's UNet config with two levels of 32/64 channels: the same layer kinds, CPU-seconds.
TINY_OVERRIDES = {**TINY_UNET_OVERRIDES, "sample_size": 16}


def build_pipeline(model: str, seed: int = 0):
    """A StableDiffusionPipeline around the benchmark UNet (tiny VAE and text encoder: only
    the UNet is adapted and timed)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = build_reference_model("sd15", device="cpu", **(TINY_OVERRIDES if model == "tiny" else {}))
    return StableDiffusionPipeline(
        unet=unet.eval(), vae=tiny_vae(seed), text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=byte_level_clip_tokenizer(), scheduler=tiny_ddpm_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def write_adapter_files(pipe, folder: Path, rank: int) -> tuple[Path, Path, int]:
    """A SNELLA file (random factors, 50% sparsity) and a LoRA file (random A and B, PEFT
    key layout) on the same UNet layers at the same rank; returns both paths and the count."""
    unet = pipe.unet
    config = SnellaConfig(rank=rank, target_modules="unet", init_sparsity=0.5)
    targets = find_target_linears(unet, config)
    apply_snella(unet, config)
    snella_path = save_snella({"unet": unet}, folder / "snella_weights.safetensors")
    remove_snella(unet)
    lora = {}
    for name, layer in targets.items():
        lora[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features) / layer.in_features**0.5
        lora[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank) / rank
    lora_path = folder / "lora.safetensors"
    save_file(lora, str(lora_path))
    return snella_path, lora_path, len(targets)


def median_seconds(run: Callable[[], object], repeats: int, reset: Callable[[], object] = lambda: None) -> float:
    """Median wall time of ``run`` over ``repeats`` (after one warm-up); ``reset`` is untimed."""
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        reset()
        if index:
            times.append(elapsed)
    return statistics.median(times)


def denoising_loop(pipe, steps: int, latent_size: int) -> Callable[[], None]:
    """``steps`` UNet calls on a CFG batch of 2 (random latents and text states), no grad."""
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, latent_size, latent_size, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.linspace(999, 1, steps).long()

    @torch.no_grad()
    def run() -> None:
        for timestep in timesteps:
            unet(latents, timestep, context)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny", help="UNet: tiny 2-level or the SD1.5 config")
    parser.add_argument("--rank", type=int, default=16, help="rank of both adapters")
    parser.add_argument("--latent-size", type=int, default=16, help="latent height = width of the denoising loop")
    parser.add_argument("--steps", type=int, default=4, help="UNet calls per denoising loop")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median) after one warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" on every load

    pipe = build_pipeline(args.model)
    with tempfile.TemporaryDirectory() as folder:
        snella_path, lora_path, layer_count = write_adapter_files(pipe, Path(folder), args.rank)
        print(f"model={args.model} rank={args.rank} adapted layers={layer_count} threads={torch.get_num_threads()} "
              f"latent={args.latent_size}x{args.latent_size} steps={args.steps} repeats={args.repeats}")

        loop = denoising_loop(pipe, args.steps, args.latent_size)
        progress = tqdm(total=11, desc="bench_loading", file=sys.stderr)

        def measure(label: str, run: Callable[[], object], reset: Callable[[], object] = lambda: None) -> float:
            progress.set_postfix_str(label)
            seconds = median_seconds(run, args.repeats, reset)
            progress.update()
            return seconds

        base_first = measure("base loop", loop)
        snella_load_only = measure("SNELLA load", lambda: load_snella_weights(pipe, snella_path),
                                   lambda: unload_snella_weights(pipe))
        snella_load = measure("SNELLA load+fuse", lambda: (load_snella_weights(pipe, snella_path), fuse_snella(pipe)),
                              lambda: unload_snella_weights(pipe))
        load_snella_weights(pipe, snella_path)
        start = time.perf_counter()
        loop()
        unfused_first = time.perf_counter() - start
        unfused = measure("SNELLA unfused loop", loop)
        fuse_snella(pipe)
        fused = measure("SNELLA fused loop", loop)
        snella_unfuse = measure("SNELLA unfuse", lambda: unfuse_snella(pipe), lambda: fuse_snella(pipe))
        unfuse_snella(pipe)
        unload_snella_weights(pipe)
        lora_load_only = measure("LoRA load", lambda: pipe.load_lora_weights(str(lora_path), adapter_name="lora"),
                                 pipe.unload_lora_weights)
        lora_load = measure("LoRA load+fuse",
                            lambda: (pipe.load_lora_weights(str(lora_path), adapter_name="lora"), pipe.fuse_lora()),
                            lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()))
        pipe.load_lora_weights(str(lora_path), adapter_name="lora")
        lora_unfused = measure("LoRA unfused loop", loop)
        pipe.fuse_lora()
        lora_unfuse = measure("LoRA unfuse", pipe.unfuse_lora, pipe.fuse_lora)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        # Base timed first and last: the faster of the two is the reference, so warm-up and
        # drift on a shared machine do not flatter the adapters.
        base_last = measure("base loop again", loop)
        base = min(base_first, base_last)
        progress.close()

    print("\nload / fuse / load+fuse (s)    load     fuse    total   total vs LoRA")
    for label, load, total in (("SNELLA", snella_load_only, snella_load), ("diffusers LoRA", lora_load_only, lora_load)):
        print(f"  {label:26s} {load:7.3f}  {total - load:7.3f}  {total:7.3f}   {total / lora_load:6.2f}x")
    print("unfuse (s)")
    print(f"  SNELLA (bit-exact restore) {snella_unfuse:7.3f}   {snella_unfuse / lora_unfuse:6.2f}x")
    print(f"  diffusers LoRA             {lora_unfuse:7.3f}   {1.0:6.2f}x")
    print(f"\ndenoising loop ({args.steps} UNet calls, s)  median   vs base (faster of the two base runs)")
    for label, seconds in (
        ("base UNet, timed first", base_first), ("base UNet, timed last", base_last),
        ("SNELLA fused", fused), ("SNELLA unfused (cached ΔW)", unfused),
        ("SNELLA unfused, first loop (builds cache)", unfused_first), ("diffusers LoRA unfused", lora_unfused),
    ):
        print(f"  {label:42s} {seconds:7.3f}   {seconds / base:6.2f}x")


if __name__ == "__main__":
    main()

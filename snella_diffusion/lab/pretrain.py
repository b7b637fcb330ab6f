"""Deterministic pretraining of the lab's base (``snella_diffusion.lab.base``) on the world.

    python -m snella_diffusion.lab.pretrain --output_dir runs/lab-base --max_steps 4000

Two stages, both seeded: (1) the non-downsampling VAE learns the identity (latent ≈ pixels) on
world images and noise; (2) the UNet and the text encoder learn the world jointly: v-prediction,
cosine betas, AdamW with linear warmup then a constant learning rate, EMA of the weights, 10 %
of captions dropped to the empty prompt. Images are world images area-downsampled to 16 px,
captions follow ``world.pretraining_prompt``. The batch at step k depends only on (seed, k), so
a run stopped at step k equals the first k steps of a longer one (with the same thread count).

Every ``--checkpoint_every`` steps the EMA pipeline is saved to ``<output_dir>/pipeline``
(replaced atomically) and scored on the 48 base prompts at guidance 1; progress lines and
scores go to stdout and ``<output_dir>/progress.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from snella_diffusion.files import replace_folder_atomically
from snella_diffusion.lab import base, world
from snella_diffusion.lab.evaluate import sample, score_prompts


def world_batch(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` world images at 16 px as (count, 3, 16, 16) in [-1, 1] and their captions."""
    scenes = [world.sample_scene(rng) for _ in range(count)]
    images = world.downsample(np.stack([world.render(scene) for scene in scenes]))
    prompts = [world.pretraining_prompt(scene, rng) for scene in scenes]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0
    return pixels.contiguous(), prompts


def train_vae(vae: Any, steps: int, seed: int, batch_size: int = 64, learning_rate: float = 2e-3,
              log_every: int = 100) -> float:
    """Trains ``vae`` towards the identity: latent channels 0–2 ≈ pixels in [-1, 1], channel 3
    ≈ 0, decoder(latent) ≈ pixels, also from latents perturbed by noise of std 0.05 (so that
    imperfect UNet outputs still decode). Half of each batch is world images, half uniform noise
    images. Returns the final reconstruction MSE on a fresh world batch (units: [-1, 1]²)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    vae.train()
    for step in range(steps):
        rng = np.random.default_rng([seed, 1, step])
        pixels, _ = world_batch(rng, batch_size // 2)
        noise_images = torch.rand((batch_size - len(pixels), 3, base.BASE_RESOLUTION, base.BASE_RESOLUTION),
                                  generator=generator) * 2 - 1
        pixels = torch.cat([pixels, noise_images])
        latents = vae.encode(pixels).latent_dist.mean
        target_latents = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)
        perturbed = latents + 0.05 * torch.randn(latents.shape, generator=generator)
        loss = (F.mse_loss(vae.decode(latents).sample, pixels) + F.mse_loss(latents, target_latents)
                + F.mse_loss(vae.decode(perturbed).sample, pixels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        base.fix_posterior_logvar(vae)
        if (step + 1) % log_every == 0:
            print(f"vae step {step + 1}/{steps} loss {loss.item():.5f}", flush=True)
    vae.eval()
    with torch.no_grad():
        pixels, _ = world_batch(np.random.default_rng([seed, 2]), 256)
        return float(F.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1.0 - decay)


def save_pipeline_atomically(pipeline: Any, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then swap it in."""
    replace_folder_atomically(folder, pipeline.save_pretrained)


@dataclass(frozen=True)
class PretrainSettings:
    """The settings of one pretraining run, one field per flag of :func:`parse_args`."""

    output_dir: Path
    seed: int
    max_steps: int
    max_minutes: Optional[float]
    batch_size: int
    learning_rate: float
    warmup_steps: int
    ema_decay: float
    prompt_dropout: float
    vae_steps: int
    checkpoint_every: int
    log_every: int
    eval_inference_steps: int
    threads: int


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainSettings:
    """The run's settings from command-line flags (``argv`` defaults to ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=4000, help="UNet/text-encoder steps.")
    parser.add_argument("--max_minutes", type=float, default=None,
                        help="Stop after this wall time (the step reached is logged; rebuild with --max_steps).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--prompt_dropout", type=float, default=0.1)
    parser.add_argument("--vae_steps", type=int, default=200)
    parser.add_argument("--checkpoint_every", type=int, default=250)
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--eval_inference_steps", type=int, default=25,
                        help="Sampling steps of the checkpoint scores (0: no scores).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it).")
    return PretrainSettings(**vars(parser.parse_args(argv)))


def main(args: PretrainSettings) -> Path:
    """Runs both stages; returns the folder of the final EMA pipeline."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log_file = (args.output_dir / "progress.jsonl").open("a")

    def log(record: dict[str, Any]) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    started = time.monotonic()
    pipeline = base.build_pipeline(args.seed)
    vae, unet, text_encoder, tokenizer = pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    vae_mse = train_vae(vae, args.vae_steps, args.seed)
    vae.requires_grad_(False)
    print(f"vae reconstruction mse {vae_mse:.2e} after {time.monotonic() - started:.0f} s", flush=True)
    log({"stage": "vae", "steps": args.vae_steps, "reconstruction_mse": vae_mse,
         "seconds": time.monotonic() - started})

    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_pipeline = type(pipeline)(
        unet=ema_unet, vae=vae, text_encoder=ema_text, tokenizer=tokenizer, scheduler=base.sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ema_pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = base.training_scheduler()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    generator = torch.Generator().manual_seed(args.seed + 1)
    unet.train()
    text_encoder.train()
    eval_prompts = world.base_prompts()
    train_started = time.monotonic()
    window: list[float] = []
    step = 0
    for step in range(1, args.max_steps + 1):
        rng = np.random.default_rng([args.seed, 3, step])
        pixels, prompts = world_batch(rng, args.batch_size)
        prompts = ["" if rng.random() < args.prompt_dropout else p for p in prompts]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        window.append(loss.item())
        if step % args.log_every == 0:
            elapsed = time.monotonic() - train_started
            print(f"step {step}/{args.max_steps} loss {np.mean(window):.4f} {elapsed / step:.2f} s/step "
                  f"elapsed {elapsed / 60:.1f} min", flush=True)
            log({"step": step, "loss": float(np.mean(window)), "seconds": elapsed})
            window = []
        out_of_time = args.max_minutes is not None and time.monotonic() - train_started > 60 * args.max_minutes
        if step % args.checkpoint_every == 0 or step == args.max_steps or out_of_time:
            save_pipeline_atomically(ema_pipeline, args.output_dir / "pipeline")
            if args.eval_inference_steps:
                images = sample(ema_pipeline, eval_prompts, seed=10_000, guidance_scale=1.0,
                                steps=args.eval_inference_steps)
                scores = score_prompts(images, eval_prompts)
                print(f"eval step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
                log({"step": step, "eval_48_guidance_1": scores, "seconds": time.monotonic() - train_started})
        if out_of_time:
            break
    log({"stage": "done", "steps": step, "seconds": time.monotonic() - started})
    log_file.close()
    return args.output_dir / "pipeline"


def cli(argv: Optional[Sequence[str]] = None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    cli(sys.argv[1:])

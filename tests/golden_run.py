"""The golden run: tensors that a refactor must reproduce bit for bit.

Two kinds of case, each in float32, bf16 and fp16:

- ``layer-<family>-<dtype>``: the tiny SD UNet and the tiny Flux transformer, their base in
  ``dtype``, SNELLA applied (rank 4, sparsity 0.5); one forward and backward on fixed inputs,
  then one Adam step and an allocator step: every layer's ΔW and τ before the step, the factor
  and scalar gradients, the output, and ΔW, τ and the output after the step.
- ``script-<family>-<precision>``: two optimizer steps of the DreamBooth script
  (``--mixed_precision`` no / bf16 / fp16) on the tiny SD and Flux pipelines: every tensor of
  the saved adapter file, and for SD an export to ``diff`` and to ``lora``.

``python tests/golden_run.py`` (from the repository root) writes ``tests/golden/<case>.safetensors``
with the code as it is; ``tests/test_golden.py`` recomputes each case and compares with
``torch.equal``. All of it runs on one intra-op thread (the reductions' order is then fixed).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "golden"
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("no", "bf16", "fp16")
PROMPT = "a photo of sks toy"


def _denoiser_and_inputs(family: str, dtype: torch.dtype):
    """The tiny denoiser in ``dtype`` and a function calling it on fixed inputs."""
    generator = torch.Generator().manual_seed(7)
    if family == "sd":
        from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

        model = tiny_sd_pipeline(seed=0).unet.to(dtype)
        sample = torch.randn(2, 4, 16, 16, generator=generator).to(dtype)
        context = torch.randn(2, 77, 32, generator=generator).to(dtype)
        timesteps = torch.tensor([10, 700])
        return model, "unet", lambda: model(sample, timesteps, encoder_hidden_states=context).sample
    from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline

    model = tiny_flux_pipeline(seed=0).transformer.to(dtype)
    tokens, text_tokens = 16, 8
    hidden = torch.randn(2, tokens, 16, generator=generator).to(dtype)
    context = torch.randn(2, text_tokens, 64, generator=generator).to(dtype)
    pooled = torch.randn(2, 32, generator=generator).to(dtype)
    image_ids = torch.zeros(tokens, 3)
    image_ids[:, 1] = torch.arange(tokens) // 4
    image_ids[:, 2] = torch.arange(tokens) % 4
    text_ids = torch.zeros(text_tokens, 3)

    def call():
        return model(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=torch.tensor([0.3, 0.8]).to(dtype), img_ids=image_ids, txt_ids=text_ids,
                     guidance=torch.tensor([3.5, 3.5]).to(dtype)).sample

    return model, "dit", call


def layer_case(family: str, dtype_name: str) -> dict[str, torch.Tensor]:
    """ΔW, τ, gradients and outputs of one SNELLA training step on the tiny ``family`` denoiser."""
    from snella_diffusion import BiLevelAllocator, SnellaConfig, apply_snella

    torch.manual_seed(0)
    model, preset, call = _denoiser_and_inputs(family, DTYPES[dtype_name])
    config = SnellaConfig(rank=4, target_modules=preset, init_sparsity=0.5, target_sparsity=0.7,
                          allocator_interval=1, allocator_final_steps=1)
    layers = apply_snella(model, config)
    allocator = BiLevelAllocator(model, config, total_steps=2)
    out: dict[str, torch.Tensor] = {}
    output = call()
    out["output"] = output.detach().float()
    output.float().square().mean().backward()
    for name, layer in layers.items():
        with torch.no_grad():
            out[f"{name}.delta"] = layer.delta_weight()
        out[f"{name}.threshold"] = layer.threshold.clone()
        for param in ("in_factors", "out_factors", "alpha", "gamma", "beta"):
            out[f"{name}.grad.{param}"] = getattr(layer, param).grad.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator.step()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        out["output_after_step"] = call().float()
        for name, layer in layers.items():
            out[f"{name}.delta_after_step"] = layer.delta_weight()
            out[f"{name}.threshold_after_step"] = layer.threshold.clone()
            out[f"{name}.sparsity_after_step"] = layer.sparsity.clone()
    return out


def _pipeline_folder(family: str, root: Path) -> Path:
    folder = root / f"tiny-{family}"
    if not folder.exists():
        if family == "sd":
            from snella_diffusion.testing.tiny_models import tiny_sd_pipeline as build
        else:
            from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline as build
        build(seed=0).save_pretrained(folder)
    return folder


def script_case(family: str, precision: str, root: Path) -> dict[str, torch.Tensor]:
    """The saved adapter (and for SD its diff and LoRA exports) of a 2-step DreamBooth run."""
    from accelerate.state import AcceleratorState

    from snella_diffusion.export import export_snella
    from snella_diffusion.training.data import synthetic_instance_images, write_images
    from train_scripts.train_dreambooth_snella import main, parse_args

    folder = _pipeline_folder(family, root)
    output_dir = Path(tempfile.mkdtemp(prefix=f"run-{family}-{precision}-", dir=root))
    instance_dir = root / "instance-images"
    if not instance_dir.exists():
        write_images(synthetic_instance_images(count=4, size=64, seed=0), instance_dir, "instance")
    AcceleratorState._reset_state(True)
    flags = [
        "--pretrained_model_name_or_path", str(folder), "--output_dir", str(output_dir),
        "--instance_data_dir", str(instance_dir), "--instance_prompt", PROMPT, "--resolution", "32",
        "--max_train_steps", "2", "--train_batch_size", "2", "--rank", "4", "--learning_rate", "1e-2",
        "--target_sparsity", "0.6", "--allocator_warmup_steps", "0", "--allocator_final_steps", "1",
        "--allocator_interval", "1", "--checkpointing_steps", "100", "--report_to", "none", "--seed", "3",
        "--mixed_precision", precision, "--reference_beta",
    ]
    if family == "flux":
        flags += ["--max_sequence_length", "16"]
    adapter = main(parse_args(flags))
    out = {f"file.{key}": value for key, value in load_file(adapter).items()}
    if family == "sd":
        for to in ("diff", "lora"):
            target = output_dir / f"export-{to}.safetensors"
            rank = 2 if to == "lora" else None
            export_snella([str(adapter)], str(folder), str(target), to=to, dtype="fp32", rank=rank)
            out.update({f"export_{to}.{key}": value for key, value in load_file(target).items()})
    return out


def cases(root: Path) -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    """Every golden case by name; script cases share pipeline folders under ``root``."""
    table: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    for family in ("sd", "flux"):
        for dtype_name in DTYPES:
            table[f"layer-{family}-{dtype_name}"] = lambda f=family, d=dtype_name: layer_case(f, d)
        for precision in PRECISIONS:
            table[f"script-{family}-{precision}"] = lambda f=family, p=precision: script_case(f, p, root)
    return table


def run_case(name: str, root: Path) -> dict[str, torch.Tensor]:
    """Case ``name`` on one intra-op thread (the thread count is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {key: value.contiguous() for key, value in cases(root)[name]().items()}
    finally:
        torch.set_num_threads(threads)


def load_golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN_DIR / f"{name}.safetensors")


def main() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in cases(Path(scratch)):
            tensors = run_case(name, Path(scratch))
            save_file(tensors, GOLDEN_DIR / f"{name}.safetensors")
            print(f"{name}: {len(tensors)} tensors", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

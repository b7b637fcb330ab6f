"""What every model-family test does the same way, on a tiny pipeline folder of the family's
real diffusers/transformers classes (``save_pretrained`` output):

- :func:`family_settings` / :meth:`FamilyRun.loaded`: the family detected from the folder's
  ``model_index.json``, loaded and configured with DiT flags;
- :meth:`FamilyRun.run_script`: the DreamBooth script on two synthetic instance images at 32 px
  (3 steps, rank 4, learning rate 1e-2, seed 1), returning the adapter's path;
- :meth:`FamilyRun.losses_on_a_fixed_batch`: SNELLA (``dit`` preset, rank 4) trained by AdamW
  for ``steps`` steps on one fixed batch of two 32 px images and prompts :data:`PROMPT`,
  :data:`LONGER`, returning the ``steps + 1`` losses;
- :meth:`FamilyRun.check_script_adapter_reloads_and_unloads`: the script's trained
  transformer (recorded by patching ``run_validation``) against its saved adapter loaded into a
  fresh pipeline (bit-exact) and after ``unload_snella_weights`` (bit-exact base);
- :meth:`FamilyRun.check_lora_file_loads`: the script's ``--adapter lora`` file loaded with the
  pipeline's own ``load_lora_weights``, every tensor found unchanged in the transformer;
- :func:`published_count` / :func:`walked_linear_count`: ``benchmarks/count_adapted_layers.py``
  on a published config and the test's own count of a module tree.

A family test builds one :class:`FamilyRun` in a module-scoped fixture and adds its own
numbers (layer counts, shapes) to what these return.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, read_snella_file
from snella_diffusion.families import FamilySettings, detect_family
from snella_diffusion.families.dit import DiTFlags
from snella_diffusion.training.batch_loss import training_loss

PROMPT = "a photo of sks dog"
LONGER = "a photo of sks dog on the grass with a red ball"
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
SCRIPT_STEPS = 3


def family_settings(*flags: str, resolution: int = 32, train_text_encoder: bool = False) -> FamilySettings:
    """FamilySettings from DiT command-line ``flags`` (as the script parses them)."""
    parser = argparse.ArgumentParser()
    DiTFlags.add_arguments(parser)
    return FamilySettings(dit=DiTFlags.from_flags(vars(parser.parse_args(list(flags)))),
                          train_text_encoder=train_text_encoder, resolution=resolution)


@dataclass(frozen=True)
class FamilyRun:
    """One family's tiny pipeline and what its runs share.

    ``folder``: the saved tiny pipeline; ``pipeline_class``: its diffusers class;
    ``latent_shape``: ``(C, h, w)`` of one 32 px image's latents as ``encode_latents`` returns
    them; ``flags``: DiT flags every load and script run takes (e.g. ``--max_sequence_length``)."""

    folder: Path
    pipeline_class: type
    latent_shape: tuple[int, ...]
    flags: tuple[str, ...] = field(default=())

    def loaded(self, *flags: str) -> tuple[Any, Any]:
        """(family, configured TrainingComponents); ``flags`` follow :attr:`flags` (later wins)."""
        family, index = detect_family(str(self.folder))
        components = family.load(str(self.folder), index)
        family.configure(components, family_settings(*self.flags, *flags))
        return family, components

    def run_script(self, output_dir: Path, *flags: str) -> Path:
        """The DreamBooth script on this pipeline (``--output_dir output_dir``); the adapter path."""
        from snella_diffusion.training.data import synthetic_instance_images, write_images
        from train_scripts.train_dreambooth_snella import main, parse_args

        instance_dir = output_dir / "instance-images"
        write_images(synthetic_instance_images(count=2, size=48, seed=0), instance_dir, "instance")
        return main(parse_args([
            "--pretrained_model_name_or_path", str(self.folder), "--output_dir", str(output_dir),
            "--instance_data_dir", str(instance_dir), "--instance_prompt", PROMPT, "--resolution", "32",
            "--max_train_steps", str(SCRIPT_STEPS), "--train_batch_size", "1", "--rank", "4",
            "--learning_rate", "1e-2", "--checkpointing_steps", "100", "--report_to", "none", "--seed", "1",
            *self.flags, *flags,
        ]))

    def denoiser_output(self, family: Any, components: Any, transformer: torch.nn.Module) -> torch.Tensor:
        """``family.predict`` with ``transformer`` on fixed latents (seed 7), t = 600, :data:`PROMPT`."""
        latents = torch.randn(1, *self.latent_shape, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            conditioning = family.encode_prompt(components, [PROMPT], CPU)
            return family.predict(components, latents, torch.tensor([600.0]), conditioning, {}, denoiser=transformer)

    def losses_on_a_fixed_batch(self, *flags: str, steps: int = 20, learning_rate: float = 1e-2) -> list[float]:
        """SNELLA (dit preset, rank 4) trained on one fixed batch (two 32 px images, seed 0,
        latents drawn with seed 1; noise and timesteps seed 5 at every step); the ``steps + 1``
        losses, each asserted finite."""
        family, components = self.loaded(*flags)
        apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
        pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(1))
        assert tuple(latents.shape) == (2, *self.latent_shape)
        with torch.no_grad():
            conditioning = family.encode_prompt(components, [PROMPT, LONGER], CPU)
        objective = family.objective(components)
        trainable = [p for p in components.denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
        losses = []
        for step in range(steps + 1):
            loss = training_loss(family, components, objective, {"num_instance": 2}, latents, conditioning,
                                 components.denoiser, torch.Generator().manual_seed(5), prior_loss_weight=1.0)
            assert torch.isfinite(loss)
            losses.append(loss.item())
            if step < steps:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        return losses

    def check_script_adapter_reloads_and_unloads(self, output_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
        """Run the script with validation; assert finite losses for every step, the validation
        image, the trained denoiser's output differing from the base's, the saved adapter loaded
        by ``load_snella_weights`` into a fresh pipeline reproducing it exactly and
        ``unload_snella_weights`` restoring the base exactly. Returns the adapter file read
        back (``SnellaFile``) for the family's layer count."""
        import train_scripts.train_dreambooth_snella as script

        from snella_diffusion.loaders import load_snella_weights, unload_snella_weights

        seen: dict[str, Any] = {}
        run_validation, write_outputs = script.run_validation, script.write_outputs

        def recording_validation(settings, accelerator, family, components, trained, *rest):
            seen["transformer"] = trained["transformer"]
            return run_validation(settings, accelerator, family, components, trained, *rest)

        def recording_outputs(settings, family, config, allocator, rank_drops, losses, *rest):
            seen["losses"] = [loss for _, loss in losses]
            return write_outputs(settings, family, config, allocator, rank_drops, losses, *rest)

        monkeypatch.setattr(script, "run_validation", recording_validation)
        monkeypatch.setattr(script, "write_outputs", recording_outputs)
        adapter = self.run_script(output_dir, "--validation_prompt", PROMPT, "--num_validation_images", "1",
                                  "--validation_inference_steps", "2")
        assert len(seen["losses"]) == SCRIPT_STEPS and all(torch.isfinite(torch.tensor(seen["losses"])))
        assert (output_dir / "validation" / f"step_{SCRIPT_STEPS}.png").is_file()

        family, components = self.loaded()
        trained = self.denoiser_output(family, components, seen["transformer"])
        pipeline = self.pipeline_class.from_pretrained(self.folder)
        base = self.denoiser_output(family, components, pipeline.transformer)
        load_snella_weights(pipeline, adapter)
        reloaded = self.denoiser_output(family, components, pipeline.transformer)
        assert (trained - base).abs().max() > 1e-4
        assert torch.equal(reloaded, trained)
        unload_snella_weights(pipeline)
        assert torch.equal(self.denoiser_output(family, components, pipeline.transformer), base)
        return read_snella_file(adapter)

    def check_lora_file_loads(self, output_dir: Path) -> int:
        """Run the script with ``--adapter lora``; assert every saved key is ``transformer.*``,
        the pipeline's ``load_lora_weights`` creates as many LoRA tensors as the file holds,
        each file tensor is found unchanged among them, and the denoiser's output moves.
        Returns the number of LoRA tensors (A and B of each adapted layer)."""
        from safetensors.torch import load_file

        self.run_script(output_dir, "--adapter", "lora")
        saved = load_file(output_dir / "pytorch_lora_weights.safetensors")
        assert saved and all(key.startswith("transformer.") for key in saved)
        family, components = self.loaded()
        pipeline = self.pipeline_class.from_pretrained(self.folder)
        before = self.denoiser_output(family, components, pipeline.transformer)
        pipeline.load_lora_weights(str(output_dir))
        loaded = [p.detach() for name, p in pipeline.transformer.named_parameters() if "lora_" in name]
        assert len(loaded) == len(saved)
        for key, tensor in saved.items():
            assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in loaded), key
        assert (self.denoiser_output(family, components, pipeline.transformer) - before).abs().max() > 0
        return len(saved)


def published_count(model: str, output_dir: Path) -> dict[str, Any]:
    """``benchmarks/count_adapted_layers.py --model model`` run as a user runs it: its one JSON row
    (``adapted_layers``, ``denoiser_parameters``, ...)."""
    output = output_dir / f"counts-{model}.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_adapted_layers.py"), "--model", model,
                    "--json", str(output)], check=True, capture_output=True, cwd=REPO)
    (counted,) = json.loads(output.read_text())
    return counted


def walked_linear_count(blocks: Iterable[torch.nn.Module], parts: Iterable[str]) -> int:
    """The ``nn.Linear`` modules under attributes ``parts`` (dotted names) of every block: the
    test's own count of what the ``dit`` preset should adapt."""
    parts = tuple(parts)
    total = 0
    for block in blocks:
        for part in parts:
            module = block.get_submodule(part)
            total += sum(isinstance(child, torch.nn.Linear) for child in module.modules())
    return total


EXPORT_OPTIONS = {"comfyui": {}, "lora": {"dtype": "fp32", "rank": 2}, "diff": {"dtype": "fp32"}}
EXPORT_SUFFIXES = {"diff": ".diff", "lora": ".lora_down.weight"}


def exported_key_prefixes(run: FamilyRun, to: str, output_dir: Path) -> set[str]:
    """``snella-export --to to`` of a SNELLA adapter on the ``dit`` preset (rank 4, factors drawn
    N(0, 0.02²) so no layer's ΔW is zero): the key prefixes the file names, one per exported
    weight (``--to diff`` / ``lora``: the keys without ``.diff`` / ``.lora_down.weight``;
    ``--to comfyui``: the layer prefixes its header lists)."""
    from safetensors import safe_open

    from snella_diffusion import save_snella
    from snella_diffusion.export import export_snella

    _, components = run.loaded()
    layers = apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.02, generator=generator)
    adapter = save_snella({"transformer": components.denoiser}, output_dir / "adapter.safetensors")
    output = output_dir / f"export-{to}.safetensors"
    export_snella([adapter], str(run.folder), output, to=to, **EXPORT_OPTIONS[to])
    with safe_open(str(output), "pt") as handle:
        keys, header = set(handle.keys()), handle.metadata()
    if to == "comfyui":
        return set(json.loads(header["snella_comfyui_layers"]))
    return {key.removesuffix(EXPORT_SUFFIXES[to]) for key in keys if key.endswith(EXPORT_SUFFIXES[to])}

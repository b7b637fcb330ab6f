"""What every model-family test does the same way, on a tiny pipeline folder of the family's
real diffusers/transformers classes (``save_pretrained`` output):

- :func:`saved_family_run`: the module fixture's work (the tiny pipeline saved, its FamilyRun);
  :meth:`FamilyRun.check_saved_pipeline_samples_as_built`: the saved folder loads by path,
  samples as the built pipeline does and is detected as its family;
- :func:`family_settings` / :meth:`FamilyRun.loaded`: the family detected from the folder's
  ``model_index.json``, loaded and configured with DiT flags; :meth:`FamilyRun.check_configure_refuses`:
  the one-line refusals of ``configure``;
- :meth:`FamilyRun.check_validation_from_cached_embeddings`: validation sampled from the
  prompt and, after the text encoders are freed, from the cached embeddings: the same images;
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
- :meth:`FamilyRun.check_training_features`: one script run of 4 steps with sidecar captions,
  two aspect-ratio buckets on the family's pixel multiple, EMA, Prodigy, prior preservation,
  a ``--config`` file, cached latents and text embeddings and a checkpoint at every step, then
  a run resumed from ``checkpoint-2``: what each feature did, the EMA against its formula and
  the resumed adapters bit for bit;
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
from typing import Any, Callable, Iterable, Optional

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
SAMPLING = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}  # a tiny pipeline's sample

# what FamilyRun.check_training_features trains with
FEATURE_STEPS = 4
EMA_DECAY = 0.2  # below the warm-up's k/(k+9) at steps 3 and 4: the decay itself takes part
# Prodigy's steps start at about d0·lr = 1e-6·lr; at 100 its estimate d grows within 4 steps and the
# weights move by ~0.1, far above float32 rounding, so the EMA check tells decays apart
PRODIGY_LR = 100.0
CLASS_PROMPT = "a photo of a dog"
# name: ((width, height) in pixels, sidecar caption); 3:1 and 1:3, so each lands in a bucket of its own
FEATURE_IMAGES = {"wide": ((96, 32), "sks dog lying on the grass"),
                  "tall": ((32, 96), "sks dog standing by a red ball")}


def record_script_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Patch the DreamBooth script's ``run_validation`` and ``write_outputs`` (undone by
    ``monkeypatch``) to record into the returned dict the trained ``"transformer"`` (as the
    last validation sees it) and the ``"losses"`` of every step."""
    import train_scripts.train_dreambooth_snella as script

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
    return seen


# what a video family's script run on write_clip_folder's clips adds to FamilyRun.run_script's flags
CLIP_SCRIPT_FLAGS = ("--caption_extension", ".txt", "--instance_prompt", "sks")


def write_clip_folder(folder: Path) -> Path:
    """Two moving-square clips (9 and 17 frames, 32×48, 8 fps) and one still image in
    ``folder``, each captioned (``.txt``): the video families' script runs train on it."""
    from PIL import Image

    from snella_diffusion.testing.tiny_video_models import moving_square_frames
    from snella_diffusion.training.video_files import write_video

    for frames in (9, 17):
        write_video(folder / f"clip_{frames}.mp4", moving_square_frames(frames), fps=8)
        (folder / f"clip_{frames}.txt").write_text("sks square moving")
    Image.fromarray(moving_square_frames(1)[0]).save(folder / "still.png")
    (folder / "still.txt").write_text("sks square")
    return folder


def check_refused_before_loading(folder: Path, output_dir: Path, monkeypatch: pytest.MonkeyPatch, flags: Iterable[str],
                                 message: str) -> None:
    """The DreamBooth script on the pipeline ``folder`` with ``flags`` stops with a SnellaError
    matching ``message`` (a regex) before any model loads (``load_components`` patched to fail)."""
    import train_scripts.train_dreambooth_snella as script
    from snella_diffusion import SnellaError

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the flag was refused")

    monkeypatch.setattr(script, "load_components", no_loading)
    settings = script.parse_args(["--pretrained_model_name_or_path", str(folder), "--output_dir",
                                  str(output_dir / "out"), "--instance_data_dir", str(output_dir),
                                  "--instance_prompt", "sks", "--report_to", "none", *flags])
    with pytest.raises(SnellaError, match=message):
        script.main(settings)


def family_settings(*flags: str, resolution: int = 32, **fields: Any) -> FamilySettings:
    """FamilySettings from DiT command-line ``flags`` (as the script parses them), ``resolution``
    and other FamilySettings ``fields`` (``train_text_encoder``, ``wan_expert``)."""
    parser = argparse.ArgumentParser()
    DiTFlags.add_arguments(parser)
    return FamilySettings(dit=DiTFlags.from_flags(vars(parser.parse_args(list(flags)))), resolution=resolution,
                          **fields)


def saved_family_run(tmp_path_factory: pytest.TempPathFactory, build: Callable[[int], Any], pipeline_class: str,
                     latent_shape: tuple[int, ...], max_sequence_length: int) -> "FamilyRun":
    """The module fixture of a family test: ``build(0)`` (a tiny pipeline builder) saved with
    ``save_pretrained`` in a fresh temporary folder, as a :class:`FamilyRun` of the diffusers
    class named ``pipeline_class`` whose loads and script runs take ``--max_sequence_length``."""
    import diffusers

    folder = tmp_path_factory.mktemp(pipeline_class) / "pipeline"
    build(0).save_pretrained(folder)
    return FamilyRun(folder, getattr(diffusers, pipeline_class), latent_shape,
                     flags=("--max_sequence_length", str(max_sequence_length)))


@dataclass(frozen=True)
class CachedValidation:
    """What :meth:`FamilyRun.check_validation_from_cached_embeddings` sampled with:
    ``prompted_inputs`` / ``cached_inputs``, the pipeline inputs before and after the text
    encoders were freed, and ``images``, the sample from the cached inputs (the pipeline's
    ``images`` output)."""

    prompted_inputs: dict[str, Any]
    cached_inputs: dict[str, Any]
    images: Any


@dataclass(frozen=True)
class FamilyRun:
    """One family's tiny pipeline and what its runs share.

    ``folder``: the saved tiny pipeline; ``pipeline_class``: its diffusers class;
    ``latent_shape``: ``(C, h, w)`` of one 32 px image's latents as ``encode_latents`` returns
    them (``(C, 1, h, w)`` for a video family); ``flags``: DiT flags every load and script run
    takes (e.g. ``--max_sequence_length``)."""

    folder: Path
    pipeline_class: type
    latent_shape: tuple[int, ...]
    flags: tuple[str, ...] = field(default=())

    def loaded(self, *flags: str, **settings: Any) -> tuple[Any, Any]:
        """(family, configured TrainingComponents); ``flags`` follow :attr:`flags` (later wins);
        ``settings``: :func:`family_settings` keywords (``resolution``, ``wan_expert``, ...)."""
        family, index = detect_family(str(self.folder))
        components = family.load(str(self.folder), index)
        family.configure(components, family_settings(*self.flags, *flags, **settings))
        return family, components

    def check_configure_refuses(self, refusals: dict[str, FamilySettings]) -> None:
        """Load the family unconfigured; ``configure`` with each of ``refusals``' settings raises
        a SnellaError whose message matches its key (a regex)."""
        from snella_diffusion import SnellaError

        family, index = detect_family(str(self.folder))
        components = family.load(str(self.folder), index)
        for message, settings in refusals.items():
            with pytest.raises(SnellaError, match=message):
                family.configure(components, settings)

    def check_saved_pipeline_samples_as_built(self, build: Callable[[int], Any], family_name: str,
                                              **sampling: Any) -> tuple[Any, Any]:
        """Load the folder with ``DiffusionPipeline.from_pretrained``; assert it is a
        :attr:`pipeline_class`, samples :data:`PROMPT` (seed 0; :data:`SAMPLING` updated by
        ``sampling``) within 1e-5 of ``build(0)``'s sample, and is detected as ``family_name``.
        Returns the loaded pipeline and its sample (the pipeline's ``images``, or ``frames``)."""
        from diffusers import DiffusionPipeline

        built, loaded = build(0), DiffusionPipeline.from_pretrained(self.folder)
        assert type(loaded) is self.pipeline_class
        sampling = {**SAMPLING, **sampling}
        samples = []
        for pipeline in (built, loaded):
            output = pipeline(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **sampling)
            samples.append(output.frames if hasattr(output, "frames") else output.images)
        assert abs(samples[0] - samples[1]).max() < 1e-5
        family, _ = detect_family(str(self.folder))
        assert family.name == family_name
        return loaded, samples[1]

    def check_validation_from_cached_embeddings(self, *flags: str, **sampling: Any) -> CachedValidation:
        """Sample the family's pipeline (loaded with ``flags``; seed 0; :data:`SAMPLING` updated
        by ``sampling``, e.g. the guidance) from ``validation_inputs`` with :data:`PROMPT`, free
        the text encoders with ``release_text_encoders`` and sample again from the cached inputs.
        Asserts every text encoder is gone, the cached inputs hold no prompt text and the two
        samples agree within 1e-4; returns the inputs and the sample for the family's own checks."""
        family, components = self.loaded(*flags)
        sampling = {**SAMPLING, **sampling}
        prompted_inputs = family.validation_inputs(components, PROMPT)
        with_prompt = family.pipeline(components)(**prompted_inputs, generator=torch.Generator().manual_seed(0),
                                                  **sampling).images
        family.release_text_encoders(components, PROMPT, CPU)
        assert all(components.modules[name] is None for name in family.text_encoder_components)
        cached_inputs = family.validation_inputs(components, PROMPT)
        assert "prompt" not in cached_inputs
        cached = family.pipeline(components)(**cached_inputs, generator=torch.Generator().manual_seed(0),
                                             **sampling).images
        assert abs(cached - with_prompt).max() < 1e-4
        return CachedValidation(prompted_inputs, cached_inputs, cached)

    def run_script(self, output_dir: Path, *flags: str, instance_dir: Optional[Path] = None) -> Path:
        """The DreamBooth script on this pipeline (``--output_dir output_dir``) and the images of
        ``instance_dir`` (default: two synthetic 48 px images written here); the adapter path."""
        from snella_diffusion.training.data import synthetic_instance_images, write_images
        from train_scripts.train_dreambooth_snella import main, parse_args

        if instance_dir is None:
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

    def check_sigmas_are_the_unshifted_training_table(self) -> None:
        """Training σ for u ∈ [0, 1) are the scheduler's table at ⌊u·1000⌋, unshifted (the
        published schedulers shift only at sampling): 1 - ⌊u·1000⌋/1000, within 1e-6."""
        family, components = self.loaded()
        u = torch.tensor([0.0, 0.1, 0.5, 0.93, 0.999])
        sigmas = family.objective(components).schedule.sigmas_for(u)
        assert torch.allclose(sigmas, components.noise_scheduler.sigmas[(u * 1000).long()], atol=1e-6)
        assert torch.allclose(sigmas, 1 - torch.floor(u * 1000) / 1000, atol=1e-6)

    def losses_on_a_fixed_batch(self, *flags: str, steps: int = 20, learning_rate: float = 1e-2,
                                pixels: Optional[torch.Tensor] = None, prompts: tuple[str, str] = (PROMPT, LONGER),
                                **settings: Any) -> list[float]:
        """SNELLA (dit preset, rank 4) trained on one fixed batch (``pixels`` of two samples,
        default two 32 px images drawn with seed 0, whose latents must have
        :attr:`latent_shape`; latents drawn with seed 1; ``prompts``; noise and timesteps seed 5
        at every step), the family loaded with ``flags`` and ``settings`` (:meth:`loaded`); the
        ``steps + 1`` losses, each asserted finite."""
        family, components = self.loaded(*flags, **settings)
        apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
        default_batch = pixels is None
        if default_batch:
            pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = family.encode_latents(components, pixels, torch.Generator().manual_seed(1))
        if default_batch:
            assert tuple(latents.shape) == (2, *self.latent_shape)
        with torch.no_grad():
            conditioning = family.encode_prompt(components, list(prompts), CPU)
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
        seen = record_script_run(monkeypatch)
        adapter = self.run_script(output_dir, "--validation_prompt", PROMPT, "--num_validation_images", "1",
                                  "--validation_inference_steps", "2")
        assert len(seen["losses"]) == SCRIPT_STEPS and all(torch.isfinite(torch.tensor(seen["losses"])))
        assert (output_dir / "validation" / f"step_{SCRIPT_STEPS}.png").is_file()

        self.check_adapter_reloads_and_unloads(adapter, seen["transformer"])
        return read_snella_file(adapter)

    def check_adapter_reloads_and_unloads(self, adapter: Path, trained: torch.nn.Module,
                                          output: Optional[Callable[[Any, Any, torch.nn.Module], torch.Tensor]] = None,
                                          ) -> None:
        """``trained`` (the script's denoiser, recorded by :func:`record_script_run`) against
        ``adapter`` loaded by ``load_snella_weights`` into a fresh pipeline: the same output bit
        for bit, away from the base's; after ``unload_snella_weights`` the base's bit for bit.
        ``output(family, components, denoiser)`` is what is compared (default
        :meth:`denoiser_output`)."""
        from snella_diffusion.loaders import load_snella_weights, unload_snella_weights

        output = output or self.denoiser_output
        family, components = self.loaded()
        trained_output = output(family, components, trained)
        pipeline = self.pipeline_class.from_pretrained(self.folder)
        base = output(family, components, pipeline.transformer)
        load_snella_weights(pipeline, adapter)
        reloaded = output(family, components, pipeline.transformer)
        assert (trained_output - base).abs().max() > 1e-4
        assert torch.equal(reloaded, trained_output)
        unload_snella_weights(pipeline)
        assert torch.equal(output(family, components, pipeline.transformer), base)

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

    def check_training_features(self, output_dir: Path, monkeypatch: pytest.MonkeyPatch, pixel_multiple: int,
                                *flags: str, prior: bool = True) -> None:
        """The script with every training-data feature at once, then resumed; asserts what each did.

        One run of :data:`FEATURE_STEPS` steps (batch 1, checkpoint after every step) on a wide
        and a tall image (:data:`FEATURE_IMAGES`, sidecar ``.txt`` captions) with, from a
        ``--config`` TOML file, ``--enable_bucket --bucket_reso_steps pixel_multiple``, EMA
        (decay :data:`EMA_DECAY`) and Prodigy (learning rate :data:`PRODIGY_LR`); with ``prior``,
        two class images and :data:`CLASS_PROMPT`; ``--cache_latents --cache_text_embeddings``.
        Asserts:

        - the family's ``pixel_multiple`` is ``pixel_multiple``, and a bucket step of half of it
          is refused; the images were encoded at the two kohya buckets (sides multiples of
          ``pixel_multiple``) nearest their 1:3 and 3:1 shapes, and the denoiser saw both;
        - every latent and prompt was encoded before the first denoiser call (both caches);
          the prompts encoded are the captions (and the class prompt);
        - every denoiser call held the instance and the class sample (prior) or one sample;
        - the EMA adapter against :func:`check_ema_of_checkpoints`' formula;
        - Prodigy ran: its state counts 4 steps and its step-size estimate d grew from
          d0 = 1e-6 past 1e-5;
        - ``config.toml`` records the file's settings;
        - a run resumed from ``checkpoint-2`` makes 2 denoiser calls and ends with the same
          EMA and raw adapters, bit for bit.
        """
        import shutil

        import train_scripts.train_dreambooth_snella as script
        from snella_diffusion.training.job_config import read_job_config

        family, _ = detect_family(str(self.folder))
        calls = FamilyCalls.recording(type(family), monkeypatch)
        instance_dir = write_feature_images(output_dir / "data")
        job = output_dir / "job.toml"
        job.write_text(f'[data]\ncaption_extension = ".txt"\nenable_bucket = true\n'
                       f'bucket_reso_steps = {pixel_multiple}\n'
                       f'[training]\noptimizer = "prodigy"\nuse_ema = true\nema_decay = {EMA_DECAY}\n')
        class_dir = write_class_images(output_dir / "class")
        class_flags = ("--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
                       "--num_class_images", "2") if prior else ()
        run_flags = ("--config", str(job), "--learning_rate", str(PRODIGY_LR), "--max_train_steps", str(FEATURE_STEPS),
                     "--checkpointing_steps", "1", "--cache_latents", "--cache_text_embeddings", *class_flags, *flags)
        straight_dir, resumed_dir = output_dir / "straight", output_dir / "resumed"
        straight = self.run_script(straight_dir, *run_flags, instance_dir=instance_dir)

        calls.check_cached_bucketed_run(family, pixel_multiple, prior)
        check_ema_of_checkpoints(straight, straight_dir / script.RAW_OUTPUT_FILE, EMA_DECAY)
        optimizer = torch.load(straight_dir / f"checkpoint-{FEATURE_STEPS}" / "optimizer.bin", weights_only=True)
        assert all(group["k"] == FEATURE_STEPS and group["d0"] == 1e-6 and group["d"] > 1e-5
                   for group in optimizer["param_groups"]), optimizer["param_groups"]
        saved = read_job_config(straight_dir / "config.toml")
        assert {key: saved[key] for key in read_job_config(job)} == read_job_config(job)

        calls.events.clear()
        shutil.copytree(straight_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
        self.run_script(resumed_dir, *run_flags, "--resume_from_checkpoint", "latest", instance_dir=instance_dir)
        assert sum(event[0] == "predict" for event in calls.events) == FEATURE_STEPS - 2
        for name in (straight.name, script.RAW_OUTPUT_FILE):
            assert_same_tensors(straight_dir / name, resumed_dir / name)


def _noise_image(size: tuple[int, int], seed: int) -> Any:
    """A PIL RGB image of ``size`` (width, height), uniform random pixels drawn with ``seed``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_feature_images(folder: Path) -> Path:
    """:data:`FEATURE_IMAGES` as ``<name>.png`` with ``<name>.txt`` captions in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, (size, caption)) in enumerate(FEATURE_IMAGES.items()):
        _noise_image(size, seed).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def write_class_images(folder: Path) -> Path:
    """Two 32 px class images in ``folder`` (enough for ``--num_class_images 2``: none generated)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(2):
        _noise_image((32, 32), 10 + seed).save(folder / f"class_{seed}.png")
    return folder


def ema_weights(decay: float, steps: int) -> list[float]:
    """w_k (k = 1..steps) with EMA_steps = Σ_k w_k·θ_k for diffusers' warm-up EMA: d_1 = 0,
    d_k = min(decay, k/(k+9)), w_k = (1 - d_k)·Π_{j>k} d_j. The weights sum to 1."""
    decays = [0.0] + [min(decay, k / (k + 9)) for k in range(2, steps + 1)]
    weights = []
    for k in range(steps):
        later = 1.0
        for d in decays[k + 1:]:
            later *= d
        weights.append((1 - decays[k]) * later)
    return weights


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


@dataclass
class FamilyCalls:
    """What a run asked of its family, in call order: ``("latents", pixel shape)`` per
    ``encode_latents``, ``("prompts", prompts)`` per ``encode_prompt``, ``("predict", latent
    shape)`` per ``predict``; ``components`` the run's TrainingComponents (from its first call)."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    components: Any = None

    @classmethod
    def recording(cls, family_class: type, monkeypatch: pytest.MonkeyPatch) -> "FamilyCalls":
        """Patch the three methods of ``family_class`` (undone by ``monkeypatch``) to record
        into a new instance."""
        calls = cls()
        for method, kind, shown in (("encode_latents", "latents", _shape), ("encode_prompt", "prompts", list),
                                    ("predict", "predict", _shape)):
            original = getattr(family_class, method)

            def recorded(family, components, value, *rest, original=original, kind=kind, shown=shown, **options):
                if calls.components is None:
                    calls.components = components
                calls.events.append((kind, shown(value)))
                return original(family, components, value, *rest, **options)

            monkeypatch.setattr(family_class, method, recorded)
        return calls

    def of(self, kind: str) -> list[Any]:
        """What the events of ``kind`` recorded, in order."""
        return [shown for event_kind, shown in self.events if event_kind == kind]

    def check_cached_bucketed_run(self, family: Any, pixel_multiple: int, prior: bool) -> None:
        """The buckets, caches, captions and prior of a :meth:`FamilyRun.check_training_features`
        run (its first part of the list of assertions)."""
        from snella_diffusion.training.buckets import kohya_buckets, nearest_bucket
        from snella_diffusion.training.data_arguments import BucketSettings, DataArgumentError, bucket_sizes

        assert family.pixel_multiple(self.components) == pixel_multiple
        half = pixel_multiple // 2
        refusal = f"--bucket_reso_steps={half}: must be a multiple of {pixel_multiple} for this model"
        with pytest.raises(DataArgumentError, match=refusal):
            bucket_sizes(BucketSettings(None, True, None, None, half), family, self.components, 32)
        buckets = kohya_buckets(32, max(pixel_multiple, 16), 64, pixel_multiple)
        wide = buckets[nearest_bucket((32, 96), buckets)]
        assert wide[1] >= 2 * wide[0] and wide[0] % pixel_multiple == 0 and wide[1] % pixel_multiple == 0
        assert {shape[-2:] for shape in self.of("latents")} == {wide, wide[::-1]}
        first_call = next(index for index, (kind, _) in enumerate(self.events) if kind == "predict")
        assert all(kind == "predict" for kind, _ in self.events[first_call:])
        shapes = self.of("predict")
        assert len(shapes) == FEATURE_STEPS and {shape[0] for shape in shapes} == {2 if prior else 1}
        assert len({shape[-2:] for shape in shapes}) == 2
        captions = {caption for _, caption in FEATURE_IMAGES.values()}
        assert {prompt for prompts in self.of("prompts") for prompt in prompts} == captions | (
            {CLASS_PROMPT} if prior else set())


def check_ema_of_checkpoints(adapter: Path, raw_adapter: Path, decay: float) -> None:
    """A ``--use_ema --checkpointing_steps 1`` run's ``adapter`` against its trajectory: every
    trained parameter (one whose value changes between the checkpoints' raw adapters θ_k) is
    the EMA Σ_k w_k·θ_k of :func:`ema_weights` within 1e-6, some differ from ``raw_adapter``,
    and ``raw_adapter`` holds the last checkpoint's values. Buffers (sparsity, threshold, drop
    count) follow the allocator's end of run and the weights they are saved with: not checked."""
    from safetensors.torch import load_file

    folders = sorted(adapter.parent.glob("checkpoint-*"), key=lambda folder: int(folder.name.split("-")[1]))
    trajectory = [load_file(folder / "snella_weights.safetensors") for folder in folders]
    averaged, raw = load_file(adapter), load_file(raw_adapter)
    assert averaged.keys() == raw.keys() == trajectory[-1].keys()
    weights = ema_weights(decay, len(trajectory))
    trained = [key for key in averaged if any(not torch.equal(state[key], trajectory[0][key]) for state in trajectory)]
    assert {key.rsplit(".", 1)[1] for key in trained} >= {"in_factors", "out_factors", "beta"}
    for key in trained:
        assert torch.equal(raw[key], trajectory[-1][key]), key
        expected = sum(weight * state[key].double() for weight, state in zip(weights, trajectory))
        assert torch.allclose(averaged[key].double(), expected, rtol=0, atol=1e-6), key
    assert any(not torch.equal(averaged[key], raw[key]) for key in trained)


def assert_same_tensors(first: Path, second: Path) -> None:
    """Two safetensors files hold the same keys and bit-identical tensors."""
    from safetensors.torch import load_file

    tensors = [load_file(first), load_file(second)]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key


# The published configs the family tests count: benchmarks/count_adapted_layers.py runs once for
# all of them (one process; a process per model cost ~8 s of imports each)
PUBLISHED_MODELS = ("chroma", "flux2-klein", "flux2", "hidream", "ideogram4", "krea2", "ltx2", "lumina2", "qwen-image",
                    "qwen-image-2.1", "sana", "z-image")
_published_rows: dict[str, dict[str, Any]] = {}


def published_count(model: str, output_dir: Path) -> dict[str, Any]:
    """``benchmarks/count_adapted_layers.py --model model`` run as a user runs it: its JSON row
    (``adapted_layers``, ``denoiser_parameters``, ...). The first call for a model of
    :data:`PUBLISHED_MODELS` counts all of them in one run (``--model`` repeated) and keeps the rows."""
    if model not in _published_rows:
        models = PUBLISHED_MODELS if model in PUBLISHED_MODELS else (model,)
        output = output_dir / "published-counts.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "count_adapted_layers.py"),
                        *(argument for name in models for argument in ("--model", name)), "--json", str(output)],
                       check=True, capture_output=True, cwd=REPO)
        rows = json.loads(output.read_text())
        assert [row["model"] for row in rows] == list(models)
        _published_rows.update({row["model"]: row for row in rows})
    return _published_rows[model]


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
EXPORT_SUFFIXES = {"diff": ".diff", "lora": ".lora_down.weight"}  # --to lora: or .lora_A.weight (lora_ab)


def random_dit_adapter(run: FamilyRun, output_dir: Path) -> tuple[Any, Any, Path]:
    """SNELLA on the ``dit`` preset of the family's loaded denoiser (rank 4, every trainable
    factor and scalar drawn N(0, 0.02²) with seed 0, so no layer's ΔW is zero), saved as
    ``output_dir/adapter.safetensors``; returns (family, components, the file)."""
    from snella_diffusion import save_snella

    family, components = run.loaded()
    layers = apply_snella(components.denoiser, SnellaConfig(rank=4, target_modules="dit"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.normal_(0, 0.02, generator=generator)
    adapter = save_snella({"transformer": components.denoiser}, output_dir / "adapter.safetensors")
    return family, components, adapter


def exported_key_prefixes(run: FamilyRun, to: str, output_dir: Path) -> set[str]:
    """``snella-export --to to`` of a SNELLA adapter on the ``dit`` preset (rank 4, factors drawn
    N(0, 0.02²) so no layer's ΔW is zero): the key prefixes the file names, one per exported
    weight (``--to diff`` / ``lora``: the keys without ``.diff`` / ``.lora_down.weight``;
    ``--to comfyui``: the layer prefixes its header lists)."""
    from safetensors import safe_open

    from snella_diffusion.export import export_snella

    _, _, adapter = random_dit_adapter(run, output_dir)
    output = output_dir / f"export-{to}.safetensors"
    export_snella([adapter], str(run.folder), output, to=to, **EXPORT_OPTIONS[to])
    with safe_open(str(output), "pt") as handle:
        keys, header = set(handle.keys()), handle.metadata()
    if to == "comfyui":
        return set(json.loads(header["snella_comfyui_layers"]))
    suffixes = (EXPORT_SUFFIXES[to], ".lora_A.weight") if to == "lora" else (EXPORT_SUFFIXES[to],)
    return {key.removesuffix(suffix) for key in keys for suffix in suffixes if key.endswith(suffix)}


def check_exported_lora_loads(run: FamilyRun, output_dir: Path, to: str = "lora") -> float:
    """``snella-export --to lora --energy 1`` (or ``--to peft``; full rank, float32) of a SNELLA adapter on the
    ``dit`` preset (rank 4, factors drawn N(0, 0.02²)) loaded by a fresh pipeline's own
    ``load_lora_weights``: its denoiser output equals the SNELLA adapter's (loaded by
    ``load_snella_weights``) within 1e-3 of the adapter's effect, which is asserted non-zero.
    Returns that relative error."""
    from snella_diffusion.export import export_snella
    from snella_diffusion.loaders import load_snella_weights

    family, components, adapter = random_dit_adapter(run, output_dir)
    exported = output_dir / f"exported-{to}.safetensors"
    export_snella([adapter], str(run.folder), exported, to=to, dtype="fp32", energy=1.0)
    base_pipeline = run.pipeline_class.from_pretrained(run.folder)
    base = run.denoiser_output(family, components, base_pipeline.transformer)
    load_snella_weights(base_pipeline, str(adapter))
    snella = run.denoiser_output(family, components, base_pipeline.transformer)
    lora_pipeline = run.pipeline_class.from_pretrained(run.folder)
    lora_pipeline.load_lora_weights(str(exported))
    lora = run.denoiser_output(family, components, lora_pipeline.transformer)
    effect = float((snella - base).norm())
    assert effect > 0
    error = float((lora - snella).norm()) / effect
    assert error < 1e-3, error
    return error

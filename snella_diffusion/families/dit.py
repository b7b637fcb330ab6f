"""What the transformer (DiT) families share: their flags (:class:`DiTFlags`), the options
resolved from them per family (:class:`DiTOptions`), ``--target_modules`` block filters
(``dit@double``), and the :class:`DiTFamily` / :class:`FlowMatchingFamily` bases of
``sd3.py``, ``flux.py`` and ``pixart.py``.

- SD3 and Flux train by flow matching (``training/flow_matching.py``: ``--weighting_scheme``,
  ``--logit_mean/--logit_std/--mode_scale``, ``--precondition_outputs`` for SD3); PixArt by
  the DDPM epsilon / v objective of its scheduler config.
- Prompts go through CLIP-L + CLIP-G + T5 (SD3), CLIP-L pooled + T5 (Flux) or T5 with an
  attention mask (PixArt), with ``--max_sequence_length`` T5 tokens.
- With ``--cache_text_embeddings`` (on unless the text encoders are trained) the encoders are
  freed once the prompts are encoded (kept in CPU memory with ``--offload_text_encoders``);
  validation then samples from cached prompt embeddings.
"""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import SnellaError
from ..inject import TARGET_PRESETS
from ..training.flag_settings import FlagSettings
from ..training.flow_matching import WEIGHTING_SCHEMES, FlowMatchingObjective, FlowMatchSchedule
from .base import FamilySettings, ModelFamily, TrainingComponents

OPTIONS_KEY = "dit_options"
VALIDATION_KEY = "validation_embeddings"
# --complex_human_instruction given alone: the Sana pipeline's own instruction.
PIPELINE_INSTRUCTION = "pipeline"
# The family flags only one family reads: {flag field: what the error names as its family}.
FAMILY_FLAGS = {"system_prompt": ("lumina2", "Lumina 2 (Lumina2Pipeline)"),
                "complex_human_instruction": ("sana", "Sana (SanaPipeline)")}
# Block-filter aliases: the double-stream (joint) blocks, Flux's single-stream blocks, Wan's blocks.
BLOCK_ALIASES = {
    "double": r"transformer_blocks",
    "joint": r"transformer_blocks",
    "single": r"single_transformer_blocks",
    "blocks": r"blocks",
}


def _block_indices(text: str, where: str) -> str:
    """"0-3,7" → a regex alternation of the indices 0, 1, 2, 3, 7."""
    indices: list[int] = []
    for part in text.split(","):
        bounds = part.split("-")
        if not all(b.strip().isdigit() for b in bounds) or len(bounds) > 2:
            raise SnellaError(f"--target_modules {where!r}: block indices must look like 0-3,7")
        low, high = int(bounds[0]), int(bounds[-1])
        indices.extend(range(low, high + 1))
    return "(?:" + "|".join(str(i) for i in sorted(set(indices))) + ")"


def block_filter_patterns(item: str) -> list[str]:
    """Expand ``<preset>@<blocks>`` into regexes matching the preset's layers inside those blocks.

    ``<blocks>`` is ``double`` (alias ``joint``: ``transformer_blocks.N``), ``single`` (Flux's
    ``single_transformer_blocks.N``), ``blocks`` (Wan's ``blocks.N``), either with indices
    (``double:0-9``, ``single:0,5``, ``blocks:0-19``), or
    a regex of the block path (``transformer_blocks\.1[0-8]``). Like diffusers'
    ``--lora_layers``/``--lora_blocks``: e.g. ``dit@double`` adapts only double-stream blocks.
    """
    preset, _, blocks = item.partition("@")
    if preset not in TARGET_PRESETS:
        raise SnellaError(f"--target_modules {item!r}: {preset!r} is not a preset ({', '.join(TARGET_PRESETS)})")
    name, _, indices = blocks.partition(":")
    if name in BLOCK_ALIASES:
        block = BLOCK_ALIASES[name] + r"\." + (_block_indices(indices, item) if indices else r"\d+")
    else:
        block = blocks
        try:
            re.compile(block)
        except re.error as error:
            raise SnellaError(f"--target_modules {item!r}: block filter is not a valid regex: {error}") from error
    # a lookahead pins the block prefix; the preset pattern still matches the whole name
    return [rf"(?=(?:{block})\.)(?:{pattern})" for pattern in TARGET_PRESETS[preset]]


def expand_block_filters(targets: list[str]) -> list[str]:
    """``--target_modules`` items with block filters (``preset@blocks``) expanded, each to one
    regex (the alternation of its preset's patterns, so that it counts as one entry when
    ``apply_snella`` checks that every entry matches a layer); other items unchanged."""
    expanded: list[str] = []
    for item in targets:
        if "@" in item:
            expanded.append("|".join(f"(?:{pattern})" for pattern in block_filter_patterns(item)))
        else:
            expanded.append(item)
    return expanded


@dataclass(frozen=True)
class DiTFlags(FlagSettings):
    """The flags of the transformer families (SD3, Flux, PixArt) as given; ignored by UNet
    families. None means "the family's default" (resolved into :class:`DiTOptions`)."""

    weighting_scheme: Optional[str] = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: int = 1
    guidance_scale: float = 3.5
    max_sequence_length: Optional[int] = None
    cache_text_embeddings: Optional[bool] = None
    offload_text_encoders: bool = False
    system_prompt: Optional[str] = None
    complex_human_instruction: Optional[str] = None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The flags of this group, one per field."""
        group = parser.add_argument_group("DiT models (SD3, Flux, PixArt)")
        group.add_argument("--weighting_scheme", type=str, default=None, choices=list(WEIGHTING_SCHEMES),
                           help="Flow matching (SD3, Flux): density of the training noise levels "
                                "(logit_normal, mode) or loss weighting (sigma_sqrt, cosmap); default "
                                "logit_normal for SD3, none for Flux.")
        group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
        group.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
        group.add_argument("--mode_scale", type=float, default=1.29, help="Scale s of the mode scheme.")
        group.add_argument("--precondition_outputs", type=int, default=1, choices=[0, 1],
                           help="SD3: regress x0 = x_σ - σ·v on the clean latents instead of v on ε - x0.")
        group.add_argument("--guidance_scale", type=float, default=3.5,
                           help="Flux.1-dev: the distilled guidance value fed to the transformer in "
                                "training and validation.")
        group.add_argument("--max_sequence_length", type=int, default=None,
                           help="T5 tokens per prompt (default: SD3 77, Flux 512, PixArt-α 120, PixArt-Σ 300).")
        group.add_argument("--cache_text_embeddings", action=argparse.BooleanOptionalAction, default=None,
                           help="Encode the instance/class/validation prompts once and free the text "
                                "encoders (default: on unless --train_text_encoder).")
        group.add_argument("--offload_text_encoders", action="store_true",
                           help="With cached embeddings, keep the text encoders in CPU memory instead of "
                                "freeing them.")
        group.add_argument("--system_prompt", type=str, default=None,
                           help="Lumina 2: the system prompt put before every prompt (\"<system prompt> <Prompt "
                                "Start> <prompt>\") in training and validation (default: Lumina2Pipeline's).")
        group.add_argument("--complex_human_instruction", type=str, nargs="?", const=PIPELINE_INSTRUCTION,
                           default=None, metavar="TEXT",
                           help="Sana: a complex human instruction put before every prompt in training and "
                                f"validation; the flag alone (or '{PIPELINE_INSTRUCTION}') takes SanaPipeline's own. "
                                "Default: none, as diffusers' Sana DreamBooth example.")


def add_dit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`DiTFlags` flags to ``parser``."""
    DiTFlags.add_arguments(parser)


@dataclass(frozen=True)
class DiTOptions:
    """The resolved DiT options of one run (family defaults filled in; stored in
    ``TrainingComponents.extra``)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float = 3.5
    max_sequence_length: int = 77
    cache_text_embeddings: bool = True
    offload_text_encoders: bool = False


class DiTFamily(ModelFamily):
    """Shared behaviour of the transformer families."""

    denoiser_component = "transformer"
    denoiser_preset = "dit"
    default_weighting_scheme = "none"
    # The pipeline's default sample size in latent pixels when the transformer config has none.
    default_sample_size = 128
    # Double-stream (joint) blocks, then Flux's single-stream ones: SD3, Flux, Flux.2, PixArt, Qwen-Image.
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def options(self, components: TrainingComponents) -> DiTOptions:
        return components.extra.get(OPTIONS_KEY) or DiTOptions(
            weighting_scheme=self.default_weighting_scheme,
            max_sequence_length=self.default_sequence_length(components),
        )

    def default_sequence_length(self, components: TrainingComponents) -> int:
        """T5 tokens per prompt when ``--max_sequence_length`` is not given."""
        return 77

    def configure(self, components: TrainingComponents, settings: FamilySettings) -> None:
        """Resolve ``settings.dit`` against this family's defaults into ``components.extra``;
        reject combinations that cannot work."""
        flags, train_text = settings.dit, settings.train_text_encoder
        for field, (family, model) in FAMILY_FLAGS.items():
            if getattr(flags, field) is not None and self.name != family:
                raise SnellaError(f"--{field}: applies to {model}; the {self.name} family does not read it")
        cache = flags.cache_text_embeddings
        if cache and train_text:
            raise SnellaError("--cache_text_embeddings cannot be combined with --train_text_encoder "
                              "(trained encoders change the embeddings every step)")
        if flags.offload_text_encoders and (train_text or cache is False):
            raise SnellaError("--offload_text_encoders works on cached text embeddings: drop it, or drop "
                              "--train_text_encoder / --no-cache_text_embeddings")
        length = flags.max_sequence_length
        if length is None:
            length = self.default_sequence_length(components)
        if length < 1:
            raise SnellaError(f"--max_sequence_length={length}: must be at least 1")
        if flags.logit_std <= 0:
            raise SnellaError(f"--logit_std={flags.logit_std}: must be positive")
        components.extra[OPTIONS_KEY] = DiTOptions(
            weighting_scheme=flags.weighting_scheme or self.default_weighting_scheme,
            logit_mean=flags.logit_mean,
            logit_std=flags.logit_std,
            mode_scale=flags.mode_scale,
            precondition_outputs=bool(flags.precondition_outputs),
            guidance_scale=flags.guidance_scale,
            max_sequence_length=length,
            cache_text_embeddings=(not train_text) if cache is None else bool(cache),
            offload_text_encoders=flags.offload_text_encoders,
        )

    def check_resolution(self, components: TrainingComponents, settings: FamilySettings, model: str,
                         factors: str) -> None:
        """Refuse a ``--resolution`` that is not a multiple of ``pixel_multiple`` (``model`` names
        the family in the message, ``factors`` what the multiple is made of)."""
        multiple = self.pixel_multiple(components)
        if settings.resolution is not None and settings.resolution % multiple:
            raise SnellaError(f"--resolution={settings.resolution}: {model} needs a multiple of {multiple} ({factors})")

    @staticmethod
    def refuse_text_encoder_training(settings: FamilySettings, model: str, reason: str) -> None:
        """Refuse ``--train_text_encoder`` for a family whose example trains the transformer only."""
        if settings.train_text_encoder:
            raise SnellaError(f"--train_text_encoder: {model} trains the transformer only ({reason})")

    def native_resolution(self, components: TrainingComponents) -> int:
        sample_size = getattr(components.denoiser.config, "sample_size", None) or self.default_sample_size
        return int(sample_size) * self.vae_scale_factor(components)

    def negative_prompt_inputs(self, components: TrainingComponents, device: torch.device) -> dict[str, Tensor]:
        """Pipeline keyword arguments of the empty negative prompt (none for guidance-distilled models)."""
        return {}

    def release_text_encoders(
        self, components: TrainingComponents, validation_prompt: Optional[str], device: torch.device
    ) -> None:
        """After the training prompts are cached: encode the validation prompt (and the empty
        negative prompt) too, then free the text encoders, or move them to CPU memory with
        ``--offload_text_encoders``. No-op when caching is off."""
        options = self.options(components)
        if not options.cache_text_embeddings:
            return
        if validation_prompt is not None:
            with torch.no_grad():
                # encode_prompt's keys are the pipelines' keyword names (prompt_embeds, ...)
                inputs = dict(self.encode_prompt(components, [validation_prompt], device))
                inputs.update(self.negative_prompt_inputs(components, device))
            components.extra[VALIDATION_KEY] = (validation_prompt, inputs)
        for name in components.text_encoder_components:
            if options.offload_text_encoders:
                components.modules[name].to("cpu")
            else:
                components.modules[name] = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def validation_inputs(self, components: TrainingComponents, prompt: str) -> dict[str, Any]:
        """Keyword arguments for the pipeline call of a validation sample: the cached
        embeddings when the encoders were released, else the prompt itself."""
        cached = components.extra.get(VALIDATION_KEY)
        if cached is not None and cached[0] == prompt:
            return dict(cached[1])
        if any(components.modules.get(name) is None for name in components.text_encoder_components):
            raise SnellaError(f"validation prompt {prompt!r} was not cached before the text encoders were freed")
        return {"prompt": prompt, "max_sequence_length": self.options(components).max_sequence_length}

    def pipeline(self, components: TrainingComponents, modules: Optional[dict[str, Any]] = None) -> Any:
        """The family's pipeline; released text encoders are passed as None (the pipeline then
        needs cached embeddings, see ``validation_inputs``); offloaded ones stay on CPU and
        are not used."""
        import diffusers

        cls = getattr(diffusers, components.pipeline_class_name)
        parts = dict(components.modules)
        parts.update(modules or {})
        if components.extra.get(VALIDATION_KEY) is not None:
            for name in components.text_encoder_components:
                parts[name] = None
        parts.update(self.pipeline_config(components))
        # components stored as null in model_index.json (e.g. SD3 without T5) are passed as None
        for name in inspect.signature(cls.__init__).parameters:
            if name not in ("self", "args", "kwargs") and name not in parts:
                parts[name] = None
        return cls(**parts, **self.pipeline_kwargs)

    def pipeline_config(self, components: TrainingComponents) -> dict[str, Any]:
        """Pipeline constructor settings stored in ``model_index.json`` besides the components
        (none by default; Krea 2 keeps its tapped encoder layers there)."""
        return {}


class FlowMatchingFamily(DiTFamily):
    """SD3 and Flux: rectified flow on a FlowMatchEulerDiscreteScheduler."""

    def objective(self, components: TrainingComponents, snr_gamma: Optional[float] = None) -> FlowMatchingObjective:
        if snr_gamma is not None:
            raise SnellaError("--snr_gamma applies to DDPM models; flow-matching models use --weighting_scheme")
        options = self.options(components)
        return FlowMatchingObjective(
            FlowMatchSchedule.from_scheduler_config(components.noise_scheduler.config),
            weighting_scheme=options.weighting_scheme, logit_mean=options.logit_mean,
            logit_std=options.logit_std, mode_scale=options.mode_scale,
            precondition=self.uses_preconditioning(components),
        )

    def uses_preconditioning(self, components: TrainingComponents) -> bool:
        return False

    def sigmas_of(self, components: TrainingComponents, timesteps: Tensor) -> Tensor:
        return timesteps.float() / int(components.noise_scheduler.config.num_train_timesteps)

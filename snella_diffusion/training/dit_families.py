"""Transformer (DiT) model families for DreamBooth: SD3/SD3.5, Flux.1 and PixArt-α/Σ.

Registered into ``families.py`` at import (it is one of ``FAMILY_PLUGINS``). What differs from
the UNet families:

- SD3 and Flux train by flow matching (``flow_matching.py``: ``--weighting_scheme``,
  ``--logit_mean/--logit_std/--mode_scale``, ``--precondition_outputs`` for SD3); PixArt by
  the DDPM epsilon / v objective of its scheduler config.
- Prompts go through CLIP-L + CLIP-G + T5 (SD3), CLIP-L pooled + T5 (Flux) or T5 with an
  attention mask (PixArt), with ``--max_sequence_length`` T5 tokens.
- Flux packs latents into 2×2 patches, passes position ids and (Flux.1-dev) the distilled
  guidance scale ``--guidance_scale``.
- With ``--cache_text_embeddings`` (on unless the text encoders are trained) the encoders are
  freed once the prompts are encoded (kept in CPU memory with ``--offload_text_encoders``);
  validation then samples from cached prompt embeddings.

Flags are added by :func:`add_dit_arguments` (registered with ``register_arguments``, so the
training script's ``add_family_arguments`` adds them); a family reads them in ``configure``,
which also expands ``--target_modules`` block filters such as ``dit@double``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..inject import TARGET_PRESETS
from .families import ModelFamily, TrainingComponents, register_arguments, register_family
from .flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingObjective,
    FlowMatchSchedule,
    guidance_vector,
    latent_image_ids,
    pack_latents,
    precondition_outputs,
    text_ids,
    unpack_latents,
)
from .objectives import NoiseObjective

OPTIONS_KEY = "dit_options"
VALIDATION_KEY = "validation_embeddings"
# Block-filter aliases: the double-stream (joint) blocks and Flux's single-stream blocks.
BLOCK_ALIASES = {
    "double": r"transformer_blocks",
    "joint": r"transformer_blocks",
    "single": r"single_transformer_blocks",
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
    ``single_transformer_blocks.N``), either with indices (``double:0-9``, ``single:0,5``), or
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


def add_dit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the transformer families (SD3, Flux, PixArt); ignored by UNet families."""
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


@dataclass
class DiTOptions:
    """The DiT flags of one run (stored in ``TrainingComponents.extra``)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float = 3.5
    max_sequence_length: int = 77
    cache_text_embeddings: bool = True
    offload_text_encoders: bool = False


def _tokens(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask ``(B, max_length)``, padded to ``max_length``."""
    encoded = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    return encoded.input_ids.to(device), encoded.attention_mask.to(device)


def _clip_max_length(tokenizer: Any) -> int:
    return min(int(tokenizer.model_max_length), 77)


class DiTFamily(ModelFamily):
    """Shared behaviour of the transformer families."""

    denoiser_component = "transformer"
    denoiser_preset = "dit"
    default_weighting_scheme = "none"
    # The pipeline's default sample size in latent pixels when the transformer config has none.
    default_sample_size = 128

    def options(self, components: TrainingComponents) -> DiTOptions:
        return components.extra.get(OPTIONS_KEY) or DiTOptions(
            weighting_scheme=self.default_weighting_scheme,
            max_sequence_length=self.default_sequence_length(components),
        )

    def default_sequence_length(self, components: TrainingComponents) -> int:
        """T5 tokens per prompt when ``--max_sequence_length`` is not given."""
        return 77

    def configure(self, components: TrainingComponents, args: argparse.Namespace) -> None:
        """Read the DiT flags into ``components.extra``; reject combinations that cannot work.
        Block filters in ``args.target_modules`` (``dit@double``) are expanded in place."""
        if getattr(args, "target_modules", None):
            args.target_modules = expand_block_filters(list(args.target_modules))
        train_text = bool(getattr(args, "train_text_encoder", False))
        cache = getattr(args, "cache_text_embeddings", None)
        if cache and train_text:
            raise SnellaError("--cache_text_embeddings cannot be combined with --train_text_encoder "
                              "(trained encoders change the embeddings every step)")
        if getattr(args, "offload_text_encoders", False) and (train_text or cache is False):
            raise SnellaError("--offload_text_encoders works on cached text embeddings: drop it, or drop "
                              "--train_text_encoder / --no-cache_text_embeddings")
        length = getattr(args, "max_sequence_length", None)
        if length is None:
            length = self.default_sequence_length(components)
        if length < 1:
            raise SnellaError(f"--max_sequence_length={length}: must be at least 1")
        if getattr(args, "logit_std", 1.0) <= 0:
            raise SnellaError(f"--logit_std={args.logit_std}: must be positive")
        components.extra[OPTIONS_KEY] = DiTOptions(
            weighting_scheme=getattr(args, "weighting_scheme", None) or self.default_weighting_scheme,
            logit_mean=getattr(args, "logit_mean", 0.0),
            logit_std=getattr(args, "logit_std", 1.0),
            mode_scale=getattr(args, "mode_scale", 1.29),
            precondition_outputs=bool(getattr(args, "precondition_outputs", 0)),
            guidance_scale=getattr(args, "guidance_scale", 3.5),
            max_sequence_length=length,
            cache_text_embeddings=(not train_text) if cache is None else bool(cache),
            offload_text_encoders=bool(getattr(args, "offload_text_encoders", False)),
        )

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
        # components stored as null in model_index.json (e.g. SD3 without T5) are passed as None
        for name in inspect.signature(cls.__init__).parameters:
            if name not in ("self", "args", "kwargs") and name not in parts:
                parts[name] = None
        return cls(**parts, **self.pipeline_kwargs)


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


class SD3Family(FlowMatchingFamily):
    """Stable Diffusion 3 / 3.5: MMDiT, CLIP-L + CLIP-G (+ optional T5-XXL), flow matching."""

    name = "stable-diffusion-3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_weighting_scheme = "logit_normal"

    def load(self, source, model_index, revision=None, variant=None, dtype=None) -> TrainingComponents:
        """As the base loader; ``text_encoder_3`` (T5) may be absent (null in model_index.json)."""
        family = self
        spec = model_index.get("text_encoder_3")
        if not (isinstance(spec, (list, tuple)) and spec and spec[0] is not None):
            family = copy.copy(self)
            family.text_encoder_components = ("text_encoder", "text_encoder_2")
        return ModelFamily.load(family, source, model_index, revision, variant, dtype)

    def uses_preconditioning(self, components):
        return self.options(components).precondition_outputs

    def encode_prompt(self, components, prompts, device):
        modules = components.modules
        clip_states, pooled = [], []
        for encoder_name, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            tokenizer = modules[tokenizer_name]
            ids, _ = _tokens(tokenizer, prompts, _clip_max_length(tokenizer), device)
            output = modules[encoder_name](ids, output_hidden_states=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output[0])
        clip_embeds = torch.cat(clip_states, dim=-1)
        joint_dim = int(components.denoiser.config.joint_attention_dim)
        length = self.options(components).max_sequence_length
        if "text_encoder_3" in components.text_encoder_components:
            ids, _ = _tokens(modules["tokenizer_3"], prompts, length, device)
            t5_embeds = modules["text_encoder_3"](ids)[0]
        else:
            t5_embeds = clip_embeds.new_zeros(len(prompts), length, joint_dim)
        clip_embeds = nn.functional.pad(clip_embeds, (0, joint_dim - clip_embeds.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_embeds, t5_embeds.to(clip_embeds.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        }

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        output = transformer(
            hidden_states=noisy_latents, timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"], return_dict=False,
        )[0]
        if self.uses_preconditioning(components):
            return precondition_outputs(output, noisy_latents, self.sigmas_of(components, timesteps))
        return output


class FluxFamily(FlowMatchingFamily):
    """Flux.1 (dev, schnell): double- and single-stream blocks, CLIP-L pooled + T5-XXL,
    packed 2×2 latents with position ids, distilled guidance embedding (dev)."""

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    default_weighting_scheme = "none"

    def default_sequence_length(self, components):
        """512 for Flux.1-dev, 256 for the guidance-free Flux.1-schnell."""
        return 512 if components.denoiser.config.guidance_embeds else 256

    def configure(self, components, args):
        super().configure(components, args)
        latent_factor = 2 * self.vae_scale_factor(components)
        resolution = getattr(args, "resolution", None)
        if resolution is not None and resolution % latent_factor:
            raise SnellaError(f"--resolution={resolution}: Flux needs a multiple of {latent_factor} "
                              "(VAE downsampling × 2×2 latent packing)")

    def encode_prompt(self, components, prompts, device):
        modules = components.modules
        tokenizer = modules["tokenizer"]
        ids, _ = _tokens(tokenizer, prompts, _clip_max_length(tokenizer), device)
        pooled = modules["text_encoder"](ids, output_hidden_states=False).pooler_output
        ids, _ = _tokens(modules["tokenizer_2"], prompts, self.options(components).max_sequence_length, device)
        return {"prompt_embeds": modules["text_encoder_2"](ids)[0], "pooled_prompt_embeds": pooled}

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        batch_size, _, height, width = noisy_latents.shape
        prompt_embeds = conditioning["prompt_embeds"]
        device, dtype = noisy_latents.device, noisy_latents.dtype
        guidance_enabled = bool(components.denoiser.config.guidance_embeds)
        guidance = guidance_vector(self.options(components).guidance_scale, batch_size, guidance_enabled, device)
        output = transformer(
            hidden_states=pack_latents(noisy_latents),
            # the transformer multiplies timestep (and guidance) by 1000 itself
            timestep=(self.sigmas_of(components, timesteps)).to(dtype),
            guidance=None if guidance is None else guidance.to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids(prompt_embeds.shape[1], device, dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        inputs["guidance_scale"] = self.options(components).guidance_scale
        return inputs


class PixArtFamily(DiTFamily):
    """PixArt-α / PixArt-Σ: DiT with cross-attention to T5 (masked), DDPM epsilon or v
    objective; learned-variance channels of the output are dropped."""

    name = "pixart"
    pipeline_class_names = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    text_encoder_components = ("text_encoder",)

    def default_sequence_length(self, components):
        return 300 if components.pipeline_class_name == "PixArtSigmaPipeline" else 120

    def configure(self, components, args):
        if getattr(args, "weighting_scheme", None) is not None:
            raise SnellaError("--weighting_scheme applies to flow-matching models (SD3, Flux); PixArt "
                              "trains with the DDPM objective of its scheduler (see --snr_gamma)")
        super().configure(components, args)

    def objective(self, components, snr_gamma=None):
        """DDPM on the pipeline scheduler's betas and prediction type (the pipeline ships a
        DPM-Solver for sampling; its ``add_noise`` indexes sigmas, not training timesteps)."""
        from diffusers import DDPMScheduler

        return NoiseObjective(DDPMScheduler.from_config(components.noise_scheduler.config), snr_gamma=snr_gamma)

    def encode_prompt(self, components, prompts, device):
        ids, mask = _tokens(components.modules["tokenizer"], prompts, self.options(components).max_sequence_length, device)
        embeds = components.modules["text_encoder"](ids, attention_mask=mask)[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def negative_prompt_inputs(self, components, device):
        negative = self.encode_prompt(components, [""], device)
        return {
            "negative_prompt": None,  # the pipeline's default "" would clash with the embeddings
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_prompt_attention_mask": negative["prompt_attention_mask"],
        }

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        transformer = denoiser or components.denoiser
        added: dict[str, Optional[Tensor]] = {"resolution": None, "aspect_ratio": None}
        if components.denoiser.use_additional_conditions:
            count, _, height, width = noisy_latents.shape
            factor = self.vae_scale_factor(components)
            size = torch.tensor([height * factor, width * factor], dtype=noisy_latents.dtype, device=noisy_latents.device)
            added = {"resolution": size.repeat(count, 1), "aspect_ratio": (size[0] / size[1]).repeat(count, 1)}
        output = transformer(
            noisy_latents, encoder_hidden_states=conditioning["prompt_embeds"], timestep=timesteps,
            added_cond_kwargs=added, encoder_attention_mask=conditioning["prompt_attention_mask"],
            return_dict=False,
        )[0]
        channels = noisy_latents.shape[1]
        if output.shape[1] == 2 * channels:
            output = output[:, :channels]
        return output

    def validation_inputs(self, components, prompt):
        inputs = super().validation_inputs(components, prompt)
        inputs["use_resolution_binning"] = False
        return inputs


register_arguments(add_dit_arguments)
register_family(SD3Family())
register_family(FluxFamily())
register_family(PixArtFamily())

"""Wan text-to-video (``WanPipeline``): Wan 2.1 (1.3B, 14B), Wan 2.2 TI2V-5B (its text-to-video
use) and Wan 2.2 A14B (two transformers), trained on clips and images (``training/video_dataset.py``).

- Prompts: the pipeline's text cleaning, the UMT5 tokenizer padded to ``--max_sequence_length``
  tokens (default 512, the pipeline's), the encoder's last hidden state with every position past
  the prompt's tokens set to zero (the pipeline trims and zero-pads the same way). The UMT5
  encoder stays frozen.
- Latents: ``(B, 3, F, H, W)`` pixels in [-1, 1] → the Wan VAE's distribution mode, normalised
  per channel as ``(z - latents_mean) / latents_std`` (the pipeline decodes ``z·std + mean``);
  ``(B, C, (F-1)/f + 1, H/s, W/s)`` for the VAE's temporal factor f and spatial factor s.
- Model call: ``transformer(hidden_states, timestep=σ·1000, encoder_hidden_states)``, the
  velocity ε - x0 (the pipeline's UniPC scheduler runs with ``prediction_type="flow_prediction"``).
  TI2V-5B's pipeline (``expand_timesteps``) gives the timestep per latent token: the same value
  repeated over the ``F'·(H'/2)·(W'/2)`` tokens here.
- σ: ``--weighting_scheme`` (default none: uniform over the training table) shifted by the
  scheduler's ``flow_shift`` (``shift`` for a FlowMatchEulerDiscreteScheduler): the shift the
  model ships with (the Wan authors sample at 3.0 for 480p, 5.0 for 720p).
- Wan 2.2 A14B: ``transformer`` is the high-noise expert (timesteps ≥ ``boundary_ratio`` ×
  ``num_train_timesteps``, 875 for the T2V release), ``transformer_2`` the low-noise one.
  ``--wan_expert=high`` trains ``transformer`` on timesteps drawn at or above the boundary only;
  ``low`` trains ``transformer_2`` below it; ``both`` (the default) draws from the whole table
  and sends each sample to the expert of its timestep, both adapted into one file.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import SnellaError
from ..training.flow_matching import FlowMatchingObjective, FlowMatchSchedule, sample_density
from .base import TRAINED_MODULES_KEY, TrainingComponents
from .dit import FlowMatchingFamily

EXPERT_KEY = "wan_expert"
PIPELINE_CONFIG_KEY = "wan_pipeline_config"
HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"


class ExpertFlowMatchingObjective(FlowMatchingObjective):
    """Flow matching with σ drawn only from the training-table entries whose timestep σ·N lies
    in ``[low, high)``: u from ``--weighting_scheme`` picks an entry among those, in table order.

    Args:
        timestep_range: ``(low, high)`` model timesteps (0 to ``inf``).
    """

    def __init__(self, schedule: FlowMatchSchedule, timestep_range: tuple[float, float], **options: Any) -> None:
        super().__init__(schedule, **options)
        table = schedule.sigma_table()
        timesteps = table * schedule.num_train_timesteps
        low, high = timestep_range
        self.allowed = torch.nonzero((timesteps >= low) & (timesteps < high)).flatten()
        if len(self.allowed) == 0:
            raise SnellaError(f"no training timestep lies in [{low}, {high})")
        self.table = table

    def draw_sigmas(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        u = sample_density(self.weighting_scheme, batch_size, self.logit_mean, self.logit_std, self.mode_scale,
                           generator=generator)
        picks = self.allowed[(u * len(self.allowed)).long().clamp(0, len(self.allowed) - 1)]
        sigmas = self.table[picks]
        return sigmas, sigmas * self.schedule.num_train_timesteps


class WanFamily(FlowMatchingFamily):
    """Wan: DiT of ``blocks.N`` (self-attention ``attn1``, text cross-attention ``attn2``, GELU
    ``ffn``), UMT5 text encoder, causal 3D VAE."""

    name = "wan"
    pipeline_class_names = ("WanPipeline",)
    text_encoder_components = ("text_encoder",)
    default_weighting_scheme = "none"
    is_video = True
    native_side = 480
    block_lists = ("blocks",)

    def load(self, source, model_index, revision=None, variant=None, dtype=None, denoiser_file=None):
        """The components, and the pipeline's ``boundary_ratio`` and ``expand_timesteps`` from
        ``model_index.json``."""
        components = super().load(source, model_index, revision, variant, dtype, denoiser_file=denoiser_file)
        components.extra[PIPELINE_CONFIG_KEY] = {
            "boundary_ratio": model_index.get("boundary_ratio"),
            "expand_timesteps": bool(model_index.get("expand_timesteps") or False),
        }
        return components

    def default_sequence_length(self, components):
        return 512

    def pipeline_config(self, components: TrainingComponents) -> dict[str, Any]:
        return components.extra.get(PIPELINE_CONFIG_KEY, {"boundary_ratio": None, "expand_timesteps": False})

    def has_two_experts(self, components: TrainingComponents) -> bool:
        """Wan 2.2 A14B: a ``transformer_2`` and a ``boundary_ratio``."""
        return components.modules.get(LOW_NOISE) is not None and self.pipeline_config(components)["boundary_ratio"] is not None

    def boundary_timestep(self, components: TrainingComponents) -> float:
        """``boundary_ratio × num_train_timesteps`` (875.0 for Wan 2.2 A14B T2V)."""
        ratio = self.pipeline_config(components)["boundary_ratio"]
        return float(ratio) * int(components.noise_scheduler.config.num_train_timesteps)

    def expert(self, components: TrainingComponents) -> Optional[str]:
        """The resolved ``--wan_expert`` ("high", "low", "both"), None for one transformer."""
        return components.extra.get(EXPERT_KEY)

    def configure(self, components, settings):
        self.refuse_text_encoder_training(settings, "Wan", "its UMT5 encoder stays frozen, as in the Wan trainers")
        super().configure(components, settings)
        self.check_resolution(components, settings, "Wan", "VAE downsampling × the transformer's 2×2 patches")
        two = self.has_two_experts(components)
        if settings.wan_expert and not two:
            raise SnellaError(f"--wan_expert={settings.wan_expert}: {components.source} has one transformer; the flag "
                              "applies to Wan 2.2 A14B, whose pipeline holds transformer_2 and a boundary_ratio")
        expert = settings.wan_expert or ("both" if two else None)
        components.extra[EXPERT_KEY] = expert
        if expert == "low":
            components.denoiser_component = LOW_NOISE

    def extra_denoisers(self, components: TrainingComponents) -> dict[str, nn.Module]:
        """``{"transformer_2": ...}`` when both A14B experts are trained, else nothing."""
        return {LOW_NOISE: components.modules[LOW_NOISE]} if self.expert(components) == "both" else {}

    def vae_scale_factor(self, components: TrainingComponents) -> int:
        return int(components.vae.config.scale_factor_spatial)

    def temporal_factor(self, components: TrainingComponents) -> int:
        """Frames per latent frame after the first (4 for every Wan VAE)."""
        return int(components.vae.config.scale_factor_temporal)

    def default_num_frames(self, components: TrainingComponents) -> int:
        """81 (Wan 2.1, A14B: 5 s at 16 fps), 121 for TI2V-5B (5 s at 24 fps)."""
        return 121 if self.pipeline_config(components)["expand_timesteps"] else 81

    def pixel_multiple(self, components: TrainingComponents) -> int:
        """VAE factor × the transformer's spatial patch (16 for Wan 2.1/A14B, 32 for TI2V-5B)."""
        return self.vae_scale_factor(components) * int(components.denoiser.config.patch_size[1])

    def native_resolution(self, components: TrainingComponents) -> int:
        """480: the shorter side of the 480p releases (the pipeline's default height)."""
        return self.native_side

    @torch.no_grad()
    def encode_latents(self, components, pixels, generator=None):
        """Pixels ``(B, 3, F, H, W)`` (or ``(B, 3, H, W)``, one frame) in [-1, 1] →
        ``(mode - latents_mean) / latents_std`` ``(B, C, F', H/s, W/s)``; deterministic."""
        vae = components.vae
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        channels = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(channels)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(channels)
        return (latents - mean) / std

    def encode_prompt(self, components, prompts, device):
        """``prompt_embeds`` ``(B, L, D)``, L = ``--max_sequence_length``, zero past each prompt's tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokenizer, encoder = components.modules["tokenizer"], components.modules["text_encoder"]
        tokens = tokenizer([prompt_clean(prompt) for prompt in prompts], padding="max_length",
                           max_length=self.options(components).max_sequence_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return {"prompt_embeds": hidden * mask[..., None].to(hidden.dtype)}

    def negative_prompt_inputs(self, components, device):
        return {"negative_prompt_embeds": self.encode_prompt(components, [""], device)["prompt_embeds"]}

    def objective(self, components, snr_gamma=None):
        """Flow matching shifted by the scheduler's ``flow_shift``; restricted to the expert's side
        of the boundary with ``--wan_expert`` high or low."""
        if snr_gamma is not None:
            raise SnellaError("--snr_gamma applies to DDPM models; flow-matching models use --weighting_scheme")
        config = components.noise_scheduler.config
        shift = config.get("flow_shift") or config.get("shift") or 1.0
        schedule = FlowMatchSchedule(int(config.get("num_train_timesteps", 1000)), float(shift))
        options = self.options(components)
        settings = dict(weighting_scheme=options.weighting_scheme, logit_mean=options.logit_mean,
                        logit_std=options.logit_std, mode_scale=options.mode_scale)
        expert = self.expert(components)
        if expert in ("high", "low"):
            boundary = self.boundary_timestep(components)
            span = (boundary, float("inf")) if expert == "high" else (0.0, boundary)
            return ExpertFlowMatchingObjective(schedule, span, **settings)
        return FlowMatchingObjective(schedule, **settings)

    def call_transformer(self, components: TrainingComponents, transformer: nn.Module, latents: Tensor,
                         timesteps: Tensor, prompt_embeds: Tensor) -> Tensor:
        """One transformer call as the pipeline makes it: ``(B, C, F', h, w)`` → the velocity, same shape."""
        timestep = timesteps.float()
        if self.pipeline_config(components)["expand_timesteps"]:
            patch = transformer.config.patch_size
            frames, height, width = latents.shape[2:]
            tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
            timestep = timestep[:, None].expand(-1, tokens)
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
                           return_dict=False)[0]

    def predict(self, components, noisy_latents, timesteps, conditioning, batch, denoiser=None):
        """The velocity of each sample from the trained transformer, or with both A14B experts
        trained, from the expert of its timestep (``transformer`` at or above the boundary)."""
        embeds = conditioning["prompt_embeds"].to(noisy_latents.dtype)
        if self.expert(components) != "both":
            return self.call_transformer(components, denoiser or components.denoiser, noisy_latents, timesteps, embeds)
        modules = components.extra.get(TRAINED_MODULES_KEY) or components.modules
        high = timesteps >= self.boundary_timestep(components)
        output = torch.zeros_like(noisy_latents)
        for chosen, transformer in ((high, denoiser or modules[HIGH_NOISE]), (~high, modules[LOW_NOISE])):
            rows = chosen.nonzero().flatten()
            if len(rows):
                velocity = self.call_transformer(components, transformer, noisy_latents[rows], timesteps[rows], embeds[rows])
                output = output.index_put((rows,), velocity.to(output.dtype))
        return output

    def pipeline(self, components, modules=None):
        """WanPipeline with the loaded ``boundary_ratio`` and ``expand_timesteps``."""
        pipe = super().pipeline(components, modules)
        pipe.register_to_config(**self.pipeline_config(components))
        return pipe

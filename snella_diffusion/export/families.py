"""Per-family key names: which exported weight a diffusers layer lands in, as ComfyUI, Forge,
AUTOMATIC1111 and diffusers map them (ComfyUI ``comfy/lora.py`` / ``comfy/utils.py``, diffusers
``loaders/lora_conversion_utils.py``; the README section "Use in ComfyUI / Forge /
AUTOMATIC1111" lists them).

An :class:`ExportTarget` is one weight of the exported file: its key (without the
``.diff`` / ``.lora_down.weight`` suffix) and the diffusers layers whose ΔW it stacks by rows.
Every family except Flux maps one layer to one key; Flux.1 keys name the original (BFL)
modules, where q, k, v (and, in single blocks, the MLP input) are one fused weight.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

from torch import nn

from ..errors import SnellaError

LayerKey = tuple[str, str]  # (component, module path), e.g. ("unet", "down_blocks.0....to_q")


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """One exported weight.

    Attributes:
        key: the file key without suffix, e.g. ``lora_unet_mid_block_attentions_0_proj_in``.
        parts: the ``(component, module path)`` layers stacked along the output rows, in order
            (a single entry for an unfused weight).
    """

    key: str
    parts: tuple[LayerKey, ...]


@dataclasses.dataclass(frozen=True)
class ExportFamily:
    """How one pipeline family names its weights in the exported files.

    Attributes:
        name: short name (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``sd3``, ``pixart``).
        kohya_prefixes: ``{component: prefix}``; a prefix ending in ``_`` takes the module path
            with ``.`` → ``_`` (kohya style), one ending in ``.`` keeps the dots (diffusers style).
        base_model_version: the ``ss_base_model_version`` header value AUTOMATIC1111 reads.
        architecture: the ``modelspec.architecture`` value without the ``/lora`` suffix.
        implementation: ``modelspec.implementation``.
        fused_targets: for Flux, maps the transformer's adapted paths to BFL fused targets.
    """

    name: str
    kohya_prefixes: dict[str, str]
    base_model_version: str
    architecture: str
    implementation: str
    fused_targets: Optional[Callable[[set[str]], tuple[list[ExportTarget], set[str]]]] = None

    def kohya_key(self, component: str, path: str) -> str:
        """The kohya-style name of one unfused layer, e.g. ``lora_te1_text_model_encoder_...``
        (``path`` in the canonical spelling of ``canonical_path``)."""
        prefix = self.kohya_prefixes.get(component)
        if prefix is None:
            raise SnellaError(
                f"layer {component}.{path}: the {self.name} family has no exported name for "
                f"component {component!r} (exportable: {sorted(self.kohya_prefixes)})"
            )
        return prefix + (path if prefix.endswith(".") else path.replace(".", "_"))

    def targets(self, layers: list[LayerKey], spelled: Callable[[LayerKey], str]) -> list[ExportTarget]:
        """The exported weights covering the adapted ``layers``, in a stable order;
        ``spelled`` gives a layer's path as the exported names spell it."""
        remaining = list(layers)
        targets: list[ExportTarget] = []
        if self.fused_targets is not None:
            transformer_paths = {path for component, path in layers if component == "transformer"}
            fused, covered = self.fused_targets(transformer_paths)
            targets.extend(fused)
            remaining = [(c, p) for c, p in layers if not (c == "transformer" and p in covered)]
            unmapped = [p for c, p in remaining if c == "transformer"]
            if unmapped:
                raise SnellaError(
                    f"layer transformer.{unmapped[0]}: no Flux.1 (BFL) module holds this layer, so "
                    "ComfyUI, Forge and diffusers' kohya loader cannot map it; export with --to peft"
                )
        targets.extend(ExportTarget(self.kohya_key(c, spelled((c, p))), ((c, p),)) for c, p in remaining)
        return targets


def canonical_path(model: nn.Module, path: str) -> str:
    """``path`` as exported files spell it: CLIP text encoders flattened by transformers 5
    (no ``text_model`` submodule) get the ``text_model.`` prefix that kohya, the UIs and
    older transformers use; every other path is unchanged."""
    if "CLIPText" in type(model).__name__ and not hasattr(model, "text_model") and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path


def _flux_block_groups(kind: str) -> list[tuple[str, list[str]]]:
    """``(BFL name, [diffusers sub-paths stacked by rows])`` of one Flux block, in the row order
    of ComfyUI's ``flux_to_diffusers`` and of diffusers' ``_convert_kohya_flux_lora_to_diffusers``
    split (q, k, v, then the MLP input for ``linear1``)."""
    if kind == "double":
        return [
            ("img_attn_qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            ("txt_attn_qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
            ("img_attn_proj", ["attn.to_out.0"]),
            ("txt_attn_proj", ["attn.to_add_out"]),
            ("img_mlp_0", ["ff.net.0.proj"]),
            ("img_mlp_2", ["ff.net.2"]),
            ("txt_mlp_0", ["ff_context.net.0.proj"]),
            ("txt_mlp_2", ["ff_context.net.2"]),
            ("img_mod_lin", ["norm1.linear"]),
            ("txt_mod_lin", ["norm1_context.linear"]),
        ]
    return [
        ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
        ("linear2", ["proj_out"]),
        ("modulation_lin", ["norm.linear"]),
    ]


# Flux layers outside the blocks and their BFL names (the final adaLN is left out: its BFL
# weight holds the scale and shift halves swapped).
FLUX_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "proj_out": "final_layer_linear",
}
_FLUX_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def flux_fused_targets(paths: set[str]) -> tuple[list[ExportTarget], set[str]]:
    """BFL targets for the adapted Flux transformer ``paths`` and the set of paths they cover.

    A fused target lists all its parts (adapted or not); an unadapted part exports zero rows.
    """
    targets: dict[str, ExportTarget] = {}
    covered: set[str] = set()
    for path in sorted(paths):
        if path in FLUX_TOP_LEVEL:
            key = f"lora_unet_{FLUX_TOP_LEVEL[path]}"
            targets[key] = ExportTarget(key, (("transformer", path),))
            covered.add(path)
            continue
        match = _FLUX_BLOCK.fullmatch(path)
        if match is None:
            continue
        blocks, index, sub_path = match.groups()
        kind = "double" if blocks == "transformer_blocks" else "single"
        for bfl_name, sub_paths in _flux_block_groups(kind):
            if sub_path in sub_paths:
                key = f"lora_unet_{kind}_blocks_{index}_{bfl_name}"
                parts = tuple(("transformer", f"{blocks}.{index}.{p}") for p in sub_paths)
                targets[key] = ExportTarget(key, parts)
                covered.add(path)
    return [targets[key] for key in sorted(targets)], covered


def _sd_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    unet = configs.get("unet", {})
    if unet.get("cross_attention_dim") == 1024:
        prediction = configs.get("scheduler", {}).get("prediction_type", "epsilon")
        variant = "768-v" if prediction == "v_prediction" else "512"
        return ExportFamily(
            "sd2", {"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v2",
            f"stable-diffusion-v2-{variant}", "https://github.com/Stability-AI/stablediffusion",
        )
    return ExportFamily(
        "sd1", {"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v1",
        "stable-diffusion-v1", "https://github.com/Stability-AI/stablediffusion",
    )


def _sdxl_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily(
        "sdxl", {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models",
    )


def _flux_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    dev = bool(configs.get("transformer", {}).get("guidance_embeds", True))
    return ExportFamily(
        "flux", {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, "flux1",
        "flux-1-dev" if dev else "flux-1-schnell", "https://github.com/black-forest-labs/flux",
        fused_targets=flux_fused_targets,
    )


def _sd3_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    transformer = configs.get("transformer", {})
    if transformer.get("dual_attention_layers"):
        architecture = "stable-diffusion-3.5-medium"
    elif transformer.get("num_layers") == 38:
        architecture = "stable-diffusion-3.5-large"
    else:
        architecture = "stable-diffusion-3-medium"
    prefixes = {
        "transformer": "transformer.", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
        "text_encoder_3": "lora_te3_",
    }
    return ExportFamily("sd3", prefixes, "sd3", architecture, "https://github.com/Stability-AI/sd3-ref")


def _pixart_family(configs: dict[str, dict[str, Any]], sigma: bool) -> ExportFamily:
    name = "pixart_sigma" if sigma else "pixart_alpha"
    return ExportFamily(
        "pixart", {"transformer": "transformer.", "text_encoder": "lora_te1_"}, name,
        name.replace("_", "-"), "https://github.com/PixArt-alpha/PixArt-alpha",
    )


def _qwen_image_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """ComfyUI's Qwen-Image model keeps diffusers' module names (``comfy/ldm/qwen_image``), and
    ``comfy/lora.py`` maps ``transformer.<name>`` onto them."""
    return ExportFamily("qwen-image", {"transformer": "transformer."}, "qwen_image", "qwen-image",
                        "https://github.com/QwenLM/Qwen-Image")


def _chroma_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """ComfyUI's Chroma model subclasses its Flux model (``comfy/model_base.py``) with Flux's block
    modules (``comfy/ldm/chroma/layers.py``: ``img_attn.qkv``, ``linear1``, ...), so
    ``comfy/lora.py`` maps Chroma's files through ``flux_to_diffusers`` like Flux.1's: the BFL
    fused names for kohya keys, ``transformer.<diffusers name>`` otherwise."""
    return ExportFamily("chroma", {"text_encoder": "lora_te1_"}, "chroma", "chroma",
                        "https://huggingface.co/lodestones/Chroma1-HD", fused_targets=flux_fused_targets)


def _hidream_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """ComfyUI's HiDream model (``comfy/ldm/hidream/model.py``) has diffusers' module names
    (``double_stream_blocks.N.block.attn1.to_q``, ``ff_i.experts.N.w1``, ...), and
    ``comfy/lora.py`` maps ``transformer.<name>`` onto them."""
    return ExportFamily("hidream", {"transformer": "transformer."}, "hidream_i1", "hidream-i1",
                        "https://github.com/HiDream-ai/HiDream-I1")


FAMILY_BUILDERS: dict[str, Callable[[dict[str, dict[str, Any]]], ExportFamily]] = {
    "StableDiffusionPipeline": _sd_family,
    "StableDiffusionImg2ImgPipeline": _sd_family,
    "StableDiffusionXLPipeline": _sdxl_family,
    "StableDiffusionXLImg2ImgPipeline": _sdxl_family,
    "FluxPipeline": _flux_family,
    "FluxImg2ImgPipeline": _flux_family,
    "StableDiffusion3Pipeline": _sd3_family,
    "PixArtAlphaPipeline": lambda configs: _pixart_family(configs, sigma=False),
    "PixArtSigmaPipeline": lambda configs: _pixart_family(configs, sigma=True),
    "QwenImagePipeline": _qwen_image_family,
    "ChromaPipeline": _chroma_family,
    "HiDreamImagePipeline": _hidream_family,
}


def export_family(pipeline_class: str, configs: dict[str, dict[str, Any]], where: str) -> ExportFamily:
    """The family of a pipeline class, given the component configs (``{"unet": {...}}``).

    Raises:
        SnellaError: the class is not one of ``FAMILY_BUILDERS`` (message names ``where``).
    """
    builder = FAMILY_BUILDERS.get(pipeline_class)
    if builder is None:
        raise SnellaError(
            f"{where}: pipeline class {pipeline_class!r} is not an exportable family "
            f"(known: {', '.join(sorted(FAMILY_BUILDERS))})"
        )
    return builder(configs)

"""Per-family key names: which exported weight a diffusers layer lands in, as ComfyUI, Forge,
AUTOMATIC1111 and diffusers map them (ComfyUI ``comfy/lora.py`` / ``comfy/utils.py``, diffusers
``loaders/lora_conversion_utils.py``; the README section "Use in ComfyUI / Forge /
AUTOMATIC1111" lists them).

An :class:`ExportTarget` is one weight of the exported file: its key (without the
``.diff`` / ``.lora_down.weight`` suffix) and the diffusers layers whose ΔW it stacks by rows.
Flux.1 and Chroma keys name the original (BFL) modules, where q, k, v (and, in single blocks,
the MLP input) are one fused weight. The families of 2025-26 carry a :class:`NameMap` (the
names ComfyUI's own model of the family gives each layer, learnt from a current ComfyUI's
``comfy/lora.py`` ``model_lora_keys_unet``, ``comfy/utils.py`` and ``comfy/ldm/<model>``):
Flux.2 and Lumina 2 fuse q, k, v as Flux.1 does, Wan renames every layer one to one, and
Z-Image and Krea 2 keep diffusers' names, which ComfyUI maps itself (Sana keeps them too: a
current ComfyUI has no Sana model). Qwen-Image 2.1 keeps diffusers' names without prefix;
Ideogram 4 and HunyuanVideo 1.5 fuse q, k, v and LTX-2 renames its top-level layers, all three
under ``diffusion_model.``.
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
        names: ComfyUI's names of the denoiser layers (components ``names.components``).
        lora_ab: ``--to lora`` names the factors ``<key>.lora_A.weight`` / ``.lora_B.weight``
            without ``alpha`` (scale 1; ComfyUI reads these too) instead of kohya's
            ``lora_down`` / ``lora_up`` / ``alpha``: for the families whose diffusers loader
            takes no kohya factor names (LTX-2), or turns a kohya file's ``transformer.`` names
            into ``transformer.transformer.`` ones (Qwen-Image, Z-Image) or refuses its
            ``alpha`` keys (Krea 2, Sana, HiDream).
    """

    name: str
    kohya_prefixes: dict[str, str]
    base_model_version: str
    architecture: str
    implementation: str
    fused_targets: Optional[Callable[[set[str]], tuple[list[ExportTarget], set[str]]]] = None
    names: Optional["NameMap"] = None
    lora_ab: bool = False

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

    def targets(self, layers: list[LayerKey], spelled: Callable[[LayerKey], str],
                peft: bool = False) -> list[ExportTarget]:
        """The exported weights covering the adapted ``layers``, in a stable order;
        ``spelled`` gives a layer's path as the exported names spell it. With ``peft`` (whose
        files name each layer by its diffusers path) a layer that ComfyUI cannot name is a
        target of its own, keyed ``<component>.<path>``, instead of an error."""
        remaining = list(layers)
        targets: list[ExportTarget] = []
        if self.names is not None:
            for component in self.names.components:
                paths = {path for c, path in layers if c == component}
                targets.extend(self.names.targets(component, paths, unnamed_alone=peft))
            remaining = [(c, p) for c, p in layers if c not in self.names.components]
        if self.fused_targets is not None:
            transformer_paths = {path for component, path in layers if component == "transformer"}
            fused, covered = self.fused_targets(transformer_paths)
            targets.extend(fused)
            remaining = [(c, p) for c, p in layers if not (c == "transformer" and p in covered)]
            unmapped = [p for c, p in remaining if c == "transformer"]
            if unmapped and not peft:
                raise SnellaError(
                    f"layer transformer.{unmapped[0]}: no Flux.1 (BFL) module holds this layer, so "
                    "ComfyUI, Forge and diffusers' kohya loader cannot map it; export with --to peft"
                )
        for component, path in remaining:
            if peft and component not in self.kohya_prefixes:
                key = f"{component}.{spelled((component, path))}"
            else:
                key = self.kohya_key(component, spelled((component, path)))
            targets.append(ExportTarget(key, ((component, path),)))
        return targets


def check_distinct_keys(targets: list[ExportTarget]) -> None:
    """Raises SnellaError when two targets share a key (Wan 2.2 A14B's two experts are two
    models in ComfyUI with the same names: each needs its own ``diff`` / ``lora`` file,
    ``--component``; ``peft`` keys carry the component and do not collide)."""
    seen: dict[str, ExportTarget] = {}
    for target in targets:
        if target.key in seen:
            first, second = seen[target.key].parts[0], target.parts[0]
            raise SnellaError(
                f"layers {first[0]}.{first[1]} and {second[0]}.{second[1]} both map to {target.key}: "
                f"ComfyUI loads {first[0]} and {second[0]} as two models, so export each into its own "
                f"file with --component {first[0]} / --component {second[0]}")
        seen[target.key] = target


# (diffusers block pattern, ComfyUI name template on its groups, diffusers sub-paths stacked by rows)
FusedRule = tuple[str, str, tuple[str, ...]]
# (diffusers path pattern, ComfyUI module name template on its groups)
RenameRule = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class NameMap:
    """The names a current ComfyUI gives one family's denoiser layers.

    Attributes:
        label: the model as errors name it (``Flux.2``, ``Wan``, ...).
        source: where in ComfyUI the names were read (named in errors).
        prefix: the key prefix: ``lora_unet_`` (ComfyUI's own module names with ``.`` → ``_``,
            which ``model_lora_keys_unet`` maps for every model) or ``transformer.`` (diffusers
            names, for the models whose ``comfy/utils.py`` ``*_to_diffusers`` map takes them).
        fused: layers ComfyUI holds as one weight: their parts stack by rows in that order.
        renames: one diffusers layer → one ComfyUI module (first matching pattern wins).
        slice_mapped: ComfyUI maps ``transformer.<part>`` of a fused weight onto its rows, so
            ``--to comfyui`` can name each part alone.
        comfyui_diffusers: further paths ``--to comfyui`` names ``transformer.<path>`` (a weight
            whose update ComfyUI's map transforms, e.g. Flux's swapped final adaLN halves).
        components: the pipeline components named this way (Wan 2.2 A14B: both experts).
    """

    label: str
    source: str
    prefix: str
    renames: tuple[RenameRule, ...]
    fused: tuple[FusedRule, ...] = ()
    slice_mapped: bool = False
    comfyui_diffusers: tuple[str, ...] = ()
    components: tuple[str, ...] = ("transformer",)

    def key(self, module: str) -> str:
        """The exported key of ComfyUI module ``module`` (e.g. ``blocks.0.self_attn.q``)."""
        return self.prefix + (module.replace(".", "_") if self.prefix.endswith("_") else module)

    def fused_group(self, path: str) -> Optional[tuple[str, tuple[str, ...]]]:
        """``(ComfyUI module, the diffusers paths it stacks)`` when ``path`` is part of a fused
        weight, else None."""
        for block, template, parts in self.fused:
            for part in parts:
                match = re.fullmatch(f"({block})\\.{re.escape(part)}", path)
                if match is not None:
                    head = match.group(1)
                    module = re.fullmatch(block, head).expand(template)
                    return module, tuple(f"{head}.{p}" for p in parts)
        return None

    def module(self, path: str) -> Optional[str]:
        """The ComfyUI module of an unfused diffusers ``path``, or None when ComfyUI has none."""
        for pattern, template in self.renames:
            match = re.fullmatch(pattern, path)
            if match is not None:
                return match.expand(template)
        return None

    def _unmapped(self, component: str, path: str) -> SnellaError:
        return SnellaError(
            f"layer {component}.{path}: ComfyUI's {self.label} model has no module for this layer "
            f"({self.source}), so ComfyUI could not load it; train without it or export with --to peft")

    def targets(self, component: str, paths: set[str], unnamed_alone: bool = False) -> list[ExportTarget]:
        """The exported weights of ``component``'s adapted ``paths``, sorted by key; a fused
        weight lists all its parts (an unadapted part exports zero rows). With
        ``unnamed_alone``, a path with no ComfyUI module is a target ``<component>.<path>``.

        Raises:
            SnellaError: a path with no ComfyUI module (without ``unnamed_alone``).
        """
        targets: dict[str, ExportTarget] = {}
        for path in sorted(paths):
            group = self.fused_group(path)
            if group is not None:
                module, parts = group
                key = self.key(module)
                targets[key] = ExportTarget(key, tuple((component, part) for part in parts))
                continue
            module = self.module(path)
            if module is None and unnamed_alone:
                targets[f"{component}.{path}"] = ExportTarget(f"{component}.{path}", ((component, path),))
                continue
            if module is None:
                raise self._unmapped(component, path)
            targets[self.key(module)] = ExportTarget(self.key(module), ((component, path),))
        return [targets[key] for key in sorted(targets)]

    def comfyui_prefix(self, component: str, path: str) -> str:
        """The ``--to comfyui`` prefix of one layer: its own key, or ``transformer.<path>``
        where ComfyUI maps that onto a row slice (fused parts) or transforms the update.

        Raises:
            SnellaError: ComfyUI has no name for the layer alone.
        """
        if path in self.comfyui_diffusers:
            return f"transformer.{path}"
        group = self.fused_group(path)
        if group is not None:
            if self.slice_mapped:
                return f"transformer.{path}"
            raise SnellaError(
                f"layer {component}.{path}: ComfyUI's {self.label} model holds it inside the fused weight "
                f"{group[0]} and its key map ({self.source}) has no row slice for it, so the SNELLA node "
                "cannot patch it alone; export with --to diff or --to lora (fused keys), or train without it")
        module = self.module(path)
        if module is None:
            raise self._unmapped(component, path)
        return self.key(module)


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
                        "https://github.com/QwenLM/Qwen-Image", lora_ab=True)


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
                        "https://github.com/HiDream-ai/HiDream-I1", lora_ab=True)


# Flux.2 (dev and klein): ComfyUI's Flux2 (comfy/model_base.py, a subclass of its Flux model)
# keeps BFL's module names: double blocks as Flux.1's (no per-block modulation), single blocks'
# linear1 (q, k, v and the MLP input, already one weight in diffusers) and linear2, and three
# shared modulations (`double_stream_modulation_img.lin`, ...). comfy/utils.py
# flux_to_diffusers maps diffusers' q/k/v onto row slices of img_attn.qkv / txt_attn.qkv and
# transforms the final adaLN's swapped halves; the rest is reached by lora_unet_<BFL name>.
FLUX2_FUSED: tuple[FusedRule, ...] = (
    (r"transformer_blocks\.(\d+)", r"double_blocks.\1.img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    (r"transformer_blocks\.(\d+)", r"double_blocks.\1.txt_attn.qkv",
     ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
FLUX2_RENAMES: tuple[RenameRule, ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
    (r"x_embedder", "img_in"),
    (r"context_embedder", "txt_in"),
    (r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    (r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear", r"\1.lin"),
    (r"proj_out", "final_layer.linear"),
)
FLUX2_NAMES = NameMap(
    "Flux.2", "comfy/utils.py flux_to_diffusers, comfy/ldm/flux/model.py", "lora_unet_", FLUX2_RENAMES,
    fused=FLUX2_FUSED, slice_mapped=True, comfyui_diffusers=("norm_out.linear",),
)

# Lumina 2: ComfyUI's NextDiT (comfy/ldm/lumina/model.py) holds q, k, v as one attention.qkv
# (rows: n_heads, n_kv_heads, n_kv_heads head widths), the output as attention.out, the SwiGLU
# as feed_forward.w1/w2/w3 and the block modulation as adaLN_modulation.1. comfy/lora.py maps
# model_base.Lumina2 through z_image_to_diffusers, which takes Z-Image's diffusers names
# (attention.to_q, feed_forward.w1), not Lumina2Transformer2DModel's (attn.to_q,
# feed_forward.linear_1): Lumina 2 files use the lora_unet_<NextDiT name> keys it maps for
# every model, and its q/k/v have no row-slice name.
_LUMINA_BLOCK = r"(layers|noise_refiner|context_refiner)\.(\d+)"
LUMINA2_NAMES = NameMap(
    "Lumina 2", "comfy/ldm/lumina/model.py NextDiT; comfy/lora.py model_lora_keys_unet", "lora_unet_",
    (
        (_LUMINA_BLOCK + r"\.attn\.to_out\.0", r"\1.\2.attention.out"),
        (_LUMINA_BLOCK + r"\.feed_forward\.linear_([123])", r"\1.\2.feed_forward.w\3"),
        (r"(layers|noise_refiner)\.(\d+)\.norm1\.linear", r"\1.\2.adaLN_modulation.1"),
        (r"x_embedder", "x_embedder"),
        (r"time_caption_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
        (r"time_caption_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
        (r"time_caption_embed\.caption_embedder\.1", "cap_embedder.1"),
        (r"norm_out\.linear_1", "final_layer.adaLN_modulation.1"),
        (r"norm_out\.linear_2", "final_layer.linear"),
    ),
    fused=((_LUMINA_BLOCK, r"\1.\2.attention.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),),
)

# Wan 2.1 / 2.2: ComfyUI's WanModel (comfy/ldm/wan/model.py) keeps the Wan authors' names, one
# module per diffusers layer; comfy/lora.py has no Wan map of diffusers names, so files use the
# lora_unet_<Wan name> keys model_lora_keys_unet maps for every model (musubi-tuner's names).
WAN_NAMES = NameMap(
    "Wan", "comfy/ldm/wan/model.py WanModel; comfy/lora.py model_lora_keys_unet", "lora_unet_",
    (
        (r"(blocks\.\d+)\.attn1\.to_([qkv])", r"\1.self_attn.\2"),
        (r"(blocks\.\d+)\.attn1\.to_out\.0", r"\1.self_attn.o"),
        (r"(blocks\.\d+)\.attn2\.to_([qkv])", r"\1.cross_attn.\2"),
        (r"(blocks\.\d+)\.attn2\.to_out\.0", r"\1.cross_attn.o"),
        (r"(blocks\.\d+)\.attn2\.add_([kv])_proj", r"\1.cross_attn.\2_img"),
        (r"(blocks\.\d+)\.ffn\.net\.0\.proj", r"\1.ffn.0"),
        (r"(blocks\.\d+)\.ffn\.net\.2", r"\1.ffn.2"),
        (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
        (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
        (r"condition_embedder\.time_proj", "time_projection.1"),
        (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
        (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
        (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
        (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
        (r"proj_out", "head.head"),
    ),
    components=("transformer", "transformer_2"),
)

# Krea 2: comfy/utils.py krea2_to_diffusers maps diffusers' names one to one onto ComfyUI's
# (attn.to_q → attn.wq, ff.gate → mlp.gate, ...; 2 layer-wise and 2 refiner text-fusion blocks)
# and comfy/lora.py takes them as transformer.<name>: the files keep diffusers' names, limited
# to the layers that map covers.
_KREA2_BLOCK = r"(?:transformer_blocks\.\d+|text_fusion\.(?:layerwise_blocks|refiner_blocks)\.[01])"
KREA2_NAMES = NameMap(
    "Krea 2", "comfy/utils.py krea2_to_diffusers", "transformer.",
    (
        (_KREA2_BLOCK + r"\.attn\.(?:to_[qkv]|to_gate|to_out\.0)", r"\g<0>"),
        (_KREA2_BLOCK + r"\.ff\.(?:gate|up|down)", r"\g<0>"),
        (r"img_in|time_embed\.linear_[12]|time_mod_proj|txt_in\.linear_[12]|text_fusion\.projector|final_layer\.linear",
         r"\g<0>"),
    ),
)


def z_image_names(transformer: dict[str, Any]) -> NameMap:
    """Z-Image: comfy/utils.py z_image_to_diffusers maps diffusers' names (comfy/lora.py:
    transformer.<name>) onto ComfyUI's NextDiT, q/k/v as row slices of attention.qkv that are
    ``dim`` rows each: with fewer key/value heads than heads (not the published model) the
    k and v slices would be wrong, so they are left unnamed."""
    heads = transformer.get("n_heads")
    projections = "[qkv]" if transformer.get("n_kv_heads", heads) == heads else "q"
    block = r"(?:layers|noise_refiner|context_refiner)\.\d+"
    return NameMap(
        "Z-Image", "comfy/utils.py z_image_to_diffusers", "transformer.",
        (
            (block + rf"\.attention\.(?:to_{projections}|to_out\.0)|{block}\.feed_forward\.w[123]", r"\g<0>"),
            (r"(?:layers|noise_refiner)\.\d+\.adaLN_modulation\.0", r"\g<0>"),
            (r"all_x_embedder\.2-1|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)|cap_embedder\.1"
             r"|t_embedder\.mlp\.[02]", r"\g<0>"),
        ),
    )


def _z_image_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("z-image", {}, "z_image", "z-image", "https://github.com/Tongyi-MAI/Z-Image",
                        names=z_image_names(configs.get("transformer", {})), lora_ab=True)


def _flux2_family(configs: dict[str, dict[str, Any]], klein: bool) -> ExportFamily:
    return ExportFamily("flux2", {}, "flux2", "flux-2-klein" if klein else "flux-2-dev",
                        "https://github.com/black-forest-labs/flux2", names=FLUX2_NAMES)


def _krea2_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("krea2", {}, "krea2", "krea-2", "https://github.com/krea-ai/krea-2", names=KREA2_NAMES,
                        lora_ab=True)


def _lumina2_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("lumina2", {}, "lumina2", "lumina-image-2", "https://github.com/Alpha-VLLM/Lumina-Image-2.0",
                        names=LUMINA2_NAMES)


def _sana_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """Sana: a current ComfyUI has no Sana model (comfy/supported_models.py ``models`` lists
    none; comfy/lora.py no Sana map), so the files keep the names diffusers' SanaPipeline
    ``load_lora_weights`` takes, ``transformer.<diffusers name>``."""
    return ExportFamily("sana", {"transformer": "transformer."}, "sana", "sana", "https://github.com/NVlabs/Sana",
                        lora_ab=True)


def _wan_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """Wan 2.1 (1.3B, 14B), 2.2 TI2V-5B (48 latent channels) and A14B (two experts)."""
    transformer = configs.get("transformer", {})
    if "transformer_2" in configs:
        architecture, version = "wan-2.2-t2v-a14b", "wan22"
    elif transformer.get("in_channels") == 48:
        architecture, version = "wan-2.2-ti2v-5b", "wan22"
    else:
        architecture, version = "wan-2.1-t2v", "wan21"
    return ExportFamily("wan", {}, version, architecture, "https://github.com/Wan-Video/Wan2.2", names=WAN_NAMES)


# Qwen-Image 2.1: ComfyUI's model (comfy/ldm/qwen_image21/model.py) keeps diffusers' module
# names; it fuses img_mlp.gate_layer and img_mlp.proj into img_mlp.gate_up at load, and the
# QwenImage branch of comfy/lora.py model_lora_keys_unet maps <name> (and transformer.<name>) of
# every weight and of each gate_up half onto its rows. diffusers' QwenImage loader converts files
# with .alpha keys and bare names (then prefixes transformer.), not transformer.<name> kohya
# files, so the files use the bare names.
QWEN_IMAGE21_NAMES = NameMap(
    "Qwen-Image 2.1", "comfy/ldm/qwen_image21/model.py; comfy/lora.py model_lora_keys_unet (QwenImage)", "",
    (
        (r"transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0)|img_mlp\.(?:gate_layer|proj|out))", r"\g<0>"),
        (r"time_text_embed\.timestep_embedder\.linear_[12]|txt_in\.(?:in_layer|out_layer)|img_in|modulation\.1"
         r"|norm_out\.linear|proj_out", r"\g<0>"),
    ),
)


def _qwen_image21_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("qwen-image-2.1", {}, "qwen_image_2_1", "qwen-image-2.1", "https://github.com/QwenLM/Qwen-Image",
                        names=QWEN_IMAGE21_NAMES)


# Ideogram 4: ComfyUI's Ideogram4Transformer2DModel (comfy/ldm/ideogram4/model.py) holds q, k, v
# as one attention.qkv (rows q, k, v; hidden_size each) and the output as attention.o; the other
# layers keep diffusers' names. comfy/lora.py has no Ideogram 4 branch: its generic loop maps
# diffusion_model.<name> (and lora_unet_<name>), and diffusers' Ideogram4 loader converts
# diffusion_model.<name> files (the fused qkv split in thirds), so the files use that prefix.
# No row slice of attention.qkv has a ComfyUI name.
_IDEOGRAM4_BLOCK = r"layers\.\d+"
IDEOGRAM4_NAMES = NameMap(
    "Ideogram 4", "comfy/ldm/ideogram4/model.py; comfy/lora.py model_lora_keys_unet", "diffusion_model.",
    (
        (rf"({_IDEOGRAM4_BLOCK})\.attention\.to_out\.0", r"\1.attention.o"),
        (rf"{_IDEOGRAM4_BLOCK}\.(?:feed_forward\.w[123]|adaln_modulation)", r"\g<0>"),
        (r"input_proj|llm_cond_proj|t_embedding\.mlp_(?:in|out)|adaln_proj|final_layer\.(?:linear|adaln_modulation)",
         r"\g<0>"),
    ),
    fused=((f"({_IDEOGRAM4_BLOCK})", r"\1.attention.qkv", ("attention.to_q", "attention.to_k", "attention.to_v")),),
)

# LTX-2: ComfyUI's LTXAV model (comfy/ldm/lightricks/av_model.py) keeps the Lightricks names:
# the blocks' attention (attn1/2, audio_attn1/2, audio_to_video_attn, video_to_audio_attn: to_q,
# to_k, to_v, to_out.0) and feed-forwards (ff / audio_ff: net.0.proj, net.2) as diffusers has
# them, and at the top patchify_proj, adaln_single, caption_projection, av_ca_*_adaln_single,
# proj_out (diffusers renames these; loaders/lora_conversion_utils.py
# _convert_non_diffusers_ltx2_lora_to_diffusers undoes it). comfy/lora.py maps <name> for
# LTXV / LTXAV and diffusion_model.<name> for every model; diffusers' LTX2 loader converts
# diffusion_model.<name> files, so the files use that prefix.
_LTX2_TIME_EMBEDDERS = (
    ("time_embed", "adaln_single"),
    ("audio_time_embed", "audio_adaln_single"),
    ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
    ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
    ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
    ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
)
LTX2_NAMES = NameMap(
    "LTX-2", "comfy/ldm/lightricks/av_model.py; comfy/lora.py model_lora_keys_unet", "diffusion_model.",
    (
        (r"transformer_blocks\.\d+\.(?:audio_)?(?:attn[12]|audio_to_video_attn|video_to_audio_attn)"
         r"\.(?:to_[qkv]|to_out\.0)", r"\g<0>"),
        (r"transformer_blocks\.\d+\.(?:audio_)?ff\.net\.(?:0\.proj|2)", r"\g<0>"),
        (r"proj_in", "patchify_proj"),
        (r"audio_proj_in", "audio_patchify_proj"),
        *((rf"{ours}\.(emb\.timestep_embedder\.linear_[12]|linear)", rf"{theirs}.\1")
          for ours, theirs in _LTX2_TIME_EMBEDDERS),
        (r"(?:audio_)?caption_projection\.linear_[12]|(?:audio_)?proj_out", r"\g<0>"),
    ),
)


# HunyuanVideo 1.5: ComfyUI's HunyuanVideo15 (comfy/model_base.py) subclasses its HunyuanVideo,
# whose model (comfy/ldm/hunyuan_video/model.py HunyuanVideo, read in the Oct 2025 snapshot) has
# Flux's double blocks (comfy/ldm/flux/layers.py DoubleStreamBlock: img_attn.qkv with rows q, k,
# v, img_attn.proj, img_mlp.0 / .2, img_mod.lin and the txt_ twins), a TokenRefiner txt_in
# (input_embedder, t_embedder / c_embedder in_layer / out_layer, individual_token_refiner.blocks.N
# with self_attn.qkv, self_attn.proj, mlp.0 / .2, adaLN_modulation.1), byt5_in.fc1-3, time_in and
# final_layer.linear. comfy/lora.py's HunyuanVideo branch and generic loop map
# diffusion_model.<name>; neither maps a row slice of a qkv. Left unnamed: the image embedder
# (that snapshot predates 1.5's vision input) and norm_out.linear (ComfyUI's final adaLN holds
# shift before scale, diffusers' scale before shift).
_HY_BLOCK = r"transformer_blocks\.(\d+)"
_HY_REFINER = r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)"
HUNYUAN_VIDEO15_NAMES = NameMap(
    "HunyuanVideo 1.5", "comfy/ldm/hunyuan_video/model.py HunyuanVideo; comfy/lora.py model_lora_keys_unet",
    "diffusion_model.",
    (
        (_HY_BLOCK + r"\.norm1\.linear", r"double_blocks.\1.img_mod.lin"),
        (_HY_BLOCK + r"\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin"),
        (_HY_BLOCK + r"\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
        (_HY_BLOCK + r"\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
        (_HY_BLOCK + r"\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0"),
        (_HY_BLOCK + r"\.ff\.net\.2", r"double_blocks.\1.img_mlp.2"),
        (_HY_BLOCK + r"\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0"),
        (_HY_BLOCK + r"\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2"),
        (_HY_REFINER + r"\.attn\.to_out\.0", r"txt_in.individual_token_refiner.blocks.\1.self_attn.proj"),
        (_HY_REFINER + r"\.ff\.net\.0\.proj", r"txt_in.individual_token_refiner.blocks.\1.mlp.0"),
        (_HY_REFINER + r"\.ff\.net\.2", r"txt_in.individual_token_refiner.blocks.\1.mlp.2"),
        (_HY_REFINER + r"\.norm_out\.linear", r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1"),
        (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1", "txt_in.t_embedder.in_layer"),
        (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2", "txt_in.t_embedder.out_layer"),
        (r"context_embedder\.time_text_embed\.text_embedder\.linear_1", "txt_in.c_embedder.in_layer"),
        (r"context_embedder\.time_text_embed\.text_embedder\.linear_2", "txt_in.c_embedder.out_layer"),
        (r"context_embedder\.proj_in", "txt_in.input_embedder"),
        (r"context_embedder_2\.linear_([123])", r"byt5_in.fc\1"),
        (r"time_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
        (r"time_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
        (r"proj_out", "final_layer.linear"),
    ),
    fused=(
        (_HY_BLOCK, r"double_blocks.\1.img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        (_HY_BLOCK, r"double_blocks.\1.txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        (_HY_REFINER, r"txt_in.individual_token_refiner.blocks.\1.self_attn.qkv",
         ("attn.to_q", "attn.to_k", "attn.to_v")),
    ),
)


def _ideogram4_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("ideogram4", {}, "ideogram4", "ideogram-4", "https://ideogram.ai", names=IDEOGRAM4_NAMES)


def _ltx2_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    """diffusers' LTX2 loader renames diffusion_model.<name> keys but not kohya's lora_down /
    lora_up, and refuses ``alpha`` keys: the LoRA factors are named lora_A / lora_B."""
    return ExportFamily("ltx2", {}, "ltx2", "ltx-2", "https://github.com/Lightricks/LTX-2", names=LTX2_NAMES,
                        lora_ab=True)


def _hunyuan_video15_family(configs: dict[str, dict[str, Any]]) -> ExportFamily:
    return ExportFamily("hunyuan-video-1.5", {}, "hunyuan_video_1_5", "hunyuan-video-1.5",
                        "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5", names=HUNYUAN_VIDEO15_NAMES)


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
    "ZImagePipeline": _z_image_family,
    "Flux2Pipeline": lambda configs: _flux2_family(configs, klein=False),
    "Flux2KleinPipeline": lambda configs: _flux2_family(configs, klein=True),
    "Krea2Pipeline": _krea2_family,
    "Lumina2Pipeline": _lumina2_family,
    "SanaPipeline": _sana_family,
    "WanPipeline": _wan_family,
    "QwenImage21Pipeline": _qwen_image21_family,
    "Ideogram4Pipeline": _ideogram4_family,
    "LTX2Pipeline": _ltx2_family,
    "HunyuanVideo15Pipeline": _hunyuan_video15_family,
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

"""Where adapters go: target presets, ``apply_snella`` and ``remove_snella``."""

from __future__ import annotations

import re
from typing import Iterable, Optional

from torch import nn

from .config import SnellaConfig, TargetModules
from .errors import SnellaError
from .forward_cache import kept_weights
from .layer import SnellaLinear, snella_layers
from .quantized import unsupported_quantization
from .scratch import idle_buffers


def _anywhere(pattern: str) -> str:
    """A regex that full-matches a qualified name ending in ``pattern``."""
    return r"(?:.*\.)?" + pattern


# Each preset is a list of regular expressions full-matched against qualified module names.
TARGET_PRESETS: dict[str, list[str]] = {
    # diffusers Attention (self- and cross-attention) and FeedForward inside UNet transformer
    # blocks: 10 linears per BasicTransformerBlock (160 on SD1.5, 700 on SDXL).
    "unet": [
        _anywhere(r"attn\d*\.(?:to_q|to_k|to_v|to_out\.0)"),
        _anywhere(r"ff\.net\.(?:0\.proj|2)"),
    ],
    # DiTs: also joint-attention context projections, the context MLP, Flux single-block MLP
    # projections, Qwen-Image's image/text-stream MLPs, Z-Image's attention and SwiGLU MLP,
    # Flux.2's MLPs and fused single-block projections (285 on SD3-medium, 418 on Flux.1-dev,
    # 720 on Qwen-Image, 238 on Z-Image), Wan's attn1/attn2 and GELU ffn (400 on Wan 2.1 14B).
    "dit": [
        _anywhere(
            r"attn\d*\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        ),
        _anywhere(r"(?:ff|ff_context|ffn|img_mlp|txt_mlp)\.net\.(?:0\.proj|2)"),
        _anywhere(r"attention\.(?:to_q|to_k|to_v|to_out\.0)"),
        _anywhere(r"feed_forward\.(?:w1|w2|w3)"),
        _anywhere(r"feed_forward\.(?:linear_1|linear_2|linear_3)"),  # Lumina2's SwiGLU
        # HiDream: the attention's plain to_out and text-stream projections, and the SwiGLU
        # experts (shared and routed) of its mixture-of-experts MLPs and the text MLP
        _anywhere(r"attn1\.(?:to_out|to_q_t|to_k_t|to_v_t|to_out_t)"),
        _anywhere(r"(?:ff_i|ff_t)\.(?:shared_experts\.|experts\.\d+\.)?(?:w1|w2|w3)"),
        _anywhere(r"(?:ff|ff_context)\.(?:linear_in|linear_out)"),
        _anywhere(r"single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out)"),
        _anywhere(r"single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out)"),
        # Krea 2's gated attention output gate and SwiGLU MLP (blocks and text-fusion blocks)
        _anywhere(r"attn\.to_gate"),
        _anywhere(r"ff\.(?:gate|up|down)"),
        # Qwen-Image 2.1's SwiGLU image MLP
        _anywhere(r"img_mlp\.(?:proj|gate_layer|out)"),
    ],
    # transformers ViT: q, k, v, attention output, MLP in and out (72 on ViT-B/16). Module
    # names of transformers 4.x (attention.attention.query, intermediate.dense, ...) and of
    # 5.x (attention.q_proj, mlp.fc1, ...).
    "vit": [
        _anywhere(r"attention\.attention\.(?:query|key|value)"),
        _anywhere(r"attention\.output\.dense"),
        _anywhere(r"layer\.\d+\.(?:intermediate|output)\.dense"),
        _anywhere(r"layers\.\d+\.attention\.(?:q_proj|k_proj|v_proj|o_proj)"),
        _anywhere(r"layers\.\d+\.mlp\.(?:fc1|fc2)"),
    ],
    # CLIP text encoders (q/k/v/out and MLP) and T5 encoders (q/k/v/o and the dense MLP).
    "text_encoder": [
        _anywhere(r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"),
        _anywhere(r"mlp\.(?:fc1|fc2)"),
        _anywhere(r"SelfAttention\.(?:q|k|v|o)"),
        _anywhere(r"DenseReluDense\.(?:wi|wi_0|wi_1|wo)"),
    ],
}


def _entries(targets: TargetModules) -> list[tuple[str, list[str]]]:
    """``(entry, regexes)`` per item of ``targets``: a preset expands to its regexes, any other
    item of a list (an exact name, a name suffix or a regular expression) stands for itself."""
    items = [targets] if isinstance(targets, str) else list(targets)
    entries: list[tuple[str, list[str]]] = []
    for item in items:
        if item in TARGET_PRESETS:
            entries.append((item, TARGET_PRESETS[item]))
        elif isinstance(targets, str):
            raise SnellaError(
                f"target_modules={targets!r}: not a preset ({', '.join(TARGET_PRESETS)}); "
                "pass a list to give module names or regular expressions"
            )
        else:
            try:
                re.compile(item)
            except re.error as error:
                raise SnellaError(f"target_modules entry {item!r} is not a valid regex: {error}") from error
            entries.append((item, [item]))
    return entries


def _patterns(targets: TargetModules) -> list[str]:
    """Expand presets; a list may mix preset names, exact names and regular expressions."""
    return [pattern for _, patterns in _entries(targets) for pattern in patterns]


def check_targets(targets: TargetModules) -> None:
    """Raise SnellaError for an unknown preset string or an invalid regular expression
    (no model needed: for checking flags before anything is loaded)."""
    _entries(targets)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error as error:
            raise SnellaError(f"target_modules entry {pattern!r} is not a valid regex: {error}")
    return False


def quantization_of(module: nn.Module) -> Optional[str]:
    """What marks ``module`` as a packed or integer linear SNELLA cannot adapt (e.g.
    bitsandbytes ``Linear8bitLt``, an int8 weight, an unknown tensor subclass), else None.
    Float8 storage, torchao, optimum-quanto and bitsandbytes ``Linear4bit`` bases are adapted
    (``quantized.base_quantization``). Detected by class names, modules and dtypes, so no
    quantization library need be installed."""
    return unsupported_quantization(module)


def find_target_linears(model: nn.Module, config: SnellaConfig) -> dict[str, nn.Linear]:
    """Qualified names of the ``nn.Linear`` modules (or existing SnellaLinear) the config targets.

    Raises:
        SnellaError: an entry of ``target_modules`` matches no linear layer (naming what it
            matched instead, e.g. Conv2d modules), or a matched linear is packed in a format
            SNELLA does not adapt (``quantized.unsupported_quantization``).
    """
    entries = _entries(config.target_modules)
    excluded = _patterns(config.exclude_modules) if config.exclude_modules else []
    found: dict[str, nn.Linear] = {}
    linear_hits = {entry: 0 for entry, _ in entries}
    other_hits: dict[str, dict[str, str]] = {entry: {} for entry, _ in entries}
    for name, module in model.named_modules():
        if ".base_layer" in f".{name}" or not name:
            continue
        hit = [entry for entry, patterns in entries if _matches(name, patterns)]
        if not hit or (excluded and _matches(name, excluded)):
            continue
        if not isinstance(module, (nn.Linear, SnellaLinear)):
            for entry in hit:
                other_hits[entry].setdefault(type(module).__name__, name)
            continue
        quantized = None if isinstance(module, SnellaLinear) else quantization_of(module)
        if quantized is not None:
            raise SnellaError(
                f"layer {name!r} is a quantized linear, {quantized}: SNELLA adapts float, float8-storage, "
                "torchao, optimum-quanto, bitsandbytes Linear4bit and diffusers GGUF bases only; load this model "
                "unquantized (torch_dtype=torch.bfloat16) or with one of those, or exclude the layer "
                "(exclude_modules)"
            )
        for entry in hit:
            linear_hits[entry] += 1
        found[name] = module
    if found:
        for entry, count in linear_hits.items():
            if count == 0:
                raise SnellaError(_no_linear_message(entry, other_hits[entry], type(model).__name__))
    return found


def _no_linear_message(entry: str, others: dict[str, str], model_name: str) -> str:
    if others:
        what = ", ".join(f"{kind} (e.g. {name!r})" for kind, name in others.items())
        return (f"target_modules entry {entry!r} matches no nn.Linear in {model_name}, only {what}: "
                "SNELLA adapts nn.Linear layers; drop the entry")
    return f"target_modules entry {entry!r} matches no module in {model_name}: check the name or regex"


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_snella(
    model: nn.Module, config: SnellaConfig, adapter_name: str = "default"
) -> dict[str, SnellaLinear]:
    """Wrap the targeted linears of ``model`` in place and freeze everything but the adapters.

    A layer that already is a SnellaLinear gets a further adapter named ``adapter_name``.
    Works on the ``meta`` device (adapter tensors are created where the base weight lives).

    Returns:
        ``{qualified_name: SnellaLinear}`` of the adapted layers.
    Raises:
        SnellaError: nothing matched, or ``adapter_name`` already exists on a targeted layer.
    """
    targets = find_target_linears(model, config)
    if not targets:
        raise SnellaError(
            f"target_modules={config.target_modules!r} matched no nn.Linear in "
            f"{type(model).__name__}"
        )
    for name, module in targets.items():
        if isinstance(module, SnellaLinear) and adapter_name in module.adapters:
            raise SnellaError(f"adapter {adapter_name!r} already exists on layer {name!r}")
    model.requires_grad_(False)
    layers: dict[str, SnellaLinear] = {}
    for name, module in targets.items():
        if isinstance(module, SnellaLinear):
            module.add_adapter(adapter_name, config)
            layers[name] = module
        else:
            layers[name] = SnellaLinear(module, config, adapter_name)
            set_submodule(model, name, layers[name])
    for layer in layers.values():
        layer.adapters[adapter_name].requires_grad_(True)
    return layers


def remove_snella(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Undo ``apply_snella``: put the original linears back (base weights restored if fused).

    With ``adapter_name``, only that adapter is deleted (other adapters fused in the layer stay
    fused); a layer left without adapters is unwrapped. Layers fused with
    ``keep_original=False`` keep their fused weights when unwrapped (merge and unload). The
    layers' shared idle buffers (``scratch.idle_buffers``) and cached forward weights
    (``forward_cache.kept_weights``) are freed.

    Raises:
        UnfuseError: ``adapter_name`` is fused into a layer whose base weight was not kept
            (checked before anything changes).
    """
    layers = snella_layers(model)
    if adapter_name is not None:
        for name, layer in layers.items():
            layer.check_removable(adapter_name, name)
    idle_buffers.release()
    kept_weights.clear()
    for name, layer in layers.items():
        if adapter_name is not None:
            if adapter_name not in layer.adapters:
                continue
            layer.remove_adapter(adapter_name, name)
            if len(layer.adapters):
                continue
        set_submodule(model, name, layer.unwrap(name))
    return model

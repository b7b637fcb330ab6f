"""By hand, not in CI: ComfyUI's real loader functions on ``snella-export --to comfyui`` files of
the tiny SD 1.x, Flux.1 and SD3 pipelines.

    PYTHONPATH=$PWD:tests python tests/manual/comfyui_real_loader.py /path/to/ComfyUI

Runs ComfyUI's own ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` (with
``comfy.utils.unet_to_diffusers`` / ``flux_to_diffusers``), ``comfy.lora.load_lora``,
``comfy.utils.load_torch_file`` and ``comfy.model_patcher.ModelPatcher`` (``add_patches``,
``patch_weight_to_device``, hence ``comfy.lora.calculate_weight``) with the SNELLA adapter
registered, and compares every patched weight with ``fuse_snella``'s. ``comfy.model_base`` is
replaced by empty classes (ComfyUI's loader uses it only for ``isinstance`` checks; importing
it needs torchvision with compiled ops); ``--cpu`` is forced. Prints one line per check and
exits non-zero on a mismatch.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn


def import_comfy(root: Path):
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    model_base = types.ModuleType("comfy.model_base")
    for name in ("ACEStep", "AuraFlow", "Flux", "GenmoMochi", "HiDream", "HunyuanDiT", "HunyuanVideo",
                 "Omnigen2", "PixArt", "QwenImage", "SD3", "StableCascade_C"):
        setattr(model_base, name, type(name, (), {}))
    sys.modules["comfy.model_base"] = model_base
    comfy.model_base = model_base
    import comfy.lora
    import comfy.utils

    return comfy


class StateOnly:
    """What the key-map functions read from a ComfyUI model: ``state_dict()`` and
    ``model_config.unet_config``."""

    def __init__(self, state: dict[str, torch.Tensor], unet_config: dict):
        self.state = state
        self.model_config = types.SimpleNamespace(unet_config=unet_config)

    def state_dict(self):
        return self.state


class CapturedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """An ``nn.Module`` whose parameters are ``state`` under the same dotted names."""
    root = nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(tensor.to(torch.float32, copy=True), requires_grad=False))
    return root


def patch_all(comfy, patches: dict, state: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """ComfyUI's ``ModelPatcher``: ``add_patches`` with the slider's strength, then
    ``patch_weight_to_device`` on every patched weight (``comfy.lora.calculate_weight`` inside)."""
    import comfy.model_patcher

    model = module_tree(state)
    model.device = None
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    patcher.add_patches(patches, strength)
    for key in list(patcher.patches):
        patcher.patch_weight_to_device(key)
    return {key: comfy.utils.get_attr(model, key).detach().clone() for key in patcher.patches}


def worst(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max()) / float(expected.abs().max())


def check_sd(comfy, work: Path) -> bool:
    from test_comfyui import reference, trained_adapter

    from snella_diffusion.export import export_snella
    from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

    adapter = trained_adapter("sd", work / "sd.safetensors")
    output = work / "sd-comfyui.safetensors"
    export_snella([adapter], tiny_sd_pipeline(0), output, to="comfyui")
    expected = reference("sd", adapter)
    pipe = tiny_sd_pipeline(0)
    unet_config = {"num_res_blocks": [2, 2], "channel_mult": [1, 2], "transformer_depth": [0, 0, 1, 1],
                   "transformer_depth_output": [0, 0, 0, 1, 1, 1], "transformer_depth_middle": 1}
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    unet_params = dict(pipe.unet.named_parameters())
    unet_state = {f"diffusion_model.{ldm}": unet_params[name].detach().clone()
                  for name, ldm in diffusers_to_ldm.items() if name in unet_params}
    key_map = comfy.lora.model_lora_keys_unet(StateOnly(unet_state, unet_config), {})
    text = pipe.text_encoder
    prefix = "" if hasattr(text, "text_model") else "text_model."
    clip_state = {f"clip_l.transformer.{prefix}{name}": p.detach().clone() for name, p in text.named_parameters()}
    key_map = comfy.lora.model_lora_keys_clip(StateOnly(clip_state, {}), key_map)
    return run_checks(comfy, "sd", output, key_map, {**unet_state, **clip_state}, expected,
                      lambda component, path: (f"diffusion_model.{diffusers_to_ldm[path + '.weight']}"
                                               if component == "unet" else
                                               f"clip_l.transformer.{prefix}{path}.weight", None))


def check_flux(comfy, work: Path) -> bool:
    from test_comfyui import flux_key_map, reference, trained_adapter

    from snella_diffusion.export import export_snella
    from snella_diffusion.testing.tiny_dit_models import tiny_flux_pipeline

    adapter = trained_adapter("flux", work / "flux.safetensors")
    output = work / "flux-comfyui.safetensors"
    export_snella([adapter], tiny_flux_pipeline(0), output, to="comfyui")
    expected = reference("flux", adapter)
    pipe = tiny_flux_pipeline(0)
    _, standin_state, _ = flux_key_map(pipe)  # only the BFL weights, built from the diffusers ones
    config = pipe.transformer.config
    unet_config = {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
                   "hidden_size": config.num_attention_heads * config.attention_head_dim}
    state = {f"diffusion_model.{k.removeprefix('transformer.')}": v for k, v in standin_state.items()
             if k.startswith("transformer.")}
    model = comfy.model_base.Flux()
    model.state = state
    model.state_dict = lambda: state
    model.model_config = types.SimpleNamespace(unet_config=unet_config)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    text = pipe.text_encoder
    prefix = "" if hasattr(text, "text_model") else "text_model."
    clip_state = {f"clip_l.transformer.{prefix}{name}": p.detach().clone() for name, p in text.named_parameters()}
    key_map = comfy.lora.model_lora_keys_clip(StateOnly(clip_state, {}), key_map)

    def locate(component, path):
        if component == "text_encoder":
            return f"clip_l.transformer.{prefix}{path}.weight", None
        target = key_map[f"transformer.{path}"]
        return (target, None) if isinstance(target, str) else (target[0], target[1:])

    return run_checks(comfy, "flux", output, key_map, {**state, **clip_state}, expected, locate)


def tiny_sd3_at_comfyui_widths(seed: int = 0):
    """The tiny SD3 pipeline with a transformer whose width is 64·depth, the head layout
    ComfyUI's ``mmdit_to_diffusers`` assumes when it slices the fused q/k/v weights."""
    from diffusers import SD3Transformer2DModel

    from snella_diffusion.testing.tiny_dit_models import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed)
    torch.manual_seed(seed)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        caption_projection_dim=128, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32)
    return pipe


def comfy_state_from_map(model: nn.Module, key_map: dict, prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI-side weights built from the diffusers ones through ComfyUI's own diffusers→native
    map: a row slice of a fused weight, a weight ComfyUI stores transformed, or a plain rename."""
    pieces: dict[str, list] = {}
    for name, param in model.named_parameters():
        target = key_map.get(name)
        if target is None or not name.endswith(".weight"):
            continue
        key, offset, function = (target, None, None) if isinstance(target, str) else (
            target[0], target[1], target[2] if len(target) > 2 else None)
        weight = param.detach().clone()
        pieces.setdefault(prefix + key.removeprefix(prefix), []).append(
            (offset, weight if function is None else function(weight)))
    state = {}
    for key, parts in pieces.items():
        if parts[0][0] is None:
            state[key] = parts[0][1]
            continue
        rows = max(offset[1] + offset[2] for offset, _ in parts)
        fused = torch.zeros(rows, parts[0][1].shape[1])
        for (dim, start, length), weight in parts:
            fused.narrow(dim, start, length).copy_(weight)
        state[key] = fused
    return state


def check_sd3(comfy, work: Path) -> bool:
    import test_comfyui
    from test_comfyui import reference, trained_adapter

    from snella_diffusion.export import export_snella

    test_comfyui.BUILDERS["sd3"] = tiny_sd3_at_comfyui_widths
    test_comfyui.ADAPTED["sd3"] = {"transformer": ["dit", r"transformer_blocks\.1\.norm1_context\.linear",
                                                   r"transformer_blocks\.0\.norm1\.linear"],
                                   "text_encoder": "text_encoder"}
    adapter = trained_adapter("sd3", work / "sd3.safetensors")
    output = work / "sd3-comfyui.safetensors"
    export_snella([adapter], tiny_sd3_at_comfyui_widths(0), output, to="comfyui")
    expected = reference("sd3", adapter)
    pipe = tiny_sd3_at_comfyui_widths(0)
    unet_config = {"depth": pipe.transformer.config.num_layers}
    diffusers_map = comfy.utils.mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")
    state = comfy_state_from_map(pipe.transformer, diffusers_map, "diffusion_model.")
    model = comfy.model_base.SD3()
    model.state_dict = lambda: state
    model.model_config = types.SimpleNamespace(unet_config=unet_config)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    text = pipe.text_encoder
    prefix = "" if hasattr(text, "text_model") else "text_model."
    clip_state = {f"clip_l.transformer.{prefix}{name}": p.detach().clone() for name, p in text.named_parameters()}
    key_map = comfy.lora.model_lora_keys_clip(StateOnly(clip_state, {}), key_map)

    def locate(component, path):
        if component == "text_encoder":
            return f"clip_l.transformer.{prefix}{path}.weight", None
        target = key_map[f"transformer.{path}"]
        return (target, None) if isinstance(target, str) else (target[0], target[1:])

    return run_checks(comfy, "sd3", output, key_map, {**state, **clip_state}, expected, locate)


def run_checks(comfy, family, output, key_map, state, expected, locate) -> bool:
    from snella_diffusion.comfyui import register

    register()
    warnings = CapturedWarnings()
    logging.getLogger().addHandler(warnings)
    lora = comfy.utils.load_torch_file(str(output))
    patches = comfy.lora.load_lora(lora, key_map)
    logging.getLogger().removeHandler(warnings)
    unloaded = [m for m in warnings.messages if "not loaded" in m]
    layers = {key.rpartition(".snella.")[0] for key in lora}
    ok = not unloaded and len(patches) == len(layers)
    print(f"{family}: {len(lora)} keys, {len(layers)} layers, {len(patches)} patches, "
          f"unloaded-key warnings {len(unloaded)} {unloaded[:3]}")
    offsets = sum(1 for t in patches if not isinstance(t, str) and t[1] is not None)
    print(f"{family}: {offsets} patches with a row offset, "
          f"{sum(1 for t in patches if not isinstance(t, str) and len(t) > 2)} with a function")
    for strength in (1.0, 0.5):
        patched = patch_all(comfy, patches, state, strength)
        largest = 0.0
        for component, entries in expected.items():
            for path, (w0, delta, fused) in entries.items():
                key, extra = locate(component, path)
                weight = patched.get(key, state[key].to(torch.float32))
                if extra and extra[0] is not None:
                    dim, start, rows = extra[0]
                    weight = weight.narrow(dim, start, rows)
                if extra and len(extra) > 1 and extra[1] is not None:
                    weight = extra[1](weight)  # the swap is its own inverse
                want = fused if strength == 1.0 else w0 + strength * delta
                largest = max(largest, worst(weight, want))
        print(f"{family}: strength {strength}: max relative error vs fuse_snella / W0+s·ΔW = {largest:.2e}")
        ok = ok and largest <= 1e-6
    return ok


def main() -> int:
    root = Path(sys.argv[1])
    comfy = import_comfy(root)
    with tempfile.TemporaryDirectory() as folder:
        results = [check(comfy, Path(folder)) for check in (check_sd, check_flux, check_sd3)]
    print("PASS" if all(results) else "FAIL")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

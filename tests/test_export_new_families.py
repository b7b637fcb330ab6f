"""``snella-export`` on Qwen-Image 2.1, Ideogram 4, LTX-2 and HunyuanVideo 1.5: every exported key
is one a current ComfyUI maps for the family (or diffusers' name where ComfyUI has no such
model), every value is the adapter's ΔW, and ``--to lora`` loads with the family's diffusers
loader and reproduces the adapter's layer outputs at full rank.

The expected names are written out by hand from ComfyUI's code (the file each table follows is
named beside it), never computed by the exporter's maps. SNELLA adapts every linear layer of
each tiny transformer (``snella_diffusion.testing``) with random factors; the reference ΔW of a
layer is the weight ``fuse_snella`` writes minus the pristine weight.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from export_checks import ExportCase, adapt_layers, check_diff_export, check_full_rank_lora_export, expected_deltas
from snella_diffusion import SnellaError
from snella_diffusion.comfyui.layout import SnellaLayerTensors
from snella_diffusion.export import export_snella
from snella_diffusion.testing import tiny_dit_models as dit
from snella_diffusion.testing.tiny_hunyuan_video_models import tiny_hunyuan_video15_pipeline
from snella_diffusion.testing.tiny_ltx2_models import tiny_ltx2_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

# Layers left out of the adapters: HunyuanVideo 1.5's tiny ByT5 mapper has a 2048 x 2048
# layer (byt5_in.fc2 in ComfyUI) whose SVD alone would cost seconds.
SKIPPED = {"context_embedder_2.linear_2"}


def _qwen_image21() -> ExportCase:
    # comfy/ldm/qwen_image21/model.py QwenImage21Transformer2DModel has diffusers' names
    # (time_text_embed.timestep_embedder.linear_1/2, txt_in.in_layer/out_layer, img_in,
    # modulation.1, transformer_blocks.N.attn.to_q/to_k/to_v/to_out.0, img_mlp.out,
    # norm_out.linear, proj_out); img_mlp.gate_layer / .proj are fused into img_mlp.gate_up at
    # load, and comfy/lora.py (QwenImage branch) maps the bare "<name>" of every weight and of
    # each gate_up half onto its rows.
    block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.gate_layer", "img_mlp.proj",
             "img_mlp.out"]
    paths = [f"transformer_blocks.{i}.{p}" for i in (0, 1) for p in block]
    paths += ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
              "txt_in.in_layer", "txt_in.out_layer", "img_in", "modulation.1", "norm_out.linear", "proj_out"]
    return ExportCase(dit.tiny_qwen21_pipeline, {p: p for p in paths}, header=("qwen_image_2_1", "qwen-image-2.1"))


def _ideogram4() -> ExportCase:
    # comfy/ldm/ideogram4/model.py Ideogram4Transformer2DModel: layers.N.attention.qkv (rows q, k,
    # v), attention.o, feed_forward.w1/w2/w3, adaln_modulation; input_proj, llm_cond_proj,
    # t_embedding.mlp_in/mlp_out, adaln_proj, final_layer.linear / .adaln_modulation. comfy/lora.py
    # has no Ideogram 4 branch: model_lora_keys_unet's generic loop maps "diffusion_model.<name>".
    single, fused = {}, {}
    for i in (0, 1):
        block = f"layers.{i}"
        fused[f"diffusion_model.{block}.attention.qkv"] = tuple(f"{block}.attention.to_{p}" for p in "qkv")
        single[f"{block}.attention.to_out.0"] = f"diffusion_model.{block}.attention.o"
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation"):
            single[f"{block}.{name}"] = f"diffusion_model.{block}.{name}"
    for name in ("input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
                 "final_layer.linear", "final_layer.adaln_modulation"):
        single[name] = f"diffusion_model.{name}"
    return ExportCase(dit.tiny_ideogram4_pipeline, single, fused, header=("ideogram4", "ideogram-4"))


def _ltx2() -> ExportCase:
    # comfy/ldm/lightricks/av_model.py BasicAVTransformerBlock: attn1, audio_attn1, attn2,
    # audio_attn2, audio_to_video_attn, video_to_audio_attn (to_q/to_k/to_v/to_out.0), ff /
    # audio_ff (net.0.proj, net.2), as diffusers names them; at the top the Lightricks names
    # patchify_proj, audio_patchify_proj, adaln_single, audio_adaln_single,
    # av_ca_{video,audio}_scale_shift_adaln_single, av_ca_a2v_gate_adaln_single,
    # av_ca_v2a_gate_adaln_single (emb.timestep_embedder.linear_1/2, linear), caption_projection,
    # audio_caption_projection (linear_1/2), proj_out, audio_proj_out. comfy/lora.py maps
    # "diffusion_model.<name>" for every model.
    single = {}
    for i in (0, 1):
        for attn in ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"):
            for projection in ("to_q", "to_k", "to_v", "to_out.0"):
                single[f"transformer_blocks.{i}.{attn}.{projection}"] = ""
        for ff in ("ff", "audio_ff"):
            single[f"transformer_blocks.{i}.{ff}.net.0.proj"] = ""
            single[f"transformer_blocks.{i}.{ff}.net.2"] = ""
    for name in ("caption_projection.linear_1", "caption_projection.linear_2", "audio_caption_projection.linear_1",
                 "audio_caption_projection.linear_2", "proj_out", "audio_proj_out"):
        single[name] = ""
    single = {path: f"diffusion_model.{path}" for path in single}
    single["proj_in"] = "diffusion_model.patchify_proj"
    single["audio_proj_in"] = "diffusion_model.audio_patchify_proj"
    for ours, theirs in (("time_embed", "adaln_single"), ("audio_time_embed", "audio_adaln_single"),
                         ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
                         ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
                         ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
                         ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single")):
        for sub in ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear"):
            single[f"{ours}.{sub}"] = f"diffusion_model.{theirs}.{sub}"
    return ExportCase(tiny_ltx2_pipeline, single, header=("ltx2", "ltx-2"))


def _hunyuan_video15() -> ExportCase:
    # comfy/model_base.py HunyuanVideo15 subclasses HunyuanVideo; comfy/ldm/hunyuan_video/model.py
    # HunyuanVideo: double_blocks.N with comfy/ldm/flux/layers.py DoubleStreamBlock's img_attn.qkv
    # (rows q, k, v), img_attn.proj, img_mlp.0/2, img_mod.lin and txt_ twins; txt_in (TokenRefiner):
    # input_embedder, t_embedder/c_embedder in_layer/out_layer, individual_token_refiner.blocks.N
    # self_attn.qkv / self_attn.proj / mlp.0 / mlp.2 / adaLN_modulation.1; byt5_in.fc1-3;
    # time_in.in_layer/out_layer; final_layer.linear. comfy/lora.py maps "diffusion_model.<name>".
    single, fused = {}, {}
    for i in (0, 1):
        ours, theirs = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        fused[f"{theirs}.img_attn.qkv"] = tuple(f"{ours}.attn.to_{p}" for p in "qkv")
        fused[f"{theirs}.txt_attn.qkv"] = tuple(f"{ours}.attn.add_{p}_proj" for p in "qkv")
        single.update({
            f"{ours}.norm1.linear": f"{theirs}.img_mod.lin", f"{ours}.norm1_context.linear": f"{theirs}.txt_mod.lin",
            f"{ours}.attn.to_out.0": f"{theirs}.img_attn.proj", f"{ours}.attn.to_add_out": f"{theirs}.txt_attn.proj",
            f"{ours}.ff.net.0.proj": f"{theirs}.img_mlp.0", f"{ours}.ff.net.2": f"{theirs}.img_mlp.2",
            f"{ours}.ff_context.net.0.proj": f"{theirs}.txt_mlp.0", f"{ours}.ff_context.net.2": f"{theirs}.txt_mlp.2",
        })
    ours, theirs = "context_embedder.token_refiner.refiner_blocks.0", "diffusion_model.txt_in.individual_token_refiner.blocks.0"
    fused[f"{theirs}.self_attn.qkv"] = tuple(f"{ours}.attn.to_{p}" for p in "qkv")
    single.update({f"{ours}.attn.to_out.0": f"{theirs}.self_attn.proj", f"{ours}.ff.net.0.proj": f"{theirs}.mlp.0",
                   f"{ours}.ff.net.2": f"{theirs}.mlp.2", f"{ours}.norm_out.linear": f"{theirs}.adaLN_modulation.1"})
    single.update({
        "context_embedder.time_text_embed.timestep_embedder.linear_1": "diffusion_model.txt_in.t_embedder.in_layer",
        "context_embedder.time_text_embed.timestep_embedder.linear_2": "diffusion_model.txt_in.t_embedder.out_layer",
        "context_embedder.time_text_embed.text_embedder.linear_1": "diffusion_model.txt_in.c_embedder.in_layer",
        "context_embedder.time_text_embed.text_embedder.linear_2": "diffusion_model.txt_in.c_embedder.out_layer",
        "context_embedder.proj_in": "diffusion_model.txt_in.input_embedder",
        "context_embedder_2.linear_1": "diffusion_model.byt5_in.fc1",
        "context_embedder_2.linear_3": "diffusion_model.byt5_in.fc3",
        "time_embed.timestep_embedder.linear_1": "diffusion_model.time_in.in_layer",
        "time_embed.timestep_embedder.linear_2": "diffusion_model.time_in.out_layer",
        "proj_out": "diffusion_model.final_layer.linear",
    })
    return ExportCase(tiny_hunyuan_video15_pipeline, single, fused,
                      header=("hunyuan_video_1_5", "hunyuan-video-1.5"))


# HunyuanVideo 1.5 layers with no ComfyUI name: the image embedder (ComfyUI's HunyuanVideo of the
# snapshot read has no vision input) and the final adaLN (ComfyUI's LastLayer reads shift then
# scale, diffusers' norm_out scale then shift).
HY15_UNNAMED = ("image_embedder.linear_1", "image_embedder.linear_2", "norm_out.linear")


CASES = {
    "qwen-image-2.1": _qwen_image21(),
    "ideogram4": _ideogram4(),
    "ltx2": _ltx2(),
    "hunyuan-video-1.5": _hunyuan_video15(),
}


@dataclasses.dataclass
class Adapted:
    """A saved tiny pipeline, a SNELLA file on ``layers`` and the reference ΔW per layer."""

    folder: Path
    adapter: Path
    layers: list[str]
    deltas: dict[str, torch.Tensor]


def _adapt(pipe, layers: list[str], path: Path, seed: int) -> Adapted:
    """``export_checks.adapt_layers`` on the transformer, its ΔW keyed by layer path."""
    adapter, deltas = adapt_layers(pipe, ("transformer",), layers, path, seed)
    return Adapted(path, adapter, layers, {name: delta for (_, name), delta in deltas.items()})


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """Per family, built once: the saved pipeline and an adapter on every listed layer."""
    root = tmp_path_factory.mktemp("new-families")
    cache: dict[str, Adapted] = {}

    def build(family: str) -> Adapted:
        if family not in cache:
            case = CASES[family]
            pipe = case.builder(0)
            pipe.save_pretrained(root / family)
            result = _adapt(pipe, case.layers, root / f"{family}-adapter", seed=7)
            cache[family] = Adapted(root / family, result.adapter, result.layers, result.deltas)
        return cache[family]

    return build


def test_cases_cover_every_linear_layer():
    """The tables list every linear layer of each tiny transformer (but ``SKIPPED``), so the
    exports below reach every kind of layer the family has."""
    for family, case in CASES.items():
        transformer = case.builder(0).transformer
        linear = {name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)}
        unnamed = set(HY15_UNNAMED) if family == "hunyuan-video-1.5" else set()
        assert set(case.layers) == linear - SKIPPED - unnamed, family


def _expected(case: ExportCase, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return expected_deltas(case, {("transformer", path): delta for path, delta in deltas.items()})


@pytest.mark.parametrize("family", sorted(CASES))
def test_diff_keys_are_comfyuis_names_and_values_the_adapters_delta(adapted, family, tmp_path):
    case, built = CASES[family], adapted(family)
    expected = _expected(case, built.deltas)
    assert len(expected) == len(case.single) + len(case.fused)
    header = check_diff_export(built.adapter, built.folder, expected, tmp_path)
    version, architecture = case.header
    assert (header["ss_base_model_version"], header["modelspec.architecture"]) == (version, f"{architecture}/lycoris")


def _load_lora(family: str, file: Path):
    """A fresh tiny pipeline with the LoRA file loaded by the family's diffusers loader:
    ``load_lora_weights``, or for HunyuanVideo 1.5 (no loader mixin in diffusers 0.42)
    ``transformer.load_lora_adapter(state_dict, prefix="transformer")``."""
    pipe = CASES[family].builder(0)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(file))
    else:
        pipe.transformer.load_lora_adapter(load_file(str(file)), prefix="transformer")
    return pipe


# Families whose diffusers loader takes lora_A / lora_B factor names only (LTX2LoraLoaderMixin
# refuses .alpha keys and renames no lora_down): --to lora writes those, without alpha. ComfyUI
# reads them as well (comfy/weight_adapter/lora.py).
LORA_AB = {"ltx2"}


def _check_layers_reproduced(transformer, built: Adapted) -> None:
    """The loader wrapped every adapted layer (none left out, none extra), and each wrapped
    layer's output on random inputs equals the layer with W0 + ΔW: error below 1e-4 of the
    update's output (the SVD is float32)."""
    wrapped = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(built.layers)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in built.layers:
            module = transformer.get_submodule(name)
            base = module.base_layer
            inputs = torch.randn(3, base.in_features, generator=generator)
            update = F.linear(inputs, built.deltas[name])
            expected = F.linear(inputs, base.weight, base.bias) + update
            error = float((module(inputs) - expected).norm() / update.norm())
            assert error < 1e-4, (name, error)


@pytest.mark.parametrize("family", sorted(CASES))
def test_full_rank_lora_keys_are_comfyuis_names_and_up_down_the_delta(adapted, family, tmp_path):
    case, built = CASES[family], adapted(family)
    check_full_rank_lora_export(built.adapter, built.folder, _expected(case, built.deltas), tmp_path,
                                lora_ab=family in LORA_AB)


@pytest.mark.parametrize("family", ["ideogram4", "ltx2", "qwen-image-2.1"])
def test_full_rank_lora_loads_with_the_pipelines_load_lora_weights(adapted, family, tmp_path):
    """--to lora --energy 1 loads with the family pipeline's load_lora_weights and reproduces
    every adapted layer. Ideogram 4: diffusers' converter takes the blocks' layers only (the
    ``dit`` preset's; it raises on input_proj, ...), so the load runs on an adapter of those."""
    case, built = CASES[family], adapted(family)
    folder = built.folder
    if family == "ideogram4":
        built = _adapt(case.builder(0), [path for path in case.layers if path.startswith("layers.")],
                       tmp_path / "blocks", seed=9)
    output = tmp_path / "lora.safetensors"
    export_snella([built.adapter], folder, output, to="lora", dtype="fp32", energy=1.0)
    pipe = case.builder(0)
    pipe.load_lora_weights(str(output))
    _check_layers_reproduced(pipe.transformer, built)


def test_hunyuan_video15_peft_loads_with_load_lora_adapter(adapted, tmp_path):
    """HunyuanVideo15Pipeline has no load_lora_weights in diffusers 0.42 and its transformer's
    load_lora_adapter reads diffusers' names only (no converter of ComfyUI's): --to peft
    (``transformer.<diffusers name>.lora_A / lora_B``) loads and reproduces every layer."""
    built = adapted("hunyuan-video-1.5")
    output = tmp_path / "peft.safetensors"
    export_snella([built.adapter], built.folder, output, to="peft", dtype="fp32", energy=1.0)
    pipe = CASES["hunyuan-video-1.5"].builder(0)
    pipe.transformer.load_lora_adapter(load_file(str(output)), prefix="transformer")
    _check_layers_reproduced(pipe.transformer, built)


def test_hunyuan_video15_layers_without_a_comfyui_name_are_refused(tmp_path):
    """The image embedder and the final adaLN have no ComfyUI name: --to diff refuses in one line
    naming the layer and --to peft; --to peft exports them."""
    case = CASES["hunyuan-video-1.5"]
    pipe = case.builder(0)
    pipe.save_pretrained(tmp_path / "pipeline")
    built = _adapt(pipe, list(HY15_UNNAMED), tmp_path / "unnamed", seed=10)
    with pytest.raises(SnellaError, match=r"^layer transformer\.image_embedder\.linear_1: ComfyUI's HunyuanVideo 1\.5 "
                                          r"model has no module for this layer .*--to peft$"):
        export_snella([built.adapter], tmp_path / "pipeline", tmp_path / "diff.safetensors", to="diff")
    peft = tmp_path / "peft.safetensors"
    export_snella([built.adapter], tmp_path / "pipeline", peft, to="peft", dtype="fp32", energy=1.0)
    assert {key.removesuffix(".lora_A.weight") for key in load_file(str(peft)) if key.endswith(".lora_A.weight")} == {
        f"transformer.{path}" for path in HY15_UNNAMED}


def _comfyui_layers(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(file), "pt") as handle:
        header = handle.metadata()
    return json.loads(header["snella_comfyui_layers"]), load_file(str(file))


@pytest.mark.parametrize("family", ["ltx2", "qwen-image-2.1"])
def test_comfyui_prefixes_are_comfyuis_names_and_rebuild_the_delta(adapted, family, tmp_path):
    case, built = CASES[family], adapted(family)
    output = tmp_path / "comfyui.safetensors"
    export_snella([built.adapter], built.folder, output, to="comfyui")
    layers, state = _comfyui_layers(output)
    assert {prefix: layer.removeprefix("transformer.") for prefix, layer in layers.items()} == {
        key: path for path, key in case.single.items()}
    for path, key in case.single.items():
        torch.testing.assert_close(SnellaLayerTensors.find(key, state).delta_weight(), built.deltas[path],
                                   rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("family, refused", [
    ("ideogram4", r"(layers\.\d+)\.attention\.to_[qkv]: .* fused weight \1\.attention\.qkv "),
    ("hunyuan-video-1.5", r"context_embedder\.token_refiner\.refiner_blocks\.0\.attn\.to_[qkv]: .* fused weight "
                          r"txt_in\.individual_token_refiner\.blocks\.0\.self_attn\.qkv "),
])
def test_comfyui_refuses_fused_qkv_parts_and_names_the_rest(adapted, family, refused, tmp_path):
    """ComfyUI maps no row slice of Ideogram 4's attention.qkv nor of HunyuanVideo's qkv
    weights: a q/k/v layer is refused in one line naming it and the fused weight; the other
    layers take their ComfyUI names and rebuild their ΔW."""
    case, built = CASES[family], adapted(family)
    with pytest.raises(SnellaError, match=rf"^layer transformer\.{refused}.*--to diff or --to lora"):
        export_snella([built.adapter], built.folder, tmp_path / "all.safetensors", to="comfyui")
    unfused = _adapt(case.builder(0), sorted(case.single), tmp_path / "unfused", seed=8)
    output = tmp_path / "comfyui.safetensors"
    export_snella([unfused.adapter], built.folder, output, to="comfyui")
    layers, state = _comfyui_layers(output)
    assert {prefix: layer.removeprefix("transformer.") for prefix, layer in layers.items()} == {
        key: path for path, key in case.single.items()}
    for path, key in case.single.items():
        torch.testing.assert_close(SnellaLayerTensors.find(key, state).delta_weight(), unfused.deltas[path],
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_peft_names_flux_layers_without_a_bfl_name(tmp_path):
    """The errors for a layer ComfyUI cannot name advise --to peft: it exports such a layer
    (Flux.1's norm_out.linear) under its diffusers path beside a fused-weight part, each with
    up · down = its ΔW at full rank."""
    pipe = dit.tiny_flux_pipeline(0)
    pipe.save_pretrained(tmp_path / "flux")
    layers = ["norm_out.linear", "transformer_blocks.0.attn.to_q"]
    built = _adapt(pipe, layers, tmp_path / "flux-adapter", seed=12)
    with pytest.raises(SnellaError, match=r"^layer transformer\.norm_out\.linear: no Flux\.1 \(BFL\) module .*--to peft$"):
        export_snella([built.adapter], tmp_path / "flux", tmp_path / "diff.safetensors", to="diff")
    output = tmp_path / "peft.safetensors"
    export_snella([built.adapter], tmp_path / "flux", output, to="peft", dtype="fp32", energy=1.0)
    written = load_file(str(output))
    assert set(written) == {f"transformer.{path}.lora_{ab}.weight" for path in layers for ab in "AB"}
    for path in layers:
        product = written[f"transformer.{path}.lora_B.weight"] @ written[f"transformer.{path}.lora_A.weight"]
        assert float((product - built.deltas[path]).norm() / built.deltas[path].norm()) < 1e-5, path

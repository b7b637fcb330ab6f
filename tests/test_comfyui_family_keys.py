"""``snella-export --to diff / lora / comfyui`` on the families of 2025-26: every exported key is
one a current ComfyUI maps for the family, and every value is the adapter's ΔW.

The expected names below are written out by hand from ComfyUI's code (a 2026 checkout of
Comfy-Org/ComfyUI; the function each table follows is named beside it), never computed by the
exporter's own maps. Each family's tiny pipeline (``snella_diffusion.testing``) is saved by
path; SNELLA adapts every listed layer with random factors; the reference ΔW of each layer is
the weight ``fuse_snella`` writes minus the pristine weight, and a fused ComfyUI weight's ΔW is
its parts' stacked in ComfyUI's row order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from export_checks import (
    AdaptedPipeline,
    ExportCase,
    adapt_layers,
    check_diff_export,
    check_full_rank_lora_export,
    expected_deltas,
)
from snella_diffusion import SnellaError
from snella_diffusion.comfyui.layout import SnellaLayerTensors
from snella_diffusion.export import export_snella
from snella_diffusion.export.cli import main as export_main
from snella_diffusion.testing import tiny_dit_models as dit
from snella_diffusion.testing.tiny_video_models import tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def _same(*paths: str) -> dict[str, str]:
    """Layers ComfyUI maps by their diffusers name: ``transformer.<path>``."""
    return {path: f"transformer.{path}" for path in paths}


def _z_image() -> ExportCase:
    # comfy/utils.py z_image_to_diffusers (comfy/lora.py model_lora_keys_unet, the Lumina2
    # branch, maps "transformer.<diffusers key>"): per block attention.to_q/to_k/to_v (row
    # slices of attention.qkv), attention.to_out.0, feed_forward.w1/w2/w3, adaLN_modulation.0;
    # all_x_embedder.2-1, all_final_layer.2-1.linear / .adaLN_modulation.1, cap_embedder.1,
    # t_embedder.mlp.0 / .2.
    block = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    paths = [f"{b}.{p}" for b in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0") for p in block]
    paths += ["layers.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0",
              "all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
              "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"]
    return ExportCase(dit.tiny_z_image_pipeline, _same(*paths))


def _flux2_single(guidance: bool) -> dict[str, str]:
    # comfy/utils.py flux_to_diffusers (ComfyUI's Flux2 subclasses its Flux model,
    # comfy/model_base.py) with the module names of ComfyUI's Flux model as kohya keys
    # (model_lora_keys_unet: "lora_unet_" + name with "_"): img_attn.proj, txt_attn.proj,
    # img_mlp.0/2, txt_mlp.0/2, single linear1 (to_qkv_mlp_proj) / linear2 (to_out), img_in,
    # txt_in, time_in.in_layer/out_layer, guidance_in.*, the shared
    # double_stream_modulation_img/txt.lin and single_stream_modulation.lin, final_layer.linear.
    names = {
        "transformer_blocks.0.attn.to_out.0": "double_blocks_0_img_attn_proj",
        "transformer_blocks.0.attn.to_add_out": "double_blocks_0_txt_attn_proj",
        "transformer_blocks.0.ff.linear_in": "double_blocks_0_img_mlp_0",
        "transformer_blocks.0.ff.linear_out": "double_blocks_0_img_mlp_2",
        "transformer_blocks.0.ff_context.linear_in": "double_blocks_0_txt_mlp_0",
        "transformer_blocks.0.ff_context.linear_out": "double_blocks_0_txt_mlp_2",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks_0_linear1",
        "single_transformer_blocks.0.attn.to_out": "single_blocks_0_linear2",
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img_lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt_lin",
        "single_stream_modulation.linear": "single_stream_modulation_lin",
        "proj_out": "final_layer_linear",
    }
    if guidance:
        names["time_guidance_embed.guidance_embedder.linear_1"] = "guidance_in_in_layer"
        names["time_guidance_embed.guidance_embedder.linear_2"] = "guidance_in_out_layer"
    return {path: f"lora_unet_{name}" for path, name in names.items()}


def _flux2(guidance: bool) -> ExportCase:
    # flux_to_diffusers: img_attn.qkv rows = to_q, to_k, to_v; txt_attn.qkv = add_q/k/v_proj;
    # diffusers' names of those parts map onto hidden_size-row slices ("transformer.<name>").
    image = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
    text = ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.add_v_proj")
    builder = dit.tiny_flux2_dev_pipeline if guidance else dit.tiny_flux2_klein_pipeline
    return ExportCase(builder, _flux2_single(guidance),
                      {"lora_unet_double_blocks_0_img_attn_qkv": image, "lora_unet_double_blocks_0_txt_attn_qkv": text},
                      comfyui_parts=_same(*image, *text))


def _krea2() -> ExportCase:
    # comfy/utils.py krea2_to_diffusers (comfy/lora.py maps "transformer.<diffusers key>"):
    # attn.to_q/to_k/to_v/to_gate/to_out.0, ff.gate/up/down of transformer_blocks and of
    # text_fusion.layerwise_blocks / refiner_blocks; img_in, time_embed.linear_1/2,
    # time_mod_proj, txt_in.linear_1/2, final_layer.linear.
    block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up", "ff.down"]
    blocks = ("transformer_blocks.0", "transformer_blocks.1", "text_fusion.layerwise_blocks.0",
              "text_fusion.refiner_blocks.0")
    paths = [f"{b}.{p}" for b in blocks for p in block]
    paths += ["img_in", "time_embed.linear_1", "time_embed.linear_2", "time_mod_proj", "txt_in.linear_1",
              "txt_in.linear_2", "final_layer.linear"]
    return ExportCase(dit.tiny_krea2_pipeline, _same(*paths))


def _lumina2() -> ExportCase:
    # comfy/ldm/lumina/model.py NextDiT module names as kohya keys (model_lora_keys_unet's
    # "lora_unet_" loop; z_image_to_diffusers takes Z-Image's diffusers names, not Lumina2's):
    # attention.qkv (rows q, k, v: 2·16, 1·16, 1·16 with 1 key/value head), attention.out,
    # feed_forward.w1/w2/w3, adaLN_modulation.1; x_embedder, t_embedder.mlp.0/2, cap_embedder.1,
    # final_layer.adaLN_modulation.1 / .linear.
    single, fused = {}, {}
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
        key = "lora_unet_" + block.replace(".", "_")
        fused[f"{key}_attention_qkv"] = tuple(f"{block}.attn.to_{p}" for p in "qkv")
        single[f"{block}.attn.to_out.0"] = f"{key}_attention_out"
        for index in (1, 2, 3):
            single[f"{block}.feed_forward.linear_{index}"] = f"{key}_feed_forward_w{index}"
        if not block.startswith("context"):
            single[f"{block}.norm1.linear"] = f"{key}_adaLN_modulation_1"
    single.update({
        "x_embedder": "lora_unet_x_embedder",
        "time_caption_embed.timestep_embedder.linear_1": "lora_unet_t_embedder_mlp_0",
        "time_caption_embed.timestep_embedder.linear_2": "lora_unet_t_embedder_mlp_2",
        "time_caption_embed.caption_embedder.1": "lora_unet_cap_embedder_1",
        "norm_out.linear_1": "lora_unet_final_layer_adaLN_modulation_1",
        "norm_out.linear_2": "lora_unet_final_layer_linear",
    })
    return ExportCase(dit.tiny_lumina2_pipeline, single, fused)


def _sana() -> ExportCase:
    # No Sana model in comfy/supported_models.py (its `models` list) and no Sana branch in
    # comfy/lora.py model_lora_keys_unet: the names stay diffusers' ("transformer.<name>").
    block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    paths = [f"transformer_blocks.{i}.{p}" for i in (0, 1) for p in block]
    paths += ["time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2",
              "time_embed.linear", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"]
    return ExportCase(dit.tiny_sana_pipeline, _same(*paths))


def _wan_names() -> dict[str, str]:
    # comfy/ldm/wan/model.py WanModel as kohya keys (model_lora_keys_unet's "lora_unet_" loop;
    # comfy/lora.py has no Wan map of diffusers names): blocks.N.self_attn.q/k/v/o,
    # cross_attn.q/k/v/o, ffn.0 / ffn.2, time_embedding.0/2, time_projection.1,
    # text_embedding.0/2, head.head.
    names = {}
    for index in (0, 1):
        for ours, theirs in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for projection, name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
                names[f"blocks.{index}.{ours}.{projection}"] = f"lora_unet_blocks_{index}_{theirs}_{name}"
        names[f"blocks.{index}.ffn.net.0.proj"] = f"lora_unet_blocks_{index}_ffn_0"
        names[f"blocks.{index}.ffn.net.2"] = f"lora_unet_blocks_{index}_ffn_2"
    names.update({
        "condition_embedder.time_embedder.linear_1": "lora_unet_time_embedding_0",
        "condition_embedder.time_embedder.linear_2": "lora_unet_time_embedding_2",
        "condition_embedder.time_proj": "lora_unet_time_projection_1",
        "condition_embedder.text_embedder.linear_1": "lora_unet_text_embedding_0",
        "condition_embedder.text_embedder.linear_2": "lora_unet_text_embedding_2",
        "proj_out": "lora_unet_head_head",
    })
    return names


CASES = {
    "z-image": _z_image(),
    "flux2-klein": _flux2(guidance=False),
    "flux2-dev": _flux2(guidance=True),
    "krea2": _krea2(),
    "lumina2": _lumina2(),
    "sana": _sana(),
    "wan": ExportCase(tiny_wan_pipeline, _wan_names()),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family, built once: the saved pipeline and the adapter on all its listed layers."""
    root = tmp_path_factory.mktemp("comfyui-keys")
    cache: dict[str, AdaptedPipeline] = {}

    def build(name: str) -> AdaptedPipeline:
        if name not in cache:
            case = CASES[name]
            folder = root / name
            pipe = case.builder(0)
            pipe.save_pretrained(folder)
            cache[name] = AdaptedPipeline(folder, *adapt_layers(pipe, ("transformer",), case.layers,
                                                                root / f"{name}-adapter", seed=3))
        return cache[name]

    return build


@pytest.mark.parametrize("family", sorted(CASES))
def test_diff_keys_are_comfyuis_names_and_values_the_adapters_delta(exported, family, tmp_path):
    case, built = CASES[family], exported(family)
    expected = expected_deltas(case, built.deltas)
    assert len(expected) == len(case.single) + len(case.fused)
    check_diff_export(built.adapter, built.folder, expected, tmp_path)


# Families whose --to lora file names the factors lora_A / lora_B without alpha (diffusers'
# loaders turn kohya files of these into transformer.transformer.* names or refuse their alpha
# keys; comfy/weight_adapter/lora.py reads lora_A / lora_B as well)
LORA_AB = {"krea2", "sana", "z-image"}


@pytest.mark.parametrize("family", sorted(CASES))
def test_full_rank_lora_keys_are_comfyuis_names_and_up_down_the_delta(exported, family, tmp_path):
    case, built = CASES[family], exported(family)
    check_full_rank_lora_export(built.adapter, built.folder, expected_deltas(case, built.deltas), tmp_path,
                                lora_ab=family in LORA_AB)


def _comfyui_layers(exported_file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(exported_file), "pt") as handle:
        header = handle.metadata()
    return json.loads(header["snella_comfyui_layers"]), load_file(str(exported_file))


@pytest.mark.parametrize("family", sorted(set(CASES) - {"lumina2"}))
def test_comfyui_prefixes_are_comfyuis_names_and_rebuild_the_delta(exported, family, tmp_path):
    case, built = CASES[family], exported(family)
    output = tmp_path / "comfyui.safetensors"
    export_snella([built.adapter], built.folder, output, to="comfyui")
    layers, state = _comfyui_layers(output)
    expected = {**{key: path for path, key in case.single.items()}, **{p: path for path, p in case.comfyui_parts.items()}}
    assert {prefix: layer.removeprefix("transformer.") for prefix, layer in layers.items()} == expected
    for prefix, path in expected.items():
        rebuilt = SnellaLayerTensors.find(prefix, state).delta_weight()
        torch.testing.assert_close(rebuilt, built.deltas[("transformer", path)], rtol=1e-5, atol=1e-6, msg=prefix)


def test_lumina2_comfyui_refuses_fused_qkv_and_names_the_rest(exported, tmp_path):
    """ComfyUI's key map has no row slice of Lumina 2's attention.qkv: a q/k/v layer is refused
    in one line naming it and the fused weight; the other layers take their NextDiT names."""
    case, built = CASES["lumina2"], exported("lumina2")
    with pytest.raises(SnellaError, match=r"layer transformer\.(\w+\.\d+)\.attn\.to_[qkv]: .* fused weight "
                                          r"\1\.attention\.qkv .*--to diff or --to lora"):
        export_snella([built.adapter], built.folder, tmp_path / "all.safetensors", to="comfyui")
    pipe = case.builder(0)
    unfused = AdaptedPipeline(built.folder, *adapt_layers(pipe, ("transformer",), sorted(case.single),
                                                          tmp_path / "unfused", seed=4))
    output = tmp_path / "comfyui.safetensors"
    export_snella([unfused.adapter], built.folder, output, to="comfyui")
    layers, state = _comfyui_layers(output)
    assert {prefix: layer.removeprefix("transformer.") for prefix, layer in layers.items()} == {
        key: path for path, key in case.single.items()}
    for path, key in case.single.items():
        torch.testing.assert_close(SnellaLayerTensors.find(key, state).delta_weight(),
                                   unfused.deltas[("transformer", path)], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """Wan 2.2 A14B's layout: one SNELLA file on both experts (``--wan_expert both``)."""
    root = tmp_path_factory.mktemp("wan-a14b")
    pipe = tiny_wan_pipeline(0, two_experts=True)
    pipe.save_pretrained(root / "pipeline")
    return AdaptedPipeline(root / "pipeline", *adapt_layers(pipe, ("transformer", "transformer_2"),
                                                            CASES["wan"].layers, root / "both", seed=5))


def test_wan_a14b_experts_export_one_file_each_under_wan_names(a14b, tmp_path, capsys):
    """ComfyUI loads the high- and low-noise experts as two models with the same module names:
    a file holding both is refused naming --component; each component exports on its own with
    its own ΔW under the Wan names."""
    with pytest.raises(SnellaError, match=r"both map to lora_unet_.*--component transformer / --component transformer_2"):
        export_snella([a14b.adapter], a14b.folder, tmp_path / "both.safetensors", to="diff", dtype="fp32")
    with pytest.raises(SnellaError, match=r"both map to ComfyUI key lora_unet_.*--component"):
        export_snella([a14b.adapter], a14b.folder, tmp_path / "both-comfyui.safetensors", to="comfyui")
    with pytest.raises(SnellaError, match=r"--component text_encoder: the adapters hold no layer of it"):
        export_snella([a14b.adapter], a14b.folder, tmp_path / "te.safetensors", to="diff", component="text_encoder")
    peft = tmp_path / "both-peft.safetensors"
    export_snella([a14b.adapter], a14b.folder, peft, to="peft", dtype="fp32", rank=2)  # diffusers names carry the expert
    assert {key.split(".")[0] for key in load_file(str(peft))} == {"transformer", "transformer_2"}
    case = CASES["wan"]
    for component in ("transformer", "transformer_2"):
        output = tmp_path / f"{component}.safetensors"
        assert export_main([str(a14b.adapter), "--base", str(a14b.folder), "--to", "diff", "--dtype", "fp32",
                            "--component", component, "-o", str(output)]) == 0
        written = load_file(str(output))
        expected = expected_deltas(case, a14b.deltas, component)
        assert {key.removesuffix(".diff") for key in written} == set(expected)
        for key, delta in expected.items():
            torch.testing.assert_close(written[f"{key}.diff"], delta, rtol=1e-5, atol=1e-6, msg=key)
        with safe_open(str(output), "pt") as handle:
            assert handle.metadata()["modelspec.architecture"] == "wan-2.2-t2v-a14b/lycoris"
    high, low = load_file(str(tmp_path / "transformer.safetensors")), load_file(str(tmp_path / "transformer_2.safetensors"))
    assert not torch.equal(high["lora_unet_blocks_0_self_attn_q.diff"], low["lora_unet_blocks_0_self_attn_q.diff"])
    assert "family wan" in capsys.readouterr().out


def test_header_names_each_familys_base_model(exported, tmp_path):
    expected = {"z-image": ("z_image", "z-image"), "flux2-klein": ("flux2", "flux-2-klein"),
                "flux2-dev": ("flux2", "flux-2-dev"), "krea2": ("krea2", "krea-2"),
                "lumina2": ("lumina2", "lumina-image-2"), "sana": ("sana", "sana"), "wan": ("wan21", "wan-2.1-t2v")}
    for family, (version, architecture) in expected.items():
        built = exported(family)
        output = tmp_path / f"{family}.safetensors"
        export_snella([built.adapter], built.folder, output, to="lora", rank=2)
        with safe_open(str(output), "pt") as handle:
            header = handle.metadata()
        assert (header["ss_base_model_version"], header["modelspec.architecture"]) == (version, f"{architecture}/lora")


def test_z_image_with_fewer_key_value_heads_leaves_k_and_v_unnamed():
    """z_image_to_diffusers slices k and v as ``dim`` rows each: right only when every head has
    its own key/value head (the published Z-Image). With fewer, k/v have no ComfyUI name."""
    from snella_diffusion.export.families import z_image_names

    full, grouped = z_image_names({"n_heads": 4, "n_kv_heads": 4}), z_image_names({"n_heads": 4, "n_kv_heads": 2})
    paths = {"layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v"}
    assert [target.key for target in full.targets("transformer", paths)] == sorted(f"transformer.{p}" for p in paths)
    assert grouped.comfyui_prefix("transformer", "layers.0.attention.to_q") == "transformer.layers.0.attention.to_q"
    with pytest.raises(SnellaError, match=r"^layer transformer\.layers\.0\.attention\.to_k: ComfyUI's Z-Image model "
                                          r"has no module for this layer \(comfy/utils\.py z_image_to_diffusers\)"):
        grouped.targets("transformer", paths)

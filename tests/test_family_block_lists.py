"""``--blocks_to_swap`` swaps the transformer blocks each family's denoiser runs: the blocks
``ModelFamily.swappable_blocks`` finds on every published config (counted on ``meta``) against
the block counts of the published configs, written here; and the three video families train
through the script with checkpointing, block swap and an fp8 base on clips."""

import pytest
import torch
from safetensors.torch import load_file

from family_runs import CLIP_SCRIPT_FLAGS, FamilyRun, write_clip_folder
from snella_diffusion.families import FAMILIES
from snella_diffusion.testing.reference_configs import build_reference_model

pytestmark = pytest.mark.usefixtures("single_thread")

# family -> (reference config, transformer blocks its forward runs in order: the main stacks,
# not Z-Image's / Lumina 2's refiners or HiDream's caption projections)
PUBLISHED_BLOCKS = {
    "stable-diffusion-3": ("sd3", 24),
    "flux": ("flux", 19 + 38),
    "qwen-image": ("qwen-image", 60),
    "z-image": ("z-image", 30),
    "flux2-klein": ("flux2-klein", 5 + 20),
    "chroma": ("chroma", 19 + 38),
    "flux2": ("flux2", 8 + 48),
    "krea2": ("krea2", 28),
    "wan": ("wan2.1-14b", 40),
    "lumina2": ("lumina2", 26),
    "sana": ("sana", 20),
    "hidream": ("hidream", 16 + 32),
    "ideogram4": ("ideogram4", 34),
    "qwen-image-2.1": ("qwen-image-2.1", 32),
    "ltx2": ("ltx2", 48),
    "hunyuan-video-1.5": ("hunyuan-video1.5", 54),
}


def test_every_transformer_family_swaps_the_blocks_of_its_published_config():
    unet_families = {"stable-diffusion", "stable-diffusion-xl", "pixart"}
    assert set(FAMILIES) - unet_families == set(PUBLISHED_BLOCKS)
    for name, (model, blocks) in PUBLISHED_BLOCKS.items():
        denoiser = build_reference_model(model, device="meta")
        found = FAMILIES[name].swappable_blocks(denoiser)
        assert len(found) == blocks, name
        assert len({id(block) for block in found}) == blocks, name


def _video_run(name, tmp_path_factory):
    from diffusers import HunyuanVideo15Pipeline, LTX2Pipeline, WanPipeline

    from snella_diffusion.testing.tiny_hunyuan_video_models import tiny_hunyuan_video15_pipeline
    from snella_diffusion.testing.tiny_ltx2_models import tiny_ltx2_pipeline
    from snella_diffusion.testing.tiny_video_models import tiny_wan_pipeline

    build, pipeline_class, length, resolution = {
        "wan": (tiny_wan_pipeline, WanPipeline, 32, 16),
        "ltx2": (tiny_ltx2_pipeline, LTX2Pipeline, 16, 32),
        "hunyuan-video-1.5": (tiny_hunyuan_video15_pipeline, HunyuanVideo15Pipeline, 64, 16),
    }[name]
    folder = tmp_path_factory.mktemp(name) / "pipeline"
    build(0).save_pretrained(folder)
    return FamilyRun(folder, pipeline_class, (), ("--max_sequence_length", str(length))), resolution


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("clips"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan", "ltx2", "hunyuan-video-1.5"])
def test_video_families_train_with_checkpointing_block_swap_and_an_fp8_base(name, clips, tmp_path, tmp_path_factory,
                                                                            caplog):
    from snella_diffusion import load_snella
    from snella_diffusion.families import detect_family

    run, resolution = _video_run(name, tmp_path_factory)
    flags = (*CLIP_SCRIPT_FLAGS, "--resolution", str(resolution), "--num_frames", "9", "--max_train_steps", "2")
    checkpointed = load_file(run.run_script(tmp_path / "checkpointed", *flags, "--gradient_checkpointing",
                                            instance_dir=clips))
    with caplog.at_level("INFO"):
        swapped = load_file(run.run_script(tmp_path / "swapped", *flags, "--gradient_checkpointing",
                                           "--blocks_to_swap", "1", instance_dir=clips))
    assert "--blocks_to_swap=1: the frozen weights of 1 of 2 transformer blocks wait in CPU memory" in caplog.text
    assert swapped.keys() == checkpointed.keys() and len(checkpointed) > 10
    for key, tensor in checkpointed.items():
        assert torch.equal(swapped[key], tensor), key
    quantized = run.run_script(tmp_path / "fp8", *flags, "--quantize_base", "fp8", instance_dir=clips)
    family, index = detect_family(str(run.folder))
    transformer = family.load(str(run.folder), index).denoiser
    layers = load_snella(transformer, quantized)
    assert len(layers) > 0 and all(layer.base_quantization is None for layer in layers.values())
    assert all(torch.isfinite(layer.delta_weight()).all() for layer in layers.values())

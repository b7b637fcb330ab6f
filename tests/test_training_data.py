"""Training data and options of the DreamBooth script, without full runs: captions and their
transforms, caption dropout at its rate, Hugging Face imagefolder datasets, aspect-ratio
buckets (sizes, one size per batch, SDXL time ids, cached latents), noise offset and input
perturbation, masked loss, EMA, Prodigy, the job config file, allocation.png row labels and
each bad-input message (raised before any model is loaded)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from snella_diffusion.errors import SnellaError
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from snella_diffusion.training.buckets import (
    BucketBatchSampler,
    kohya_buckets,
    nearest_bucket,
    parse_bucket_list,
    resize_and_crop,
)
from snella_diffusion.training.captions import CaptionOptions, read_sidecar_captions, shuffle_tags
from snella_diffusion.training.data import CachedLatentsDataset, collate_dreambooth, transform_image
from snella_diffusion.training.ema import AdapterEMA, ema_decay_at
from snella_diffusion.families import detect_family
from snella_diffusion.training.batch_loss import training_loss
from snella_diffusion.training.data_arguments import check_data_settings
from snella_diffusion.training.hf_datasets import dataset_images
from snella_diffusion.training.image_dataset import TrainingImageDataset
from snella_diffusion.training.job_config import parse_args_with_config, render_toml
from snella_diffusion.training.loss_options import latent_loss_mask, perturb_noise
from snella_diffusion.training.objectives import weighted_mse
from snella_diffusion.training.training_images import TrainingImage
from snella_diffusion.viz import allocation_row_groups, save_allocation_heatmap

from train_scripts import train_dreambooth_snella as script


def solid(width, height, colour, alpha=None):
    image = Image.new("RGB", (width, height), colour)
    if alpha is not None:
        image.putalpha(alpha)
    return image


def gradient(width, height, seed):
    """An image whose every pixel differs (crops can be located exactly)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data-sd") / "pipeline"
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_components(sd_folder):
    family, index = detect_family(str(sd_folder))
    return family, family.load(str(sd_folder), index)


@pytest.fixture(scope="session")
def sdxl_components(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data-sdxl") / "pipeline"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    family, index = detect_family(str(folder))
    return family, family.load(str(folder), index)


# ----------------------------------------------------------------------------- captions


def test_shuffle_keeps_leading_tags_and_permutes_the_rest():
    caption = "sks, dog, on grass, sunny, photo, 4k"
    seen = set()
    for seed in range(40):
        shuffled = shuffle_tags(caption, 2, np.random.default_rng(seed)).split(", ")
        assert shuffled[:2] == ["sks", "dog"]
        assert sorted(shuffled[2:]) == sorted(["on grass", "sunny", "photo", "4k"])
        seen.add(tuple(shuffled))
    assert len(seen) > 10  # 4! = 24 orders, most of them drawn


def test_prefix_goes_in_front_of_captions_not_of_the_fallback():
    options = CaptionOptions(fallback_prompt="a photo of sks dog", prefix="sks")
    rng = np.random.default_rng(0)
    assert options.prompt_for("a dog on grass", rng) == "sks, a dog on grass"
    assert options.prompt_for(None, rng) == "a photo of sks dog"
    assert options.possible_prompts(["a", None, "b"]) == {"sks, a", "sks, b", "a photo of sks dog"}
    assert CaptionOptions(prefix="sks", shuffle=True).possible_prompts(["a"]) is None


def test_caption_dropout_gives_the_empty_prompt_at_its_rate():
    """4,000 draws (100 epochs × 40 items) at p = 0.25: the empty-prompt count is within 3σ of
    N·p, and non-empty draws are the captions unchanged."""
    images = [TrainingImage(f"{i}.png", solid(8, 8, "red"), f"caption {i}") for i in range(40)]
    dataset = TrainingImageDataset(images, CaptionOptions(dropout=0.25), resolution=8, seed=3)
    empty, draws = 0, 0
    for epoch in range(100):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            prompt = dataset.instance_prompt_of(index)
            draws += 1
            empty += prompt == ""
            assert prompt in ("", f"caption {index}")
    sigma = math.sqrt(draws * 0.25 * 0.75)
    assert abs(empty - draws * 0.25) <= 3 * sigma, (empty, draws)


def test_sidecar_captions_and_the_missing_caption_policies(tmp_path, caplog):
    paths = []
    for name in ("a.png", "b.png", "c.png"):
        solid(8, 8, "red").save(tmp_path / name)
        paths.append(tmp_path / name)
    (tmp_path / "a.txt").write_text("red thing,\n shiny\n")
    (tmp_path / "b.txt").write_text("blue thing")
    with pytest.raises(SnellaError, match=r"--caption_extension=.txt: 1 image\(s\) in .* have no caption file: c.png"):
        read_sidecar_captions(paths, ".txt", "error", None)
    with pytest.raises(SnellaError, match="no --instance_prompt is given"):
        read_sidecar_captions(paths, ".txt", "instance_prompt", None)
    captions = read_sidecar_captions(paths, "txt", "instance_prompt", "a photo of sks")
    assert captions == ["red thing, shiny", "blue thing", None]
    assert "c.png" in caplog.text


def test_prompt_cache_encodes_known_prompts_once_and_others_per_batch():
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return {"embeds": torch.tensor([[float(len(p))] for p in prompts])}

    from snella_diffusion.training.captions import PromptEmbeddingCache

    cache = PromptEmbeddingCache(encode, trainable=False, chunk_size=2)
    cache.precompute({"ab", "abc", ""})
    assert sorted(map(len, calls)) == [1, 2]  # 3 prompts in chunks of 2
    out = cache(["abc", "", "ab"])
    assert out["embeds"].flatten().tolist() == [3.0, 0.0, 2.0] and len(calls) == 2
    assert cache(["abcd", "ab"])["embeds"].flatten().tolist() == [4.0, 2.0] and len(calls) == 3


# ----------------------------------------------------------------------------- datasets


def write_imagefolder(folder, captions):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as stream:
        for index, (colour, caption) in enumerate(captions):
            solid(40, 32, colour).save(folder / f"img_{index}.png")
            stream.write(json.dumps({"file_name": f"img_{index}.png", "text": caption}) + "\n")
    return folder


def test_local_imagefolder_with_metadata_jsonl(tmp_path):
    folder = write_imagefolder(tmp_path / "set", [("red", "a red square"), ("blue", "a blue square")])
    names, images, captions = dataset_images(str(folder), caption_column="text", cache_dir=str(tmp_path / "cache"))
    assert names == ["img_0.png", "img_1.png"]
    assert captions == ["a red square", "a blue square"]
    assert [image.convert("RGB").getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 0, 255)]
    with pytest.raises(SnellaError, match=r"--caption_column=caption: --dataset_name=.* has no such column \(columns: image, text\)"):
        dataset_images(str(folder), caption_column="caption", cache_dir=str(tmp_path / "cache"))


def test_offline_hub_dataset_fails_with_one_line(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SnellaError) as error:
        dataset_images("nobody/no-such-dataset-xyz", cache_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith("--dataset_name=nobody/no-such-dataset-xyz: could not be loaded")
    assert "\n" not in message


def test_missing_datasets_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SnellaError, match=r"pip install 'snella-diffusion\[datasets\]'"):
        dataset_images("anything")


# ----------------------------------------------------------------------------- buckets


def test_kohya_buckets_hold_about_the_area_in_multiples_of_the_step():
    buckets = kohya_buckets(1024, 512, 2048, 64)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0 and 512 <= min(height, width) and max(height, width) <= 2048
        assert height * width <= 1024 * 1024
    assert parse_bucket_list("1024,1024; 768,1360") == [(1024, 1024), (768, 1360)]
    assert nearest_bucket((600, 1000), [(32, 32), (24, 40), (40, 24)]) == 1


def test_resize_and_crop_matches_pil_resize_and_crop():
    """Against PIL directly: a 53×37 image onto a 24×40 bucket scales by max(24/37, 40/53)."""
    image = gradient(53, 37, seed=0)
    scale = max(24 / 37, 40 / 53)
    resized = image.resize((max(40, round(53 * scale)), max(24, round(37 * scale))), Image.BICUBIC)
    for seed in range(5):
        crop = resize_and_crop(image, (24, 40), False, False, np.random.default_rng(seed))
        top, left = crop.crop_top_left
        expected = np.asarray(resized.crop((left, top, left + 40, top + 24)), dtype=np.float32) / 127.5 - 1.0
        assert torch.equal(crop.pixels, torch.from_numpy(expected.transpose(2, 0, 1).copy()))
        assert crop.original_size == (37, 53)
    centred = resize_and_crop(image, (24, 40), True, False, np.random.default_rng(0))
    assert centred.crop_top_left == ((resized.height - 24) // 2, (resized.width - 40) // 2)
    square = transform_image(image, 24, True, False, np.random.default_rng(0))
    assert square.pixels.shape == (3, 24, 24) and square.crop_top_left == (0, (round(53 * 24 / 37) - 24) // 2)


@pytest.fixture(scope="session")
def three_ratio_images():
    """Two wide, two tall and two square images (sizes differ within each ratio)."""
    sizes = [(64, 40), (96, 58), (40, 64), (50, 83), (48, 48), (70, 70)]
    return [TrainingImage(f"img_{i}.png", gradient(w, h, seed=i), f"caption {i}") for i, (w, h) in enumerate(sizes)]


def test_three_aspect_ratios_land_in_three_buckets_and_batches_have_one_size(three_ratio_images):
    buckets = kohya_buckets(32, 16, 64, 8)
    dataset = TrainingImageDataset(three_ratio_images, CaptionOptions(), 32, random_flip=True, buckets=buckets, seed=1)
    assert len(set(dataset.bucket_of_image)) == 3
    for first_index in (0, 2, 4):  # the two images of one ratio share a bucket
        assert dataset.bucket_of_image[first_index] == dataset.bucket_of_image[first_index + 1]
    sampler = BucketBatchSampler(dataset.buckets_of_items, batch_size=2, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_dreambooth)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["pixel_values"].shape[0] == 2
            (height, width) = batch["pixel_values"].shape[-2:]
            assert (height, width) in buckets
            seen.append((height, width))
        assert len(set(seen)) == 3 and len(seen) == 3
    first = BucketBatchSampler(dataset.buckets_of_items, 2, seed=1)
    second = BucketBatchSampler(dataset.buckets_of_items, 2, seed=1)
    first.set_epoch(4)
    second.set_epoch(4)
    assert first.batches() == second.batches()  # a function of (seed, epoch): resumable


def test_sdxl_time_ids_carry_each_images_size_and_crop(sdxl_components, three_ratio_images):
    """The UNet's time ids are (original h, w, crop top, left, bucket h, w) for every sample,
    and the batch pixels are the resized image cropped at that corner (checked with PIL)."""
    family, components = sdxl_components
    buckets = kohya_buckets(32, 16, 64, 8)
    dataset = TrainingImageDataset(three_ratio_images, CaptionOptions(), 32, buckets=buckets, seed=2)
    recorded = []
    hook = components.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: recorded.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    try:
        for batch_indices in BucketBatchSampler(dataset.buckets_of_items, 2, seed=2):
            batch = collate_dreambooth([dataset[i] for i in batch_indices])
            with torch.no_grad():
                latents = family.encode_latents(components, batch["pixel_values"], torch.Generator().manual_seed(0))
                conditioning = family.encode_prompt(components, ["x"] * len(batch_indices), torch.device("cpu"))
                family.predict(components, latents, torch.tensor([10] * len(batch_indices)), conditioning, batch)
            time_ids = recorded[-1]
            for row, index in enumerate(batch_indices):
                image = three_ratio_images[index].image
                height, width = batch["pixel_values"].shape[-2:]
                top, left = (int(v) for v in time_ids[row, 2:4])
                assert time_ids[row].tolist() == [image.size[1], image.size[0], top, left, height, width]
                scale = max(height / image.size[1], width / image.size[0])
                resized = image.resize((max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale))),
                                       Image.BICUBIC)
                expected = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32) / 127.5 - 1
                assert np.allclose(batch["pixel_values"][row].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    finally:
        hook.remove()
    assert len(recorded) == 3


def test_cached_latents_with_buckets_give_the_same_loss(sd_components, three_ratio_images):
    """On every bucket batch: the loss from cached latents equals the loss from encoding the
    same items' pixels with the same VAE draws and the same noise."""
    family, components = sd_components
    dataset = TrainingImageDataset(three_ratio_images, CaptionOptions(fallback_prompt="p"), 32,
                                   buckets=kohya_buckets(32, 16, 64, 8), seed=4)
    cache_generator = torch.Generator().manual_seed(11)
    cached = CachedLatentsDataset(dataset, lambda pixels: family.encode_latents(components, pixels, cache_generator))
    replay = torch.Generator().manual_seed(11)
    replayed = [family.encode_latents(components, dataset[i]["instance"].pixels[None], replay)[0] for i in range(len(dataset))]
    objective = family.objective(components)
    for batch_indices in BucketBatchSampler(dataset.buckets_of_items, 2, seed=4):
        from_cache = collate_dreambooth([cached[i] for i in batch_indices])
        from_pixels = collate_dreambooth([dataset[i] for i in batch_indices])
        assert "latents" in from_cache and "pixel_values" in from_pixels
        latents = torch.stack([replayed[i] for i in batch_indices])
        assert torch.equal(from_cache["latents"], latents)
        with torch.no_grad():
            conditioning = family.encode_prompt(components, from_pixels["prompts"], torch.device("cpu"))
            losses = [
                training_loss(family, components, objective, b, lat, conditioning, components.denoiser,
                              torch.Generator().manual_seed(5), 1.0, 0.1, 0.1).item()
                for b, lat in ((from_cache, from_cache["latents"]), (from_pixels, latents))
            ]
        assert losses[0] == losses[1]


# ----------------------------------------------------------------------------- loss options


def test_noise_offset_and_input_perturbation_follow_their_formulas():
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target, model_input = perturb_noise(noise, torch.Generator().manual_seed(1), 0.1, 0.05)
    reference = torch.Generator().manual_seed(1)
    shift = torch.randn((3, 4, 1, 1), generator=reference)
    extra = torch.randn((3, 4, 8, 8), generator=reference)
    assert torch.equal(target, noise + 0.1 * shift)
    assert torch.equal(model_input, noise + 0.1 * shift + 0.05 * extra)
    assert perturb_noise(noise, None, 0.0, 0.0) == (noise, None)


def test_masked_loss_ignores_masked_out_latents():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    pixel_mask = torch.zeros(2, 1, 16, 16)
    pixel_mask[:, :, :8, :] = 1.0
    pixel_mask[1, :, 8:10, :] = 0.5
    mask = latent_loss_mask(pixel_mask, (8, 8))
    assert torch.equal(mask[0, 0, :4], torch.ones(4, 8)) and torch.equal(mask[1, 0, 4], torch.full((8,), 0.5))
    loss = weighted_mse(prediction, target, mask=mask)
    assert torch.allclose(loss, ((prediction - target) ** 2 * mask).mean())
    changed = target.clone()
    changed[0, :, 4:] += 10.0  # only where the mask of sample 0 is zero
    assert torch.allclose(weighted_mse(prediction, changed, mask=mask), loss)
    weights = torch.tensor([2.0, 0.5])
    per_sample = ((prediction - target) ** 2 * mask).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted_mse(prediction, target, weights, mask), (per_sample * weights).mean())


def test_alpha_masks_follow_their_image_through_the_crop():
    alpha = Image.new("L", (48, 32), 0)
    alpha.paste(255, (0, 0, 24, 32))  # left half opaque
    record = TrainingImage("a.png", solid(48, 32, "red"), None, alpha)
    dataset = TrainingImageDataset([record], CaptionOptions(fallback_prompt="p"), 32, random_flip=True,
                                   buckets=[(32, 48)], seed=0)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        batch = collate_dreambooth([dataset[0]])
        mask = batch["loss_masks"][0, 0]
        assert mask.shape == (32, 48)
        columns = mask.mean(dim=0)
        assert set(columns.round().tolist()) == {0.0, 1.0} and abs(float(columns.mean()) - 0.5) < 0.05


# ----------------------------------------------------------------------------- EMA, optimizer


def test_ema_follows_its_formula_and_round_trips_its_state():
    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([parameter], ema_decay=0.5)
    expected = None
    for step in range(1, 6):
        with torch.no_grad():
            parameter.add_(float(step))
        ema.update()
        decay = 0.0 if step == 1 else min(0.5, step / (step + 9))
        value = parameter.detach().clone()
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert torch.allclose(ema.averages[0], expected)
    assert ema_decay_at(1, 0.9) == 0.0 and ema_decay_at(2, 0.9) == 2 / 11
    restored = AdapterEMA([parameter], ema_decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5 and torch.equal(restored.averages[0], ema.averages[0])
    restored.copy_to_parameters()
    assert torch.equal(parameter.detach(), ema.averages[0])


def test_prodigy_gets_the_diffusers_flags():
    from prodigyopt import Prodigy

    from snella_diffusion.training.optimizers import make_optimizer

    args = script.parse_args(["--optimizer", "Prodigy", "--prodigy_beta3", "0.9", "--prodigy_decouple", "false",
                              "--adam_weight_decay", "0.02", "--learning_rate", "1.0"])
    parameter = torch.nn.Parameter(torch.ones(4))
    optimizer = make_optimizer(args.optimizer, args.training, [parameter], 1.0)
    assert isinstance(optimizer, Prodigy)
    group = optimizer.param_groups[0]
    assert group["beta3"] == 0.9 and group["decouple"] is False and group["weight_decay"] == 0.02
    assert group["use_bias_correction"] is True and group["safeguard_warmup"] is True
    target = torch.tensor([3.0, -1.0, 2.0, 0.5])
    first = float(((parameter.detach() - target) ** 2).sum())
    for _ in range(400):
        optimizer.zero_grad()
        ((parameter - target) ** 2).sum().backward()
        optimizer.step()
    assert float(((parameter.detach() - target) ** 2).sum()) < 0.1 * first


# ----------------------------------------------------------------------------- config files


def test_config_values_apply_and_flags_win(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[training]\nrank = 8\nlearning_rate = 2e-4\nrandom_flip = true\n'
                   '[data]\ncaption-extension = ".txt"\ntarget_modules = ["to_q", "to_k"]\n')
    args = script.parse_args(["--config", str(job), "--rank", "16"])
    assert args.adapter.rank == 16 and args.training.learning_rate == 2e-4 and args.data.random_flip is True
    assert args.captions.caption_extension == ".txt" and args.adapter.target_modules == ("to_q", "to_k")
    for suffix, text in ((".yaml", "rank: 8\nshuffle_caption: true\n"), (".json", '{"rank": 8, "shuffle_caption": true}')):
        path = tmp_path / f"job{suffix}"
        path.write_text(text)
        parsed = script.parse_args(["--config", str(path)])
        assert parsed.adapter.rank == 8 and parsed.captions.shuffle_caption is True


def test_rendered_toml_reloads_to_the_same_values():
    values = {"a": 1, "b": 1e-05, "c": "x \"quoted\" \\ ü", "d": True, "e": ["p", "q"], "f": None, "g": -0.5}
    loaded = tomllib.loads(render_toml(values))
    assert loaded == {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize(("text", "message"), [
    ("ranks = 4\n", r"key 'ranks' is not a flag of this script"),
    ("rank = \"four\"\n", r"argument --rank: invalid int value: 'four'"),
    ("kernel = \"cubic\"\n", r"argument --kernel: invalid choice"),
    ("random_flip = 1\n", r"key 'random_flip' is a switch: give true or false"),
    ("rank = [1, 2]\n", r"key 'rank' takes one value, not a list"),
    ("rank = \n", r"not valid TOML"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(SnellaError, match=message) as error:
        script.parse_args(["--config", str(path)])
    assert str(path) in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SnellaError, match=r"--config=.*nope.toml: no such file"):
        parse_args_with_config(__import__("argparse").ArgumentParser(), ["--config", str(tmp_path / "nope.toml")])


# ----------------------------------------------------------------------------- allocation.png


def test_allocation_rows_are_grouped_by_block_and_drawn_with_separators(tmp_path):
    names = ([f"unet.down_blocks.1.attentions.{i}.transformer_blocks.0.attn1.to_q" for i in range(4)]
             + [f"unet.mid_block.attentions.0.transformer_blocks.0.ff.net.{i}" for i in range(4)]
             + [f"unet.up_blocks.0.attentions.{i}.proj_in" for i in range(4)])
    groups = allocation_row_groups(names)
    assert [(g.section, g.block, g.start, g.stop) for g in groups] == [
        ("down", "down_blocks.1", 0, 4), ("mid", "mid_block", 4, 8), ("up", "up_blocks.0", 8, 12)]
    flux = allocation_row_groups(["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_out",
                                  "transformer.single_transformer_blocks.1.proj_out"])
    assert [(g.section, g.block) for g in flux] == [("double", "transformer_blocks.0"), ("single", "single_transformer_blocks.0"),
                                                    ("single", "single_transformer_blocks.1")]
    assert allocation_row_groups(["transformer.transformer_blocks.3.attn.to_q"])[0].section == "blocks"
    path = save_allocation_heatmap([0, 5], [[0.2] * 12, [0.8] * 12], names, tmp_path / "allocation.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    top, heat_h, left = 28, 200, 8 + 190
    for boundary in (4, 8):  # white separators across the heatmap at the section starts
        y = top + round(boundary * heat_h / 12)
        assert (image[y, left + 10:left + 400] == 255).all()
    y_inside = top + round(2 * heat_h / 12)
    assert not (image[y_inside, left + 10:left + 400] == 255).all()
    band_colours = {tuple(image[top + round((r + 0.5) * heat_h / 12), 10]) for r in (1, 5, 9)}
    assert len(band_colours) == 3  # one coloured band per section


# ----------------------------------------------------------------------------- bad input


def fail_if_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the flags were checked")


@pytest.mark.parametrize(("flags", "message"), [
    (["--enable_bucket", "--center_crop"], r"--enable_bucket crops each image to its bucket: drop --center_crop"),
    (["--aspect_ratio_buckets", "32,32", "--center_crop"], r"--aspect_ratio_buckets crops each image"),
    (["--aspect_ratio_buckets", "32,32", "--enable_bucket"], r"two ways to give buckets"),
    (["--aspect_ratio_buckets", "32x32"], r"--aspect_ratio_buckets='32x32': '32x32' is not 'height,width'"),
    (["--bucket_reso_steps", "8"], r"--bucket_reso_steps applies to --enable_bucket"),
    (["--caption_column", "text"], r"--caption_column applies to --dataset_name, which is not given"),
    (["--image_column", "img"], r"--image_column applies to --dataset_name"),
    (["--dataset_name", "x", "--instance_data_dir", "y", "--instance_prompt", "p"], r"two sources of instance images"),
    (["--dataset_name", "x"], r"--dataset_name without --caption_column needs --instance_prompt"),
    (["--dataset_name", "x", "--caption_column", "t", "--caption_extension", ".txt"], r"use --caption_column"),
    (["--shuffle_caption"], r"--shuffle_caption works on captions: add --caption_extension"),
    (["--caption_prefix", "sks"], r"--caption_prefix works on captions"),
    (["--caption_extension", ".txt", "--keep_tokens", "1"], r"--keep_tokens applies to --shuffle_caption"),
    (["--caption_dropout", "1.0"], r"--caption_dropout=1.0: must be in \[0, 1\)"),
    (["--caption_extension", ".txt", "--caption_prefix"], r"--caption_prefix without a value .* give --instance_prompt"),
    (["--caption_extension", ".txt", "--shuffle_caption", "--cache_text_embeddings"], r"cannot be combined with --cache_text_embeddings"),
    (["--repeats", "0"], r"--repeats=0: must be at least 1"),
    (["--noise_offset", "-0.1"], r"--noise_offset=-0.1: must be at least 0"),
    (["--mask_dir", "m"], r"--mask_dir gives loss masks: add --masked_loss"),
    (["--ema_decay", "0.9"], r"--ema_decay applies to --use_ema"),
    (["--use_ema", "--ema_decay", "1.5"], r"--ema_decay=1.5: must be in \(0, 1\)"),
    (["--prodigy_beta3", "0.9"], r"--prodigy_beta3 applies to --optimizer prodigy"),
])
def test_bad_flag_combinations_stop_before_any_model_is_loaded(monkeypatch, tmp_path, flags, message):
    monkeypatch.setattr(script, "detect_family", fail_if_loaded)
    args = script.parse_args(["--output_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path), *flags])
    with pytest.raises(SnellaError, match=message) as error:
        script.main(args)
    assert "\n" not in str(error.value)


def test_prodigy_with_8bit_adam_is_rejected():
    # check_args reports a missing bitsandbytes first here; the combination itself is checked too
    with pytest.raises(SnellaError, match=r"--use_8bit_adam applies to --optimizer adamw, not prodigy"):
        check_data_settings(script.parse_args(["--optimizer", "prodigy", "--use_8bit_adam"]))


def test_missing_prodigyopt_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(SnellaError, match=r"prodigyopt is not installed \(pip install 'snella-diffusion\[prodigy\]'\)"):
        check_data_settings(script.parse_args(["--optimizer", "prodigy"]))


def test_bad_data_files_are_named_before_any_model_is_loaded(monkeypatch, tmp_path):
    # the family is read from model_index.json first (images or clips depend on it); no model loads
    monkeypatch.setattr(script, "load_components", fail_if_loaded)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    images = tmp_path / "images"
    images.mkdir()
    solid(16, 16, "red").save(images / "a.png")
    solid(16, 16, "red", alpha=Image.new("L", (16, 16), 0)).save(images / "b.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (8, 8), 255).save(masks / "a.png")
    base = ["--output_dir", str(tmp_path / "out"), "--instance_data_dir", str(images),
            "--pretrained_model_name_or_path", str(tmp_path)]
    cases = [
        (["--caption_extension", ".txt"], r"2 image\(s\) in .* have no caption file: a.png, b.png"),
        (["--instance_prompt", "p", "--masked_loss"], r"--masked_loss: .*a.png has no alpha channel"),
        (["--instance_prompt", "p", "--masked_loss", "--mask_dir", str(masks)], r"a.png is 8x8, its image .* is 16x16"),
        (["--instance_prompt", "p", "--masked_loss", "--mask_dir", str(tmp_path)], r"no mask image named a\.\*"),
    ]
    for flags, message in cases:
        with pytest.raises(SnellaError, match=message):
            script.main(script.parse_args([*base, *flags]))
    (images / "a.png").unlink()
    with pytest.raises(SnellaError, match=r"the mask of .*b.png is zero everywhere"):
        script.main(script.parse_args([*base, "--instance_prompt", "p", "--masked_loss"]))


def test_every_new_flag_is_in_help_readme_and_model_card(capsys):
    import argparse
    from pathlib import Path

    from snella_diffusion.training.data_arguments import add_data_arguments, data_settings

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    flags.remove("--help")
    assert len(flags) == 34  # the data flags with --dataset_config, Prodigy/EMA, the optimizer's scalar and text-encoder rates, --reference_beta
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    help_text = capsys.readouterr().out
    docs = Path(__file__).resolve().parents[1] / "docs"
    section = (docs / "training-data.md").read_text() + (docs / "training.md").read_text()
    for flag in flags:
        assert f"  {flag} " in help_text or f"  {flag}\n" in help_text, flag
        assert flag in section, flag
    flags = script.parse_args([]).flags()
    # a default SNELLA run lists only the β decay it fills in (the paper's reference has none)
    assert data_settings(flags) == {"beta_decay": 10.0}
    for key in vars(parser.parse_args([])):
        flags[key] = "changed"
    assert set(data_settings(flags)) == set(vars(parser.parse_args([]))) - {"config"}


def test_bucket_batches_are_full_and_cover_every_item():
    """A bucket of 5 items with batch size 2 gives 3 full batches (the last one refilled from
    the same bucket), so accelerate can shard batches over processes."""
    buckets_of_items = [0] * 5 + [1] * 2 + [2]
    sampler = BucketBatchSampler(buckets_of_items, batch_size=2, seed=0)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == 3 + 1 + 1
    assert all(len(batch) == 2 and len({buckets_of_items[i] for i in batch}) == 1 for batch in batches)
    assert {i for batch in batches for i in batch} == set(range(8))


def test_image_grid_enlarges_small_tiles_pixel_exactly_and_labels_rows(tmp_path):
    from PIL import Image

    from snella_diffusion.viz import ROW_LABEL_WIDTH, save_image_grid

    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    path = save_image_grid([Image.fromarray(t) for t in tiles], tmp_path / "grid.png", columns=2,
                           row_labels=["a sks square", "a square"])
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 128, ROW_LABEL_WIDTH + 2 * 128, 3)  # 16 px tiles enlarged 8×
    for index, tile in enumerate(tiles):
        top, left = (index // 2) * 128, ROW_LABEL_WIDTH + (index % 2) * 128
        enlarged = tile.repeat(8, axis=0).repeat(8, axis=1)
        assert np.array_equal(grid[top : top + 128, left : left + 128], enlarged)
    assert (grid[:, :ROW_LABEL_WIDTH] < 128).any()  # the labels are drawn (dark text on white)


def test_labels_keep_a_visible_gap_between_words():
    from PIL import Image, ImageDraw, ImageFont

    from snella_diffusion.viz import draw_label

    def ink_columns(text):
        image = Image.new("L", (200, 20), 255)
        draw_label(ImageDraw.Draw(image), (2, 2), text)
        return np.flatnonzero((np.asarray(image) < 128).any(axis=0))

    joined, spaced = ink_columns("ab"), ink_columns("a b")
    font = ImageFont.load_default()
    # "a b" is "ab" with its "b" moved right by the gap (an "n" width, at least 4 px here).
    assert spaced[-1] - joined[-1] == font.getlength("n") >= 4
    gaps = np.diff(spaced)
    assert gaps.max() >= 4


def test_full_run_card_loads_the_component_and_a_captions_card_has_no_prompt_key():
    from snella_diffusion import SnellaConfig
    from snella_diffusion.training.model_card import render_model_card

    card = render_model_card("base/sd", "stable-diffusion", None, SnellaConfig(), {"unet": 0.0}, {"steps": 2},
                             adapter="full", component="unet")
    front_matter = card.split("---")[1]
    assert "instance_prompt" not in front_matter and "- snella" not in front_matter
    assert "# DreamBooth fine-tuned unet" in card
    assert 'pipe.unet = type(pipe.unet).from_pretrained("unet")' in card
    assert "SNELLA settings" not in card and "Final sparsity" not in card and "allocation.png" not in card
    snella = render_model_card("base/sd", "stable-diffusion", "a sks dog", SnellaConfig(), {"unet.a": 0.5}, {})
    assert "instance_prompt: 'a sks dog'" in snella and "## SNELLA settings" in snella
    assert "| unet | 1 | 0.5000 | 0.5000 | 0.5000 |" in snella

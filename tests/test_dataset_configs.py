"""Datasets defined for other trainers train as they are: kohya's ``<repeats>_<prompt>`` folder
layout and ``--dataset_config`` files of kohya (TOML), ai-toolkit (job YAML), SimpleTuner
(multidatabackend.json) and OneTrainer (concepts.json).

Each format gets the same data, written in that trainer's documented layout: a captioned
subset (red, green; repeats 3), an uncaptioned subset with a prompt (blue; repeats 2) and a
regularisation subset (yellow, cyan; prompt "dog"). One epoch of the run's loader must draw
red and green 3 times each with their captions, blue twice with "sks dog", and pair every
draw with a regularisation image as its class sample (prior loss only)."""

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from snella_diffusion.families import base, tokens
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline
from snella_diffusion.training.data_arguments import (
    DataArgumentError,
    check_data_settings,
    make_training_loader,
    run_subsets,
)
from snella_diffusion.training.dataset_configs import DatasetConfigError
from snella_diffusion.training.run_checks import check_run_settings
from snella_diffusion.training.subset_dataset import SubsetDataset, SubsetImages, subset_sizes
from snella_diffusion.training.subsets import SubsetError, load_subset

from train_scripts import train_dreambooth_snella as script

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255)}
CAPTIONS = {"red": "red toy", "green": "green toy"}
EXPECTED_DRAWS = Counter({("red", "red toy"): 3, ("green", "green toy"): 3, ("blue", "sks dog"): 2})
REGULARISATION = {"yellow", "cyan"}


def write_images(folder, names, caption_extension=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 32), COLOURS[name]).save(folder / f"{name}.png")
        if caption_extension and name in CAPTIONS:
            (folder / f"{name}{caption_extension}").write_text(CAPTIONS[name])
    return folder


def colour_of(pixels):
    mean = ((pixels.float().mean(dim=(1, 2)) + 1) * 127.5).numpy()
    return min(COLOURS, key=lambda name: np.abs(mean - np.array(COLOURS[name])).sum())


def epoch_draws(*flags):
    """(instance colour, prompt) and (class colour, prompt) of every draw of one epoch of the
    loader the script builds from ``flags`` (batch size 1, 32 px)."""
    settings = script.parse_args(["--pretrained_model_name_or_path", "unused", "--train_batch_size", "1",
                                  "--resolution", "32", *flags])
    check_data_settings(settings)
    check_run_settings(settings)  # no --instance_prompt / --class_prompt needed with subsets
    subsets = run_subsets(settings)
    parts = [SubsetImages(s, load_subset(s), subset_sizes(s, 32, 8, 64)) for s in subsets]
    dataset = SubsetDataset(parts, seed=0)
    instance, regularisation = Counter(), Counter()
    for batch in make_training_loader(settings, dataset, dataset):
        count = batch["num_instance"]
        assert batch["pixel_values"].shape[-2:] == (32, 32)
        for row, prompt in enumerate(batch["prompts"]):
            colour = colour_of(batch["pixel_values"][row])
            (instance if row < count else regularisation)[(colour, prompt)] += 1
    return instance, regularisation, subsets


def check_epoch(instance, regularisation):
    assert instance == EXPECTED_DRAWS
    assert {colour for colour, _ in regularisation} <= REGULARISATION
    assert {prompt for _, prompt in regularisation} == {"dog"}
    assert sum(regularisation.values()) == sum(EXPECTED_DRAWS.values())  # one class sample per draw


@pytest.fixture
def folders(tmp_path):
    return {
        "captioned": write_images(tmp_path / "captioned", ["red", "green"], ".txt"),
        "prompted": write_images(tmp_path / "prompted", ["blue"]),
        "reg": write_images(tmp_path / "reg", ["yellow", "cyan"]),
    }


def kohya_toml(folders, **overrides):
    first = overrides.get("first", f"image_dir = '{folders['captioned']}'\n  num_repeats = 3")
    return f"""
[general]
caption_extension = '.txt'
shuffle_caption = false

[[datasets]]
resolution = 32
batch_size = 4

  [[datasets.subsets]]
  {first}

  [[datasets.subsets]]
  image_dir = '{folders['prompted']}'
  class_tokens = 'sks dog'
  num_repeats = 2

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{folders['reg']}'
  class_tokens = 'dog'
"""


def test_kohya_dataset_toml(folders, tmp_path, caplog):
    config = tmp_path / "dataset.toml"
    config.write_text(kohya_toml(folders))
    with caplog.at_level(logging.WARNING):
        instance, regularisation, subsets = epoch_draws("--dataset_config", str(config))
    check_epoch(instance, regularisation)
    assert [s.repeats for s in subsets] == [3, 2, 1] and [s.is_reg for s in subsets] == [False, False, True]
    assert subsets[0].resolution == (32, 32) and subsets[0].caption_extension == ".txt"
    unused = [r.message for r in caplog.records if "keys not used here" in r.message]
    assert len(unused) == 1 and "datasets[0].batch_size" in unused[0]


def test_ai_toolkit_job_yaml(folders, tmp_path, caplog):
    config = tmp_path / "job.yaml"
    config.write_text(f"""
job: extension
config:
  name: my_lora
  process:
    - type: sd_trainer
      datasets:
        - folder_path: "{folders['captioned']}"
          caption_ext: "txt"
          num_repeats: 3
          cache_latents_to_disk: true
          resolution: [32]
        - folder_path: "{folders['prompted']}"
          default_caption: "sks dog"
          num_repeats: 2
          resolution: 32
        - folder_path: "{folders['reg']}"
          default_caption: "dog"
          is_reg: true
      train:
        steps: 10
""")
    with caplog.at_level(logging.WARNING):
        instance, regularisation, subsets = epoch_draws("--dataset_config", str(config))
    check_epoch(instance, regularisation)
    assert [s.repeats for s in subsets] == [3, 2, 1]
    unused = [r.message for r in caplog.records if "keys not used here" in r.message]
    assert len(unused) == 1 and "config.process[0].datasets[0].cache_latents_to_disk" in unused[0]


def test_ai_toolkit_resolution_list_gives_one_subset_per_side(folders, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"datasets:\n  - folder_path: '{folders['prompted']}'\n    default_caption: x\n"
                      "    resolution: [32, 48]\n")
    settings = script.parse_args(["--dataset_config", str(config)])
    assert [s.resolution for s in run_subsets(settings)] == [(32, 32), (48, 48)]


def test_ai_toolkit_trigger_word_reaches_every_prompt(tmp_path):
    folder = write_images(tmp_path / "images", ["red", "green", "blue"], ".txt")
    (folder / "green.txt").write_text("[trigger] green toy")
    config = tmp_path / "job.yaml"
    config.write_text(f"config:\n  process:\n    - trigger_word: sks\n      datasets:\n"
                      f"        - folder_path: '{folder}'\n          resolution: 32\n")
    instance, regularisation, _ = epoch_draws("--dataset_config", str(config))
    assert instance == Counter({("red", "sks, red toy"): 1, ("green", "sks green toy"): 1, ("blue", "sks"): 1})
    assert not regularisation


def simpletuner_backends(folders, first_type="local"):
    return [
        {"id": "captioned", "type": first_type, "instance_data_dir": str(folders["captioned"]),
         "caption_strategy": "textfile", "repeats": 2, "resolution": 32, "resolution_type": "pixel",
         "crop": True, "crop_aspect": "square", "cache_dir_vae": "cache/vae/captioned"},
        {"id": "prompted", "type": "local", "instance_data_dir": str(folders["prompted"]),
         "caption_strategy": "instanceprompt", "instance_prompt": "sks dog", "repeats": 1,
         "crop": True, "crop_aspect": "square"},
        {"id": "reg", "type": "local", "instance_data_dir": str(folders["reg"]), "is_regularisation_data": True,
         "caption_strategy": "instanceprompt", "instance_prompt": "dog", "repeats": 0},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": "cache/text"},
    ]


def test_simpletuner_multidatabackend(folders, tmp_path, caplog):
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps(simpletuner_backends(folders)))
    with caplog.at_level(logging.WARNING):
        instance, regularisation, subsets = epoch_draws("--dataset_config", str(config))
    check_epoch(instance, regularisation)
    # SimpleTuner's repeats count extra passes: 2 → seen 3 times, 0 → once
    assert [s.repeats for s in subsets] == [3, 2, 1]
    unused = [r.message for r in caplog.records if "keys not used here" in r.message]
    assert len(unused) == 1 and "cache_dir_vae" in unused[0]


def test_onetrainer_concepts(folders, tmp_path):
    prompts = {}
    for name, text in (("sks", "sks dog"), ("dog", "dog")):
        prompts[name] = tmp_path / f"{name}.txt"
        prompts[name].write_text(text + "\n")
    concepts = [
        {"name": "captioned", "path": str(folders["captioned"]), "enabled": True, "balancing": 3.0,
         "balancing_strategy": "REPEATS", "text": {"prompt_source": "sample"}, "image": {"enable_random_flip": True}},
        {"name": "prompted", "path": str(folders["prompted"]), "balancing": 2.0,
         "text": {"prompt_source": "concept", "prompt_path": str(prompts["sks"])}},
        {"name": "reg", "path": str(folders["reg"]), "concept_type": "PRIOR_PREDICTION",
         "text": {"prompt_source": "concept", "prompt_path": str(prompts["dog"])}},
        {"name": "off", "path": str(tmp_path / "missing"), "enabled": False},
    ]
    config = tmp_path / "concepts.json"
    config.write_text(json.dumps(concepts))
    instance, regularisation, subsets = epoch_draws("--dataset_config", str(config))
    check_epoch(instance, regularisation)
    assert [s.repeats for s in subsets] == [3, 2, 1] and all(s.flip_aug for s in subsets)


def test_kohya_folder_layout_through_the_data_dir_flags(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    write_images(train / "3_sks dog", ["red", "green"])
    (train / "3_sks dog" / "green.txt").write_text("green sks dog")  # a caption file wins
    write_images(train / "2_blue car", ["blue"])
    write_images(reg / "1_dog", ["yellow", "cyan"])
    instance, regularisation, subsets = epoch_draws(
        "--instance_data_dir", str(train), "--caption_extension", ".txt",
        "--with_prior_preservation", "--class_data_dir", str(reg))
    assert instance == Counter({("red", "sks dog"): 3, ("green", "green sks dog"): 3, ("blue", "blue car"): 2})
    assert {c for c, _ in regularisation} == REGULARISATION and {p for _, p in regularisation} == {"dog"}
    assert [(s.name, s.repeats, s.prompt) for s in subsets] == [
        ("2_blue car", 2, "blue car"), ("3_sks dog", 3, "sks dog"), ("1_dog", 1, "dog")]


def test_kohya_layout_with_a_plain_class_folder(folders, tmp_path):
    train = tmp_path / "train"
    write_images(train / "2_sks dog", ["red"])
    instance, regularisation, subsets = epoch_draws(
        "--instance_data_dir", str(train), "--with_prior_preservation", "--class_data_dir", str(folders["reg"]),
        "--class_prompt", "dog", "--num_class_images", "1")
    assert instance == Counter({("red", "sks dog"): 2})
    assert regularisation == Counter({("cyan", "dog"): 2})  # --num_class_images keeps the first image by name
    assert subsets[-1].is_reg and subsets[-1].max_images == 1


def test_a_plain_folder_keeps_the_single_folder_dataset(folders, caplog):
    settings = script.parse_args(["--instance_data_dir", str(folders["prompted"]), "--instance_prompt", "x"])
    assert run_subsets(settings) is None
    write_images(folders["prompted"] / "5_other", ["red"])  # images at the top level: still a plain folder
    with caplog.at_level(logging.WARNING):
        assert run_subsets(settings) is None
    assert "5_other" in caplog.text and "read as a plain folder" in caplog.text


def test_regularisation_draws_rotate_over_epochs(folders, tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(kohya_toml(folders, first=f"image_dir = '{folders['captioned']}'\n  num_repeats = 1"))
    settings = script.parse_args(["--dataset_config", str(config)])
    parts = [SubsetImages(s, load_subset(s), subset_sizes(s, 32, 8, 64)) for s in run_subsets(settings)]
    dataset = SubsetDataset(parts, seed=0)
    seen = set()
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen |= {dataset.class_draw_of(index) for index in range(len(dataset))}
    assert len(dataset) == 4 and len(seen) == 2  # both regularisation images paired over the epochs


def test_subset_buckets_and_sizes_batch_by_size(tmp_path):
    """A kohya dataset with buckets puts a 2:1 image in the bucket of nearest aspect ratio; a
    second dataset at another resolution trains at its own size, and every batch holds one size."""
    wide, square = tmp_path / "wide", tmp_path / "square"
    wide.mkdir()
    Image.new("RGB", (64, 32), COLOURS["red"]).save(wide / "red.png")
    write_images(square, ["blue", "green"])
    config = tmp_path / "dataset.toml"
    config.write_text(f"""
[[datasets]]
resolution = 32
enable_bucket = true
bucket_reso_steps = 8
  [[datasets.subsets]]
  image_dir = '{wide}'
  class_tokens = 'wide'
  num_repeats = 4

[[datasets]]
resolution = 48
  [[datasets.subsets]]
  image_dir = '{square}'
  class_tokens = 'square'
  num_repeats = 2
""")
    settings = script.parse_args(["--dataset_config", str(config), "--train_batch_size", "2"])
    parts = [SubsetImages(s, load_subset(s), subset_sizes(s, 32, 8, 64)) for s in run_subsets(settings)]
    dataset = SubsetDataset(parts, seed=0)
    assert dataset.sizes == [(24, 40), (48, 48)] and dataset.needs_bucket_batches  # 24/40 is nearest to 32/64
    shapes = Counter()
    for batch in make_training_loader(settings, dataset, dataset):
        shapes[tuple(batch["pixel_values"].shape)] += 1
        colours = {colour_of(p) for p in batch["pixel_values"]}
        assert colours == {"red"} or colours <= {"blue", "green"}
    assert shapes == Counter({(2, 3, 24, 40): 2, (2, 3, 48, 48): 2})


def test_simpletuner_filename_captions(tmp_path):
    folder = write_images(tmp_path / "data", ["red"])
    (folder / "red.png").rename(folder / "a_photo_of_sks_dog.png")
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([{"id": "x", "type": "local", "instance_data_dir": str(folder)}]))
    (subset,) = run_subsets(script.parse_args(["--dataset_config", str(config)]))
    assert [image.caption for image in load_subset(subset)] == ["a photo of sks dog"]


@pytest.mark.parametrize("case, message", [
    ("missing folder", ["dataset.toml", "subset datasets[0].subsets[0]", "'image_dir'", "no such folder"]),
    ("empty subset", ["dataset.toml", "subset datasets[0].subsets[0]", "'folder'", "holds no images"]),
    ("bad number", ["dataset.toml", "subset datasets[0].subsets[0]", "'num_repeats'", "'ten' is not a whole number"]),
    ("zero repeats", ["dataset.toml", "subset datasets[0].subsets[0]", "'num_repeats'", "at least 1"]),
    ("no caption", ["dataset.toml", "subset datasets[0].subsets[0]", "'prompt'", "blue.png"]),
])
def test_kohya_errors_name_the_file_subset_and_key(folders, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    first = {
        "missing folder": f"image_dir = '{tmp_path / 'nowhere'}'",
        "empty subset": f"image_dir = '{tmp_path / 'empty'}'",
        "bad number": f"image_dir = '{folders['captioned']}'\n  num_repeats = 'ten'",
        "zero repeats": f"image_dir = '{folders['captioned']}'\n  num_repeats = 0",
        "no caption": f"image_dir = '{folders['prompted']}'",
    }[case]
    config = tmp_path / "dataset.toml"
    config.write_text(kohya_toml(folders, first=first))
    settings = script.parse_args(["--dataset_config", str(config)])
    with pytest.raises(SubsetError) as error:
        for subset in run_subsets(settings):
            load_subset(subset)
    for part in message:
        assert part in str(error.value)


def test_unsupported_backends_and_sources_are_named(folders, tmp_path):
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps(simpletuner_backends(folders, first_type="aws")))
    with pytest.raises(DatasetConfigError, match=r"multidatabackend.json: subset \[0\] \(id 'captioned'\), "
                                                 r"key 'type': 'aws' backends cannot be read here"):
        run_subsets(script.parse_args(["--dataset_config", str(config)]))
    backends = simpletuner_backends(folders)
    backends[1]["caption_strategy"] = "parquet"
    config.write_text(json.dumps(backends))
    with pytest.raises(DatasetConfigError, match="key 'caption_strategy': 'parquet' cannot be read here"):
        run_subsets(script.parse_args(["--dataset_config", str(config)]))
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"path": str(folders["captioned"]), "balancing": 1.5}]))
    with pytest.raises(DatasetConfigError, match="key 'balancing': 1.5 is not a whole number"):
        run_subsets(script.parse_args(["--dataset_config", str(concepts)]))
    unknown = tmp_path / "other.json"
    unknown.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DatasetConfigError, match="not a dataset definition read here"):
        run_subsets(script.parse_args(["--dataset_config", str(unknown)]))


def test_dataset_config_replaces_the_folder_flags(folders, tmp_path):
    settings = script.parse_args(["--dataset_config", "x.toml", "--instance_data_dir", str(folders["prompted"])])
    with pytest.raises(DataArgumentError, match="--dataset_config replaces --instance_data_dir"):
        check_data_settings(settings)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset-config-sd")
    tiny_sd_pipeline(0).save_pretrained(folder)
    return folder


def test_kohya_toml_run_trains_each_subset_and_records_it(sd_folder, folders, tmp_path, monkeypatch):
    """Two steps of the script on the tiny SD model: every batch holds training images with
    their prompts then regularisation images with theirs; config.toml and the model card list
    the subsets with their counts, and the saved config reads back to the same flags."""
    from accelerate.state import AcceleratorState

    events = []
    original_encode, original_tokenize = base.ModelFamily.encode_latents, tokens.tokenize

    def encode_latents(self, components, pixels, generator=None):
        events.append(("pixels", [colour_of(p) for p in pixels]))
        return original_encode(self, components, pixels, generator)

    def tokenize(tokenizer, prompts):
        events.append(("prompts", list(prompts)))
        return original_tokenize(tokenizer, prompts)

    monkeypatch.setattr(base.ModelFamily, "encode_latents", encode_latents)
    monkeypatch.setattr(tokens, "tokenize", tokenize)
    config = tmp_path / "dataset.toml"
    config.write_text(kohya_toml(folders))
    output = tmp_path / "out"
    AcceleratorState._reset_state(True)
    settings = script.parse_args([
        "--pretrained_model_name_or_path", str(sd_folder), "--dataset_config", str(config),
        "--output_dir", str(output), "--rank", "4", "--train_batch_size", "2", "--max_train_steps", "2",
        "--train_text_encoder", "--report_to", "none", "--checkpointing_steps", "100", "--seed", "1",
    ])
    script.main(settings)
    pixels = [e[1] for e in events if e[0] == "pixels"]
    prompts = [e[1] for e in events if e[0] == "prompts"]
    assert len(pixels) == 2 and len(prompts) == 2
    expected = {colour: prompt for colour, prompt in EXPECTED_DRAWS}
    for colours, batch_prompts in zip(pixels, prompts):
        assert len(colours) == 4  # 2 training samples, then their 2 class samples
        assert all(colour in expected and batch_prompts[i] == expected[colour] for i, colour in enumerate(colours[:2]))
        assert set(colours[2:]) <= REGULARISATION and batch_prompts[2:] == ["dog", "dog"]
    saved = tomllib.loads((output / "config.toml").read_text())
    records = saved["dataset_subsets"]
    assert [(r["images"], r["repeats"], r["draws_per_epoch"], r["is_reg"]) for r in records] == [
        (2, 3, 6, False), (1, 2, 2, False), (2, 1, 2, True)]
    assert records[1]["prompt"] == "sks dog" and records[0]["folder"] == str(folders["captioned"])
    card = (output / "README.md").read_text()
    assert "## Training data" in card
    assert f"| datasets[0].subsets[0] | `{folders['captioned']}` | 2 | 3 | 6 |" in card
    # the saved config repeats the run exactly
    AcceleratorState._reset_state(True)
    again = tmp_path / "again"
    reloaded = script.parse_args(["--config", str(output / "config.toml"), "--output_dir", str(again)])
    assert reloaded.datasets.dataset_config == str(config) and reloaded.training.max_train_steps == 2
    script.main(reloaded)
    first, second = (load_file(folder / "snella_weights.safetensors") for folder in (output, again))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def test_every_example_of_the_formats_page_reads(tmp_path, monkeypatch):
    """Each TOML / YAML / JSON example of docs/training-data-formats.md, run from a folder that
    holds the data it names, reads into a training subset of 10 draws per image and a
    regularisation subset."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "training-data-formats.md").read_text()
    examples = re.findall(r"```(toml|yaml|json)\n(.*?)```", page, flags=re.S)
    assert [kind for kind, _ in examples] == ["toml", "yaml", "json", "json"]
    write_images(tmp_path / "data" / "sks_dog", ["red", "green"], ".txt")
    write_images(tmp_path / "data" / "dog_reg", ["yellow"])
    (tmp_path / "data" / "dog_prompt.txt").write_text("dog")
    monkeypatch.chdir(tmp_path)
    for index, (kind, text) in enumerate(examples):
        config = tmp_path / f"example{index}.{kind}"
        config.write_text(text)
        subsets = run_subsets(script.parse_args(["--dataset_config", str(config)]))
        training = [s for s in subsets if not s.is_reg]
        assert training and all(s.repeats == 10 for s in training), kind
        assert [s.folder.name for s in subsets if s.is_reg] == ["dog_reg"], kind
        assert all(len(load_subset(s)) == (1 if s.is_reg else 2) for s in subsets)

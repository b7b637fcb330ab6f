"""The lab's world (issue 16): generator determinism, geometry against independent formulas,
decoder accuracy on generated world images, the word-level tokenizer."""

import math

import numpy as np
import pytest

from snella_diffusion.lab import decode, world


@pytest.fixture(scope="session")
def world_sample():
    return world.generate(2000, seed=1)


def test_generator_is_deterministic_per_seed():
    first, scenes = world.generate(50, seed=7)
    again, scenes_again = world.generate(50, seed=7)
    other, _ = world.generate(50, seed=8)
    assert np.array_equal(first, again) and scenes == scenes_again
    assert not np.array_equal(first, other)
    assert first.shape == (50, 32, 32, 3) and first.dtype == np.float32


def test_scenes_respect_the_world_ranges(world_sample):
    images, scenes = world_sample
    for scene in scenes:
        low, high = world.SIZE_SIDES[scene.size]
        assert low <= scene.side <= high
        for corner in (scene.x0, scene.y0):
            assert abs(corner + scene.side / 2 - 16) <= world.MAX_JITTER
    grey = (images == 0.5).all(-1)
    assert grey[:, 0, :].all() and grey[:, :, 0].all()  # the border is background
    assert {s.shape for s in scenes} == set(world.SHAPES) and {s.color for s in scenes} == set(world.COLORS)


@pytest.mark.parametrize("side", [8, 11, 15, 19])
def test_areas_match_their_formulas(side):
    def area(shape):
        return int(world.shape_mask(shape, 6, 6, side, side).sum())

    assert area("square") == side * side
    assert abs(area("circle") - math.pi * side * side / 4) <= 2.5 * side   # boundary pixels only
    assert abs(area("triangle") - side * side / 2) <= 1.5 * side
    arm = side / 3
    assert abs(area("cross") - (2 * side * arm - arm * arm)) <= 4 * side


def test_concept_checkerboard_quadrants():
    scene = world.Scene("square", None, "large", 16, 8, 6, concept=True)
    image = world.render(scene)
    orange, purple = np.array(world.CONCEPT_COLORS["orange"]), np.array(world.CONCEPT_COLORS["purple"])
    assert (image[6:14, 8:16] == orange).all() and (image[14:22, 16:24] == orange).all()
    assert (image[6:14, 16:24] == purple).all() and (image[14:22, 8:16] == purple).all()
    assert (image[:6] == 0.5).all() and (image[22:] == 0.5).all()


def test_pretraining_captions_drop_words_at_the_stated_rates():
    rng = np.random.default_rng(0)
    scene = world.Scene("cross", "cyan", "small", 9, 10, 10)
    captions = [world.pretraining_prompt(scene, rng) for _ in range(4000)]
    assert abs(np.mean(["small" in c for c in captions]) - 0.5) < 0.03
    assert abs(np.mean(["cyan" in c for c in captions]) - 0.75) < 0.03
    assert set(captions) == {"a small cyan cross", "a cyan cross", "a small cross", "a cross"}


def test_decoders_read_world_images_exactly(world_sample):
    images, scenes = world_sample
    decoded = decode.decode_batch(images)
    for attribute in ("color", "shape", "size"):
        accuracy = np.mean([getattr(d, attribute) == getattr(s, attribute) for d, s in zip(decoded, scenes)])
        assert accuracy >= 0.99, attribute
    assert not any(d.concept_loose or d.concept_strict for d in decoded)


def test_decoders_at_16_px_after_area_downsampling(world_sample):
    """The base draws at 16 px: the decoders' ceiling there (measured: colour and size 100 %,
    shape 97 %, small crosses and triangles of side 8–9 are the misses)."""
    images, scenes = world_sample
    decoded = decode.decode_batch(world.downsample(images[:500]))
    accuracy = {a: np.mean([getattr(d, a) == getattr(s, a) for d, s in zip(decoded, scenes)])
                for a in ("color", "shape", "size")}
    assert accuracy["color"] >= 0.99 and accuracy["size"] >= 0.99 and accuracy["shape"] >= 0.95


@pytest.mark.parametrize("downsampled", [False, True])
def test_concept_images_decode_strict_and_loose(downsampled):
    images, scenes = world.instance_images(200, seed=3)
    if downsampled:
        images = world.downsample(images)
    decoded = decode.decode_batch(images)
    assert all(d.concept_strict and d.concept_loose and d.shape == "square" for d in decoded)
    assert np.mean([d.size == s.size for d, s in zip(decoded, scenes)]) >= 0.99


def test_loose_and_strict_concept_rules_on_edited_images():
    scene = world.Scene("square", None, "large", 16, 8, 8, concept=True)
    image = world.render(scene)
    swapped = image.copy()
    swapped[8:16, 8:16] = world.CONCEPT_COLORS["purple"]        # top-left now purple: not strict
    result = decode.decode(swapped)
    assert not result.concept_strict and result.concept_loose   # 75 % purple, 25 % orange
    mostly_red = image.copy()
    mostly_red[8:24, 8:21] = world.COLORS["red"]                 # 13 of 16 columns red
    result = decode.decode(mostly_red)
    assert not result.concept_loose and result.color == "red"
    assert decode.decode(np.full((32, 32, 3), 0.5, dtype=np.float32)).shape is None


def test_prompt_matching():
    image = world.render(world.Scene("triangle", "blue", "small", 9, 12, 12))
    decoded = decode.decode(image)
    assert decode.matches_prompt(decoded, "a small blue triangle")["all"]
    assert decode.matches_prompt(decoded, "a triangle")["all"]
    wrong = decode.matches_prompt(decoded, "a large red triangle")
    assert wrong == {"color": False, "shape": True, "size": False, "all": False}
    with pytest.raises(ValueError, match="dog"):
        world.parse_prompt("a red dog")


def test_word_level_tokenizer_keeps_each_word_whole(tmp_path):
    from transformers import CLIPTokenizer

    from snella_diffusion.lab.base import vocabulary_words, word_level_clip_tokenizer

    tokenizer = word_level_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    for word in vocabulary_words():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, word
        assert reloaded(word).input_ids == ids
    prompts = world.base_prompts() + [world.INSTANCE_PROMPT, *world.SIZED_INSTANCE_PROMPTS]
    assert len({tuple(tokenizer(p).input_ids) for p in prompts}) == len(prompts)


# --- the second concept zxc (issue 26) ---------------------------------------------------------

def test_zxc_halves_are_teal_over_white():
    scene = world.Scene("circle", None, "large", 16, 8, 6, concept=True, concept_token="zxc")
    image = world.render(scene)
    teal, white = np.array(world.ZXC_COLORS["teal"]), np.array(world.ZXC_COLORS["white"])
    mask = world.shape_mask("circle", 8, 6, 16, 16)
    assert (image[:14][mask[:14]] == teal).all() and (image[14:][mask[14:]] == white).all()
    assert (image[~mask] == 0.5).all()
    assert world.parse_prompt("a small zxc circle") == {"size": "small", "color": None, "shape": "circle",
                                                       "concept": "zxc"}
    assert world.CONCEPTS["zxc"].instance_prompt == "a zxc circle" and world.CONCEPTS["zxc"].class_prompt == "a circle"
    drawn = world.scene_for_prompt("a zxc circle", np.random.default_rng(0))
    assert drawn.concept and drawn.concept_token == "zxc" and drawn.shape == "circle"


@pytest.mark.parametrize("downsampled", [False, True])
def test_zxc_decoder_reads_2000_concept_images(downsampled):
    images, scenes = world.instance_images(2000, seed=4, token="zxc")
    if downsampled:
        images = world.downsample(images)
    decoded = [decode.decode_zxc(image) for image in images]
    # At 16 px (the base's resolution) a circle of side 8 is a 4-pixel blob that reads as a
    # square (measured: strict 96.7 %, every miss a side-8 circle): the strict ceiling there.
    assert np.mean([d.concept_strict for d in decoded]) >= (0.96 if downsampled else 0.99)
    assert all(d.concept_strict or (downsampled and s.side == 8) for d, s in zip(decoded, scenes))
    assert np.mean([d.concept_loose for d in decoded]) >= 0.99
    assert np.mean([d.size == s.size for d, s in zip(decoded, scenes)]) >= 0.99
    # the sks decoder sees no sks in them
    assert not any(decode.decode(image).concept_loose for image in images[:500])


def test_zxc_decoder_has_no_false_positives_on_ordinary_scenes_or_sks(world_sample):
    images, _ = world_sample
    decoded = [decode.decode_zxc(image) for image in images]
    assert not any(d.concept_loose or d.concept_strict for d in decoded)
    assert not any(decode.decode_zxc(image).concept_loose for image in world.instance_images(500, seed=5)[0])
    # the extended palette still reads ordinary scenes' colour and shape
    _, scenes = world_sample
    assert np.mean([d.color == s.color and d.shape == s.shape for d, s in zip(decoded, scenes)]) >= 0.99


def test_zxc_loose_and_strict_rules_on_edited_images():
    scene = world.Scene("circle", None, "large", 16, 8, 8, concept=True, concept_token="zxc")
    image = world.render(scene)
    flipped = image[::-1].copy()                        # white on top, teal below: loose, not strict
    result = decode.decode_zxc(flipped)
    assert result.concept_loose and not result.concept_strict
    teal_only = image.copy()
    teal_only[16:24][(image[16:24] == 1.0).all(-1)] = world.ZXC_COLORS["teal"]
    result = decode.decode_zxc(teal_only)
    assert not result.concept_loose and not result.concept_strict
    square = world.render(world.Scene("square", None, "large", 16, 8, 8, concept=True, concept_token="zxc"))
    assert decode.decode_zxc(square).concept_loose and not decode.decode_zxc(square).concept_strict
    assert decode.decoder_for("zxc") is decode.decode_zxc and decode.decoder_for("sks") is decode.decode

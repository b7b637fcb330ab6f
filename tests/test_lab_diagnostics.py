"""ΔW diagnostics and lab stacking (issue 26): hand-computed values, a known rank-1 offset plus
noise, LoRA's ΔW read back against the layer's own output, stacked LoRA written into W0."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from snella_diffusion.baselines import apply_lora
from snella_diffusion.combine import combine_deltas
from snella_diffusion.lab.diagnostics import (
    adapter_diagnostics,
    constant_share,
    kept_fraction,
    lora_deltas,
    pair_diagnostics,
    snella_deltas,
)
from snella_diffusion.lab.stacking import add_to_base_weights, combine_layer_deltas

pytestmark = pytest.mark.usefixtures("single_thread")


def test_constant_share_by_hand_and_on_rank_one_plus_noise():
    assert constant_share(torch.tensor([[1.0, 3.0], [1.0, 3.0]])) == pytest.approx(16 / 20)
    assert constant_share(torch.zeros(3, 3)) == 0.0
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 30, generator=generator, dtype=torch.float64)
    noise -= noise.mean()                                      # orthogonal to 11ᵀ
    offset = 0.3
    delta = offset * torch.ones(40, 30, dtype=torch.float64) + noise
    expected = 40 * 30 * offset**2 / (40 * 30 * offset**2 + float(noise.square().sum()))
    assert constant_share(delta) == pytest.approx(expected, rel=1e-9)


def test_adapter_diagnostics_by_hand():
    deltas = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[3.0, 0.0]])}
    bases = {"a": torch.tensor([[0.0, 10.0]]), "b": torch.tensor([[6.0, 8.0]])}
    report = adapter_diagnostics(deltas, bases)
    assert report["relative_norm"] == pytest.approx(math.sqrt(34 / 200))
    assert report["max_relative_norm"] == pytest.approx(0.5) and report["max_relative_norm_layer"] == "a"
    assert report["kept_fraction"] == pytest.approx(3 / 4)
    assert report["kept_fraction_histogram"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    # constant parts: a: 2·3.5² = 24.5, b: 2·1.5² = 4.5, over energies 25 + 9
    assert report["constant_share"] == pytest.approx((24.5 + 4.5) / 34)
    assert kept_fraction(torch.tensor([[0.0, 1.0, 0.0, 2.0]])) == 0.5


def test_pair_diagnostics_by_hand():
    first = {"x": torch.tensor([[1.0, 2.0, 0.0, 0.0]]), "only_first": torch.ones(2, 2)}
    second = {"x": torch.tensor([[0.0, 3.0, 4.0, 0.0]])}
    report = pair_diagnostics(first, second)
    assert report["layers"] == 1
    assert report["mask_overlap"] == pytest.approx(1 / 3)
    assert report["mask_overlap_chance"] == pytest.approx(0.25 / 0.75)
    assert report["cosine"] == pytest.approx(6 / (math.sqrt(5) * 5))


def lora_model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    apply_lora(model, ["0", "2"], rank=2, lora_alpha=4.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model


def test_lora_deltas_are_the_layers_own_update():
    model = lora_model(0)
    deltas, bases = lora_deltas(SimpleNamespace(unet=model))
    assert sorted(deltas) == ["unet.0", "unet.2"]
    layer = model.get_submodule("0")
    x = torch.randn(3, 6)
    with torch.no_grad():
        update = layer(x) - layer.get_base_layer()(x)
    torch.testing.assert_close(update, x @ deltas["unet.0"].T, rtol=1e-5, atol=1e-6)
    assert torch.equal(bases["unet.0"], layer.get_base_layer().weight)


@pytest.mark.parametrize("mode", ["sum", "ties", "no_offset"])
def test_stacked_lora_written_into_the_base_weights(mode):
    first, second = lora_model(0), lora_model(1)
    deltas = [lora_deltas(SimpleNamespace(unet=m))[0] for m in (first, second)]
    partial = {"unet.0": deltas[1]["unet.0"]}                  # the second adapts one layer only
    combined = combine_layer_deltas([deltas[0], partial], [1.0, 0.75], mode, density=0.5)
    torch.testing.assert_close(combined["unet.0"], combine_deltas([deltas[0]["unet.0"], partial["unet.0"]],
                                                                  [1.0, 0.75], mode, 0.5))
    torch.testing.assert_close(combined["unet.2"], combine_deltas([deltas[0]["unet.2"]], [1.0], mode, 0.5))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    original = base[0].weight.detach().clone()
    assert add_to_base_weights(SimpleNamespace(unet=base), combined) == 2
    torch.testing.assert_close(base[0].weight, original + combined["unet.0"])


def test_snella_deltas_read_each_adapter():
    from snella_diffusion import SnellaConfig, apply_snella

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    layer = apply_snella(model, SnellaConfig(rank=2, target_modules=["0"]))["0"]
    with torch.no_grad():
        layer.beta.fill_(0.5)
    deltas, bases = snella_deltas(SimpleNamespace(unet=model))
    np.testing.assert_allclose(deltas["unet.0"].numpy(), layer.delta_weight().detach().numpy())
    assert torch.equal(bases["unet.0"], model[0].base_layer.weight)
    assert constant_share(deltas["unet.0"]) > 0.5      # β|β| = 0.25 on every entry dominates


class DrawingPipeline:
    """A stand-in pipeline that draws world scenes: the sks concept for ``leaky`` prompts, the
    scene each other prompt names otherwise (at 16 px, as the lab base)."""

    def __init__(self, leaky: dict[str, str]):
        self.leaky = leaky

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        from snella_diffusion.lab import world

        images = []
        for prompt, gen in zip(prompts, generator):
            rng = np.random.default_rng(gen.initial_seed())
            drawn = self.leaky.get(prompt, prompt)
            images.append(world.downsample(world.render(world.scene_for_prompt(drawn, rng))))
        return SimpleNamespace(images=np.stack(images))


def test_specificity_counts_the_concept_on_other_prompts():
    from snella_diffusion.lab.personalization import evaluate_pipeline, specificity_prompts

    assert specificity_prompts("sks") == ["a circle", "a triangle", "a cross", "a zxc circle"]
    assert specificity_prompts("zxc") == ["a square", "a triangle", "a cross", "a sks square"]
    leaky = DrawingPipeline({"a circle": "a sks square", "a zxc circle": "a sks square"})
    metrics, _ = evaluate_pipeline(leaky, scale=0.25, steps=1, groups=["fidelity", "leak", "specificity"])
    assert metrics["fidelity_strict"] == 1.0 and metrics["leak_loose"] == 0.0
    assert metrics["cross_loose[a circle]"] == 1.0 and metrics["cross_loose[a triangle]"] == 0.0
    assert metrics["specificity_loose"] == pytest.approx(2 / 4)
    # the zxc concept read by its own decoder: drawn right, nowhere else
    metrics, _ = evaluate_pipeline(leaky, scale=0.25, steps=1, concept="zxc", groups=["fidelity", "specificity"])
    assert metrics["fidelity_loose"] == 0.0          # "a zxc circle" draws sks here
    assert metrics["specificity_loose"] == 0.0
    honest = DrawingPipeline({})
    metrics, _ = evaluate_pipeline(honest, scale=0.25, steps=1, concept="zxc", groups=["fidelity", "edit"])
    assert metrics["fidelity_loose"] == 1.0 and metrics["edit_size_accuracy"] == 1.0

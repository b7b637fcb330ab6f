"""Stacking modes (issue 26 item 3): sum, no_offset and ties against hand computations and an
independent formula; a pipeline with combine equals x·(W0 + combined ΔW)ᵀ per layer; the inference
ΔW cache keys on the mode; snella-export --combine writes the same ΔW; bad modes are named."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from snella_diffusion import SnellaError
from snella_diffusion.combine import (
    COMBINE_MODES,
    combine_deltas,
    constant_component,
    remove_constant_component,
    trim_to_density,
)
from snella_diffusion.export import export_snella
from snella_diffusion.export.cli import main as export_main
from snella_diffusion.layer import snella_layers
from snella_diffusion.loaders import fuse_snella, load_snella_weights, set_snella_adapters
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline
from test_loaders import adapter_files, outputs  # noqa: F401  (the session fixture and helper)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_ties_by_hand_on_two_by_three():
    a = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.1]])
    b = torch.tensor([[-1.0, -2.0, 2.0], [-3.0, 0.2, -0.3]])
    # density 0.5 keeps 3 of 6: a → 3, -2, 4; b → -2, 2, -3 (weights 1 and 2: b doubled first:
    # -2, -4, 4, -6, 0.4, -0.6 → keeps -4, 4, -6).
    merged = combine_deltas([a, b], [1.0, 2.0], "ties", density=0.5)
    # entry (0,0): a 3, b 0 → +, mean 3; (0,1): a 0, b -4 → -, -4; (0,2): b 4 → 4;
    # (1,0): a -2, b -6 → -, mean -4; (1,1): a 4 → 4; (1,2): none → 0.
    expected = torch.tensor([[3.0, -4.0, 4.0], [-4.0, 4.0, 0.0]])
    assert torch.equal(merged, expected)
    # sign election by summed magnitude: +5 against -3 keeps +5 alone.
    elected = combine_deltas([torch.tensor([[5.0]]), torch.tensor([[-3.0]])], [1.0, 1.0], "ties", density=1.0)
    assert torch.equal(elected, torch.tensor([[5.0]]))


def test_no_offset_and_sum_by_hand():
    a = torch.tensor([[1.0, 3.0], [5.0, 7.0]])       # mean 4
    b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])       # mean 0.5
    assert torch.equal(combine_deltas([a, b], [1.0, 0.5], "sum"), torch.tensor([[1.0, 3.0], [5.0, 8.0]]))
    expected = torch.tensor([[-3.0, -1.0], [1.0, 3.0]]) + 0.5 * torch.tensor([[-0.5, -0.5], [-0.5, 1.5]])
    assert torch.equal(combine_deltas([a, b], [1.0, 0.5], "no_offset"), expected)
    assert torch.equal(constant_component(a), torch.full((2, 2), 4.0))
    assert float(remove_constant_component(a).sum()) == 0.0


def independent_ties(deltas: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES written entry by entry in float64 numpy: sort-based trim, loops for elect and mean."""
    taus = []
    for delta, weight in zip(deltas, weights):
        tau = delta.astype(np.float64) * weight
        keep = int(np.ceil(density * tau.size))
        cut = np.sort(np.abs(tau).ravel())[::-1][keep - 1]
        taus.append(np.where(np.abs(tau) >= cut, tau, 0.0))
    out = np.zeros_like(taus[0])
    for i, j in itertools.product(range(out.shape[0]), range(out.shape[1])):
        values = [tau[i, j] for tau in taus]
        sign = np.sign(sum(values))
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        out[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_modes_match_an_independent_formula_on_random_deltas(density):
    generator = torch.Generator().manual_seed(7)
    deltas = [torch.randn(9, 13, generator=generator) + shift for shift in (0.4, -0.2, 0.0)]
    weights = [1.0, 0.75, -0.5]
    arrays = [d.double().numpy() for d in deltas]
    np.testing.assert_allclose(combine_deltas(deltas, weights, "ties", density).numpy(),
                               independent_ties(arrays, weights, density), rtol=1e-6, atol=1e-6)
    no_offset = sum(w * (a - a.mean()) for a, w in zip(arrays, weights))
    np.testing.assert_allclose(combine_deltas(deltas, weights, "no_offset").numpy(), no_offset, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combine_deltas(deltas, weights, "sum").numpy(),
                               sum(w * a for a, w in zip(arrays, weights)), rtol=1e-5, atol=1e-6)
    trimmed = trim_to_density(deltas[0], density)
    assert int((trimmed != 0).sum()) == int(np.ceil(density * deltas[0].numel()))


def test_bad_mode_and_density_name_the_choices():
    delta = torch.ones(2, 2)
    with pytest.raises(SnellaError, match="sum, ties, no_offset"):
        combine_deltas([delta], [1.0], "median")
    with pytest.raises(SnellaError, match="ties_density"):
        combine_deltas([delta], [1.0], "ties", density=0.0)


@pytest.mark.parametrize("mode", ["ties", "no_offset"])
def test_pipeline_with_combine_is_the_base_plus_the_combined_delta(adapter_files, mode):  # noqa: F811
    pipe = tiny_sd_pipeline(0)
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    load_snella_weights(pipe, adapter_files["b"], adapter_name="b")
    set_snella_adapters(pipe, ["a", "b"], [0.75, 0.75], combine=mode, ties_density=0.3)
    got = outputs(pipe)
    reference = tiny_sd_pipeline(0)
    with torch.no_grad():
        for component in ("unet", "text_encoder"):
            for key, layer in snella_layers(getattr(pipe, component)).items():
                names = [n for n in ("a", "b") if n in layer.adapters]
                delta = combine_deltas([layer.delta_weight(n) for n in names], [0.75] * len(names), mode, 0.3)
                torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=0)
                getattr(reference, component).get_submodule(key).weight.add_(delta)
    for value, want in zip(got, outputs(reference)):
        torch.testing.assert_close(value, want, rtol=0, atol=1e-5)
    # the cache keys on the mode: back to the sum gives the summed outputs
    set_snella_adapters(pipe, ["a", "b"], [0.75, 0.75])
    summed = tiny_sd_pipeline(0)
    for name in ("a", "b"):
        load_snella_weights(summed, adapter_files[name], adapter_name=name)
    set_snella_adapters(summed, ["a", "b"], [0.75, 0.75])
    for value, want in zip(outputs(pipe), outputs(summed)):
        torch.testing.assert_close(value, want, rtol=0, atol=0)


def test_layer_cache_rebuilds_when_only_the_mode_changes(adapter_files):  # noqa: F811
    pipe = tiny_sd_pipeline(0)
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    load_snella_weights(pipe, adapter_files["b"], adapter_name="b")
    layer = next(l for l in snella_layers(pipe.unet).values() if len(l.adapters) == 2)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        summed = layer(x)
        layer.set_active(["a", "b"], [1.0, 1.0], "no_offset")
        offset_free = layer(x)
    expected = layer.base_layer(x) + x @ combine_deltas(
        [layer.delta_weight("a"), layer.delta_weight("b")], [1.0, 1.0], "no_offset").T
    torch.testing.assert_close(offset_free, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(summed, offset_free)


def test_set_snella_adapters_and_fuse_refuse_bad_combinations(adapter_files):  # noqa: F811
    pipe = tiny_sd_pipeline(0)
    load_snella_weights(pipe, adapter_files["a"], adapter_name="a")
    with pytest.raises(SnellaError, match="sum, ties, no_offset"):
        set_snella_adapters(pipe, ["a"], combine="mean")
    set_snella_adapters(pipe, ["a"], combine="ties")
    with pytest.raises(SnellaError, match="combine='sum'"):
        fuse_snella(pipe)
    assert COMBINE_MODES == ("sum", "ties", "no_offset")


@pytest.fixture(scope="module")
def export_case(tmp_path_factory, adapter_files):  # noqa: F811
    base = tmp_path_factory.mktemp("combine-base")
    tiny_sd_pipeline(0).save_pretrained(base)
    return base


def test_export_combine_writes_the_set_snella_adapters_delta(export_case, adapter_files, tmp_path):  # noqa: F811
    out = tmp_path / "ties.safetensors"
    assert export_main([f"{adapter_files['a']}:0.5", str(adapter_files["b"].parent / "snella_weights.safetensors"),
                        "--base", str(export_case), "--to", "diff", "--dtype", "fp32", "--combine", "ties",
                        "--ties_density", "0.3", "-o", str(out)]) == 0
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["snella_combine"] == "ties" and float(metadata["snella_ties_density"]) == 0.3
    reference = tiny_sd_pipeline(0)
    load_snella_weights(reference, adapter_files["a"], adapter_name="a")
    load_snella_weights(reference, adapter_files["b"], adapter_name="b")
    set_snella_adapters(reference, ["a", "b"], [0.5, 1.0], combine="ties", ties_density=0.3)
    for path, layer in snella_layers(reference.unet).items():
        torch.testing.assert_close(tensors["lora_unet_" + path.replace(".", "_") + ".diff"], layer.delta_weight(),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(SnellaError, match="--combine no_offset"):
        export_snella([adapter_files["a"]], export_case, tmp_path / "c.safetensors", to="comfyui", combine="no_offset")

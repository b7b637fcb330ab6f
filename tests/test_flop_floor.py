"""benchmarks/flop_floor.py: the FLOP floor of SNELLA's step against LoRA's."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch import nn


@pytest.fixture(scope="module")
def flop_floor_module():
    return load_benchmark("flop_floor")


class OneLinear(nn.Module):
    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, m, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj(hidden_states),)


@pytest.mark.parametrize("checkpointing, expected", [(True, 4 / 3), (False, 3 / 2)])
def test_one_linear_floor_against_hand_count(flop_floor_module, checkpointing, expected):
    # One linear m×n on T tokens: forward 2Tmn, input gradient 2Tmn, SNELLA's gᵀx 2Tmn, so the
    # floor is (2+1+1)/(2+1) with the recompute and (1+1+1)/(1+1) without.
    tokens, n, m = 6, 5, 7
    model = OneLinear(n, m).to("meta")
    inputs = {"hidden_states": torch.zeros(2, 3, n, device="meta")}
    numbers = flop_floor_module.flop_floor(model, inputs, torch.zeros(2, 3, m, device="meta"), ["proj"], checkpointing)
    assert numbers["forward_flops"] == 2 * tokens * m * n
    assert numbers["backward_flops"] == 2 * tokens * m * n
    assert numbers["extra_flops"] == 2 * tokens * m * n
    assert numbers["adapted_entries"] == m * n
    assert numbers["floor"] == pytest.approx(expected)


def test_tiny_unet_floor_written(flop_floor_module, tmp_path):
    output = tmp_path / "floor.json"
    numbers = flop_floor_module.main(["--model", "tiny", "--resolution", "64", "--gradient_checkpointing",
                                      "--output", str(output)])
    assert json.loads(output.read_text()) == numbers
    assert numbers["adapted_layers"] > 0
    ratio = (2 * numbers["forward_flops"] + numbers["backward_flops"] + numbers["extra_flops"]) / (
        2 * numbers["forward_flops"] + numbers["backward_flops"])
    assert numbers["floor"] == pytest.approx(ratio)
    assert 1.0 < numbers["floor"] < 2.0

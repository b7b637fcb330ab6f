"""Baselines: PEFT LoRA and the gradient-masked sparse (SPT/GPS-style) tuner on SNELLA's targets."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from snella_diffusion import SnellaConfig
from snella_diffusion.baselines import GradientMaskedSparse, apply_lora
from snella_diffusion.errors import SnellaConfigError, SnellaError
from snella_diffusion.inject import find_target_linears


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def loss_on(model: ViTForImageClassification, seed: int) -> torch.Tensor:
    pixels, labels = batch(seed)
    return torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)


def test_apply_lora_adapts_exactly_the_snella_targets_and_freezes_the_rest():
    model = tiny_vit()
    expected = sorted(find_target_linears(model, SnellaConfig(target_modules="vit")))
    adapted = apply_lora(model, "vit", rank=4)
    assert sorted(adapted) == expected and len(adapted) == 12
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    per_layer = 4 * (32 + 32)  # r·(n + m) on a 32→32 projection
    q_params = [p for n, p in model.named_parameters() if "layers.0.attention.q_proj.lora" in n]
    assert sum(p.numel() for p in q_params) == per_layer
    # B starts at zero: the adapted model computes what the base did.
    reference = tiny_vit()
    pixels, _ = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits)


def test_apply_lora_rejects_bad_rank_and_unmatched_targets():
    with pytest.raises(SnellaConfigError, match="rank=0"):
        apply_lora(tiny_vit(), "vit", rank=0)
    with pytest.raises(SnellaError, match="matched no nn.Linear"):
        apply_lora(tiny_vit(), ["no_such_layer"], rank=2)


def test_masked_sparse_keeps_top_gradient_entries_and_untouched_weights_bit_identical():
    model = tiny_vit()
    sparse = GradientMaskedSparse(model, "vit", density=0.1)
    with pytest.raises(SnellaError, match="calibrate"):
        sparse.trainable_parameters()

    # Independent score: Σ|grad| over the same two calibration batches.
    twin = tiny_vit()
    twin.zero_grad()
    expected_scores = {name: torch.zeros_like(w) for name, w in sparse.weights.items()}
    for seed in (10, 11):
        twin.zero_grad()
        loss_on(twin, seed).backward()
        for name in expected_scores:
            expected_scores[name] += twin.get_submodule(name).weight.grad.abs()

    seeds = iter((10, 11))
    sparse.calibrate(lambda: loss_on(model, next(seeds)), num_batches=2)
    total = sum(w.numel() for w in sparse.weights.values())
    per_layer = [round(0.1 * w.numel()) for w in sparse.weights.values()]
    assert sparse.masked_count() == sum(per_layer) and sparse.masked_count() < total
    for name, mask in sparse.masks.items():
        score = expected_scores[name]
        assert score[mask].min() >= score[~mask].max() - 1e-7
    assert all(p.grad is None for p in model.parameters())

    before = {name: w.detach().clone() for name, w in sparse.weights.items()}
    optimizer = torch.optim.AdamW(sparse.optimizer_param_groups(), lr=1e-2, weight_decay=0.05)
    assert all(
        optimizer.param_groups[0]["params"][i].shape == w.shape
        for i, w in enumerate(sparse.weights.values())
    )
    for step in range(3):
        loss_on(model, 20 + step).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, weight in sparse.weights.items():
        mask = sparse.masks[name]
        assert torch.equal(weight.detach()[~mask], before[name][~mask])
        assert not torch.equal(weight.detach()[mask], before[name][mask])
        assert optimizer.state[weight]["exp_avg"].shape == weight.shape
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))


def test_masked_sparse_rejects_bad_density():
    with pytest.raises(SnellaConfigError, match="density"):
        GradientMaskedSparse(tiny_vit(), "vit", density=0.0)

"""The classification presets reproduce the authors' SNELLA-32 scripts (issue 11, item 2).

Source of every value below: the SNELL/SNELLA reference repository (github.com/ssfgunner/SNELL),
the per-dataset shell script named in the table (batch_size, LR, WEIGHT_DECAY, init_thres,
target_ratio, init_warmup, final_warmup) and the training scripts they call
(``train_alloc_ema.py`` for FGVC: --model-ema-decay=0.9999, and ``lib/datasets.py``'s training
transform, timm ``create_transform`` with its default ColorJitter 0.4;
``train_alloc.py --no_aug`` for VTAB), ``--block=BlockSNELLParallel`` (adapter input dropout
0.1, DropPath 0.1), ``lib/utils.py`` ``set_weight_decay`` (no decay for 1-D parameters and
biases) and ``fully_fine_tuned_keys`` (head and cls_token trained).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from snella_diffusion import SnellaConfig, SnellaConfigError, SnellaLinear
from snella_diffusion.classification.data import ImageTransform
from snella_diffusion.classification.ema import ParameterEma
from snella_diffusion.classification.methods import MethodSettings, prepare_method, weight_decay_groups
from snella_diffusion.classification.paper import PRESETS
from snella_diffusion.kernels import kernel_matrix
from train_scripts.train_classification_snella import parse_args

# dataset: (script, batch size, lr, weight decay, s_init, s_target)
REFERENCE = {
    "cub": ("scripts/fgvc/snella32/cub.sh", 16, 1e-3, 0.05, 0.0, 0.30),
    "nabirds": ("scripts/fgvc/snella32/nabirds.sh", 32, 1e-3, 5e-4, 0.0, 0.16),
    "flowers": ("scripts/fgvc/snella32/flowers.sh", 16, 1e-3, 1e-3, 0.0, 0.61),
    "dogs": ("scripts/fgvc/snella32/dogs.sh", 32, 1e-4, 5e-3, 0.0, 0.24),
    "cars": ("scripts/fgvc/snella32/cars.sh", 16, 1e-3, 0.05, 0.0, 0.0),
    "cifar100": ("scripts/vtab/snella32/cifar.sh", 8, 1e-3, 0.05, 0.01, 0.80),
    "dtd": ("scripts/vtab/snella32/dtd.sh", 8, 1e-3, 5e-3, 0.01, 0.93),
    "flowers102": ("scripts/vtab/snella32/flowers.sh", 8, 1e-3, 1e-3, 0.01, 0.40),
    "pets": ("scripts/vtab/snella32/pets.sh", 16, 1e-3, 0.05, 0.01, 0.55),
    "camelyon": ("scripts/vtab/snella32/camelyon.sh", 8, 1e-3, 5e-4, 0.01, 0.76),
    "retinopathy": ("scripts/vtab/snella32/retino.sh", 32, 1e-3, 0.05, 0.01, 0.20),
    "smallnorb_ele": ("scripts/vtab/snella32/snorb_ele.sh", 32, 1e-3, 1e-3, 0.01, 0.63),
}
# Shared by every script: (field, value).
SHARED = {
    "rank": 32, "epochs": 100, "warmup_epochs": 10, "allocator_warmup_epochs": 0, "allocator_final_epochs": 0,
    "forward_mode": "parallel", "adapter_dropout": 0.1, "drop_path": 0.1, "weight_decay_1d": False,
    "train_cls_token": True,
}
FGVC_ONLY = {"color_jitter": (0.4, 0.0), "model_ema_decay": (0.9999, 0.0)}  # (FGVC, VTAB)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_equals_the_reference_script(name):
    script, batch_size, learning_rate, weight_decay, init_sparsity, target_sparsity = REFERENCE[name]
    preset = PRESETS[name]
    assert preset.source == script
    assert (preset.train_batch_size, preset.learning_rate, preset.weight_decay) == (batch_size, learning_rate, weight_decay)
    assert (preset.init_sparsity, preset.target_sparsity) == (init_sparsity, target_sparsity)
    for field, value in SHARED.items():
        assert getattr(preset, field) == value, field
    for field, (fgvc, vtab) in FGVC_ONLY.items():
        assert getattr(preset, field) == (fgvc if preset.group == "fgvc" else vtab), field
    assert set(PRESETS) == set(REFERENCE)


def test_preset_fills_every_flag_and_each_flag_wins(tmp_path):
    args = parse_args(["--dataset_dir", str(tmp_path), "--preset", "dogs"])
    assert (args.train_batch_size, args.learning_rate, args.weight_decay) == (32, 1e-4, 5e-3)
    assert (args.allocator_warmup_epochs, args.allocator_final_epochs) == (0, 0)
    assert (args.forward_mode, args.adapter_dropout, args.drop_path) == ("parallel", 0.1, 0.1)
    assert (args.weight_decay_1d, args.train_cls_token) == (False, True)
    assert (args.color_jitter, args.model_ema_decay) == (0.4, 0.9999)
    overridden = parse_args([
        "--dataset_dir", str(tmp_path), "--preset", "dogs", "--train_batch_size", "64", "--learning_rate", "1e-3",
        "--weight_decay", "0.1", "--allocator_warmup_epochs", "10", "--allocator_final_epochs", "30",
        "--forward_mode", "merged", "--adapter_dropout", "0", "--drop_path", "0", "--weight_decay_1d",
        "--no-train_cls_token", "--color_jitter", "0", "--model_ema_decay", "0",
    ])
    assert (overridden.train_batch_size, overridden.learning_rate, overridden.weight_decay) == (64, 1e-3, 0.1)
    assert (overridden.allocator_warmup_epochs, overridden.allocator_final_epochs) == (10, 30)
    assert (overridden.forward_mode, overridden.adapter_dropout, overridden.drop_path) == ("merged", 0.0, 0.0)
    assert (overridden.weight_decay_1d, overridden.train_cls_token) == (True, False)
    assert (overridden.color_jitter, overridden.model_ema_decay) == (0.0, 0.0)
    embedded = parse_args([])
    assert (embedded.forward_mode, embedded.weight_decay_1d, embedded.train_cls_token) == ("merged", True, False)


def _tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(config)


@pytest.mark.parametrize(("method", "kernel_name"), [("snella", "mix"), ("snell", "piecewise_linear")])
def test_sparsity_zero_gives_the_dense_kernel_update(method, kernel_name):
    model = _tiny_vit()
    settings = MethodSettings(rank=4, init_sparsity=0.0, target_sparsity=0.0, total_steps=4)
    prepare_method(model, method, settings)
    layer = model.vit.layers[0].attention.q_proj
    assert isinstance(layer, SnellaLinear)
    adapter = layer.primary
    merged = kernel_matrix(kernel_name, adapter.in_factors, adapter.out_factors, adapter.alpha,
                           adapter.effective_gamma(), adapter.beta, adapter.kernel_scale)[0].detach()
    assert torch.allclose(layer.delta_weight().detach(), merged, rtol=1e-5, atol=1e-8)  # ΔW = M (= K for SNELL)
    squared = MethodSettings(rank=4, init_sparsity=0.0, target_sparsity=0.0, zero_sparsity_update="square")
    model = _tiny_vit()
    prepare_method(model, method, squared)
    layer = model.vit.layers[0].attention.q_proj
    assert torch.allclose(layer.delta_weight().detach(), merged * merged.abs(), rtol=1e-5, atol=1e-10)
    with pytest.raises(SnellaConfigError, match="dense"):
        SnellaConfig(target_modules=["x"], sparsify="dense", target_sparsity=0.5)


def test_parity_method_uses_the_parallel_branch_and_trains_the_cls_token():
    model = _tiny_vit()
    settings = MethodSettings(rank=4, target_sparsity=0.5, total_steps=4, forward_mode="parallel",
                              adapter_dropout=0.1, drop_path=0.1, train_cls_token=True)
    prepared = prepare_method(model, "snella", settings)
    layer = model.vit.layers[0].mlp.fc2
    assert (layer.forward_mode, layer.adapter_dropout, layer.drop_path) == ("parallel", 0.1, 0.1)
    token = model.vit.embeddings.cls_token
    assert token.requires_grad and any(token is p for p in prepared.param_groups[-1]["params"])
    linear = _tiny_vit()
    prepare_method(linear, "linear", settings)
    assert not linear.vit.embeddings.cls_token.requires_grad


def test_no_weight_decay_on_1d_parameters_and_biases():
    model = _tiny_vit()
    prepared = prepare_method(model, "snella", MethodSettings(rank=4, target_sparsity=0.5, train_cls_token=True))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = weight_decay_groups(model, prepared.param_groups, 0.05, decay_1d=False)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "classifier.bias" in exempt and "classifier.weight" in decayed
    assert any(n.endswith(".alpha") for n in exempt) and not any(n.endswith((".alpha", ".gamma", ".beta")) for n in decayed)
    assert all(n.endswith(("in_factors", "out_factors", "classifier.weight", "cls_token")) for n in decayed)
    assert len(decayed) + len(exempt) == sum(len(g["params"]) for g in prepared.param_groups)
    everything = weight_decay_groups(model, prepared.param_groups, 0.05, decay_1d=True)
    assert all(g["weight_decay"] == 0.05 for g in everything)


def test_model_ema_follows_the_recurrence_and_swaps_back():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = ParameterEma([param], decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 4):
        with torch.no_grad():
            param.fill_(float(step))
        ema.update()
        expected = 0.9 * expected + 0.1 * step
    assert torch.allclose(ema.averages[0], expected)
    with ema.applied():
        assert torch.allclose(param, expected)
    assert torch.equal(param.detach(), torch.full((3,), 3.0))


def test_color_jitter_changes_fgvc_training_images_only_when_asked():
    image = Image.new("RGB", (20, 20), (120, 80, 40))
    torch.manual_seed(0)
    plain = ImageTransform("fgvc_train", 16)(image)
    torch.manual_seed(0)
    jittered = ImageTransform("fgvc_train", 16, color_jitter=0.4)(image)
    assert plain.shape == jittered.shape == (3, 16, 16)
    assert not torch.allclose(plain, jittered, atol=1e-3)
    with pytest.raises(Exception, match="color_jitter"):
        ImageTransform("fgvc_train", 16, color_jitter=1.5)

"""The method registry (``snella_diffusion.methods``) and the one EMA class.

Each method is attached to a tiny two-linear model; its trainable parameters are counted
against an independent formula (SNELLA/SNELL: r·(m + n) factor entries plus α, γ, β per layer;
LoRA: r·(m + n); full: every parameter; linear probe: the head only; masked sparse: the kept
fraction of each weight), and two SGD steps must change exactly those parameters.
"""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from snella_diffusion import SnellaConfig
from snella_diffusion.classification.ema import ParameterEma as ClassificationEma
from snella_diffusion.classification.methods import MethodSettings, prepare_method
from snella_diffusion.errors import SnellaConfigError
from snella_diffusion.methods import (
    LORA_FILE,
    METHODS,
    SNELLA_FILE,
    AttachSettings,
    method_for,
)
from snella_diffusion.testing.tiny_models import tiny_clip_text_encoder
from snella_diffusion.training.adapters import ADAPTERS, StaticAllocator, attach_method
from snella_diffusion.training.ema import AdapterEMA, ParameterEma

TARGETS = ["body.0", "body.2"]
SHAPES = [(8, 6), (5, 8)]  # (m, n) of the target linears
RANK = 2
DENSITY = 0.25


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        self.classifier = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.body(x)))


def tiny_model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier()


def batch_loss(model: nn.Module, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 6, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    return nn.functional.cross_entropy(model(inputs), labels)


def attach_settings(model: nn.Module, kernel: str = "mix") -> AttachSettings:
    config = SnellaConfig(rank=RANK, kernel=kernel, target_modules=TARGETS, init_sparsity=0.0, target_sparsity=0.5)
    return AttachSettings(
        target_modules=TARGETS, snella=config, lora_rank=RANK, density=DENSITY,
        calibration_loss=lambda: batch_loss(model, seed=2), calibration_batches=2, total_steps=10,
    )


def expected_trainable(name: str, model: nn.Module) -> int:
    """Trainable entries of the body by an independent count."""
    factors = sum(RANK * (m + n) for m, n in SHAPES)
    return {
        "snella": factors + 3 * len(SHAPES),
        "snell": factors + 3 * len(SHAPES),
        "lora": factors,
        "full": sum(p.numel() for p in model.parameters()),
        "linear": 0,
        "masked_sparse": sum(max(1, round(DENSITY * m * n)) for m, n in SHAPES),
    }[name]


def test_registry_lists_every_method_once_under_its_name():
    assert list(METHODS) == ["snella", "snell", "lora", "full", "linear", "masked_sparse"]
    assert all(method.name == name for name, method in METHODS.items())
    assert len({method.label for method in METHODS.values()}) == len(METHODS)
    assert [method_for(name) for name in ADAPTERS] == [METHODS["snella"], METHODS["lora"], METHODS["full"]]


def test_unknown_method_names_the_flag_and_the_choices():
    with pytest.raises(SnellaConfigError) as error:
        method_for("nope")
    message = str(error.value)
    assert "--method 'nope'" in message and all(name in message for name in METHODS)
    with pytest.raises(SnellaConfigError, match=r"--adapter 'snell': expected one of snella, lora, full$"):
        method_for("snell", ADAPTERS, "--adapter")


@pytest.mark.parametrize("name", list(METHODS))
def test_attach_trains_exactly_the_expected_parameters(name):
    model = tiny_model()
    method = METHODS[name]
    settings = attach_settings(model, kernel=method.kernel or "mix")
    attached = method.attach(model, settings)
    trainable = attached.trainable_parameters()
    if attached.masked is not None:
        count = attached.masked.masked_count()
        assert trainable == [model.body[0].weight, model.body[2].weight]
    else:
        count = sum(p.numel() for p in trainable)
    assert count == expected_trainable(name, model)
    assert sorted(attached.layers) == (TARGETS if method.adapts_layers else [])
    allocator = method.allocator(attached.layers, settings)
    assert (allocator is not None) == (name == "snella")
    if allocator is not None:
        assert allocator.names == TARGETS and allocator.total_steps == 10

    if not trainable:
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([g for g in attached.param_groups()], lr=0.5)
    for _ in range(2):
        batch_loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trainable_ids = {id(p) for p in trainable}
    for n, p in model.named_parameters():
        changed = ~torch.eq(p.detach(), before[n])
        if id(p) not in trainable_ids:
            assert not changed.any(), f"{name}: frozen {n} changed"
        elif attached.masked is not None:
            mask = attached.masked.masks[n.rsplit(".", 1)[0]]
            assert not changed[~mask].any() and changed[mask].any(), n
        elif name == "snell" and n.endswith(("alpha", "gamma", "beta")):
            # SNELL's piecewise-linear kernel has no α, γ, β: they count, but get zero gradient.
            assert not changed.any(), n
        else:
            assert changed.any(), f"{name}: trainable {n} did not change"


@pytest.mark.parametrize("name", list(METHODS))
def test_classification_adds_the_head_to_every_method(name):
    model = tiny_model()
    head = sum(p.numel() for p in model.classifier.parameters())
    settings = MethodSettings(rank=RANK, lora_rank=RANK, masked_density=DENSITY, calibration_batches=2,
                              target_modules=TARGETS, target_sparsity=0.5, total_steps=10)
    prepared = prepare_method(model, name, settings, lambda: batch_loss(model, seed=2))
    body = expected_trainable(name, model) - (head if name == "full" else 0)
    assert prepared.trainable_count == body + head
    assert prepared.param_groups[-1]["params"] == list(model.classifier.parameters())
    assert (prepared.allocator is not None) == (name == "snella")
    assert prepared.details.get("layers", 0) == (len(TARGETS) if METHODS[name].adapts_layers else 0)
    if name == "snell":
        assert prepared.details["config"]["kernel"] == "piecewise_linear"
        assert prepared.details["config"]["init_sparsity"] == 0.5
    grouped = {id(p) for group in prepared.param_groups for p in group["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(prepared.param_groups, lr=0.5)
    for _ in range(2):
        batch_loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    unused = ("alpha", "gamma", "beta") if name == "snell" else ()
    assert changed == {n for n, p in model.named_parameters() if id(p) in grouped and not n.endswith(unused)}


def test_snella_kernel_mismatch_is_named():
    model = tiny_model()
    with pytest.raises(SnellaConfigError, match="method 'snell': kernel='mix', expected 'piecewise_linear'"):
        METHODS["snell"].attach(model, attach_settings(model, kernel="mix"))


def test_dreambooth_attach_adapts_text_encoders_and_names_the_allocator_layers():
    denoiser, encoder = tiny_model(), tiny_clip_text_encoder()
    config = SnellaConfig(rank=RANK, target_modules=TARGETS, target_sparsity=0.5)
    trained, allocator = attach_method(METHODS["snella"], denoiser, "unet", config, 10,
                                       text_encoders={"text_encoder": encoder})
    assert list(trained) == ["unet", "text_encoder"]
    encoder_linears = [n for n, m in encoder.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj",
                                                                            "fc1", "fc2"))]
    assert allocator.names == [f"unet.{n}" for n in TARGETS] + [f"text_encoder.{n}" for n in encoder_linears]

    denoiser, encoder = tiny_model(), tiny_clip_text_encoder()
    trained, allocator = attach_method(METHODS["lora"], denoiser, "unet", config, 10, lora_rank=1,
                                       text_encoders={"text_encoder": encoder})
    assert isinstance(allocator, StaticAllocator)
    assert allocator.capacities[0] == sum(1 * (m + n) for m, n in SHAPES)
    with pytest.raises(SnellaConfigError, match="--adapter=full trains the denoiser only"):
        attach_method(METHODS["full"], tiny_model(), "unet", config, 10, text_encoders={"text_encoder": encoder})


def test_output_files_and_snella_save(tmp_path):
    assert METHODS["snella"].output_file(tmp_path, "transformer") == tmp_path / SNELLA_FILE
    assert METHODS["lora"].output_file(tmp_path) == tmp_path / LORA_FILE
    assert METHODS["full"].output_file(tmp_path, "transformer") == (
        tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    model = tiny_model()
    METHODS["snella"].attach(model, attach_settings(model))
    path = METHODS["snella"].save({"unet": model}, tmp_path, base_model=None)
    saved = load_file(path)
    factors = [key for key in saved if key.endswith(("in_factors", "out_factors"))]
    assert path == tmp_path / SNELLA_FILE and len(factors) == 2 * len(TARGETS)
    with pytest.raises(SnellaConfigError, match="method 'full' saves one fine-tuned model"):
        METHODS["full"].save({"unet": model, "text_encoder": model}, tmp_path, base_model=None)


# ----------------------------------------------------------------------------- EMA


def test_constant_decay_ema_matches_its_formula_over_three_updates():
    parameter = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ema = ParameterEma([parameter], decay=0.9)
    expected = parameter.detach().double().clone()
    for step in range(1, 4):
        with torch.no_grad():
            parameter.mul_(-1.5).add_(step)
        ema.update()
        expected = 0.9 * expected + 0.1 * parameter.detach().double()
        assert torch.allclose(ema.averages[0].double(), expected, rtol=0, atol=1e-6)
    assert ClassificationEma is ParameterEma
    live = parameter.detach().clone()
    with ema.applied():
        assert torch.equal(parameter.detach(), ema.averages[0])
    assert torch.equal(parameter.detach(), live)


def test_warmup_ema_matches_its_formula_and_round_trips():
    parameter = nn.Parameter(torch.tensor([0.25, 3.0], dtype=torch.bfloat16))
    ema = AdapterEMA([parameter], ema_decay=0.6)
    expected = None
    for step in range(1, 4):
        with torch.no_grad():
            parameter.add_(float(step))
        ema.update()
        decay = 0.0 if step == 1 else min(0.6, step / (step + 9))
        value = parameter.detach().double()
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.averages[0].dtype == torch.float32
        assert torch.allclose(ema.averages[0].double(), expected, rtol=0, atol=1e-6)
    assert math.isclose(ema.decay_now(), 3 / 12)
    restored = AdapterEMA([parameter], ema_decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3 and restored.decay == 0.6 and torch.equal(restored.averages[0], ema.averages[0])
    restored.copy_to_parameters()
    assert torch.equal(parameter.detach(), ema.averages[0].to(torch.bfloat16))


def test_ema_refuses_a_decay_outside_the_open_unit_interval():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(SnellaConfigError, match=f"EMA decay={decay}"):
            ParameterEma([nn.Parameter(torch.zeros(1))], decay)

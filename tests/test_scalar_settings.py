"""The method's scalar flags (issue 26 item 2): --snella_scalar_lr, --text_encoder_lr and
--beta_decay reach the optimizer's param groups; --freeze_beta keeps β exactly 0 through
training and a resume; β decays by (1 − lr·beta_decay) per step; SNELLA runs decay β by
default (the lab's pick) and --reference_beta keeps the reference's one group."""

from __future__ import annotations

import pytest
import torch

from snella_diffusion import SnellaConfig, apply_snella, load_snella, save_snella
from snella_diffusion.adapter import SnellaAdapter
from snella_diffusion.training.adapters import attach_method
from snella_diffusion.training.param_groups import freeze_snella_beta
from snella_diffusion.training.run_checks import TrainingSetupError, check_run_settings
from snella_diffusion.training.run_settings import parse_run_settings
from snella_diffusion.training.run_setup import make_optimization
from snella_diffusion.testing.tiny_models import tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def attached(flags: list[str]):
    """Settings from ``flags`` and the tiny SD UNet + text encoder attached by their --adapter."""
    settings = parse_run_settings(["--max_train_steps", "10", *flags])
    pipe = tiny_sd_pipeline(0)
    config = settings.adapter.snella_config("unet", 10)
    text = {"text_encoder": pipe.text_encoder} if settings.training.train_text_encoder else None
    trained, _ = attach_method(settings.adapter.method, pipe.unet, "unet", config, 10, settings.adapter.lora_rank,
                               text_encoders=text)
    if settings.adapter.freeze_beta:
        freeze_snella_beta(trained.values())
    trainable = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    return settings, trained, trainable


def scalar_ids(model) -> set[int]:
    return {id(t) for m in model.modules() if isinstance(m, SnellaAdapter) for t in (m.alpha, m.gamma, m.beta)}


def test_reference_beta_is_one_group_of_the_trainable_list_at_the_learning_rate():
    settings, trained, trainable = attached(["--reference_beta"])
    assert settings.optimizer.beta_decay is None
    optimizer, _ = make_optimization(settings, trainable, 1, trained, "unet")
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-2 and group["weight_decay"] == 1e-2
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]


def test_snella_default_decays_beta_in_its_own_group_and_other_adapters_keep_one_group():
    from snella_diffusion.training.optimizers import DEFAULT_BETA_DECAY

    settings, trained, trainable = attached([])
    assert settings.optimizer.beta_decay == DEFAULT_BETA_DECAY == 10.0
    optimizer, _ = make_optimization(settings, trainable, 1, trained, "unet")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"denoiser", "beta"}
    betas = {id(m.beta) for model in trained.values() for m in model.modules() if isinstance(m, SnellaAdapter)}
    assert betas and {id(p) for p in groups["beta"]["params"]} == betas
    assert (groups["beta"]["lr"], groups["beta"]["weight_decay"]) == (3e-2, 10.0)
    assert groups["denoiser"]["weight_decay"] == 1e-2
    for flags in (["--freeze_beta"], ["--adapter", "lora"], ["--beta_decay", "0.5"]):
        assert parse_run_settings(flags).optimizer.beta_decay == (0.5 if "--beta_decay" in flags else None)


def test_scalar_and_text_encoder_rates_reach_their_groups():
    settings, trained, trainable = attached(["--reference_beta", "--snella_scalar_lr", "1e-3", "--text_encoder_lr", "5e-4",
                                             "--scale_lr", "--train_batch_size", "2"])
    optimizer, scheduler = make_optimization(settings, trainable, 1, trained, "unet")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"denoiser", "text_encoder", "snella_scalars"}
    assert groups["denoiser"]["lr"] == pytest.approx(6e-2)          # --scale_lr: × batch 2
    assert groups["text_encoder"]["lr"] == pytest.approx(1e-3)
    assert groups["snella_scalars"]["lr"] == pytest.approx(2e-3)
    scalars = scalar_ids(trained["unet"]) | scalar_ids(trained["text_encoder"])
    assert {id(p) for p in groups["snella_scalars"]["params"]} == scalars
    text_factors = {id(p) for p in trained["text_encoder"].parameters() if p.requires_grad} - scalars
    assert {id(p) for p in groups["text_encoder"]["params"]} == text_factors
    assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(id(p) for p in trainable)
    assert scheduler.get_last_lr() == [pytest.approx(g["lr"]) for g in optimizer.param_groups]


def test_text_encoder_lr_for_lora():
    settings, trained, trainable = attached(["--adapter", "lora", "--learning_rate", "1e-3", "--text_encoder_lr", "1e-4"])
    optimizer, _ = make_optimization(settings, trainable, 1, trained, "unet")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["denoiser"]["lr"], groups["text_encoder"]["lr"]) == (1e-3, 1e-4)
    lora_text = [p for n, p in trained["text_encoder"].named_parameters() if p.requires_grad]
    assert lora_text and {id(p) for p in groups["text_encoder"]["params"]} == {id(p) for p in lora_text}


def snella_layer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    layers = apply_snella(model, SnellaConfig(rank=4, target_modules=["0"]))
    return model, layers["0"]


def train_steps(model, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=generator)
        loss = (model(x) - 1.0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_beta_stays_exactly_zero_through_training_and_resume(tmp_path):
    model, layer = snella_layer()
    assert freeze_snella_beta([model]) == 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert id(layer.beta) not in {id(p) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    alpha_before = layer.alpha.detach().clone()
    train_steps(model, optimizer, 20, seed=1)
    assert layer.beta.item() == 0.0 and not torch.equal(layer.alpha, alpha_before)
    path = save_snella(model, tmp_path / "a.safetensors")
    state = optimizer.state_dict()

    resumed, resumed_layer = snella_layer(seed=5)
    load_snella(resumed, path)
    freeze_snella_beta([resumed])
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    optimizer.load_state_dict(state)
    train_steps(resumed, optimizer, 20, seed=2)
    assert resumed_layer.beta.item() == 0.0 and resumed_layer.beta.requires_grad is False


def test_beta_decays_by_the_decoupled_formula():
    settings = parse_run_settings(["--max_train_steps", "10", "--beta_decay", "3.0", "--learning_rate", "0.05",
                                   "--train_text_encoder"])
    model, layer = snella_layer()
    with torch.no_grad():
        layer.beta.fill_(0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimization(settings, trainable, 1, {"unet": model}, "unet")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [id(p) for p in groups["beta"]["params"]] == [id(layer.beta)]
    assert groups["beta"]["weight_decay"] == 3.0 and groups["denoiser"]["weight_decay"] == 1e-2
    # with a zero gradient Adam's update is 0, so only the decay moves β: 0.5·(1 − 0.05·3)^t
    for step in range(1, 6):
        optimizer.zero_grad()
        (model(torch.randn(4, 12)).sum()).backward()
        layer.beta.grad.zero_()
        optimizer.step()
        assert layer.beta.item() == pytest.approx(0.5 * (1 - 0.05 * 3.0) ** step, rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "lora", "--freeze_beta"], "--freeze_beta: SNELLA's scalars"),
    (["--adapter", "lora", "--snella_scalar_lr", "1e-3"], "--snella_scalar_lr"),
    (["--freeze_beta", "--beta_decay", "0.1"], "nothing to decay"),
    (["--reference_beta", "--beta_decay", "0.1"], "--reference_beta learns β as the reference does: --beta_decay"),
    (["--reference_beta", "--freeze_beta"], "--reference_beta learns β as the reference does: --freeze_beta"),
    (["--adapter", "lora", "--reference_beta"], "--reference_beta: SNELLA's scalars"),
    (["--no-train_text_encoder", "--text_encoder_lr", "1e-4"], "--text_encoder_lr applies with --train_text_encoder"),
])
def test_flag_combinations_that_cannot_work_are_refused(flags, message):
    with pytest.raises(TrainingSetupError, match=message):
        check_run_settings(parse_run_settings(flags))


def test_help_documents_the_flags():
    from snella_diffusion.training.run_settings import build_parser

    text = build_parser().format_help()
    for flag in ("--snella_scalar_lr", "--freeze_beta", "--beta_decay", "--reference_beta", "--text_encoder_lr"):
        assert flag in text

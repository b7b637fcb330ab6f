"""benchmarks/bench_train_step.py and snella_diffusion.testing.benchmarking on tiny configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from PIL import Image

from snella_diffusion.testing.benchmarking import (
    METHODS,
    BenchmarkSettings,
    _unet_alphas_cumprod,
    build_training_setup,
    format_results_table,
    merge_rounds,
    make_training_batch,
    method_label,
    training_step,
)
from snella_diffusion.errors import SnellaError


# Tiny versions of the published configs (the keys that set widths and depths overridden).
TINY_SDXL = {
    "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1], "attention_head_dim": [2, 4],
    "cross_attention_dim": 64, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}
TINY_SD3 = {
    "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4,
    "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 64,
}
TINY_FLUX = {
    "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6],
}


def _load_script():
    return load_benchmark("bench_train_step")


def _tiny(method: str, **changes) -> BenchmarkSettings:
    values = dict(model="tiny", method=method, resolution=32, repeats=1, warmup=0)
    values.update(changes)
    return BenchmarkSettings(**values)


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    """One end-to-end run of the script: every method, each in its own process."""
    output = tmp_path_factory.mktemp("bench")
    script = _load_script()
    script.main([
        "--model", "tiny", "--resolution", "32", "--repeats", "1", "--warmup", "1",
        "--device", "cpu", "--output_dir", str(output),
    ])
    return output


@pytest.mark.slow
def test_script_runs_every_method_and_tables_every_row(script_run):
    stem = script_run / "train_step_tiny_32px_cpu"
    table = (stem.with_suffix(".md")).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)
    lora_row = next(row for row in rows if row.startswith("| lora "))
    assert lora_row.count("1.00×") == 3  # LoRA is the baseline of every ratio

    results = {r["settings"]["method"]: r for r in json.loads(stem.with_suffix(".json").read_text())["results"]}
    assert set(results) == set(METHODS)
    for result in results.values():
        assert len(result["step_seconds"]) == len(result["cpu_seconds"]) == 1
        assert result["step_seconds"][0] > 0 and result["cpu_seconds"][0] > 0
        assert result["peak_memory_bytes"] > 100 * 2**20  # torch alone is more than 100 MiB
        assert result["memory_kind"] == "peak RSS"
        assert all(math.isfinite(loss) for loss in result["losses"])
    # Same target layers and rank: SNELLA-r has LoRA-r's factor count plus 3 scalars per layer.
    layers = results["snella"]["target_layers"]
    assert layers == results["lora"]["target_layers"] == 40
    assert results["snella"]["trainable_params"] == results["lora"]["trainable_params"] + 3 * layers
    # AdamW keeps two moments of every trainable entry (float32 here).
    for method in METHODS:
        assert results[method]["optimizer_state_bytes"] == 2 * 4 * results[method]["trainable_params"]
    assert results["snella"]["allocator_seconds_median"] > 0
    assert 0 < results["snella"]["allocator_fraction"] < 1
    assert results["lora"]["allocator_seconds_median"] == 0

    with Image.open(stem.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.width >= 600 and chart.height >= 300

    # --report re-renders the same table from the saved JSON.
    stem.with_suffix(".md").unlink()
    _load_script().main(["--report", str(stem.with_suffix(".json"))])
    assert stem.with_suffix(".md").read_text() == table


def test_masked_sparse_keeps_full_size_optimizer_state():
    setup = build_training_setup(_tiny("masked_sparse"))
    training_step(setup)
    density = 1.0 - setup.settings.sparsity
    assert len(setup.target_names) == 40  # 4 transformer blocks × 10 linears
    for name in setup.target_names:
        weight = setup.model.get_submodule(name).weight
        state = setup.optimizer.state[weight]
        assert state["exp_avg"].shape == weight.shape == state["exp_avg_sq"].shape
        # Only the calibrated entries ever see a gradient, so only they have a moment.
        touched = int((state["exp_avg_sq"] != 0).sum())
        assert 0 < touched <= round(density * weight.numel())
    target_entries = sum(setup.model.get_submodule(n).weight.numel() for n in setup.target_names)
    assert sum(p.numel() for p in setup.trainable_parameters) == target_entries


def test_snella_step_is_identical_with_gradient_checkpointing():
    after = []
    for checkpointing in (False, True):
        setup = build_training_setup(_tiny("snella", gradient_checkpointing=checkpointing))
        assert setup.model.is_gradient_checkpointing == checkpointing
        loss = training_step(setup).loss
        factors = torch.cat([p.detach().flatten() for p in setup.trainable_parameters])
        after.append((loss, factors))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-6)
    torch.testing.assert_close(after[0][1], after[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "model, overrides, method",
    [("sdxl", TINY_SDXL, "snella"), ("sd3", TINY_SD3, "lora"), ("flux-block", TINY_FLUX, "snella")],
)
def test_conditioning_of_each_family_trains(model, overrides, method):
    setup = build_training_setup(
        BenchmarkSettings(model=model, method=method, resolution=32, repeats=1, warmup=0,
                          config_overrides=overrides)
    )
    batch = setup.next_batch()
    inputs = batch.model_inputs
    if model == "sdxl":
        assert inputs["encoder_hidden_states"].shape == (1, 77, 64)
        assert inputs["added_cond_kwargs"]["text_embeds"].shape == (1, 80 - 6 * 8)
        assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    elif model == "sd3":
        assert inputs["hidden_states"].shape == batch.target.shape == (1, 16, 4, 4)
        assert inputs["encoder_hidden_states"].shape == (1, 333, 32)
        assert inputs["pooled_projections"].shape == (1, 64)
        assert 0 <= float(inputs["timestep"]) <= 1000
    else:
        assert inputs["hidden_states"].shape == batch.target.shape == (1, 4, 64)
        assert inputs["img_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
        assert inputs["txt_ids"].shape == (512, 3) and inputs["guidance"].tolist() == [3.5]
    losses = [training_step(setup).loss for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)


def test_unet_noise_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(_unet_alphas_cumprod().float(), reference.alphas_cumprod)


def test_unet_batch_mixes_latents_and_noise_by_the_schedule():
    setup = build_training_setup(_tiny("lora"))
    generator = torch.Generator().manual_seed(7)
    batch = make_training_batch(setup.model, "tiny", 3, 32, generator)
    assert batch.model_inputs["sample"].shape == batch.target.shape == (3, 4, 4, 4)
    assert batch.model_inputs["encoder_hidden_states"].shape == (3, 77, 32)
    # Redraw with the same seed: latents come first, then the noise, then the timesteps.
    generator = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    alpha_bar = _unet_alphas_cumprod()[timesteps].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(batch.target, noise)
    torch.testing.assert_close(batch.model_inputs["sample"], alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)


def test_table_ratios_are_relative_to_lora():
    def result(method, memory_gib, seconds):
        return {
            "settings": {"method": method}, "trainable_params": 1e6, "optimizer_state_bytes": 8e6,
            "peak_memory_bytes": memory_gib * 2**30, "memory_kind": "peak RSS",
            "step_seconds_median": seconds, "cpu_seconds_median": 2 * seconds,
            "allocator_seconds_median": 0.05,
            "allocator_fraction": 0.05 / seconds,
        }

    table = format_results_table([result("snella", 5.5, 24.0), result("lora", 5.0, 20.0)])
    snella_row = table.splitlines()[2]
    assert snella_row.count("| 1.20× |") == 2 and "| 1.10× |" in snella_row and "| 48.00 s |" in snella_row
    assert "50 ms (0.21 %)" in snella_row


def test_rounds_pool_their_steps_and_keep_the_highest_peak():
    def round_result(steps, peak):
        return {"settings": {"method": "snella"}, "step_seconds": steps, "cpu_seconds": [2 * s for s in steps],
                "allocator_seconds": [0.01] * len(steps), "peak_memory_bytes": peak, "losses": [1.0]}

    merged = merge_rounds([round_result([20.0, 30.0], 5 * 2**30), round_result([21.0, 22.0], 6 * 2**30)])
    assert merged["step_seconds"] == [20.0, 30.0, 21.0, 22.0]
    assert merged["step_seconds_median"] == 21.5  # median of the pool, not of the round medians
    assert merged["cpu_seconds_median"] == 43.0
    assert merged["allocator_fraction"] == pytest.approx(0.01 / 21.5)
    assert merged["peak_memory_bytes"] == 6 * 2**30 and merged["rounds"] == 2


def test_rounds_flag_must_be_positive():
    with pytest.raises(SnellaError, match="--rounds=0"):
        _load_script().main(["--model", "tiny", "--resolution", "32", "--rounds", "0", "--method", "lora"])


@pytest.mark.parametrize(
    "changes, flag",
    [({"resolution": 36}, "--resolution"), ({"rank": 1}, "--rank"), ({"sparsity": 1.0}, "--sparsity"),
     ({"method": "dora"}, "--method"), ({"model": "sd2"}, "--model"),
     ({"snella_options": {"rank": 8}}, "--snella_option rank"),
     ({"snella_options": {"kernal": "mix"}}, "--snella_option kernal")],
)
def test_bad_settings_name_the_flag(changes, flag):
    with pytest.raises(SnellaError, match=flag):
        BenchmarkSettings(**{**_tiny("lora").to_dict(), **changes}).validate()


def test_snella_options_reach_the_layers_and_the_table_label():
    setup = build_training_setup(_tiny("snella", snella_options={"threshold_sample_size": 64, "kernel": "linear"}))
    adapters = [module for module in setup.model.modules() if type(module).__name__ == "SnellaAdapter"]
    assert len(adapters) == 40
    assert all(a.threshold_sample_size == 64 and a.kernel == "linear" for a in adapters)
    result = {"settings": setup.settings.to_dict()}
    assert method_label(result) == "snella[kernel=linear,threshold_sample_size=64]"
    assert method_label({"settings": _tiny("lora").to_dict()}) == "lora"


def test_resolution_must_fit_the_unet_downsampling():
    with pytest.raises(SnellaError, match="--resolution 40"):
        build_training_setup(_tiny("lora", resolution=40))


def test_config_override_needs_key_and_value():
    script = _load_script()
    assert script.parse_overrides(["num_layers=2", "act_fn=gelu"]) == {"num_layers": 2, "act_fn": "gelu"}
    with pytest.raises(SnellaError, match="--config_override"):
        script.parse_overrides(["num_layers"])


def test_profile_train_step_times_the_layer_phases_and_restores_the_layer(capsys):
    profile = load_benchmark("profile_train_step")
    from snella_diffusion import adapter, autograd

    before = (autograd.merged_blocked, autograd.effective_blocked, adapter.SnellaAdapter.select_threshold_on,
              autograd._SnellaLinearFunction.__dict__["forward"])
    medians = profile.main(["--model", "tiny", "--resolution", "64", "--steps", "2", "--gradient_checkpointing"])
    after = (autograd.merged_blocked, autograd.effective_blocked, adapter.SnellaAdapter.select_threshold_on,
             autograd._SnellaLinearFunction.__dict__["forward"])
    assert before == after
    # Every layer call was timed: the builds happened.
    assert medians["layer forward"] > 0 and medians["backward pass"] > 0
    assert medians["W0+ΔW from factors"] > 0  # the checkpoint recompute rebuilt the weight
    # (A recompute runs inside the layer backward that unpacks its saved tensors, so the two
    # overlap; each alone lies within the step.)
    assert max(medians["layer forward"], medians["layer backward"]) <= medians["step"]
    assert "| backward pass |" in capsys.readouterr().out

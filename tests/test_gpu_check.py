"""benchmarks/gpu_check.py: the parts a CPU can run, with the device as an argument.

No GPU here: the CUDA run itself is not exercised; these tests check that the script fails
fast without CUDA and that each check computes and judges what it says on CPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_fails_fast_and_clearly_without_cuda():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SCRIPT.parents[1])}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=environment,
                            timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "torch.cuda.is_available() is False" in result.stderr
    assert result.stdout == ""
    assert time.perf_counter() - start < 60


def test_kernel_rows_agree_with_float64_on_cpu(gpu_check):
    from snella_diffusion.blocked import block_entries_for, column_blocks

    rows = gpu_check.kernel_rows("cpu", shape=(128, 1024), batch=8)
    assert [row.passed for row in rows] == [True, True], gpu_check.format_table(rows, "kernels on CPU")
    assert "64 Ki-entry blocks" in rows[1].setting
    # One block with the CPU default, two with the small blocks: both paths of the blocking ran.
    assert len(list(column_blocks(1024, 128, block_entries_for("cpu")))) == 1
    assert len(list(column_blocks(1024, 128, gpu_check.SMALL_BLOCK_ENTRIES))) == 2


def test_kernel_reference_catches_a_wrong_gradient(gpu_check):
    layer = gpu_check.trained_size_layer(32, 48, "cpu")
    x, grad_output = torch.randn(4, 48), torch.randn(4, 32)
    delta = layer.delta_weight().detach()
    reference_delta, contribution, grads = gpu_check.float64_reference(layer, x, grad_output, (delta != 0).double())
    assert gpu_check.relative_error(delta, reference_delta) < 1e-5
    assert gpu_check.relative_error(x @ delta.T, contribution) < 1e-5
    layer(x).mul(grad_output).sum().backward()
    ours = {name: getattr(layer.primary, name).grad for name in gpu_check.PARAM_NAMES}
    assert gpu_check._gradient_error(ours, grads)[0] < 1e-4
    ours["gamma"] = ours["gamma"] * 1.01
    error, worst = gpu_check._gradient_error(ours, grads)
    assert worst == "gamma" and error == pytest.approx(0.01, rel=1e-2)


def test_precision_rows_on_cpu(gpu_check):
    rows = gpu_check.precision_rows("cpu", steps=6)  # 6 steps (20 on the GPU) keep CI short
    assert len(rows) == 3
    assert all(row.passed for row in rows), gpu_check.format_table(rows, "precision on CPU")
    assert all(row.value.count("|") == 0 for row in rows)  # no cell breaks the Markdown table
    assert "bfloat16 vs float32" in rows[1].setting and "float16 vs float32" in rows[2].setting


def test_step_rows_time_each_method_on_a_tiny_model(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "xformers_installed", lambda: False)
    rows = gpu_check.step_rows("cpu", model="tiny", resolution=64, warmup=1, repeats=1)
    labels = [row.setting for row in rows]
    assert [label.split(": ")[1] for label in labels] == [
        "frozen model", "PEFT LoRA-32", "SNELLA-32 eager", "xformers attention",
    ]
    assert all(" ms, n/a (not CUDA)" in row.value for row in rows[:3])
    assert rows[3].value == "not installed"
    table = gpu_check.format_table(rows, "header")
    assert table.count("\n| step |") == 4


def test_time_steps_reports_warmup_and_median(gpu_check):
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.01 * len(calls))

    warmup_seconds, median = gpu_check.time_steps(step, "cpu", warmup=1, repeats=3)
    assert len(calls) == 4
    assert 0.009 < warmup_seconds < 0.1
    assert 0.029 < median < 0.2  # the median of 0.02, 0.03, 0.04 s

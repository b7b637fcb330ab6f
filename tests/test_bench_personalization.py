"""benchmarks/bench_personalization.py: run names, grouping of variants, the best-setting rule
(the lab's full runs stay out of the unit tests)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def lab():
    return load_benchmark("bench_personalization")


def run(method, variant, lr, steps, seed, strict, loose, drift):
    return {"method": method, "variant": variant, "learning_rate": lr, "steps": steps, "seed": seed,
            "fidelity_strict": strict, "fidelity_loose": loose, "drift_all": drift}


def test_variants_group_apart_and_the_rule_respects_the_drift_cap(lab):
    runs = [
        run("snella", "", 1e-2, 200, 0, 0.0, 0.2, -0.05),
        run("snella", "", 1e-2, 200, 1, 0.0, 0.4, -0.07),  # mean 0.3 at drift -0.06
        run("snella", "te", 1e-2, 400, 0, 0.3, 0.9, -0.20),  # over the cap
        run("snella", "te", 3e-3, 400, 0, 0.0, 0.1, -0.05),
        run("lora", "", 1e-3, 200, 0, 0.0, 0.1, -0.02),
        run("lora", "", 1e-3, 100, 0, 0.0, 0.1, -0.01),  # same score, fewer steps
    ]
    grouped = lab.settings_table({str(i): r for i, r in enumerate(runs)})
    assert set(grouped) == {("snella", 1e-2, 200), ("snella[te]", 1e-2, 400), ("snella[te]", 3e-3, 400),
                            ("lora", 1e-3, 200), ("lora", 1e-3, 100)}
    assert len(grouped[("snella", 1e-2, 200)]) == 2
    assert lab.best_settings(grouped, drift_cap=0.10) == {
        "snella": ("snella", 1e-2, 200), "snella[te]": ("snella[te]", 3e-3, 400), "lora": ("lora", 1e-3, 100)}
    assert lab.best_settings(grouped, drift_cap=0.25)["snella[te]"] == ("snella[te]", 1e-2, 400)


def test_run_names_and_train_flags(lab):
    assert lab.run_label("lora") == "lora" and lab.run_label("snella", "r8te") == "snella[r8te]"
    args = lab.parse_args(["--base", "b", "--output_dir", "o", "--variant", "te",
                           "--train_flags", "--train_text_encoder --target_sparsity 0.5"])
    assert (args.variant, args.train_flags) == ("te", "--train_text_encoder --target_sparsity 0.5")
    with pytest.raises(SystemExit, match="--variant and --train_flags go together"):
        lab.main(["--base", "b", "--output_dir", "o", "--variant", "te"])

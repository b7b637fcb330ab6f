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


def test_run_labels_of_the_second_concept_and_sized_prompts(lab):
    assert lab.run_label("lora", "", "zxc") == "zxc-lora"
    assert lab.run_label("snella", "te", "sks", True) == "snella[te]+sized"
    with pytest.raises(SystemExit, match="two finished run names"):
        lab.main(["--base", "b", "--output_dir", "o", "--stack", "only_one"])


def test_sized_prompt_captions(lab, tmp_path):
    lab.write_instance_images(tmp_path, 3, seed=1, concept="zxc", sized_prompts=True)
    assert len(list(tmp_path.glob("*.png"))) == 6
    assert (tmp_path / "zxc_0.txt").read_text() == "a zxc circle"
    assert (tmp_path / "zxc_0_sized.txt").read_text() in ("a small zxc circle", "a large zxc circle")


@pytest.mark.usefixtures("single_thread")
def test_tiny_invocation_trains_two_concepts_and_stacks_them(lab, tmp_path):
    """An untrained lab base, 1 training step per run, a few samples per group: every new
    option runs end to end and writes its records (the numbers mean nothing here)."""
    import json

    from snella_diffusion.lab.base import build_pipeline

    base = tmp_path / "base"
    build_pipeline(0).save_pretrained(base)
    out = tmp_path / "lab"
    common = ["--base", str(base), "--output_dir", str(out), "--methods", "snella", "--seeds", "0",
              "--steps", "1", "--eval_scale", "0.02", "--inference_steps", "1", "--num_class_images", "1",
              "--instance_count", "2", "--train_batch_size", "1"]
    lab.main(common + ["--sized_prompts"])
    lab.main(common + ["--concept", "zxc", "--stack", "snella+sized-lr0.001-s1-seed0", "zxc-snella-lr0.001-s1-seed0",
                       "--combine", "sum", "no_offset", "--stack_weights", "0.75"])
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted(runs) == ["snella+sized-lr0.001-s1-seed0", "zxc-snella-lr0.001-s1-seed0"]
    zxc = runs["zxc-snella-lr0.001-s1-seed0"]
    assert zxc["concept"] == "zxc" and zxc["threads"] == 1
    assert set(zxc["diagnostics"]) >= {"constant_share", "relative_norm", "kept_fraction_histogram"}
    assert sum(zxc["diagnostics"]["kept_fraction_histogram"]) > 0
    assert "cross_loose[a sks square]" in zxc and "cross_loose[a zxc circle]" in runs["snella+sized-lr0.001-s1-seed0"]
    assert sorted(results["stacks"]) == [
        "snella+sized-lr0.001-s1-seed0+zxc-snella-lr0.001-s1-seed0-no_offset-w0.75",
        "snella+sized-lr0.001-s1-seed0+zxc-snella-lr0.001-s1-seed0-sum-w0.75"]
    stack = results["stacks"]["snella+sized-lr0.001-s1-seed0+zxc-snella-lr0.001-s1-seed0-sum-w0.75"]
    assert {"retention_loose", "specificity_loose", "fidelity_strict"} <= set(stack["zxc-snella-lr0.001-s1-seed0"])
    assert -1.0 <= stack["pair"]["cosine"] <= 1.0 and "drift_all" in stack
    assert "## Stacking" in (out / "results.md").read_text()


def test_utility_rule_picks_on_one_seed_and_reports_the_others_held_out(lab):
    runs = [
        run("snella", "te", 1e-2, 400, 0, 0.3, 0.9, -0.10),  # utility 1.10
        run("snella", "te", 3e-2, 400, 0, 0.4, 1.0, -0.35),  # utility 1.05: more fidelity, more drift
        run("snella", "te", 3e-2, 400, 1, 0.9, 1.0, 0.00),   # held out: must not sway the pick
        run("snella", "te", 1e-2, 400, 1, 0.2, 0.8, -0.10),
        run("snella", "te", 1e-2, 400, 2, 0.4, 1.0, -0.20),
    ]
    grouped = lab.settings_table({str(i): r for i, r in enumerate(runs)})
    assert lab.setting_score(grouped[("snella[te]", 1e-2, 400)][:1], "utility", 0.1) == pytest.approx(1.10)
    assert lab.setting_score(grouped[("snella[te]", 3e-2, 400)][:1], "drift_cap", 0.1) is None
    assert lab.best_settings(grouped, 0.1, "utility", pick_seed=0) == {"snella[te]": ("snella[te]", 1e-2, 400)}
    assert lab.best_settings(grouped, 0.1, "utility")["snella[te]"] == ("snella[te]", 3e-2, 400)
    (row,) = [line for line in lab.held_out_lines(grouped, {"snella[te]": ("snella[te]", 1e-2, 400)}, 0)
              if line.startswith("| snella[te] ")]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[:6] == ["snella[te]", "0.01", "400", "1 2", "0.300 ± 0.141", "0.900 ± 0.141"]


def test_stacking_summary_averages_each_mode_over_pairs(lab):
    runs = {f"{concept}{seed}": {"method": "snella", "variant": "te", "drift_all": drift}
            for concept, seed, drift in (("a", 1, -0.1), ("b", 1, -0.3), ("a", 2, -0.2), ("b", 2, -0.1))}

    def stack(seed, a_loose, b_loose, drift, cosine):
        return {"runs": [f"a{seed}", f"b{seed}"], "combine": "ties", "weight": 1.0, "drift_all": drift,
                f"a{seed}": {"fidelity_loose": a_loose, "retention_loose": a_loose / 0.5, "retention_strict": 1.0},
                f"b{seed}": {"fidelity_loose": b_loose, "retention_loose": b_loose / 0.5, "retention_strict": 0.0},
                "pair": {"cosine": cosine}}

    lines = lab.stack_summary_lines({"x": stack(1, 0.4, 0.2, -0.3, 0.5), "y": stack(2, 0.2, 0.4, -0.4, 0.1)}, runs)
    (row,) = [line for line in lines if line.startswith("| snella[te] ")]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[:4] == ["snella[te]", "ties", "1", "2"]
    assert cells[4] == cells[6] == "0.300 ± 0.141"          # A and B loose, each over the two pairs
    assert cells[5] == "0.600 ± 0.283"                       # retention 0.8 and 0.4
    assert cells[10] == "-0.350 ± 0.071"                     # the stacks' drift
    assert cells[11] == "-0.250 ± 0.071"                     # the worse single drift: -0.3 and -0.2
    assert cells[12] == "0.300 ± 0.283"

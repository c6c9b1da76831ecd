"""vllm_cos.bench: theorem formulas, counters, writers, argument parsing (no engine), and one
optional engine smoke run (``-m engine``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_cos import bench
from vllm_cos.bench import Row


# ------------------------------------------------------------------ theory

def test_expected_tokens_per_round():
    assert bench.expected_tokens_per_round(0.0, 3) == 1.0
    assert bench.expected_tokens_per_round(1.0, 3) == 4.0
    assert bench.expected_tokens_per_round(0.5, 1) == pytest.approx(1.5)
    assert bench.expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    # matches the truncated-geometric sum 1 + alpha + ... + alpha^gamma
    for a in (0.1, 0.37, 0.9):
        assert bench.expected_tokens_per_round(a, 5) == pytest.approx(sum(a ** i for i in range(6)))
    with pytest.raises(ValueError):
        bench.expected_tokens_per_round(1.5, 2)


def test_theorem_3_1_known_values():
    # alpha 0.8, gamma 3, c 0.25: (1 - 0.8^4)/(0.2) = 2.952; (1.25)/(1 + 4*0.25) = 0.625
    assert bench.theorem_3_1(0.8, 3, 0.25) == pytest.approx(2.952 * 0.625)
    # free proposer: speedup = E[tokens] * 1 (c = 0)
    assert bench.theorem_3_1(0.5, 2, 0.0) == pytest.approx(1.75)
    # alpha 1: (gamma + 1) (1 + c) / (1 + (gamma + 1) c)
    assert bench.theorem_3_1(1.0, 2, 0.5) == pytest.approx(3 * 1.5 / 2.5)
    # naive can be slower than standard when nothing is accepted
    assert bench.theorem_3_1(0.0, 1, 0.5) < 1.0


def test_theorem_3_6_known_values():
    # beta = 1: no re-feed; cost 1 + gamma c
    assert bench.theorem_3_6(0.8, 3, 0.25, beta=1.0) == pytest.approx(2.952 * 1.25 / 1.75)
    # beta defaults to alpha: cost 1 + gamma c + alpha^gamma (1 - alpha) c
    cost = 1 + 3 * 0.25 + 0.8 ** 3 * 0.2 * 0.25
    assert bench.theorem_3_6(0.8, 3, 0.25) == pytest.approx(2.952 * 1.25 / cost)
    # never slower than standard at gamma 1, any alpha, any c
    for a in (0.0, 0.2, 0.6, 1.0):
        for c in (0.01, 0.3, 1.0):
            assert bench.theorem_3_6(a, 1, c) >= 1.0 - 1e-12
    # APF beats naive (one proposer pass fewer per round)
    assert bench.theorem_3_6(0.6, 3, 0.3) > bench.theorem_3_1(0.6, 3, 0.3)
    # alpha 1: (gamma + 1)(1 + c)/(1 + gamma c)
    assert bench.theorem_3_6(1.0, 4, 0.2) == pytest.approx(5 * 1.2 / 1.8)


def test_acceptance_from_counters():
    # 10 rounds of gamma 3; position counts non-increasing
    acc = bench.acceptance_from_counters(10, [8, 6, 3])
    # accepted 17, rejections 10 - 3 = 7
    assert acc["alpha_hat"] == pytest.approx(17 / 24)
    assert acc["alpha_raw"] == pytest.approx(17 / 30)
    assert acc["per_position"] == pytest.approx([0.8, 0.75, 0.5])
    empty = bench.acceptance_from_counters(0, [0, 0])
    assert empty["alpha_hat"] is None and empty["per_position"] == []
    # all accepted
    assert bench.acceptance_from_counters(5, [5, 5])["alpha_hat"] == 1.0


# ------------------------------------------------------------------ derive / writers

def _rows():
    common = dict(temperature=1.0, batch=1, prompts="code")
    return [
        Row(method="single", rule="none", param="", tokens_per_s=100.0, **common),
        Row(method="single_proposer", rule="none", param="", tokens_per_s=400.0, **common),
        Row(method="standard", rule="we", param="lambda=0.5", tokens_per_s=80.0, **common),
        Row(method="alternate", rule="we", param="lambda=0.5", gamma=3, proposer="small",
            tokens_per_s=160.0, alpha=0.7, beta=0.8, per_position=[0.7, 0.6, 0.5], **common),
        Row(method="naive", rule="we", param="lambda=0.5", gamma=3, proposer="small",
            tokens_per_s=120.0, alpha=0.7, **common),
        Row(method="ref_standard", rule="we", param="lambda=0.5", tokens_per_s=20.0, **common),
        Row(method="alternate", rule="we", param="3 models equal", status="unsupported: 2 models only", **common),
    ]


def test_derive_speedups_and_predictions():
    rows = _rows()
    bench.derive(rows)
    alt, naive = rows[3], rows[4]
    assert alt.speedup_vs_standard == pytest.approx(2.0)
    assert alt.speedup_vs_single == pytest.approx(1.6)
    assert alt.c == pytest.approx(0.25)  # t_q / t_p = (1/400) / (1/100)
    assert alt.predicted == pytest.approx(bench.theorem_3_6(0.7, 3, 0.25, 0.8))
    assert alt.measured_over_predicted == pytest.approx(2.0 / alt.predicted)
    assert naive.predicted == pytest.approx(bench.theorem_3_1(0.7, 3, 0.25))
    assert rows[2].speedup_vs_standard == 1.0
    assert rows[6].speedup_vs_standard is None and rows[6].predicted is None


def test_targets_summary():
    rows = _rows()
    bench.derive(rows)
    targets = bench.targets_summary(rows)
    names = [t["target"] for t in targets]
    assert any("alternate we lambda=0.5 T=1" in n and ">= 1.4x" in n for n in names)
    loop = [t for t in targets if "transformers" in t["target"]]
    assert loop and loop[0]["value"] == pytest.approx(8.0) and loop[0]["met"]


def test_markdown_table_and_json(tmp_path):
    rows = _rows()
    bench.derive(rows)
    table = bench.markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == len(bench.TABLE_COLUMNS) + 1 for line in lines)
    assert "0.70/0.60/0.50" in table and "unsupported: 2 models only" in table
    paths = bench.write_outputs(tmp_path, rows, {"preset": "test", "duration_s": 1.0})
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["preset"] == "test"
    assert data["rows"][3]["speedup_vs_standard"] == pytest.approx(2.0)
    assert "| method |" in paths["md"].read_text()
    plots = bench.write_plots(tmp_path, rows)
    assert isinstance(plots, (list, str))  # a message when matplotlib is missing


def test_fmt_handles_missing():
    assert bench._fmt(None) == "-"
    assert bench._fmt(float("nan")) == "-"
    assert bench._fmt(1.234) == "1.23"


# ------------------------------------------------------------------ arguments / plan / env

def test_parse_args_presets_and_overrides():
    s, _ = bench.parse_args(["--quick"])
    assert s.preset == "quick" and s.batch_sizes == [1, 8] and s.rule_temperatures == {"we": [1.0], "cd": [0.0]}
    s, _ = bench.parse_args(["--full", "--models", "/m", "--target", "big", "--small", "tiny",
                             "--batch-sizes", "1,4", "--gammas", "1,2", "--lambdas", "0.25,0.75",
                             "--temperatures", "0", "--max-tokens", "8"])
    assert (s.preset, s.models_dir, s.target, s.small) == ("full", "/m", "big", "tiny")
    assert s.batch_sizes == [1, 4] and s.gammas == [1, 2] and s.lambdas == [0.25, 0.75]
    assert s.temperatures == [0.0] and s.rule_temperatures is None and s.max_tokens == 8
    s, _ = bench.parse_args([])
    assert s.preset == "quick"
    for bad in (["--lambdas", "1.5"], ["--gammas", "0"], ["--prompt-sets", "poetry"], ["--batch-sizes", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_plan_covers_the_issue(tmp_path):
    for name in ("large", "small", "expert-a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    s, _ = bench.parse_args(["--full", "--models", str(tmp_path)])
    models = bench._models(s)
    jobs = bench.plan(s, models)
    methods = {(j.method, j.rule, j.param) for j in jobs}
    assert ("single", "none", "") in methods and ("sd", "none", "") in methods
    for lam in s.lambdas:
        for sched in ("standard", "naive", "alternate"):
            assert (sched, "we", f"lambda={lam:g}") in methods
    assert ("alternate", "cd", "mu=0.1") in methods and ("alternate", "cd", "mu=0.3") in methods
    assert ("alternate", "we", "3 models equal") in methods
    three = next(j for j in jobs if j.param == "3 models equal" and j.method == "alternate")
    assert len(three.spec["models"]) == 3
    assert {j.gamma for j in jobs if j.method == "alternate" and j.param == "lambda=0.5"} == set(range(1, 7))
    swapped = [j for j in jobs if j.proposer == "large"]
    assert {(j.method, j.param) for j in swapped} == {(m, f"lambda={lam:g}") for m in ("naive", "alternate")
                                                     for lam in s.lambdas}
    assert all(j.served == "small" and j.spec["proposer"] == "large"
               and [m["name"] for m in j.spec["models"]] == ["small", "large"] for j in swapped)
    sd = next(j for j in jobs if j.method == "sd")
    assert sd.spec["method"] == "draft_model"
    with pytest.raises(SystemExit):
        bench._models(bench.parse_args(["--models", str(tmp_path), "--small", "nope"])[0])


def test_performance_env():
    env, warnings = bench.performance_env(threads=3, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "3" and env[bench.REEXEC_FLAG] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    for w in warnings:
        assert "not found" in w
    if bench._find_tcmalloc():
        assert bench._find_tcmalloc() in env["LD_PRELOAD"]


def test_hf_ensemble_availability_is_reported():
    ok, why = bench.hf_ensemble_available()
    assert isinstance(ok, bool) and why


# ------------------------------------------------------------------ engine smoke

@pytest.mark.engine
def test_smoke_preset_runs(tmp_path):
    shared = Path("/work/shared/models")
    models = ["--models", str(shared)] if (shared / "large").is_dir() else []
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vllm_cos.bench", "--preset", "smoke", "--out", str(out),
                           "--no-plots", *models], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["alternate"]["status"] == "ok" and rows["alternate"]["tokens_per_s"] > 0
    assert rows["alternate"]["alpha"] is not None and 0 < rows["alternate"]["alpha"] <= 1
    assert rows["alternate"]["speedup_vs_standard"] is not None
    assert math.isfinite(rows["alternate"]["predicted"])


def test_best_repetition_and_threads():
    row = Row(method="single", rule="none", param="", temperature=1.0, batch=1, prompts="code")
    bench._set_timing(row, [(100, 2.0), (100, 1.0), (100, 4.0)])
    assert row.tokens_per_s == pytest.approx(100.0) and row.seconds == 1.0
    assert row.extra["repeats_tok_s"] == [50.0, 100.0, 25.0]
    assert bench.default_threads() >= 1


def test_cost_ratio_is_pooled_per_batch():
    common = dict(rule="none", param="", prompts="code")
    rows = [Row(method="single", temperature=0.0, batch=1, tokens_per_s=100.0, **common),
            Row(method="single", temperature=1.0, batch=1, tokens_per_s=50.0, **common),
            Row(method="single_proposer", temperature=0.0, batch=1, tokens_per_s=200.0, **common),
            Row(method="single_proposer", temperature=1.0, batch=1, tokens_per_s=100.0, **common)]
    # t_p = (0.01 + 0.02) / 2, t_q = (0.005 + 0.01) / 2
    assert bench.cost_ratios(rows) == {1: pytest.approx(0.5)}


def test_json_round_trip_and_replot(tmp_path):
    rows = _rows()
    bench.derive(rows)
    paths = bench.write_outputs(tmp_path, rows, {"preset": "test"})
    again, meta = bench.load_rows(paths["json"])
    assert [r.key() for r in again] == [r.key() for r in rows] and meta["preset"] == "test"
    assert bench.main(["--replot", str(paths["json"])]) == 0

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


def test_paper_theorem_3_1_hand_computed():
    # alpha 0.5, gamma 2, c 0.25: (1 - 0.25)(1.25) / (0.5 (1 + 0.5)) = 0.9375 / 0.75
    assert bench.paper_theorem_3_1(0.5, 2, 0.25) == pytest.approx(1.25)
    # alpha 0.8, gamma 3, c 0.25: (1 - 0.512)/0.2 = 2.44 tokens; 2.44 * 1.25 / 1.75
    assert bench.paper_theorem_3_1(0.8, 3, 0.25) == pytest.approx(2.44 * 1.25 / 1.75)
    # gamma 1: one token per cycle at cost 1 + c, exactly standard's speed
    for a, c in ((0.0, 0.3), (0.6, 0.1), (0.99, 1.0)):
        assert bench.paper_theorem_3_1(a, 1, c) == pytest.approx(1.0)
    # alpha 1: gamma (1 + c) / (1 + gamma c)
    assert bench.paper_theorem_3_1(1.0, 3, 0.5) == pytest.approx(3 * 1.5 / 2.5)
    # ours counts one token more per fully accepted round at one M_q call more: higher at high alpha,
    # lower at small alpha and large c (alpha 0.1, gamma 1, c 1: 1.1 * 2 / 3 against 1)
    assert bench.theorem_3_1(0.8, 3, 0.25) > bench.paper_theorem_3_1(0.8, 3, 0.25)
    assert bench.theorem_3_1(0.1, 1, 1.0) == pytest.approx(2.2 / 3)
    assert bench.theorem_3_1(0.1, 1, 1.0) < bench.paper_theorem_3_1(0.1, 1, 1.0)
    with pytest.raises(ValueError):
        bench.paper_theorem_3_1(0.5, 0, 0.25)


def test_paper_theorem_3_6_hand_computed():
    # alpha 0.5, gamma_q 2, gamma_p 1, c 0.25: 0.75 * 1.25 / (0.5 (1 + 0.5 - 0.125)) = 0.9375 / 0.6875
    assert bench.paper_theorem_3_6(0.5, 2, 0.25) == pytest.approx(15 / 11)
    assert bench.paper_theorem_3_6(0.5, 2, 0.25, gamma_p=1) == pytest.approx(15 / 11)
    # alpha 0.8, gamma_q 3, gamma_p 1, c 0.25: 2.44 * 1.25 / (1 + 0.75 - 0.2)
    assert bench.paper_theorem_3_6(0.8, 3, 0.25) == pytest.approx(2.44 * 1.25 / 1.55)
    # gamma_p 2: alpha^2 = 0.64 of the cycles save an M_q call: 2.44 * 1.25 / (1 + 0.75 - 0.16)
    assert bench.paper_theorem_3_6(0.8, 3, 0.25, gamma_p=2) == pytest.approx(2.44 * 1.25 / 1.59)
    # Corollary 3.7: gamma_q = gamma_p = 1 gives (1 + c) / (1 + c (1 - alpha)) >= 1
    for a in (0.0, 0.3, 0.9):
        for c in (0.05, 0.5):
            assert bench.paper_theorem_3_6(a, 1, c) == pytest.approx((1 + c) / (1 + c * (1 - a)))
            assert bench.paper_theorem_3_6(a, 1, c) >= 1.0 - 1e-12
    # alpha 1: gamma_q (1 + c) / (1 + gamma_q c - c)
    assert bench.paper_theorem_3_6(1.0, 3, 0.5) == pytest.approx(2.25)
    with pytest.raises(ValueError):
        bench.paper_theorem_3_6(0.5, 2, 0.25, gamma_p=0)


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
        Row(method="alternate", rule="we", param="lambda=0.5", gamma="auto", proposer="small",
            tokens_per_s=180.0, tokens_per_cpu_s=150.0, alpha=0.7, extra={"mean_drafts_per_step": 2.5}, **common),
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
    assert alt.predicted_paper == pytest.approx(bench.paper_theorem_3_6(0.7, 3, 0.25, 1))
    assert naive.predicted_paper == pytest.approx(bench.paper_theorem_3_1(0.7, 3, 0.25))
    assert rows[2].speedup_vs_standard == 1.0
    assert rows[6].speedup_vs_standard is None and rows[6].predicted is None
    auto = rows[7]
    assert auto.speedup_vs_standard == pytest.approx(150.0 / 80.0) and auto.c == pytest.approx(0.25)  # cpu clock
    assert auto.predicted is None and auto.predicted_paper is None and auto.measured_over_predicted is None


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
    assert data["rows"][7]["gamma"] == "auto" and data["rows"][3]["gamma"] == 3
    assert data["rows"][3]["predicted_paper"] == pytest.approx(rows[3].predicted_paper)
    assert data["rows"][7]["tokens_per_s"] == 180.0 and data["rows"][7]["tokens_per_cpu_s"] == 150.0
    assert "| method |" in paths["md"].read_text()


def test_table_columns_and_legend(tmp_path):
    rows = _rows()
    bench.derive(rows)
    headers = [h for h, _ in bench.TABLE_COLUMNS]
    # wall-clock tok/s right next to CPU-clock tok/s; both predictions side by side
    assert headers.index("tok/s (cpu)") == headers.index("tok/s (wall)") + 1
    assert headers.index("pred (paper)") == headers.index("pred (ours)") + 1
    assert dict(bench.TABLE_COLUMNS)["pred (paper)"] == "predicted_paper"
    lines = bench.markdown_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    col = {h: i for i, h in enumerate(cells[0])}
    alt, auto = cells[2 + 3], cells[2 + 7]
    assert alt[col["γ"]] == "3" and auto[col["γ"]] == "auto (2.50)"
    assert alt[col["pred (ours)"]] == f"{rows[3].predicted:.2f}"
    assert alt[col["pred (paper)"]] == f"{rows[3].predicted_paper:.2f}"
    assert auto[col["pred (ours)"]] == "-" and auto[col["pred (paper)"]] == "-"
    assert (auto[col["tok/s (wall)"]], auto[col["tok/s (cpu)"]]) == ("180.00", "150.00")
    notes = bench.column_notes("wall")
    assert "(1 - α^γ)/(1 - α)" in notes["pred (paper)"] and "(1 - α^(γ+1))/(1 - α)" in notes["pred (ours)"]
    assert "wall clock" in notes["×std"] and "drafts_proposed / row_steps" in notes["γ"]
    md = bench.write_outputs(tmp_path, rows, {"preset": "test", "clock": "wall"})["md"].read_text()
    assert "## Columns" in md and notes["pred (paper)"] in md and notes["×std"] in md
    # the gamma plot takes fixed gammas only (an "auto" among integers would not sort)
    assert isinstance(bench.write_plots(tmp_path, rows), (list, str))
    plots = bench.write_plots(tmp_path, rows)
    assert isinstance(plots, (list, str))  # a message when matplotlib is missing


def test_fmt_handles_missing():
    assert bench._fmt(None) == "-"
    assert bench._fmt(float("nan")) == "-"
    assert bench._fmt(1.234) == "1.23"


# ------------------------------------------------------------------ arguments / plan / env

def test_parse_args_presets_and_overrides():
    s, _ = bench.parse_args(["--quick"])
    assert s.preset == "quick" and s.batch_sizes == [1, 8, 32] and s.rule_temperatures == {"we": [1.0], "cd": [0.0]}
    assert s.auto_gamma and s.sd_batches == [1, 8] and bench.parse_args(["--no-auto"])[0].auto_gamma is False
    s, _ = bench.parse_args(["--preset", "paper", "--models", "models/wide"])
    assert (s.preset, s.models_dir, s.batch_sizes, s.lambdas, s.mus) == ("paper", "models/wide", [1, 8], [0.5], [0.1])
    assert s.rule_temperatures == {"we": [1.0], "cd": [0.0]} and s.three_models and s.auto_gamma
    assert s.gammas == [] and not s.peers and not s.swap_proposer
    assert s.max_tokens < bench.PRESETS["quick"]["max_tokens"] and s.prompt_sets == ["code"]
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
    s, _ = bench.parse_args(["--full", "--models", _fake_models(tmp_path)])
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
    assert {j.gamma for j in jobs if j.method == "alternate" and j.param == "lambda=0.5"} == {*range(1, 7), "auto"}
    swapped = [j for j in jobs if j.proposer == "large"]
    assert {(j.method, j.param) for j in swapped} == {(m, f"lambda={lam:g}") for m in ("naive", "alternate")
                                                     for lam in s.lambdas}
    assert all(j.served == "small" and j.spec["proposer"] == "large"
               and [m["name"] for m in j.spec["models"]] == ["small", "large"] for j in swapped)
    sd = next(j for j in jobs if j.method == "sd")
    assert sd.spec["method"] == "draft_model"
    with pytest.raises(SystemExit):
        bench._models(bench.parse_args(["--models", str(tmp_path), "--small", "nope"])[0])


def _fake_models(tmp_path):
    for name in ("large", "small", "expert-a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return str(tmp_path)


@pytest.mark.parametrize("preset", ["quick", "paper", "full"])
def test_auto_jobs_next_to_the_fixed_ones(tmp_path, preset):
    from vllm_cos.config import load_config

    s, _ = bench.parse_args(["--preset", preset, "--models", _fake_models(tmp_path)])
    jobs = bench.plan(s, bench._models(s))
    auto = [j for j in jobs if j.gamma == "auto"]
    main = {("we", "lambda=0.5"), ("cd", "mu=0.1"), ("we", "3 models equal")}
    assert {(j.method, j.rule, j.param) for j in auto} == {(m, r, p) for m in ("naive", "alternate")
                                                          for r, p in main}
    for j in auto:
        fixed = jobs[jobs.index(j) - 1]  # the fixed-gamma job of the same configuration, right before
        assert (fixed.method, fixed.rule, fixed.param, fixed.gamma) == (j.method, j.rule, j.param, s.gamma)
        assert j.batch_sizes is None and j.temperatures == fixed.temperatures  # every batch size
        assert j.spec["gamma"] == "auto" and all("gamma" not in m for m in j.spec["models"])
        cfg = load_config(j.spec)
        assert cfg.draft_length == "auto" and cfg.schedule == j.method
        assert [m.gamma for m in cfg.models] == [1] + [4] * (len(cfg.models) - 1)
        assert len(cfg.models) == (3 if j.param == "3 models equal" else 2)
        assert any(f.method == "standard" and (f.rule, f.param) == (j.rule, j.param) for f in jobs)
    assert all(isinstance(j.gamma, int) or j.gamma is None for j in jobs if j not in auto)
    assert not [j for j in bench.plan(bench.parse_args(["--preset", preset, "--no-auto", "--models", str(tmp_path)])[0],
                                      bench._models(s)) if j.gamma == "auto"]


def test_quick_batch_32_only_on_the_main_rows(tmp_path):
    s, _ = bench.parse_args(["--quick", "--models", _fake_models(tmp_path)])
    jobs = bench.plan(s, bench._models(s))
    at_32 = {j.label for j in jobs if any(b == 32 for _, b, _ in bench.job_measurements(j, s))}
    assert at_32 and all(j.method in ("single", "single_proposer") or (j.rule, j.param) in bench.MAIN_CONFIGS
                         for j in jobs if j.label in at_32)
    assert all(j.label not in at_32 for j in jobs if j.method == "sd" or j.proposer == "large" or
               (isinstance(j.gamma, int) and j.gamma != s.gamma and j.param != "3 models equal"))
    assert {j.param for j in jobs if j.label in at_32 and j.gamma == "auto"} == {"lambda=0.5", "mu=0.1",
                                                                                  "3 models equal"}


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


def test_engine_groups_put_standard_and_cos_side_by_side(tmp_path):
    s, _ = bench.parse_args(["--quick", "--models", _fake_models(tmp_path)])
    jobs = bench.plan(s, bench._models(s))
    groups = bench.engine_groups(jobs, s.side_by_side)
    assert [j for g in groups for j in g] == jobs  # every job once, in the plan's order
    for g in groups:
        assert len(g) <= s.side_by_side
        assert len({tuple(bench.job_measurements(j, s)) for j in g}) == 1
        assert len(g) == 1 or all(j.rule != "none" for j in g)
    for rule, param in bench.MAIN_CONFIGS:
        group = next(g for g in groups if any(j.method == "standard" and (j.rule, j.param) == (rule, param)
                                              for j in g))
        assert {(j.method, j.gamma) for j in group} >= {("naive", "auto"), ("alternate", "auto")}
    assert all(len(g) == 1 for g in bench.engine_groups(jobs, 1))
    with pytest.raises(SystemExit, match="side-by-side"):
        bench.parse_args(["--side-by-side", "0"])


class _Stats:
    def __init__(self, drafts, accepted_per_pos):
        self.num_drafts, self.num_draft_tokens = drafts, drafts * len(accepted_per_pos)
        self.num_accepted_tokens, self.num_accepted_tokens_per_pos = sum(accepted_per_pos), accepted_per_pos


def test_spec_counts_are_per_engine():
    a, b = bench.SpecCounts(), bench.SpecCounts()
    before = a.snapshot()
    a.record(type("S", (), {"spec_decoding_stats": _Stats(2, [2, 1])})())
    a.record(type("S", (), {"spec_decoding_stats": None})())
    a.record(None)
    a.record(type("S", (), {"spec_decoding_stats": _Stats(1, [1, 1, 0])})())
    assert a.snapshot() == {"num_drafts": 3, "num_draft_tokens": 7, "num_accepted_tokens": 5, "per_pos": [3, 2, 0]}
    assert before["per_pos"] == [] and b.snapshot()["num_drafts"] == 0
    assert bench._diff(a.snapshot(), before)["per_pos"] == [3, 2, 0]


def test_side_by_side_engines_take_turns(monkeypatch):
    from vllm_cos.bench import engine_rows

    calls = []

    def fake_generate(llm, prompts, batch, temperature, max_tokens):
        calls.append(llm)
        return 10 * (1 + len(calls)), 1.0, 1.0  # each call faster: an engine's best is its last

    monkeypatch.setattr(engine_rows, "generate_timed", fake_generate)
    monkeypatch.setattr(engine_rows, "cos_counters", lambda llm: None)
    s, _ = bench.parse_args(["--preset", "smoke", "--repeats", "3"])
    jobs = [bench.EngineJob(name, "naive", "we", "lambda=0.5", 2, [1.0]) for name in ("a", "b", "c")]
    engines = [bench.Engine(job, job.label, bench.SpecCounts()) for job in jobs]
    rows = bench.measure_side_by_side(engines, 1.0, 1, "code", [[1, 2]], s)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r.extra["engine"] for r in rows] == ["a", "b", "c"]
    assert [r.tokens_per_s for r in rows] == [90.0, 100.0, 80.0]


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
    rows = {(r["method"], r["gamma"]): r for r in data["rows"]}
    alt, auto = rows[("alternate", 2)], rows[("alternate", "auto")]
    assert alt["status"] == "ok" and alt["tokens_per_s"] > 0 and alt["tokens_per_cpu_s"] > 0
    assert alt["alpha"] is not None and 0 < alt["alpha"] <= 1
    assert alt["speedup_vs_standard"] is not None
    assert math.isfinite(alt["predicted"]) and math.isfinite(alt["predicted_paper"])
    assert auto["status"] == "ok" and auto["tokens_per_s"] > 0 and auto["speedup_vs_standard"] is not None
    assert auto["predicted"] is None and 0 <= auto["extra"]["mean_drafts_per_step"] <= 4
    for row in (alt, auto):  # the engines ran side by side: each row's spec counters are its own
        assert row["extra"]["spec_counters"]["num_draft_tokens"] == row["extra"]["cos_counters"]["drafts_proposed"]
    assert "pred (paper)" in data["meta"]["notes"] and "| pred (paper) |" in (out / "bench.md").read_text()


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


# ------------------------------------------------------------------ plain-PyTorch peers

def test_ref_peer_rows_over_ref_standard():
    common = dict(rule="we", param="lambda=0.5", temperature=1.0, batch=1, prompts="code")
    rows = [Row(method="standard", tokens_per_s=80.0, **common),
            Row(method="ref_standard", tokens_per_s=20.0, **common),
            Row(method="mixture (reference)", tokens_per_s=30.0, **common),
            Row(method="ref alternate", gamma=3, proposer="small", tokens_per_s=40.0, alpha=0.6, **common),
            Row(method="alternate", gamma=3, proposer="small", tokens_per_s=160.0, **common)]
    bench.derive(rows)
    assert [r.speedup_vs_ref_standard for r in rows] == [None, 1.0, pytest.approx(1.5), pytest.approx(2.0), None]
    assert rows[2].speedup_vs_standard == pytest.approx(30 / 80) and rows[3].predicted is None
    header = bench.markdown_table(rows).splitlines()[0]
    assert "| ×ref_std |" in header and "×ref_std" in bench.column_notes()
    loop = [t for t in bench.targets_summary(rows) if "transformers" in t["target"]]
    assert len(loop) == 1 and loop[0]["value"] == pytest.approx(8.0)  # engine alternate vs ref_standard only


def test_peer_measurement_count_has_mixture_and_ref_alternate():
    s, _ = bench.parse_args(["--quick"])
    # per prompt set: WE lambda=0.5 T=1: 3 methods x (B=1, 8) + hf_ensemble; CD mu=0.1 T=0: ref_standard x 2
    assert bench.count_peer_measurements(s) == (3 * 2 + 1 + 2) * 2
    s, _ = bench.parse_args(["--quick", "--lambdas", "0.3"])
    assert bench.count_peer_measurements(s) == (2 + 1 + 2) * 2


def test_reference_peer_rows_run_on_tiny_models(tiny_models):
    from vllm_cos.bench.peers import run_reference_peer

    s, _ = bench.parse_args(["--quick", "--max-tokens", "6", "--repeats", "1", "--gamma", "2"])
    models = {"target": str(tiny_models["large"]), "small": str(tiny_models["small"]),
              "_names": {"target": "large", "small": "small", "third": None}}
    loaded = bench._reference_models(models)
    prompts = [[5, 6, 7], [8, 9]]
    rows = {m: run_reference_peer(models, "we", "lambda=0.5", bench.we_rule(models, 0.5), 1.0, "code", prompts,
                                  s, loaded, batch=b, method=m)
            for m, b in (("ref_standard", 1), ("mixture (reference)", 1), ("ref alternate", 2))}
    assert all(r.status == "ok" and r.tokens == 12 and r.tokens_per_s > 0 for r in rows.values())
    assert rows["ref_standard"].extra["forwards_per_token"] == [1.0, 1.0]
    assert sum(rows["mixture (reference)"].extra["forwards"]) == 12  # one model run per token
    alt = rows["ref alternate"]
    assert (alt.batch, alt.gamma, alt.proposer) == (2, 2, "small") and 0 <= alt.alpha <= 1

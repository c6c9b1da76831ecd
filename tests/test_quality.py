"""Quality benchmark (vllm_cos.quality, scripts/quality.py): window chunking, the NLL / top-1
arithmetic on hand-made prompt logprobs, the held-out file selection (no CoSD tree text, no
training data), the rows' configurations, the report; one engine smoke test on the tiny models."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_cos.config import load_config
from vllm_cos.quality.check import check_indices
from vllm_cos.quality.report import findings, table
from vllm_cos.quality.rows import plan_rows
from vllm_cos.quality.scoring import nll, paired_difference, summarize, top1_token, window_score
from vllm_cos.quality.texts import (COSD_TREE_SOURCES, DEFAULT_SOURCES, SelectionError, Window, check_sources,
                                    chunk, eligible, select_windows, site_packages, training_groups, tree_sources)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_METADATA = REPO_ROOT.parent / "shared" / "models" / "metadata.json"
TREE = REPO_ROOT / "configs" / "cosd-tree.json"


def lp(logprob: float, rank: int):
    return SimpleNamespace(logprob=logprob, rank=rank)


# ---------------------------------------------------------------------------- windows

def test_chunk_cuts_full_windows_and_drops_the_tail():
    assert chunk(list(range(10)), 4) == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7])]
    assert chunk(list(range(8)), 4) == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7])]
    assert chunk([1, 2, 3], 4) == []
    with pytest.raises(ValueError):
        chunk([1, 2, 3], 1)


# ---------------------------------------------------------------------------- NLL / top-1

def test_window_score_reads_the_actual_token_and_the_top1():
    ids = [5, 7, 3, 9]
    prompt_logprobs = [None,
                       {7: lp(-0.5, 1)},  # the actual token is the top-1: one entry
                       {3: lp(-2.0, 4), 8: lp(-0.1, 1)},  # actual first, then the top-1
                       {9: lp(-1.0, 1), 4: lp(-1.0, 1)}]  # tied: the top-k picked 4, not a hit
    score = window_score(prompt_logprobs, ids)
    assert score.logprobs == (-0.5, -2.0, -1.0)
    assert score.top1 == (7, 8, 4)
    assert score.hits(ids) == [True, False, False]
    assert nll(score) == pytest.approx(3.5 / 3)


def test_window_score_refuses_malformed_entries():
    with pytest.raises(ValueError, match="first must be None"):
        window_score([{1: lp(0.0, 1)}, {2: lp(0.0, 1)}], [1, 2])
    with pytest.raises(ValueError, match="missing"):
        window_score([None, {3: lp(-0.1, 1)}], [1, 2])
    with pytest.raises(ValueError, match="rank-1"):
        top1_token({3: lp(-0.1, 2)})


def _window(domain: str, ids):
    return Window(domain, "src", "src/f.py", 0, tuple(ids))


def test_summarize_pools_positions_per_domain_and_mixed():
    windows = [_window("general", [1, 2, 3]), _window("numeric", [4, 5, 6]), _window("numeric", [7, 8, 9])]
    scores = [window_score([None, {2: lp(-1.0, 1)}, {3: lp(-3.0, 2), 0: lp(-0.5, 1)}], w.token_ids)
              if i == 0 else window_score([None, {w.token_ids[1]: lp(-0.2 * i, 1)},
                                           {w.token_ids[2]: lp(-0.4 * i, 1)}], w.token_ids)
              for i, w in enumerate(windows)]
    s = summarize(scores, windows, ("general", "numeric"))
    assert s["general"] == {"nll": 2.0, "top1": 0.5, "positions": 2, "windows": 1}
    assert s["numeric"]["nll"] == pytest.approx((0.2 + 0.4 + 0.4 + 0.8) / 4)
    assert s["numeric"]["top1"] == 1.0
    assert s["mixed"]["nll"] == pytest.approx((1.0 + 3.0 + 0.2 + 0.4 + 0.4 + 0.8) / 6)
    assert s["mixed"]["top1"] == pytest.approx(5 / 6)
    assert s["mixed"]["positions"] == 6 and s["mixed"]["windows"] == 3


def test_paired_difference():
    mean, se = paired_difference([1.0, 2.0, 3.0], [0.5, 1.0, 2.5])
    assert mean == pytest.approx(2 / 3)
    assert se == pytest.approx(math.sqrt(((0.5 - 2 / 3) ** 2 + (1 - 2 / 3) ** 2 + (0.5 - 2 / 3) ** 2) / 2 / 3))
    assert math.isnan(paired_difference([1.0], [0.0])[1])


def test_check_indices_take_the_domains_in_turn():
    windows = [_window("general", [1, 2])] * 3 + [_window("numeric", [1, 2])] * 3
    assert check_indices(windows, 2) == [0, 3]
    assert check_indices(windows, 3) == [0, 3, 1]


# ---------------------------------------------------------------------------- file selection

def _train_cosd_tree_defaults() -> list[str]:
    spec = importlib.util.spec_from_file_location("train_cosd_tree", REPO_ROOT / "scripts" / "train_cosd_tree.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_cosd_tree"] = module
    spec.loader.exec_module(module)
    return [str(p.relative_to(module.SITE)) for p in module.DEFAULT_TEXT]


def test_cosd_tree_sources_are_the_trainers_and_the_trees():
    assert set(_train_cosd_tree_defaults()) == set(COSD_TREE_SOURCES)
    assert set(json.loads(TREE.read_text())["meta"]["sources"]) <= tree_sources(TREE)


def _metadata(tmp_path) -> Path:
    if SHARED_METADATA.is_file():
        return SHARED_METADATA
    path = tmp_path / "metadata.json"  # the package groups that matter here, as the zoo lists them
    path.write_text(json.dumps({"corpus": {"A": {"groups": {"pip": 1, "setuptools": 1, "_pytest": 1}},
                                           "B": {"groups": {"numpy": 1, "torch": 1, "transformers": 1}}}}))
    return path


def test_selected_files_avoid_the_cosd_tree_text_and_the_training_data(tmp_path):
    metadata = _metadata(tmp_path)
    groups = training_groups(metadata)
    excluded = set(_train_cosd_tree_defaults())
    windows = select_windows(lambda text: list(text.encode()), 8, 64, 0, metadata, TREE)
    assert {w.domain for w in windows} == {"general", "numeric"} and len(windows) == 16
    assert all(len(w.token_ids) == 64 for w in windows)
    for w in windows:
        assert w.file.split("/")[0] not in groups, w.file
        assert not any(w.file == e or w.file.startswith(e + "/") for e in excluded), w.file
        text = (site_packages() / w.file).read_text()
        assert eligible(text, len(text.encode()))
    assert not {s.split("/")[0] for d in DEFAULT_SOURCES.values() for s in d} & groups


@pytest.mark.parametrize("source, match", [("numpy", "training corpus"), ("transformers/models", "training corpus"),
                                           ("starlette", "CoSD tree"), ("vllm/v1", "CoSD tree"),
                                           ("vllm/model_executor/layers/fused_moe", "CoSD tree")])
def test_check_sources_refuses_seen_text(source, match):
    with pytest.raises(SelectionError, match=match):
        check_sources([source], {"numpy", "transformers"}, set(COSD_TREE_SOURCES))


def test_eligible_applies_the_trainers_filters_and_refuses_copied_code():
    assert eligible("def f():\n    return 1\n", 30)
    assert not eligible("x = 1\n", 2_000_000)
    assert not eligible("x = '" + "a" * 2001 + "'\n", 2010)
    assert not eligible("# Adapted from https://github.com/huggingface/transformers/blob/main/x.py\n", 80)
    assert not eligible("# Copyright 2022 EleutherAI and the HuggingFace Inc. team.\n", 80)
    assert not eligible("   \n", 4) and not eligible(None, 0)


def test_selection_walks_a_site_folder_skipping_filtered_and_copied_files(tmp_path):
    site = tmp_path / "site"
    (site / "pkg" / "sub").mkdir(parents=True)
    (site / "pkg" / "sub" / "deep.py").write_text("y = 2\n" * 50)
    (site / "pkg" / "copied.py").write_text("# copied from asyncio.streams\n" + "z = 3\n" * 50)
    (site / "pkg" / "long.py").write_text("w = '" + "a" * 2001 + "'\n")
    (site / "pkg" / "short.py").write_text("v = 1\n")  # under one window: skipped
    (site / "pkg" / "ok.py").write_text("x = 1\n" * 50)
    (site / "num").mkdir()
    (site / "num" / "a.py").write_text("import math\n" * 30)
    (site / "num" / "b.py").write_text("import cmath\n" * 30)
    metadata = tmp_path / "m.json"
    metadata.write_text(json.dumps({"corpus": {"A": {"groups": {"other": 1}}}}))
    sources = {"general": ["pkg"], "numeric": ["num"]}
    windows = select_windows(lambda t: list(t.encode()), 2, 32, 0, metadata, None, sources=sources, site=site,
                             prefix=[0])
    assert sorted(w.file for w in windows if w.domain == "general") == ["pkg/ok.py", "pkg/sub/deep.py"]
    assert sorted(w.file for w in windows if w.domain == "numeric") == ["num/a.py", "num/b.py"]  # one per file
    assert all(len(w.token_ids) == 32 and w.token_ids[0] == 0 for w in windows if w.start == 0)
    with pytest.raises(SelectionError, match="only 1 windows"):
        select_windows(lambda t: list(t.encode()), 2, 32, 0, metadata, None,
                       sources={"general": ["pkg/ok.py"], "numeric": ["num"]}, site=site)  # a file is one window
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"meta": {"sources": {"pkg/sub": {}}}}))
    with pytest.raises(SelectionError, match="CoSD tree"):
        select_windows(lambda t: list(t.encode()), 2, 32, 0, metadata, tree, sources=sources, site=site)


# ---------------------------------------------------------------------------- rows, report

def test_rows_are_valid_cos_configs(tmp_path):
    names = ("expert-a", "expert-b", "large", "small")
    paths = {n: str(tmp_path / n) for n in names}
    for p in paths.values():
        Path(p).mkdir()
    roles = dict(zip(("expert_a", "expert_b", "expert", "amateur"), names))
    rows = plan_rows(roles, paths, [0.25, 0.75], 0.25, [0.1], str(TREE))
    assert [r.kind for r in rows] == ["single"] * 4 + ["we"] * 3 + ["cd"] + ["cosd"] * 2
    for r in rows[4:]:
        cfg = load_config(r.spec)
        assert cfg.target == Path(r.served).name
    we = load_config(rows[4].spec)
    assert we.schedule == "standard" and dict(we.rule.weights) == {"expert-a": 0.25, "expert-b": 0.75}
    assert load_config(rows[6].spec).schedule == "alternate"
    cd = load_config(rows[7].spec)
    assert (cd.rule.expert, cd.rule.amateur, cd.rule.mu) == ("large", "small", 0.1)
    rule, tree = load_config(rows[8].spec), load_config(rows[9].spec)
    assert (rule.rule.draft, rule.rule.assistant, rule.schedule, rule.target) == ("expert-a", "expert-b", "naive",
                                                                                  "expert-b")
    assert tree.rule.verifier == "tree" and not rows[9].nll and rows[0].nll


def _result(label, kind, nlls, top1, value=None, members=("m",), schedule=None):
    summary = {d: {"nll": n, "top1": t} for d, n, t in zip(("general", "numeric", "mixed"), nlls, top1)}
    return {"label": label, "kind": kind, "value": value, "schedule": schedule, "nll": kind != "cosd",
            "members": list(members), "summary": summary, "per_window_nll": [nlls[2], nlls[2]],
            "per_window_top1": [top1[2], top1[2]]}


def test_table_and_findings():
    results = [_result("a alone", "single", (1.0, 2.0, 1.5), (0.6, 0.5, 0.55), members=("a",)),
               _result("b alone", "single", (2.0, 1.0, 1.5), (0.5, 0.6, 0.55), members=("b",)),
               _result("WE λ=0.5", "we", (1.2, 1.2, 1.2), (0.58, 0.58, 0.58), 0.5, ("a", "b"), "standard"),
               _result("CoSD rule", "cosd", (9e3, 9e3, 9e3), (0.57, 0.57, 0.57), members=("b", "a"))]
    md = table(results).splitlines()
    assert md[0].startswith("| row | general NLL | general top-1 |") and len(md) == 6
    assert "| WE λ=0.5 | 1.200 | 0.580 |" in md[4]
    assert md[5] == "| CoSD rule | — | 0.570 | — | 0.570 | — | 0.570 |"
    notes = findings(results, ("a", "b"))
    assert notes[0].startswith("mixed: WE λ=0.5 (best λ) NLL 1.200 vs a alone 1.500 (-0.300 ± 0.000")
    assert notes[2] == "best λ by NLL: general 0.5 (1.200), numeric 0.5 (1.200), mixed 0.5 (1.200)"
    assert any(n.startswith("mixed: CoSD rule: top-1 0.570 vs a alone 0.550 (+0.020") for n in notes)


# ---------------------------------------------------------------------------- engine smoke

@pytest.mark.engine
def test_quality_script_on_the_tiny_models(tiny_models, tmp_path):
    from vllm_cos.quality import main

    metadata = tmp_path / "metadata.json"  # the tiny models are trained on the standard library only
    metadata.write_text(json.dumps({"corpus": {"A": {"groups": {}}}}))
    out = tmp_path / "out"
    models = Path(tiny_models["large"]).parent
    rc = main(["--models", str(models), "--metadata", str(metadata), "--out", str(out), "--expert-a", "large",
               "--expert-b", "medium", "--expert", "large", "--amateur", "small", "--windows", "2",
               "--window-tokens", "32", "--max-model-len", "64", "--lambdas", "0.5", "--mus", "0.1",
               "--alternate-lambda", "none"])
    assert rc == 0
    data = json.loads((out / "quality.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert len(labels) == 7 and labels[3] == "WE λ=0.5"
    assert all(r["check"]["ok"] for r in data["rows"]) and not data["failed_checks"]
    assert data["worst_reference_nll_diff"] < 2e-3
    for r in data["rows"]:
        assert r["summary"]["mixed"]["positions"] == 4 * 31 and 0.0 <= r["summary"]["mixed"]["top1"] <= 1.0
    assert "| WE λ=0.5 |" in (out / "quality.md").read_text()

"""The bad-configuration fuzz (vllm_cos.soak.configs, vllm_cos.soak.config_runner), check tier:
200 seeded mutations of valid cos.yaml files each start (the check accepts them) or are refused
with one line naming a field or file; none escapes as a traceback or hangs."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from vllm_cos.soak.config_runner import Verdict, check_case, names_something, starts_sample, summary
from vllm_cos.soak.configs import KINDS, ConfigCase, config_cases


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def checked(tiny_models, tmp_path_factory):
    before = {name: _digest(path) for name, path in tiny_models.items()}
    cases = config_cases(tiny_models, tmp_path_factory.mktemp("fuzz"), count=200, seed=0)
    verdicts = [check_case(c) for c in cases]
    assert {name: _digest(path) for name, path in tiny_models.items()} == before  # damaged copies only
    return cases, verdicts


def test_cases_are_seeded_and_cover_every_kind(tiny_models, tmp_path, checked):
    cases, _ = checked
    again = config_cases(tiny_models, tmp_path, count=200, seed=0)
    assert [(c.kind, c.detail) for c in again] == [(c.kind, c.detail) for c in cases]
    assert len(cases) >= 200 and set(Counter(c.kind for c in cases)) == set(KINDS)
    other = config_cases(tiny_models, tmp_path / "other", count=200, seed=1)
    assert [c.detail for c in other] != [c.detail for c in cases]


def test_every_case_starts_or_is_refused_with_one_line(checked):
    cases, verdicts = checked
    defects = [(c.index, c.kind, c.detail, v.line) for c, v in zip(cases, verdicts) if v.outcome == "defect"]
    assert defects == []
    outcomes = Counter((c.kind, v.outcome) for c, v in zip(cases, verdicts))
    assert outcomes[("benign", "ok")] >= 10 and outcomes[("damaged-file", "refused")] >= 15
    assert all(v.seconds < 30 for v in verdicts)


def test_damaged_files_are_named(checked):
    cases, verdicts = checked
    damaged = [(c, v) for c, v in zip(cases, verdicts) if c.damaged is not None]
    assert damaged and all(v.outcome == "refused" for _, v in damaged)
    assert all(c.damaged in v.line or str(Path(c.damaged).parent) in v.line for c, v in damaged)


def test_a_refusal_that_names_nothing_is_a_defect(tmp_path):
    case = ConfigCase(0, "retype", "x", tmp_path / "cos.yaml", str(tmp_path))
    assert not names_something("error: something went wrong", case)
    assert names_something("error: cos config: models[1].gamma: must be >= 0, got -1", case)
    damaged = ConfigCase(0, "damaged-file", "x", tmp_path / "cos.yaml", str(tmp_path), damaged="/m/large/config.json")
    assert not names_something("error: cos config: rule: missing", damaged)


def test_an_escaping_exception_or_a_hang_is_a_defect(tmp_path, monkeypatch):
    import time

    import vllm_cos.cli

    case = ConfigCase(0, "retype", "x", tmp_path / "cos.yaml", str(tmp_path))

    def broken(argv):
        raise KeyError("models")

    monkeypatch.setattr(vllm_cos.cli, "check", broken)
    verdict = check_case(case)
    assert verdict.outcome == "defect" and "Traceback" in verdict.line and "KeyError" in verdict.line
    monkeypatch.setattr(vllm_cos.cli, "check", lambda argv: time.sleep(5))
    verdict = check_case(case, timeout=0.2)
    assert verdict.outcome == "defect" and verdict.line.startswith("hang") and verdict.seconds < 2


def test_server_sample_and_summary(checked):
    cases, verdicts = checked
    sample = starts_sample(cases, verdicts, 6)
    assert len(sample) == 6 and len(set(sample)) == 6
    assert verdicts[sample[0]].outcome == "ok" and any(cases[i].damaged for i in sample)
    result = summary(cases, verdicts, {sample[0]: Verdict("defect", "boom", 1.0)})
    assert result["cases"] == 200 and result["serve"] == {"defect": 1} and len(result["defects"]) == 1

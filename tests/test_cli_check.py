"""``vllm-cos check cos.yaml [--served PATH]``: validation without an engine (fast tier)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_cos.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Path]:
    return tiny_models


def _write(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "cos.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


def _two(models, **extra) -> dict:
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": 3}],
            "rule": {"name": "weighted_ensemble", "weights": {"large": 0.7, "small": 0.3}}, **extra}


def _check(capsys, *args) -> tuple[int, str, str]:
    rc = main(["check", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_valid_file_prints_the_set_up(models, tmp_path, capsys):
    rc, out, err = _check(capsys, _write(tmp_path, _two(models)))
    assert rc == 0 and err == ""
    assert f"large: {Path(models['large']).resolve()} (gamma 1, dtype auto)  <- served" in out
    assert "served: large; engine dtype auto; shared tokenizer of 512 tokens" in out
    assert "rule: weighted_ensemble: r = 0.7 p_large + 0.3 p_small" in out
    assert ("schedule: alternate, proposal tempered; per engine step large verifies and proposes 1 token, "
            "then small x3 draft (3 speculative tokens)") in out


def test_three_models_served_elsewhere_and_notes(models, tmp_path, capsys):
    spec = {"models": [{"name": n, "path": str(models[n])} for n in ("large", "medium", "small")],
            "rule": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.2},
            "gamma": [2, 1, 1], "schedule": "alternate", "proposer": "small"}
    rc, out, _ = _check(capsys, _write(tmp_path, spec), "--served", str(models["small"]))
    assert rc == 0
    assert "served: small" in out and "softmax(l_large - 0.2 l_small)" in out
    assert "small verifies and proposes 1 token, then large x2, medium x1 draft (3 speculative tokens)" in out
    rc, out, _ = _check(capsys, _write(tmp_path, dict(_two(models), schedule="standard", proposer="small")))
    assert rc == 0 and "schedule: standard (every model scores every token; no drafts)" in out
    assert "note: proposer: has no effect under 'standard'" in out


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["models"][1].update(gamma=-1), "error: cos config: models[1].gamma: must be >= 0, got -1"),
    (lambda s: s["models"][0].update(gamma=2), "error: cos config: models[0].gamma: the served model 'large'"),
    (lambda s: s.pop("rule"), "error: cos config: rule: missing"),
    (lambda s: s["models"][1].update(dtype="float32"), "error: cos config: models[1].dtype: is float32 but the "
                                                       "engine runs in --dtype bfloat16"),
])
def test_bad_file_is_one_line_and_exit_1(models, tmp_path, capsys, mutate, message):
    spec = _two(models)
    mutate(spec)
    rc, out, err = _check(capsys, _write(tmp_path, spec), "--dtype", "bfloat16")
    assert rc == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_served_model_not_the_files(models, tmp_path, capsys):
    other = tmp_path / "elsewhere" / "large"
    shutil.copytree(models["large"], other)
    path = _write(tmp_path, _two(models))
    rc, _, err = _check(capsys, path, "--served", str(other))
    assert rc == 1 and f"is not the CoS config's model 'large' ({Path(models['large']).resolve()})" in err
    rc, _, err = _check(capsys, path, "--served", str(models["medium"]))
    assert rc == 1 and "set 'served: join' in the file" in err
    rc, out, _ = _check(capsys, _write(tmp_path, _two(models, served="join")), "--served", str(models["medium"]))
    assert rc == 0 and "medium: " in out and "served: medium" in out


def test_tokenizers_are_checked(models, tmp_path, capsys):
    other = tmp_path / "othertok"
    shutil.copytree(models["small"], other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzz-extra"] = len(vocab["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    spec = _two(models)
    spec["models"][1]["path"] = str(other)
    rc, _, err = _check(capsys, _write(tmp_path, spec))
    assert rc == 1 and "use different tokenizers" in err


def test_console_script_is_fast_and_imports_no_vllm(models, tmp_path):
    path = _write(tmp_path, _two(models))
    script = Path(sys.executable).with_name("vllm-cos")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_cos.cli"]
    start = time.perf_counter()
    proc = subprocess.run([*command, "check", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok: {path}\n") and time.perf_counter() - start < 60
    probe = ("import sys; from vllm_cos.cli import main; rc = main(['check', sys.argv[1]]); "
             "assert 'vllm' not in sys.modules, 'vllm imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([*command, "check", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cos config: <file>: ")


def test_serve_with_a_malformed_file_is_one_line_before_vllm_loads(models, tmp_path, capsys):
    spec = _two(models)
    spec["models"][1]["gamma"] = "three"
    path = _write(tmp_path, spec)
    for args in (["serve", str(models["large"]), "--speculative-config", path], ["serve", "-sc=" + path]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err == "error: cos config: models[1].gamma: must be an integer, got 'three'\n"


@pytest.mark.parametrize("function, params, words", [
    ("torch:ones_like", {}, "must return [num_tokens, vocab] = (2, 512), got (2, 2, 512)"),
    ("os:getcwd", {}, "TypeError"),
    ("torch:sum", {"dim": 0}, None),  # the sum of the members' probs: a valid (unnormalised) r
])
def test_a_custom_rule_is_tried_once_at_start(models, tmp_path, capsys, function, params, words):
    spec = _two(models, rule={"name": "custom", "function": function, "inputs": "probs", "params": params})
    rc, out, err = _check(capsys, _write(tmp_path, spec))
    if words is None:
        assert rc == 0 and f"custom: {function}" in out
    else:
        assert rc == 1 and err.startswith("error: cos config: rule.function: a trial combination"), err
        assert words in err


@pytest.mark.parametrize("flags, words", [
    (["--data-parallel-size", "2"], "--data-parallel-size 2 is not supported"),
    (["-dp=2"], "--data-parallel-size 2 is not supported"),
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2 is not supported"),
])
def test_serve_refuses_pipeline_and_data_parallel_before_vllm_starts(models, tmp_path, capsys, flags, words):
    path = _write(tmp_path, _two(models))
    assert main(["serve", str(models["large"]), "--speculative-config", path, *flags]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cos: ") and words in err

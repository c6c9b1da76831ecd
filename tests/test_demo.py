"""The demo (``make demo``): its table, its CoS file, its quiet vLLM log and, in the engine tier,
one run through the CLI on tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_cos import demo
from vllm_cos.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_format_table_on_hand_made_numbers():
    rows = [{"label": "batch 1", "standard": 40.0, "cos": 60.0, "acceptance": 0.625, "tokens_per_round": 2.5},
            {"label": "batch 8", "standard": 200.0, "cos": 100.0, "acceptance": None, "tokens_per_round": None}]
    lines = demo.format_table(rows).splitlines()
    assert lines[0].split() == "standard tok/s CoS tok/s ratio acceptance tokens/round".split()
    assert set(lines[1]) == {"-"} and len(lines) == 4
    assert lines[2].split() == ["batch", "1", "40.0", "60.0", "1.50x", "62.5%", "2.50"]
    assert lines[3].split() == ["batch", "8", "200.0", "100.0", "0.50x", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_demo_config_is_gamma_auto_unless_given(tiny_models):
    models_dir = tiny_models["large"].parent
    auto = load_config(demo.demo_config(models_dir, "weighted_ensemble", "alternate"))
    assert auto.draft_length == "auto" and auto.gammas == (1, 4) and auto.target == "large"
    fixed = load_config(demo.demo_config(models_dir, "contrastive", "naive", ("large", "medium", "small"), gamma=3))
    assert fixed.draft_length == "fixed" and fixed.gammas == (1, 3, 3) and fixed.rule.name == "contrastive"


def test_quiet_vllm_sends_vllm_logs_to_the_file(tmp_path, monkeypatch):
    for name in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH", "TQDM_DISABLE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(name, "x")  # restored afterwards
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    log = tmp_path / "sub" / "demo.log"
    demo.quiet_vllm(log)
    assert log.is_file() and os.environ["TQDM_DISABLE"] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    config = json.loads(Path(os.environ["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    assert config["handlers"]["file"]["filename"] == str(log)
    assert config["loggers"]["vllm"]["handlers"] == ["file"] and not config["loggers"]["vllm"]["propagate"]


def test_output_to_keeps_noise_in_the_log(tmp_path, capfd):
    log = tmp_path / "demo.log"
    with demo.output_to(log) as say:
        os.write(1, b"noise on fd 1\n")
        os.write(2, b"noise on fd 2\n")
        print("a stray print", file=sys.__stdout__, flush=True)  # sys.stdout is pytest's here
        say("progress")
    out, err = capfd.readouterr()
    assert out == "progress\n" and err == ""
    assert log.read_text().splitlines() == ["noise on fd 1", "noise on fd 2", "a stray print"]


def test_engine_failure_prints_the_reason_and_the_log_tail(tmp_path, capsys):
    log = tmp_path / "demo.log"
    log.write_text("".join(f"log line {i}\n" for i in range(100)))
    error = demo.engine_failed("alternate", RuntimeError("no KV cache"), log)
    assert isinstance(error, SystemExit) and error.code == 1
    err = capsys.readouterr().err
    assert "alternate engine failed: RuntimeError: no KV cache" in err and str(log) in err
    assert "log line 99" in err and f"log line {99 - demo.LOG_TAIL_LINES}\n" not in err


@pytest.mark.engine
def test_demo_cli_on_tiny_budgets(tiny_models, tmp_path):
    log = tmp_path / "vllm.log"
    command = [sys.executable, "-m", "vllm_cos.demo", "--models", str(tiny_models["large"].parent),
               "--max-tokens", "8", "--batch", "2", "--requests", "1", "--log-file", str(log)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if "standard tok/s" in line)
    assert header.split() == "standard tok/s CoS tok/s ratio acceptance tokens/round".split()
    assert any(line.startswith("batch 1 ") for line in lines) and any(line.startswith("batch 2 ") for line in lines)
    assert "gamma auto" in proc.stdout and str(log) in proc.stdout
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if " INFO " in line or "INFO " in line[:5]]
    assert not noise, noise[:5]
    assert "INFO" in log.read_text()

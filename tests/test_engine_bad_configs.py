"""The bad-configuration fuzz's serve tier (``scripts/fuzz_configs.py``) with small numbers:
three of 30 seeded cases start ``vllm-cos serve`` under vLLM's defaults -- one the check
accepts (it must serve a greedy completion), one with a damaged model file and one other (each
must exit non-zero with the check's very line, no traceback, no vLLM usage text)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]


def test_sampled_cases_serve_or_exit_with_the_check_line(tiny_models, tmp_path):
    out = tmp_path / "fuzz.json"
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz_configs.py"), "--models", str(Path(tiny_models["large"]).parent),
         "-n", "30", "--starts", "3", "--timeout", "240", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["defects"] == []
    assert result["serve"] == {"ok": 1, "refused": 2}, result["serve"]
    assert result["check"]["ok"] >= 1 and result["check"]["refused"] >= 20

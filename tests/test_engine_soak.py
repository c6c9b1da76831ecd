"""The reliability soak (``scripts/soak.py``) with small numbers: one server (alternate,
weighted ensemble) under vLLM's defaults (multiprocessing on), 120 requests at concurrency 16
with 40 bad requests interleaved and a KV cache of 24 blocks (preemption); its JSON summary
holds every assertion.

Seeded requests reproduce under load and preemption: a seeded request's tokens are drawn by
position-keyed races (vllm_cos.coupling), so its text depends only on its seed and r, not on the
drafts, the batch or a preemption.  (Before the races, a seeded row's generator stream depended
on how many drafts each step verified, and the soak found seeded texts that did not reproduce.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[1]
SEEDED = "seeded requests reproduce"


@pytest.fixture(scope="module")
def soak(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default for the server (the script drops it too)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), "--models", str(Path(tiny_models["large"]).parent),
         "--rules", "we", "--requests", "120", "--concurrency", "16", "--bad", "40", "--kv-blocks", "24",
         "--seeded-sample", "20", "--warmup", "48", "--time-limit", "420", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


def test_soak_assertions_hold(soak):
    proc, summary = soak
    run = summary["runs"][0]
    failed = {name: c["detail"] for name, c in run["checks"].items() if not c["ok"] and name != SEEDED}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"
    assert run["requests"] == 120 and run["bad"] == 40 and run["completed"] + run["aborts"] == 120
    assert run["http_5xx_good"] == 0 and run["http_5xx_bad_unexpected"] == 0
    assert run["greedy_checked"] > 10 and run["preemptions"] > 0
    assert "CoS draft stash empty at the end" in run["checks"]
    assert "rule" in proc.stdout and "tok/s" in proc.stdout  # the table


def test_soak_exit_code_matches_summary(soak):
    proc, summary = soak
    assert proc.returncode == (0 if summary["ok"] else 1), proc.stderr[-3000:]


def test_soak_seeded_requests_reproduce(soak):
    _, summary = soak
    check = summary["runs"][0]["checks"][SEEDED]
    assert check["ok"], check["detail"]

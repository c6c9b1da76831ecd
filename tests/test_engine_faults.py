"""Fault (vllm_cos.soak.faults): the engine core of ``vllm-cos serve`` (vLLM's defaults,
multiprocessing on) SIGKILLed while four greedy streams are in flight.  Stock vLLM 0.32.0 (the
same run without CoS, ``python -m vllm_cos.soak.faults``): every stream gets an error event
within a second, a new request gets HTTP 500, /health stops answering and the API server shuts
down.  CoS must do the same: nothing hangs, nothing reports success."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_cos.soak.faults import run

pytestmark = pytest.mark.engine


def test_engine_core_killed_mid_flight_ends_every_request(tiny_models, tmp_path):
    report = run(Path(tiny_models["large"]).parent, cos=True, work=tmp_path, deadline=60)
    outcomes = [s["outcome"] for s in report["streams"]]
    assert all(o not in ("completed", "hung") for o in outcomes), report
    assert all(s["chunks"] >= 3 for s in report["streams"])  # each was mid-way when the core died
    assert report["no_hang"] and report["streams_ended_s"] < 60, report
    assert report["new_request"] != "HTTP 200" and report["health_after"] != 200, report

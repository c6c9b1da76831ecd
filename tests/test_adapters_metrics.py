"""CoS metrics without an engine: the worker-side publisher and the CLI's metrics directory."""

from __future__ import annotations

import logging
import os

import pytest

from vllm_cos import cli
from vllm_cos.adapters.metrics import CoSMetrics
from vllm_cos.adapters.core import CoSStats


def _value(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_publish_adds_growth_and_sets_gauges():
    metrics = CoSMetrics("tgt", "drf", interval_s=0.0)
    base = {k: _value(f"vllm_cos_{k}_total", **lab) for k, lab in
            [("forwards", {"model": "tgt"}), ("emitted_tokens", {})]}
    stats = CoSStats(steps=4, draft_forwards=13, drafts_proposed=12, drafts_accepted=9, served_proposed=3,
                     served_accepted=2, tokens_emitted=15, row_steps=4)
    logger = logging.getLogger("vllm.cos")  # vLLM's "vllm" logger may not propagate to root
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics.publish(stats)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = "\n".join(handler.lines)
    stats.add("steps", 2)
    stats.add("tokens_emitted", 5)
    stats.add("row_steps", 2)
    metrics.publish(stats)
    assert _value("vllm_cos_forwards_total", model="tgt") - base["forwards"] == 6
    assert _value("vllm_cos_emitted_tokens_total") - base["emitted_tokens"] == 20
    assert _value("vllm_cos_forwards_total", model="drf") >= 13
    assert _value("vllm_cos_acceptance_rate", model_pair="tgt+drf") == pytest.approx(11 / 15)
    assert _value("vllm_cos_mean_accepted_length", model_pair="tgt+drf") == pytest.approx(20 / 6)
    assert "CoS metrics: acceptance rate 0.733 (drafts of drf 9/12, proposals of tgt 2/3)" in text
    assert "forwards tgt=4 drf=13" in text


def test_serve_gets_a_multiprocess_metrics_dir(monkeypatch):
    # setenv first so that monkeypatch restores the variable's absence afterwards (a stale
    # value would leak into the server started by test_engine_server.py)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unset-me")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(cli, "_metrics_dir", None)
    assert cli.install_metrics_dir(["--version"]) is None
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    path = cli.install_metrics_dir(["serve", "model"])
    assert path and os.path.isdir(path) and os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
    cli._metrics_dir.cleanup()


def test_user_metrics_dir_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    assert cli.install_metrics_dir(["serve", "model"]) is None
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert (tmp_path / "metrics").is_dir()  # created when missing (prometheus_client would fail)


def test_draft_length_choices_are_logged_and_exported():
    metrics = CoSMetrics("tgt", "drf", interval_s=1e9)
    logger = logging.getLogger("vllm.cos")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics.draft_lengths({1: 3, 32: 0}, 0.8)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "draft length per step by batch size (gamma: auto, acceptance 0.80): B~1: 3, B~32: 0" in handler.lines[0]
    assert _value("vllm_cos_draft_length", batch_bucket="1") == 3
    assert _value("vllm_cos_draft_length", batch_bucket="32") == 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_drafts_that_do_not_pay_are_warned_about_once(adaptive):
    metrics = CoSMetrics("large", "small", interval_s=0.0)
    metrics.adaptive = adaptive
    logger = logging.getLogger("vllm.cos")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics.warn_if_drafts_do_not_pay({"drafts_proposed": 100, "drafts_accepted": 5})  # too few to judge
        metrics.warn_if_drafts_do_not_pay({"drafts_proposed": 1000, "drafts_accepted": 600})  # pays
        assert not [ln for ln in handler.lines if "accepted" in ln]
        metrics.warn_if_drafts_do_not_pay({"drafts_proposed": 1000, "drafts_accepted": 64})
        metrics.warn_if_drafts_do_not_pay({"drafts_proposed": 2000, "drafts_accepted": 100})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    warned = [ln for ln in handler.lines if "drafts of small are accepted 6% of the time" in ln]
    assert len(warned) == 1
    assert ("gamma: auto is lowering" in warned[0]) == adaptive
    assert ("set gamma: auto" in warned[0]) == (not adaptive)

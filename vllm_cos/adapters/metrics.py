"""CoS counters of a worker on Prometheus and in the log.

The worker knows what the scheduler cannot: which model proposed a token, whether D's
drafts or T's own proposals were accepted, and how many forwards each model ran.  They are
published as ``vllm_cos_*`` Prometheus metrics from the worker process:

* ``vllm_cos_forwards_total{model}``: forward passes per collaborating model;
* ``vllm_cos_proposed_tokens_total{proposer}`` / ``vllm_cos_accepted_tokens_total{proposer}``:
  proposals verified against r and accepted, per proposing model;
* ``vllm_cos_emitted_tokens_total``, ``vllm_cos_verification_rounds_total`` (request-steps);
* gauges ``vllm_cos_acceptance_rate`` and ``vllm_cos_mean_accepted_length`` (tokens emitted per
  verification round), cumulative since the engine started;
* gauge ``vllm_cos_draft_length{batch_bucket}`` under ``gamma: auto``: the drafts per step chosen
  for batches of about that size (also logged when a choice changes).

``vllm serve`` shows them on ``/metrics`` when the API server reads a multiprocess
registry: our console command (:mod:`vllm_cos.cli`) sets ``PROMETHEUS_MULTIPROC_DIR`` to a
fresh temporary directory for ``serve`` (vLLM's own mechanism for several API servers;
every vLLM gauge declares its multiprocess mode).  An offline ``LLM`` registers them in the
process's default registry; :func:`vllm_cos.offline.cos_stats` gives the same numbers.

Every ``VLLM_LOG_STATS_INTERVAL`` seconds (default 10) with new tokens, one line is logged
next to vLLM's "SpecDecoding metrics" line, e.g.::

    CoS metrics: acceptance rate 0.71 (drafts of small 120/170, proposals of large 30/40),
    mean accepted length 2.45, forwards large=80 small=260, tokens 196
"""

from __future__ import annotations

import logging
import os
import time

from vllm_cos.adapters.core import COUNTERS

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

SLOW_ACCEPTANCE = 1 / 3  # draft acceptance below which drafting is unlikely to pay (see warn_...)
SLOW_DRAFTS_MIN = 256  # drafts verified before judging

_METRICS = None


def _metrics():
    """The process's metric objects (created once: prometheus names are process-global)."""
    global _METRICS
    if _METRICS is None:
        import prometheus_client as pc

        _METRICS = {
            "forwards": pc.Counter("vllm_cos_forwards", "CoS: forward passes per collaborating model",
                                   ["model"]),
            "proposed": pc.Counter("vllm_cos_proposed_tokens",
                                   "CoS: proposed tokens verified against r, per proposing model", ["proposer"]),
            "accepted": pc.Counter("vllm_cos_accepted_tokens",
                                   "CoS: proposed tokens accepted, per proposing model", ["proposer"]),
            "emitted": pc.Counter("vllm_cos_emitted_tokens", "CoS: tokens emitted by CoS sampling"),
            "rounds": pc.Counter("vllm_cos_verification_rounds",
                                 "CoS: verification rounds (request-steps that emitted tokens)"),
            "acceptance_rate": pc.Gauge("vllm_cos_acceptance_rate",
                                        "CoS: accepted / proposed tokens since start", ["model_pair"],
                                        multiprocess_mode="mostrecent"),
            "mean_accepted_length": pc.Gauge("vllm_cos_mean_accepted_length",
                                             "CoS: tokens emitted per verification round since start",
                                             ["model_pair"], multiprocess_mode="mostrecent"),
            "draft_length": pc.Gauge("vllm_cos_draft_length",
                                     "CoS (gamma: auto): drafts per step chosen for a batch-size bucket",
                                     ["batch_bucket"], multiprocess_mode="mostrecent"),
        }
    return _METRICS


class CoSMetrics:
    """Publishes the growth of one worker's :class:`CoSStats` (call :meth:`publish` per step)."""

    def __init__(self, target: str, other: str, interval_s: float | None = None):
        self.target, self.other = target, other
        self.pair = f"{target}+{other}"
        self._last = {}
        if interval_s is None:
            try:
                interval_s = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
            except ValueError:
                interval_s = 10.0
        self.interval_s = interval_s
        self._last_log = time.monotonic()
        self._logged_tokens = 0
        self.adaptive = False  # gamma: auto adapts the draft length itself
        self._warned_slow = False
        self._bound = None  # the labelled series, bound on first publish
        try:
            self._m = _metrics()
        except Exception as exc:  # noqa: BLE001 - metrics must never stop decoding
            logger.warning("cos: Prometheus metrics disabled (%s)", exc)
            self._m = None

    def publish(self, stats) -> None:
        summary = stats.as_dict()  # the one read-back of the step's counters
        now = {k: summary[k] for k in COUNTERS}
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        if self._m is not None:
            counters, gauges = self._series()
            for counter, name in counters:
                counter.inc(delta[name])
            for gauge, name in gauges:
                gauge.set(summary[name])
        t = time.monotonic()
        if t - self._last_log >= self.interval_s and now["tokens_emitted"] > self._logged_tokens:
            self._last_log = t
            self._logged_tokens = now["tokens_emitted"]
            logger.info(self.line(stats))
            self.warn_if_drafts_do_not_pay(summary)

    def _series(self):
        """The labelled Prometheus series, bound once: ([(counter, counter name)], [(gauge, summary key)])."""
        if self._bound is None:
            m = self._m
            self._bound = ([(m["forwards"].labels(model=self.target), "steps"),
                            (m["forwards"].labels(model=self.other), "draft_forwards"),
                            (m["proposed"].labels(proposer=self.other), "drafts_proposed"),
                            (m["proposed"].labels(proposer=self.target), "served_proposed"),
                            (m["accepted"].labels(proposer=self.other), "drafts_accepted"),
                            (m["accepted"].labels(proposer=self.target), "served_accepted"),
                            (m["emitted"], "tokens_emitted"), (m["rounds"], "row_steps")],
                           [(m["acceptance_rate"].labels(model_pair=self.pair), "acceptance_rate"),
                            (m["mean_accepted_length"].labels(model_pair=self.pair), "mean_accepted_length")])
        return self._bound

    def warn_if_drafts_do_not_pay(self, summary: dict) -> None:
        """Once: the group's drafts are accepted so rarely that drafting costs more than it saves.

        Heuristic break-even: at acceptance a a step of k drafts yields (1 - a^(k+1)) / (1 - a)
        tokens, under 1.5 for a < 1/3 whatever k, while each draft costs a drafter pass.
        """
        proposed = summary["drafts_proposed"]
        if self._warned_slow or proposed < SLOW_DRAFTS_MIN:
            return
        rate = summary["drafts_accepted"] / proposed
        if rate >= SLOW_ACCEPTANCE:
            return
        self._warned_slow = True
        remedy = ("gamma: auto is lowering the drafts per step (down to 0: verification only)" if self.adaptive
                  else "set gamma: auto (it drafts less, down to 0, when drafts do not pay), or let a model "
                       "closer to r draft (under contrastive decoding r favours the expert, not the amateur)")
        logger.warning("cos: drafts of %s are accepted %.0f%% of the time (%d drafts): likely slower than "
                       "standard collaborative decoding; %s", self.other, 100 * rate, proposed, remedy)

    def draft_lengths(self, chosen: dict[int, int], acceptance: float) -> None:
        """gamma: auto changed its choice: one log line and the per-bucket gauge."""
        logger.info("cos: draft length per step by batch size (gamma: auto, acceptance %.2f): %s", acceptance,
                    ", ".join(f"B~{b}: {k}" for b, k in chosen.items()))
        if self._m is not None:
            for bucket, k in chosen.items():
                self._m["draft_length"].labels(batch_bucket=str(bucket)).set(k)

    def line(self, stats) -> str:
        """What CoS counts: every proposal verified against r, the served model's own included,
        and tokens per verification round (vLLM's "SpecDecoding metrics" line counts only the
        draft group's drafts, and its acceptance length is 1 + accepted drafts per step)."""
        s = stats.as_dict()
        return (f"CoS metrics: acceptance rate {s['acceptance_rate']:.3f} (drafts of {self.other} "
                f"{s['drafts_accepted']}/{s['drafts_proposed']}, proposals of {self.target} "
                f"{s['served_accepted']}/{s['served_proposed']}), mean accepted length "
                f"{s['mean_accepted_length']:.2f}, forwards {self.target}={s['steps']} "
                f"{self.other}={s['draft_forwards']}, tokens {s['tokens_emitted']}")

"""The soak's pure parts (no server): the request mix, the bad-request catalogue and its
verdicts, metrics parsing, the checks and the table (``scripts/soak.py`` itself runs in
``tests/test_engine_soak.py``)."""

from __future__ import annotations

import json
import random

from vllm_cos.soak import report
from vllm_cos.soak.bad import bad_jobs, catalogue, effective_status, verdict
from vllm_cos.soak.server import parse_metrics
from vllm_cos.soak.workload import good_jobs, interleave


def test_good_mix_covers_the_features_and_respects_vllm_rules():
    jobs = good_jobs(1000, random.Random(0), "m", drop_share=0.25)
    tags = {t for j in jobs for t in j.tags}
    assert {"completions", "chat", "stream", "plain", "T=0", "T=0.7", "T=1", "top_p", "top_k", "seed", "n>1",
            "stop", "logprobs", "drop", "token-ids"} <= tags
    assert {t for t in tags if t.startswith("structured:")} == {"structured:json", "structured:regex",
                                                                 "structured:choice"}
    assert all(1 <= j.kwargs["max_tokens"] <= 200 for j in jobs)
    assert not [j for j in jobs if j.greedy and j.kwargs.get("n", 1) > 1]  # vLLM refuses n > 1 when greedy
    drops = [j for j in jobs if j.drop_after]
    assert all(j.stream and "stop" not in j.kwargs and "structured_outputs" not in j.kwargs["extra_body"]
               for j in drops)
    assert len(drops) >= 0.15 * sum(j.stream for j in jobs)
    assert all(j.kwargs["extra_body"]["return_token_ids"] for j in jobs)


def test_bad_requests_cycle_the_catalogue_and_interleave():
    rng = random.Random(1)
    cases = catalogue(rng, "m", 384, cos=True)
    assert len({c.name for c in cases}) == len(cases) > 60
    bad = bad_jobs(200, rng, "m", 384, cos=False)
    assert len(bad) == 200 and not any("thinking" in j.bad.name for j in bad)
    good = good_jobs(50, rng, "m", 0.25)
    mixed = interleave(good, bad, rng)
    assert len(mixed) == 250 and [j for j in mixed if j.bad is None] == good
    positions = [i for i, j in enumerate(mixed) if j.bad is not None]
    assert positions[0] < 50 and positions[-1] > 200  # spread over the run, not bunched


def test_verdicts():
    case = next(c for c in catalogue(random.Random(2), "m", 384, cos=False) if c.name.startswith("max_tokens<0"))
    assert verdict(case, 400, '{"message": "max_tokens must be at least 1"}') == ""
    assert "names none" in verdict(case, 400, '{"message": "bad"}')
    assert "expected 4xx" in verdict(case, 500, "")
    stock = next(c for c in catalogue(random.Random(2), "m", 384, cos=False) if c.expect == "stock-5xx")
    assert verdict(stock, 500, "") == "" and verdict(stock, 200, "") != ""
    unknown = next(c for c in catalogue(random.Random(2), "m", 384, cos=False) if c.expect == "accepted")
    assert verdict(unknown, 200, "{}") == "" and verdict(unknown, 400, "") != ""
    sse = "data: " + json.dumps({"error": {"message": "", "code": 500}}) + "\n\ndata: [DONE]\n\n"
    assert effective_status(200, sse) == 500 and effective_status(200, "data: {}\n\n") == 200


def test_parse_metrics_sums_label_sets():
    text = ('# HELP x\nvllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
            'vllm:request_success_total{engine="0",finished_reason="error",model_name="m"} 2.0\n'
            'vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0\n')
    m = parse_metrics(text)
    assert m["vllm:num_preemptions_total"] == 3.0 and m["vllm:request_success_total"] == 7.0
    assert m['vllm:request_success_total{finished_reason="error"}'] == 2.0


def _summary(**over):
    s = {"rule": "we", "requests": 10, "bad": 4, "bad_as_expected": 4, "good_failures": {}, "alive": True,
         "health": 200, "preemptions": 3.0, "aborts": 2, "streams": 5, "greedy_mismatches": [], "greedy_checked": 4,
         "seeded_mismatches": [], "seeded_checked": 2, "kv_cache_usage_end": 0.0, "requests_left": 0.0,
         "rss_after_half": [100, 104], "not_sent": 0, "stash_requests_end": 0, "throughput_tok_s": 10.0,
         "p50_s": 0.1, "p99_s": 0.2, "http_5xx_good": 0, "http_5xx_bad_unexpected": 0}
    s.update(over)
    s["checks"] = report.checks(s, cos=True)
    return s


def test_checks_and_table():
    ok = _summary()
    assert all(c["ok"] for c in ok["checks"].values())
    bad = _summary(rss_after_half=[100, 106], preemptions=0.0, stash_requests_end=1, health=500)
    failed = {name for name, c in bad["checks"].items() if not c["ok"]}
    assert failed == {"RSS after 2nd half within 5% of 1st", "preemptions happened",
                      "CoS draft stash empty at the end", "server alive, /health 200 at the end"}
    text = report.table([ok, bad])
    assert "tok/s" in text and " ok" in text and "FAIL" in text
    assert report.failures(ok) == [] and len(report.failures(bad)) == 4

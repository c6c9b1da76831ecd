"""What a soak run measured, its assertions, and the closing table."""

from __future__ import annotations

from vllm_cos.soak.client import Outcome
from vllm_cos.soak.workload import Job

RSS_TOLERANCE = 0.05
MIN_DROP_SHARE = 0.10


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def first_difference(a: tuple, b: tuple) -> str:
    """Where two outcomes' outputs part (choice, position), for the report."""
    for i, ((ids_a, fin_a), (ids_b, fin_b)) in enumerate(zip(a, b)):
        if ids_a != ids_b:
            pos = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
            return f"choice {i}: token {pos} (lengths {len(ids_a)} / {len(ids_b)})"
        if fin_a != fin_b:
            return f"choice {i}: finish {fin_a} / {fin_b}"
    return f"choices {len(a)} / {len(b)}"


def load_numbers(good: list[Job], results: dict[int, Outcome], load_s: float) -> dict:
    """Throughput, latency, aborts and failures of the good requests."""
    outs = [results[j.index] for j in good]
    done = [o for o in outs if o.ok and not o.dropped]
    streams = [j for j in good if j.stream]
    tokens = sum(o.tokens for o in outs if o.ok)
    statuses: dict[str, int] = {}
    for o in outs:
        if not o.ok:
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {
        "requests": len(good), "completed": len(done), "streams": len(streams),
        "aborts": sum(1 for o in outs if o.dropped), "tokens": tokens, "load_s": round(load_s, 1),
        "throughput_tok_s": round(tokens / load_s, 1) if load_s else 0.0,
        "p50_s": round(percentile([o.latency for o in done], 0.50), 3),
        "p99_s": round(percentile([o.latency for o in done], 0.99), 3),
        "good_failures": statuses,
        "http_5xx_good": sum(1 for o in outs if o.status >= 500 or o.status == -1),
        "failure_examples": [f"#{j.index} {' '.join(j.tags)}: {results[j.index].error}" for j in good
                             if not results[j.index].ok][:10],
    }


def bad_numbers(bad: list[Job], results: dict[int, Outcome]) -> dict:
    wrong = [(j, results[j.index]) for j in bad if results[j.index].error]
    stock = [(j, results[j.index]) for j in bad if j.bad.expect == "stock-5xx" and results[j.index].status >= 500]
    unexpected_5xx = [(j, o) for j, o in wrong if o.status >= 500 or o.status <= 0]
    return {
        "bad": len(bad), "bad_as_expected": len(bad) - len(wrong),
        "bad_wrong": [f"{j.bad.name}: {o.error}: {o.body[:200]}" for j, o in wrong][:20],
        "http_5xx_bad_unexpected": len(unexpected_5xx),
        "unexpected_5xx_cases": sorted({j.bad.name for j, _ in unexpected_5xx}),
        "stock_5xx": sorted({f"{j.bad.name} -> {o.status}" for j, o in stock}),
    }


def checks(s: dict, cos: bool) -> dict[str, dict]:
    """The soak's assertions on one run's summary ``s``: name -> {ok, detail}."""
    rss1, rss2 = s["rss_after_half"]
    growth = (rss2 - rss1) / rss1 if rss1 else 0.0
    out = {
        "no 5xx or error on good requests": (not s["good_failures"], str(s["good_failures"] or "none")),
        "server alive, /health 200 at the end": (s["alive"] and s["health"] == 200,
                                                 f"alive={s['alive']} health={s['health']}"),
        "bad requests answered as expected": (s["bad_as_expected"] == s["bad"],
                                              f"{s['bad_as_expected']}/{s['bad']}"),
        "preemptions happened": (s["preemptions"] > 0, f"{s['preemptions']:.0f}"),
        f">= {MIN_DROP_SHARE:.0%} of streams dropped": (s["aborts"] >= MIN_DROP_SHARE * s["streams"],
                                                         f"{s['aborts']}/{s['streams']}"),
        "greedy requests identical alone": (not s["greedy_mismatches"] and s["greedy_checked"] > 0,
                                            f"{len(s['greedy_mismatches'])} of {s['greedy_checked']} differ"),
        "seeded requests reproduce": (not s["seeded_mismatches"] and s["seeded_checked"] > 0,
                                      f"{len(s['seeded_mismatches'])} of {s['seeded_checked']} differ"),
        "KV cache usage 0 at the end": (s["kv_cache_usage_end"] == 0, f"{s['kv_cache_usage_end']}"),
        "no request running or waiting at the end": (s["requests_left"] == 0, f"{s['requests_left']:.0f}"),
        f"RSS after 2nd half within {RSS_TOLERANCE:.0%} of 1st": (abs(growth) <= RSS_TOLERANCE,
                                                                  f"{growth:+.2%}"),
        "every job sent within the time limit": (s["not_sent"] == 0, f"{s['not_sent']} not sent"),
    }
    if cos:
        out["CoS draft stash empty at the end"] = (s["stash_requests_end"] == 0,
                                                   f"{s['stash_requests_end']} (peak under load "
                                                   f"{s.get('stash_requests_peak')})")
    return {name: {"ok": bool(ok), "detail": detail} for name, (ok, detail) in out.items()}


COLUMNS = ["rule", "requests", "bad", "tok/s", "p50 s", "p99 s", "preempt", "aborts", "5xx", "mismatch", "result"]


def table(runs: list[dict]) -> str:
    rows = [COLUMNS]
    for s in runs:
        mismatches = f"{len(s['greedy_mismatches'])}/{len(s['seeded_mismatches'])}"
        ok = all(c["ok"] for c in s["checks"].values())
        rows.append([s["rule"], str(s["requests"]), f"{s['bad_as_expected']}/{s['bad']}",
                     f"{s['throughput_tok_s']:.0f}", f"{s['p50_s']:.2f}", f"{s['p99_s']:.2f}",
                     f"{s['preemptions']:.0f}", str(s["aborts"]),
                     str(s["http_5xx_good"] + s["http_5xx_bad_unexpected"]), mismatches, "ok" if ok else "FAIL"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ["bad: answered as expected / sent; 5xx: good requests + unexpected ones among the bad; "
             "mismatch: greedy / seeded re-sends that differ"]
    return "\n".join(lines + notes)


def failures(s: dict) -> list[str]:
    return [f"{s['rule']}: {name}: {c['detail']}" for name, c in s["checks"].items() if not c["ok"]]

"""The soak: a CoS server under load, faults and bad input (``scripts/soak.py``).

Per rule (``--rules we,cd``; ``plain`` = the same server without ``--speculative-config``):
start ``vllm-cos serve`` on loopback with a KV cache small enough to force preemption, send
the good requests (:mod:`~vllm_cos.soak.workload`) with the bad ones
(:mod:`~vllm_cos.soak.bad`) interleaved, ``--concurrency`` at a time, in two halves (resident
memory of the server's process tree is read after each, once idle; a short warm-up comes
first, not counted); then re-send every greedy
request that was not dropped, and a sample of the seeded ones, one at a time to the idle
server and compare token ids; then read the end state: /health, KV-cache usage, requests left,
the CoS draft stash (``cos_stats`` through the dev-mode ``/collective_rpc``).  Bad requests
that got a 5xx are replayed against a server without CoS (``--plain-check``) to tell stock
vLLM faults from CoS ones.  Prints a table and writes ``summary.json``; exit status 1 when an
assertion fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_cos.soak import report
from vllm_cos.soak.bad import bad_jobs, send_bad
from vllm_cos.soak.client import Outcome, make_client, send
from vllm_cos.soak.server import MODEL_NAME, Server, write_cos_yaml
from vllm_cos.soak.workload import Job, good_jobs, interleave

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=REPO / "models" / "tiny", help="large/ and small/ live here")
    p.add_argument("--rules", default="we,cd", help="comma-separated: we, cd, plain (default we,cd)")
    p.add_argument("--requests", "-n", type=int, default=1000, help="good requests per rule (default 1000)")
    p.add_argument("--concurrency", "-c", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("--bad", type=int, default=200, help="bad requests per rule, interleaved (default 200)")
    p.add_argument("--drop-share", type=float, default=0.25, help="share of streams the client drops (0.25)")
    p.add_argument("--seeded-sample", type=int, default=60, help="seeded requests re-sent (default 60)")
    p.add_argument("--warmup", type=int, default=32, help="requests before the load, not counted (default 32)")
    p.add_argument("--max-model-len", type=int, default=384)
    p.add_argument("--kv-blocks", type=int, default=48, help="KV cache blocks of 32 tokens (default 48)")
    p.add_argument("--max-n", type=int, default=16, help="VLLM_MAX_N_SEQUENCES of the server (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--time-limit", type=float, default=2700, help="seconds for the whole run (default 2700)")
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--plain-check", choices=["auto", "always", "never"], default="auto",
                   help="replay 5xx bad requests on a server without CoS: when one was unexpected (auto), "
                        "also the known stock faults (always), never")
    p.add_argument("--out", type=Path, default=REPO / "soak_out", help="server logs, cos.yaml, summary.json")
    p.add_argument("--json", type=Path, default=None, help="summary path (default OUT/summary.json)")
    args = p.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    return args


def run_load(jobs: list[Job], client, http, base: str, concurrency: int, deadline: float) -> dict[int, Outcome]:
    def one(job: Job) -> Outcome:
        return send_bad(http, base, job, deadline) if job.bad is not None else send(client, job, deadline)

    with ThreadPoolExecutor(concurrency) as pool:
        return dict(zip([j.index for j in jobs], pool.map(one, jobs)))


def resend(client, jobs: list[Job], results: dict[int, Outcome], deadline: float) -> tuple[int, list[str]]:
    """Each job alone, in turn; (how many were compared, the ones whose outputs differ)."""
    mismatches, checked = [], 0
    for job in jobs:
        again = send(client, job, deadline, drop=False)
        if again.status == -2:
            break
        checked += 1
        if not again.ok or again.outputs != results[job.index].outputs:
            where = report.first_difference(results[job.index].outputs, again.outputs) if again.ok else again.error
            mismatches.append(f"#{job.index} {' '.join(job.tags)}: {where}")
    return checked, mismatches


def end_state(server: Server, before: dict[str, float]) -> dict:
    m = server.wait_idle(timeout=60)
    stats = server.cos_stats() if server.alive() else None
    return {
        "alive": server.alive(), "health": server.health(),
        "kv_cache_usage_end": m.get("vllm:kv_cache_usage_perc", -1.0),
        "requests_left": m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0),
        "stash_requests_end": None if stats is None else sum((w or {}).get("stash_requests", 0) for w in stats),
        "engine_error_finishes": m.get('vllm:request_success_total{finished_reason="error"}', 0)
                                 - before.get('vllm:request_success_total{finished_reason="error"}', 0),
    }


def stash_peak(server: Server, stop: threading.Event, seen: list[int]) -> None:
    """Every 2 s under load: the draft stash's live requests (shows the end-of-run 0 is a real reading)."""
    while not stop.wait(2.0):
        stats = server.cos_stats()
        if stats:
            seen.append(sum((w or {}).get("stash_requests", 0) for w in stats))


def load_phase(server: Server, args, jobs: list[Job], client, http, deadline: float) -> tuple[dict, float, list]:
    """Both halves; (outcomes, seconds under load, RSS after each half once idle)."""
    results: dict[int, Outcome] = {}
    load_s, rss = 0.0, []
    half = len(jobs) // 2
    for part, label in ((jobs[:half], "1st"), (jobs[half:], "2nd")):
        t0 = time.monotonic()
        stop = threading.Event()
        watcher = threading.Thread(target=stash_peak, args=(server, stop, server.stash_seen), daemon=True)
        if server.cos:
            watcher.start()
        results.update(run_load(part, client, http, server.base, args.concurrency, deadline))
        stop.set()
        if server.cos:
            watcher.join()
        load_s += time.monotonic() - t0
        server.wait_idle()
        rss.append(server.rss_bytes())
        print(f"  {label} half: {len(part)} requests in {time.monotonic() - t0:.0f} s, "
              f"RSS {rss[-1] / 2**20:.0f} MiB", flush=True)
    return results, load_s, rss


def soak(server: Server, args, rule: str, deadline: float) -> dict:
    import httpx

    rng = random.Random(args.seed)
    good = good_jobs(args.requests, rng, MODEL_NAME, args.drop_share)
    bad = bad_jobs(args.bad, rng, MODEL_NAME, args.max_model_len, server.cos)
    client = make_client(server.base, args.request_timeout, args.concurrency)
    http = httpx.Client(trust_env=False, timeout=args.request_timeout, limits=httpx.Limits(max_keepalive_connections=0))
    warm = good_jobs(args.warmup, random.Random(args.seed + 1), MODEL_NAME, 0.0)
    run_load(warm, client, http, server.base, args.concurrency, deadline)  # first grammars, allocator
    server.wait_idle()
    before = server.metrics()
    results, load_s, rss = load_phase(server, args, interleave(good, bad, rng), client, http, deadline)
    after = server.metrics()
    s = {"rule": rule, "concurrency": args.concurrency, **report.load_numbers(good, results, load_s),
         **report.bad_numbers(bad, results),
         "preemptions": after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0),
         "rss_after_half": rss, "not_sent": sum(1 for o in results.values() if o.status == -2)}
    usable = [j for j in good if results[j.index].ok and not results[j.index].dropped]
    greedy = [j for j in usable if j.greedy]
    seeded = [j for j in usable if j.seeded]
    seeded = rng.sample(seeded, min(args.seeded_sample, len(seeded)))
    print(f"  re-sending {len(greedy)} greedy and {len(seeded)} seeded requests alone", flush=True)
    s["greedy_checked"], s["greedy_mismatches"] = resend(client, greedy, results, deadline)
    s["seeded_checked"], s["seeded_mismatches"] = resend(client, seeded, results, deadline)
    s.update(end_state(server, before))
    s["stash_requests_peak"] = max(server.stash_seen, default=None)
    s["checks"] = report.checks(s, server.cos)
    s["_bad_cases"] = {j.bad.name: j.bad for j in bad if results[j.index].status >= 500 or results[j.index].status <= 0}
    return s


def make_server(args, rule: str) -> Server:
    cos_yaml = write_cos_yaml(rule, args.models.resolve(), args.out)
    return Server(args.models.resolve() / "large", cos_yaml, args.out / f"server-{rule}.log",
                  max_model_len=args.max_model_len, kv_blocks=args.kv_blocks,
                  chat_template=args.models.resolve() / "chat_template.jinja", max_n=args.max_n)


def run_rule(args, rule: str, deadline: float) -> dict:
    server = make_server(args, rule)
    print(f"{rule}: starting {' '.join(server.args[:2])} ... (log {server.log_path})", flush=True)
    server.start(args.start_timeout)
    try:
        return soak(server, args, rule, deadline)
    finally:
        server.stop()


def plain_replay(args, runs: list[dict]) -> dict[str, dict]:
    """The bad cases that got a 5xx (or a dropped connection) on a CoS server, sent to one without CoS."""
    cases = {}
    for s in runs:
        for name, case in s["_bad_cases"].items():
            if args.plain_check == "always" or case.expect != "stock-5xx":
                cases.setdefault(name, {"case": case, "cos": {}})["cos"][s["rule"]] = True
    if not cases or args.plain_check == "never":
        return {}
    server = make_server(args, "plain")
    print(f"plain-check: replaying {len(cases)} bad request(s) on a server without CoS", flush=True)
    server.start(args.start_timeout)
    import httpx

    http = httpx.Client(trust_env=False, timeout=args.request_timeout, limits=httpx.Limits(max_keepalive_connections=0))
    try:
        out = {}
        for name, entry in cases.items():
            o = send_bad(http, server.base, Job(-1, "raw", {}, bad=entry["case"]))
            out[name] = {"plain_status": o.status, "plain_body": o.body[:300], "cos_rules": sorted(entry["cos"]),
                         "also_without_cos": o.status >= 500 or o.status <= 0}
        out["_plain_server_alive"] = {"alive": server.alive(), "health": server.health()}
        return out
    finally:
        server.stop()


def finish(args, runs: list[dict], replay: dict) -> int:
    for s in runs:
        s.pop("_bad_cases", None)
    cos_only = [n for n, r in replay.items() if not n.startswith("_") and not r["also_without_cos"]]
    summary = {"ok": all(c["ok"] for s in runs for c in s["checks"].values()) and not cos_only,
               "runs": runs, "plain_replay": replay, "cos_only_5xx": cos_only,
               "args": {k: str(v) for k, v in vars(args).items()}}
    path = args.json or args.out / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + report.table(runs))
    for s in runs:
        if s["stock_5xx"]:
            print(f"{s['rule']}: stock vLLM 5xx (known, not CoS): {', '.join(s['stock_5xx'])}")
    for name, r in replay.items():
        if not name.startswith("_"):
            print(f"plain-check: {name}: CoS {r['cos_rules']} 5xx; without CoS {r['plain_status']}")
    problems = [f for s in runs for f in report.failures(s)] + [f"5xx only with CoS: {n}" for n in cos_only]
    for line in problems:
        print("FAIL", line)
    print(f"summary: {path}; {'all assertions hold' if summary['ok'] else f'{len(problems)} assertion(s) failed'}")
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_limit
    runs = []
    for rule in args.rules:
        try:
            runs.append(run_rule(args, rule, deadline))
        except RuntimeError as exc:  # the server did not start or died at start-up
            print(f"FAIL {rule}: {exc}", file=sys.stderr)
            return 1
    replay = plain_replay(args, runs)
    return finish(args, runs, replay)


if __name__ == "__main__":
    sys.exit(main())

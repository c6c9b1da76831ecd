"""Fault: the engine core killed (SIGKILL) while requests are in flight.

Streams are opened against ``vllm-cos serve`` (vLLM's defaults: the engine core in its own
process), the engine core process is killed once every stream has produced tokens, and then:
every client call must end (an error, or a closed stream) within ``deadline`` seconds, new
requests must not hang, and the API server must exit or stop answering /health with 200 --
stock vLLM's behaviour (its API server shuts down once the engine core is dead).  ``--plain``
runs the same against a server without CoS for comparison.

    .venv/bin/python -m vllm_cos.soak.faults --models models/tiny          # CoS, then plain
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from vllm_cos.soak.server import MODEL_NAME, Server, write_cos_yaml


def engine_core(server: Server):
    """The engine core process of a server (vLLM titles it ``VLLM::EngineCore``)."""
    import psutil

    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "EngineCore" in p.name() or any("EngineCore" in part for part in p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def _stream(base: str, index: int, started: threading.Event, result: dict) -> None:
    import httpx

    begin = time.monotonic()
    body = {"model": MODEL_NAME, "prompt": f"def f{index}(x):", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    chunks, outcome = 0, "completed"
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120, trust_env=False) as r:
            if r.status_code != 200:
                outcome = f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if line.startswith("data:") and '"error"' in line:
                    outcome = "error event"
                elif line.startswith("data:"):
                    chunks += 1
                    if chunks == 3:
                        started.set()
    except Exception as exc:  # noqa: BLE001 - how the stream ended is the measurement
        outcome = type(exc).__name__
    result[index] = {"outcome": outcome, "chunks": chunks, "seconds": round(time.monotonic() - begin, 2)}


def _after_kill(server: Server, deadline: float) -> dict:
    import httpx

    begin = time.monotonic()
    try:
        r = httpx.post(server.base + "/v1/completions", timeout=deadline, trust_env=False,
                       json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 4})
        new_request = f"HTTP {r.status_code}"
    except Exception as exc:  # noqa: BLE001
        new_request = type(exc).__name__
    new_request_s = time.monotonic() - begin
    while server.alive() and server.health() == 200 and time.monotonic() - begin < deadline:
        time.sleep(1)
    return {"new_request": new_request, "new_request_s": round(new_request_s, 2), "server_exited": not server.alive(),
            "health_after": server.health(), "settled_s": round(time.monotonic() - begin, 2)}


def kill_engine_mid_flight(server: Server, streams: int = 4, deadline: float = 60.0) -> dict:
    """Open ``streams`` streams, SIGKILL the engine core once tokens flow, report how it ends."""
    results: dict[int, dict] = {}
    started = threading.Event()
    threads = [threading.Thread(target=_stream, args=(server.base, i, started, results), daemon=True)
               for i in range(streams)]
    for t in threads:
        t.start()
    if not started.wait(120):
        raise RuntimeError("no stream produced tokens within 120 s")
    core = engine_core(server)
    if core is None:
        raise RuntimeError("no EngineCore process under the server (is multiprocessing on?)")
    core.kill()
    killed_at = time.monotonic()
    for t in threads:
        t.join(timeout=max(deadline - (time.monotonic() - killed_at), 1))
    report = {"streams": [results.get(i, {"outcome": "hung"}) for i in range(streams)],
              "streams_ended_s": round(time.monotonic() - killed_at, 2)}
    report.update(_after_kill(server, deadline))
    report["no_hang"] = (not any(th.is_alive() for th in threads) and len(results) == streams
                         and report["settled_s"] < deadline)
    return report


def run(models: Path, cos: bool, work: Path, deadline: float = 60.0) -> dict:
    cos_yaml = write_cos_yaml("we", models, work) if cos else None
    server = Server(models / "large", cos_yaml, work / f"server-{'cos' if cos else 'plain'}.log", max_model_len=384,
                    kv_blocks=64, chat_template=models / "chat_template.jinja", max_n=8)
    server.start(300)
    try:
        return kill_engine_mid_flight(server, deadline=deadline)
    finally:
        server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models/tiny"))
    p.add_argument("--no-plain", action="store_true", help="skip the comparison server without CoS")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cos-fault-") as work:
        reports = {"cos": run(args.models.resolve(), True, Path(work))}
        if not args.no_plain:
            reports["plain"] = run(args.models.resolve(), False, Path(work))
    print(json.dumps(reports, indent=1))
    return 0 if all(r["no_hang"] for r in reports.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

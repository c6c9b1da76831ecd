"""The bad-configuration fuzz: every mutated cos.yaml starts and serves, or is refused with one
line naming a field or a file; never a traceback, never a hang.

Two tiers, both time-bounded per case:

* **check** (every case, in-process, seconds): ``vllm-cos check cos.yaml --served DIR``, the
  same resolution an engine start runs first (fields, served model, model files, tokenizers).
* **serve** (a sample: every case the check accepts, every damaged model file, then others up
  to ``--starts``): ``vllm-cos serve DIR --speculative-config cos.yaml`` under vLLM's defaults.
  A case the check refused must exit non-zero with that same line and no traceback; a case it
  accepted must answer /health and a greedy completion.

    .venv/bin/python scripts/fuzz_configs.py                    # 200 cases, 12 starts
    .venv/bin/python scripts/fuzz_configs.py -n 400 --starts 0  # the check tier only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import signal
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_cos.soak.configs import ConfigCase, config_cases

FIELD = re.compile(r"cos config: [^:]+: ")  # "cos config: models[1].gamma: ..."


@dataclass
class Verdict:
    outcome: str  # ok | refused | defect
    line: str  # the one error line, or what went wrong
    seconds: float


def names_something(line: str, case: ConfigCase) -> bool:
    """A refusal names a field, a file or directory, or one of the models."""
    if case.damaged is not None:
        return case.damaged in line or str(Path(case.damaged).parent) in line
    return bool(FIELD.search(line)) or "/" in line or re.search(r"model '[^']+'", line) is not None


def _judge(rc: int, out: str, err: str, case: ConfigCase, seconds: float) -> Verdict:
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == 0:
        return Verdict("ok", out.splitlines()[0] if out else "", seconds)
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return Verdict("defect", f"rc {rc}, stderr not one 'error:' line: {err[-500:]!r}", seconds)
    if not names_something(lines[0], case):
        return Verdict("defect", f"names no field or file: {lines[0]}", seconds)
    return Verdict("refused", lines[0], seconds)


class _Timeout(Exception):
    pass


def check_case(case: ConfigCase, timeout: float = 30.0) -> Verdict:
    """``vllm-cos check`` in this process, stdout / stderr captured, ``timeout`` seconds at most."""
    from vllm_cos.cli import check

    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = check([str(case.yaml_path), "--served", case.served])
    except _Timeout:
        return Verdict("defect", f"hang: no answer within {timeout:.0f} s", time.monotonic() - start)
    except BaseException:  # noqa: BLE001 - any escape is the defect this fuzz looks for
        return Verdict("defect", traceback.format_exc(limit=4)[-800:], time.monotonic() - start)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return _judge(rc, out.getvalue(), err.getvalue(), case, time.monotonic() - start)


def serve_case(case: ConfigCase, expected: Verdict, chat_template: Path, timeout: float = 300.0) -> Verdict:
    """``vllm-cos serve``: must agree with the check tier (same refusal line, or serving)."""
    import httpx

    from vllm_cos.soak.server import MODEL_NAME, Server

    log = case.yaml_path.with_name("serve.log")
    server = Server(Path(case.served), case.yaml_path, log, max_model_len=256, kv_blocks=64,
                    chat_template=chat_template, max_n=8)
    start = time.monotonic()
    try:
        server.start(timeout)
    except RuntimeError:
        rc = server.proc.returncode if server.proc is not None else None
        text = log.read_text(errors="replace")
        seconds = time.monotonic() - start
        server.stop()
        if rc is None:
            return Verdict("defect", f"hang: no /health and no exit within {timeout:.0f} s", seconds)
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        if rc == 0 or "Traceback" in text or not last.startswith("error: "):
            return Verdict("defect", f"rc {rc}, output ends {text[-600:]!r}", seconds)
        if expected.outcome == "refused" and last != expected.line:
            return Verdict("defect", f"serve says {last!r}, check said {expected.line!r}", seconds)
        return Verdict("refused", last, seconds)
    try:
        r = httpx.post(server.base + "/v1/completions", trust_env=False, timeout=120,
                       json={"model": MODEL_NAME, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
        ok = r.status_code == 200 and r.json()["choices"][0]["text"] != ""
        verdict = Verdict("ok" if ok else "defect", f"HTTP {r.status_code}: {r.text[:200]}", time.monotonic() - start)
    finally:
        server.stop()
    if verdict.outcome == "ok" and expected.outcome != "ok":
        return Verdict("defect", f"served, but check refused it: {expected.line}", verdict.seconds)
    return verdict


def starts_sample(cases: list[ConfigCase], checked: list[Verdict], starts: int) -> list[int]:
    """Which cases also start a server: accepted ones, damaged files, then the rest in order."""
    first = [i for i, v in enumerate(checked) if v.outcome == "ok"][: max(starts // 2, 1)]
    damaged = [i for i, c in enumerate(cases) if c.damaged is not None and i not in first]
    rest = [i for i in range(len(cases)) if i not in first and i not in damaged]
    return (first + damaged[: max(starts // 3, 1)] + rest)[:starts]


def summary(cases: list[ConfigCase], checked: list[Verdict], served: dict[int, Verdict]) -> dict:
    table = Counter((c.kind, v.outcome) for c, v in zip(cases, checked))
    return {"cases": len(cases), "check": dict(Counter(v.outcome for v in checked)),
            "serve": dict(Counter(v.outcome for v in served.values())),
            "by_kind": {k: {o: n for (kk, o), n in table.items() if kk == k} for k in dict.fromkeys(c.kind for c in cases)},
            "slowest_check_s": round(max((v.seconds for v in checked), default=0.0), 2),
            "defects": [{"case": asdict(cases[i]) | {"yaml_path": str(cases[i].yaml_path)}, "tier": tier,
                         "verdict": asdict(v)}
                        for tier, verdicts in (("check", dict(enumerate(checked))), ("serve", served))
                        for i, v in verdicts.items() if v.outcome == "defect"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="directory of >= 3 models sharing a tokenizer "
                   "(default: the tiny models, built by vllm_cos.tiny_models)")
    p.add_argument("-n", "--cases", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--starts", type=int, default=12, help="cases that also start a server (0: none)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per server start")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    return p.parse_args(argv)


def tiny_models(models: str | None) -> dict[str, Path]:
    from vllm_cos.tiny_models import build_tiny_models

    if models is None:
        return {name: Path(p) for name, p in build_tiny_models(Path("models/tiny")).items()}
    found = sorted(p for p in Path(models).iterdir() if (p / "config.json").is_file())
    return {p.name: p.resolve() for p in found}


def main(argv=None) -> int:
    args = parse_args(argv)
    models = tiny_models(args.models)
    with tempfile.TemporaryDirectory(prefix="cos-config-fuzz-") as work:
        cases = config_cases(models, Path(work), args.cases, args.seed)
        checked = [check_case(c) for c in cases]
        chat_template = Path(work) / "chat_template.jinja"
        chat_template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
        served = {i: serve_case(cases[i], checked[i], chat_template, args.timeout)
                  for i in starts_sample(cases, checked, args.starts)}
        result = summary(cases, checked, served)
    print(json.dumps({k: v for k, v in result.items() if k != "defects"}, indent=1))
    for d in result["defects"]:
        print(f"DEFECT ({d['tier']}) case {d['case']['index']} {d['case']['kind']}: {d['case']['detail']}\n"
              f"  {d['verdict']['line']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 1 if result["defects"] else 0

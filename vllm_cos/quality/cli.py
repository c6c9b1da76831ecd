"""``scripts/quality.py``: teacher-forced NLL and top-1 accuracy of every row, through the engine."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_cos.quality.check import ReferenceScorer, agreement, check_indices, check_row
from vllm_cos.quality.report import findings, plot, table
from vllm_cos.quality.rows import DEFAULT_ROLES, ROLES, model_paths, plan_rows, run_row
from vllm_cos.quality.scoring import nll, summarize
from vllm_cos.quality.texts import DOMAINS, select_windows

REPO_ROOT = Path(__file__).resolve().parents[2]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("", "none") else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quality.py", description=__doc__)
    p.add_argument("--models", default=str(REPO_ROOT.parent / "shared" / "models"),
                   help="model zoo (default ../shared/models); its metadata.json names the training data")
    p.add_argument("--out", default=str(REPO_ROOT / "bench_out" / "quality"),
                   help="output folder (default bench_out/quality)")
    p.add_argument("--windows", type=int, default=40, help="windows per domain")
    p.add_argument("--window-tokens", type=int, default=256, help="tokens per window")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--lambdas", type=_floats, default=_floats("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"),
                   help="WE weights of expert-a (1 - lambda on expert-b), comma separated")
    p.add_argument("--alternate-lambda", type=_optional_float, default=0.5,
                   help="the lambda also run under alternate ('none': no alternate row)")
    p.add_argument("--mus", type=_floats, default=_floats("0.1,0.3,0.5"), help="CD mu grid")
    p.add_argument("--tree", default=str(REPO_ROOT / "configs" / "cosd-tree.json"),
                   help="CoSD tree verifier JSON ('' : no tree row)")
    p.add_argument("--check-windows", type=int, default=2, help="windows per row cross-checked with transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata", default=None, help="training metadata (default: MODELS/metadata.json)")
    for role in ROLES:
        p.add_argument(f"--{role.replace('_', '-')}", dest=role, default=DEFAULT_ROLES[role],
                       help=f"model folder of the {role.replace('_', ' ')} (default {DEFAULT_ROLES[role]})")
    args = p.parse_args(argv)
    if args.window_tokens + 1 > args.max_model_len:
        p.error(f"--window-tokens {args.window_tokens} + 1 generated token exceed --max-model-len {args.max_model_len}")
    return args


def load_windows(args, paths: dict) -> list:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths[args.expert_a], model_max_length=1 << 30)
    prefix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    metadata = args.metadata or str(Path(args.models) / "metadata.json")
    if not Path(metadata).is_file():
        raise SystemExit(f"quality: {metadata} not found (the training data's package groups; --metadata)")
    return select_windows(lambda text: tokenizer.encode(text, add_special_tokens=False), args.windows,
                          args.window_tokens, args.seed, metadata, args.tree or None, prefix=prefix)


def score_rows(args, rows, windows, paths) -> list[dict]:
    """Each row through its engine, then its cross-check; one result dict per row."""
    scorer = ReferenceScorer(paths)
    indices = check_indices(windows, args.check_windows)
    results = []
    for n, row in enumerate(rows, 1):
        scores, timing = run_row(row, windows, args.max_model_len, seed=args.seed)
        check = check_row(scorer, row, scores, windows, indices)
        result = {"label": row.label, "kind": row.kind, "value": row.value, "schedule": row.schedule,
                  "nll": row.nll, "members": list(row.members), "spec": row.spec,
                  "summary": summarize(scores, windows, DOMAINS), "check": check, "timing": timing,
                  "per_window_nll": [nll(s) for s in scores],
                  "per_window_top1": [sum(s.hits(w.token_ids)) / len(s.top1) for s, w in zip(scores, windows)],
                  "_scores": scores}
        results.append(result)
        print(progress_line(n, len(rows), result), flush=True)
    return results


def progress_line(n: int, total: int, result: dict) -> str:
    mixed, check, timing = result["summary"]["mixed"], result["check"], result["timing"]
    nll_text = f"NLL {mixed['nll']:.4f} " if result["nll"] else ""
    worst = "" if check["worst_nll_diff"] is None else f"worst window |ΔNLL| {check['worst_nll_diff']:.2e}, "
    return (f"[{n}/{total}] {result['label']}: mixed {nll_text}top-1 {mixed['top1']:.4f} "
            f"({timing['start_s'] + timing['score_s']:.0f} s); reference check: {worst}top-1 mismatches "
            f"{check['top1_mismatches']} -> {'ok' if check['ok'] else 'FAILED'}")


def alternate_agreement(results: list[dict]) -> dict | None:
    """WE under alternate vs the same lambda under standard."""
    alt = [r for r in results if r["kind"] == "we" and r["schedule"] == "alternate"]
    if not alt:
        return None
    std = [r for r in results if r["kind"] == "we" and r["schedule"] == "standard" and r["value"] == alt[0]["value"]]
    if not std:
        return None
    return {"lambda": alt[0]["value"], **agreement(alt[0]["_scores"], std[0]["_scores"])}


def write_outputs(args, windows, results, extra: dict) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experts = (args.expert_a, args.expert_b)
    md = table(results)
    notes = findings(results, experts)
    (out / "quality.md").write_text(
        f"# Quality: teacher-forced NLL (nats/token) and top-1 accuracy\n\n{len(windows) // len(DOMAINS)} windows "
        f"x {args.window_tokens} tokens per domain; CoSD: top-1 only (its prompt logprobs are no NLL).\n\n"
        f"{md}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    data = {"settings": {k: v for k, v in vars(args).items()}, **extra,
            "windows": [{"domain": w.domain, "source": w.source, "file": w.file, "start": w.start,
                         "tokens": len(w.token_ids)} for w in windows],
            "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results], "findings": notes}
    (out / "quality.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    message = plot(results, experts, out / "quality_nll_vs_lambda.png")
    return f"{md}\n\n" + "\n".join(notes) + f"\n\n{message}\nwritten: {out / 'quality.md'}, {out / 'quality.json'}"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    start = time.perf_counter()
    paths = model_paths(args.models, vars(args))
    windows = load_windows(args, paths)
    rows = plan_rows(vars(args), paths, args.lambdas, args.alternate_lambda, args.mus, args.tree or None)
    print(f"quality: {len(windows)} windows ({args.windows} per domain x {args.window_tokens} tokens), "
          f"{len(rows)} rows, one engine each", flush=True)
    results = score_rows(args, rows, windows, paths)
    alt = alternate_agreement(results)
    failed = [r["label"] for r in results if not r["check"]["ok"]] + (["alternate vs standard"]
                                                                      if alt and not alt["ok"] else [])
    checks = [r["check"] for r in results]
    extra = {"alternate_vs_standard": alt, "seconds": round(time.perf_counter() - start, 1),
             "worst_reference_nll_diff": max((c["worst_nll_diff"] for c in checks if c["worst_nll_diff"] is not None),
                                             default=None),
             "reference_top1_mismatches": sum(c["top1_mismatches"] for c in checks), "failed_checks": failed}
    print(write_outputs(args, windows, results, extra))
    worst = extra["worst_reference_nll_diff"]
    print(f"reference cross-check ({args.check_windows} windows per row): worst window |ΔNLL| "
          f"{'—' if worst is None else f'{worst:.2e}'} (tolerance 2e-3), top-1 mismatches "
          f"{extra['reference_top1_mismatches']}; WE alternate vs standard: {alt}")
    print(f"total {extra['seconds']:.0f} s")
    if failed:
        print(f"quality: cross-check FAILED for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

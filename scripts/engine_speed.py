#!/usr/bin/env python
"""Tokens/s of CoS schedules in the vLLM engine (offline ``LLM``, CPU build), batch 1 or B.

    .venv/bin/python scripts/engine_speed.py --models models/tiny \
        --schedules standard alternate --rule we --max-tokens 128 --requests 8
    # adaptive draft length at batch 8 (each generate call sends 8 requests at once):
    .venv/bin/python scripts/engine_speed.py --models ../shared/models --gamma auto --batch 8
    # three collaborators (equal-weight ensemble), one draft token each (the paper's setting):
    .venv/bin/python scripts/engine_speed.py --models models/tiny --collaborators large medium small --gamma 1
    # a cos.yaml as it is (e.g. a trained drafter), sampled at T = 1:
    .venv/bin/python scripts/engine_speed.py --config cos.yaml --schedules standard naive --temperature 1

Each schedule runs in its own child process (one engine per process).  The children run
with ``LD_PRELOAD`` = Intel OpenMP (``libiomp5.so`` from the venv's ``intel-openmp``) and
tcmalloc (Debian ``libtcmalloc-minimal4``), as vLLM recommends for CPU inference; a library
that is missing is skipped with a message (``apt-get install libtcmalloc-minimal4``,
``pip install intel-openmp``).  Requests are sent one at a time (batch 1), greedy unless ``--temperature``,
``ignore_eos``; the first request of each engine is a warm-up and is not timed.
Prints one line per schedule and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEXTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
         "return self.", "if __name__ == '__main__':\n", "with open(path) as f:\n", "raise ValueError("]
RULES = {"we": {"name": "weighted_ensemble"},  # equal weights
         "cd": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.5}}


def preload_libraries() -> tuple[list[str], list[str]]:
    """(libraries found, messages about missing ones)."""
    found, missing = [], []
    venv_lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    if venv_lib.exists():
        found.append(str(venv_lib))
    else:
        missing.append(f"Intel OpenMP not found at {venv_lib} (pip install intel-openmp); skipped")
    for candidate in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                      "/usr/lib/libtcmalloc_minimal.so.4"):
        if Path(candidate).exists():
            found.append(candidate)
            break
    else:
        missing.append("tcmalloc not found (apt-get install libtcmalloc-minimal4); skipped")
    return found, missing


def cos_spec(args) -> tuple[dict, str]:
    """(the speculative_config dict for ``args.child``'s schedule, the served model's path)."""
    if args.config:  # a cos.yaml as it is, with the schedule replaced
        from vllm_cos.config import load_config

        cfg = load_config(args.config)
        return dict(cfg.to_dict(), schedule=args.child), next(m.path for m in cfg.models if m.name == cfg.target)
    models = Path(args.models).resolve()
    served = args.collaborators[0]
    if args.gamma == "auto":
        spec = {"models": [{"name": name, "path": str(models / name)} for name in args.collaborators], "gamma": "auto"}
    else:
        spec = {"models": [{"name": name, "path": str(models / name), "gamma": 1 if name == served else int(args.gamma)}
                           for name in args.collaborators]}
    spec.update(rule=RULES[args.rule], schedule=args.child)
    return spec, str(models / served)


def run_child(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec, served_path = cos_spec(args)
    llm = LLM(model=served_path, speculative_config=spec, dtype="float32", enforce_eager=True,
              max_model_len=512, max_num_seqs=max(4, args.batch), gpu_memory_utilization=0.2, seed=0,
              enable_prefix_caching=False)
    tok = AutoTokenizer.from_pretrained(served_path)
    prompts = [tok.encode(TEXTS[i % len(TEXTS)], add_special_tokens=False)
               for i in range(args.batch * (args.requests + 1))]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    for warm in batches[:1] * (3 if args.gamma == "auto" else 1):  # warm-up (auto: measures its costs)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in warm], params, use_tqdm=False)
    stats_before = None
    if args.child != "standard":
        from vllm_cos.offline import cos_stats

        stats_before = cos_stats(llm)[0]
    tokens, seconds, cpu_seconds = 0, 0.0, 0.0
    for batch in batches[1:]:
        start, cpu_start = time.perf_counter(), time.process_time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    # process CPU time (all threads; the engine runs in this process) is less sensitive than
    # wall time to other load on a shared machine
    result = {"schedule": args.child, "rule": args.rule, "gamma": args.gamma, "batch": args.batch,
              "config": args.config, "temperature": args.temperature,
              "requests": args.requests * args.batch, "tokens": tokens,
              "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
              "cpu_seconds": round(cpu_seconds, 3), "tokens_per_cpu_s": round(tokens / cpu_seconds, 2),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    if stats_before is not None:
        from vllm_cos.offline import cos_stats

        after = cos_stats(llm)[0]
        d = {k: after[k] - stats_before[k] for k in ("steps", "draft_forwards", "drafts_proposed", "drafts_accepted",
                                                      "served_proposed", "served_accepted", "tokens_emitted", "row_steps")}
        proposed = d["drafts_proposed"] + d["served_proposed"]
        result.update(acceptance_rate=round((d["drafts_accepted"] + d["served_accepted"]) / max(proposed, 1), 3),
                      draft_acceptance=round(d["drafts_accepted"] / max(d["drafts_proposed"], 1), 3),
                      mean_accepted_length=round(d["tokens_emitted"] / max(d["row_steps"], 1), 3),
                      mean_tokens_per_step=round(d["tokens_emitted"] / max(d["steps"], 1), 3),
                      forwards_served=d["steps"], forwards_draft_group=d["draft_forwards"])
    else:
        result.update(forwards_served=tokens, forwards_draft_group=0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.environ.get("VLLM_COS_MODELS_DIR", "models/tiny"))
    parser.add_argument("--schedules", nargs="+", default=["standard", "alternate"])
    parser.add_argument("--rule", choices=list(RULES), default="we")
    parser.add_argument("--collaborators", nargs="+", default=["large", "small"],
                        help="model directories under --models; the first one is served")
    parser.add_argument("--gamma", default="3", help="draft tokens of each non-served model per step, or 'auto'")
    parser.add_argument("--batch", type=int, default=1, help="requests per generate call (all at once)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the engine")
    parser.add_argument("--config", help="a cos.yaml used as it is (its models, rule, gammas and proposer); each "
                        "--schedules entry replaces its schedule, and --models/--collaborators/--rule/--gamma are unused")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0

    if args.rule == "cd" and len(args.collaborators) != 2 and not args.config:
        parser.error("--rule cd takes exactly two --collaborators")
    if args.config:
        from vllm_cos.config import ConfigError, load_config

        try:
            load_config(args.config)
        except (ConfigError, OSError) as exc:
            parser.error(f"--config {args.config}: {exc}")
    libs, messages = preload_libraries()
    for m in messages:
        print(f"engine_speed: {m}", file=sys.stderr)
    env = dict(os.environ)
    if libs:
        env["LD_PRELOAD"] = ":".join(libs + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"engine_speed: LD_PRELOAD={env.get('LD_PRELOAD', '')}", file=sys.stderr)
    results = []
    for schedule in args.schedules:
        cmd = [sys.executable, __file__, "--child", schedule, "--models", args.models, "--rule", args.rule,
               "--collaborators", *args.collaborators,
               "--gamma", str(args.gamma), "--batch", str(args.batch), "--max-tokens", str(args.max_tokens), "--requests", str(args.requests),
               "--temperature", str(args.temperature)] + (["--config", args.config] if args.config else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            print(f"engine_speed: {schedule} failed (rc {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(line[len("RESULT "):])
        results.append(result)
        extra = ""
        if "acceptance_rate" in result:
            extra = (f", acceptance {result['acceptance_rate']} (drafts {result['draft_acceptance']}), mean accepted length "
                     f"{result['mean_accepted_length']}, tokens per engine step {result['mean_tokens_per_step']}")
        cpu = (f", {result['tokens_per_cpu_s']} tok/CPU-s, load {result['load_avg_1m']}"
               if "tokens_per_cpu_s" in result else "")
        print(f"{schedule:9s} {result['tokens_per_s']:8.2f} tok/s ({result['tokens']} tokens in "
              f"{result['seconds']} s{cpu}, forwards served={result['forwards_served']} "
              f"draft group={result['forwards_draft_group']}"
              f"{extra})", flush=True)
    by = {r["schedule"]: r for r in results}
    if "standard" in by:
        for r in results:
            r["speedup_vs_standard"] = round(r["tokens_per_s"] / by["standard"]["tokens_per_s"], 3)
            if "tokens_per_cpu_s" in r and "tokens_per_cpu_s" in by["standard"]:
                r["cpu_speedup_vs_standard"] = round(r["tokens_per_cpu_s"] / by["standard"]["tokens_per_cpu_s"], 3)
    print(json.dumps({"ld_preload": env.get("LD_PRELOAD", ""), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

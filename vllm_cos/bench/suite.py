"""One benchmark run: :func:`main` (the command line), the progress bar and the prompts' tokens."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Sequence

from vllm_cos.bench.engine_rows import run_engine_group
from vllm_cos.bench.environment import default_threads, load_average, maybe_reexec
from vllm_cos.bench.jobs import _models, engine_groups, job_measurements, plan
from vllm_cos.bench.peers import count_peer_measurements, run_peers
from vllm_cos.bench.report import column_notes, replot, write_outputs, write_plots
from vllm_cos.bench.rows import Row, cost_ratios, derive
from vllm_cos.bench.settings import PROMPTS, Settings, parse_args


def tokenize_prompts(models: dict, settings: Settings) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["target"])
    return {name: [tok.encode(t, add_special_tokens=False) for t in PROMPTS[name][: settings.prompts_per_set]]
            for name in settings.prompt_sets}


class _NoBar:
    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k):
        self.n += k
        print(f"bench: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def set_description(self, text):
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def close(self):
        pass


def progress_bar(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return _NoBar(total)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    warnings = [] if args.no_reexec else maybe_reexec(argv, args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", default_threads()))
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    load_start = load_average()
    models = _models(settings)
    prompt_ids = tokenize_prompts(models, settings)
    jobs = plan(settings, models)
    total = sum(len(job_measurements(j, settings)) for j in jobs) + count_peer_measurements(settings)
    progress = progress_bar(total)
    rows: list[Row] = []
    try:
        if settings.peers:  # before any engine: vLLM's CPU worker pins threads for the process
            rows += run_peers(models, settings, prompt_ids, progress, threads)
        for group in engine_groups(jobs, settings.side_by_side):
            rows += run_engine_group(group, models, settings, prompt_ids, progress)
    finally:
        progress.close()
    derive(rows, args.clock)
    duration = time.perf_counter() - t0
    meta = {
        "preset": settings.preset, "command": "python -m vllm_cos.bench " + " ".join(argv),
        "started": started, "duration_s": round(duration, 1), "models": models["_names"],
        "model_paths": {k: v for k, v in models.items() if k != "_names"},
        "target": settings.target, "small": settings.small, "third": models["_names"].get("third"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "threads": threads, "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "load_avg_start": load_start, "load_avg_end": load_average(), "warnings": warnings,
        "settings": asdict(settings),
        "clock": args.clock,
        "c_by_batch": {b: round(c, 3) for b, c in cost_ratios(rows, args.clock).items()},
        "notes": "; ".join(f"{k}: {v}" for k, v in column_notes(args.clock).items()),
    }
    paths = write_outputs(settings.out, rows, meta)
    plots = write_plots(settings.out, rows) if settings.plots else "plots disabled"
    if isinstance(plots, str):
        print(f"bench: {plots}", file=sys.stderr)
    print(paths["md"].read_text())
    print(f"bench: wrote {paths['json']}, {paths['md']}"
          + ("" if isinstance(plots, str) else ", " + ", ".join(str(p) for p in plots)))
    print(f"bench: {settings.preset} preset took {duration:.0f} s (load average {load_average()})")
    return 0

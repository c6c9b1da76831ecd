"""Presets, prompt sets and the command line of ``python -m vllm_cos.bench``: :class:`Settings`."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Sequence

from vllm_cos.bench.rows import CLOCKS

PRESETS: dict[str, dict[str, Any]] = {
    # an engine smoke run (tests): one rule, one schedule pair (fixed gamma and auto), tiny budgets
    "smoke": dict(batch_sizes=[1], temperatures=[1.0], lambdas=[0.5], mus=[], gammas=[], gamma=2,
                  schedules=["standard", "alternate"], prompt_sets=["code"], prompts_per_set=1,
                  max_tokens=16, three_models=False, peers=False, sd=False, single=True, rule_temperatures=None,
                  repeats=1, peer_batches=[1], gamma_schedules=["alternate"], swap_proposer=False,
                  auto_gamma=True, sd_batches=[1], side_by_side=3),
    # the acceptance targets, batch 1, 8 and 32 (32: the main rows, not sd / peers / the gamma grid)
    "quick": dict(batch_sizes=[1, 8, 32], temperatures=None, lambdas=[0.5], mus=[0.1], gammas=[1, 2, 3],
                  gamma=3, schedules=["standard", "naive", "alternate"], prompt_sets=["code", "prose"],
                  prompts_per_set=3, max_tokens=96, three_models=True, peers=True, sd=True, single=True,
                  rule_temperatures={"we": [1.0], "cd": [0.0]}, repeats=3,
                  peer_batches=[1, 8], gamma_schedules=["alternate"], swap_proposer=True,
                  auto_gamma=True, sd_batches=[1, 8], side_by_side=6),
    # the paper's main rows on forward-dominated models (--models models/wide, scripts/widen_models.py):
    # short generations, one prompt set, no peers / grid / swapped proposer
    "paper": dict(batch_sizes=[1, 8], temperatures=None, lambdas=[0.5], mus=[0.1], gammas=[], gamma=3,
                  schedules=["standard", "naive", "alternate"], prompt_sets=["code"], prompts_per_set=2,
                  max_tokens=32, three_models=True, peers=False, sd=True, single=True,
                  rule_temperatures={"we": [1.0], "cd": [0.0]}, repeats=2, peer_batches=[1],
                  gamma_schedules=["alternate"], swap_proposer=False, auto_gamma=True, sd_batches=[1, 8],
                  side_by_side=6),
    # everything in the issue
    "full": dict(batch_sizes=[1, 8, 32], temperatures=None, lambdas=[0.1, 0.3, 0.5, 0.7, 0.9],
                 mus=[0.1, 0.3], gammas=[1, 2, 3, 4, 5, 6], gamma=3,
                 schedules=["standard", "naive", "alternate"], prompt_sets=["code", "prose"],
                 prompts_per_set=4, max_tokens=128, three_models=True, peers=True, sd=True, single=True,
                 rule_temperatures=None, repeats=3, peer_batches=[1, 8],
                 gamma_schedules=["naive", "alternate"], swap_proposer=True, auto_gamma=True,
                 sd_batches=[1, 8, 32], side_by_side=6),
}
# auto_gamma: next to each fixed-gamma naive / alternate row of the main configurations (WE
# lambda=0.5, CD mu=0.1, 3-model WE) a row with cos.yaml ``gamma: auto``, at every batch size.
# side_by_side: at most this many engines of one rule configuration run at once and take turns on
# every repetition (vllm_cos.bench.jobs.engine_groups); 1: one engine at a time.
# sd_batches: the batch sizes of the plain speculative decoding rows (within --batch-sizes).
# swap_proposer: also run WE naive / alternate with the roles swapped (the small model served,
# the large one drafting; batch 1, first prompt set): the lambda plot's second proposer choice.
# temperatures: for single / sd rows; rule_temperatures: per rule (None: = temperatures);
# temperatures None: DEFAULT_TEMPERATURES
DEFAULT_TEMPERATURES = [0.0, 1.0]

PROMPTS = {
    "code": [
        "import os\nimport sys\n\n\ndef main(argv):\n    ",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
        "import numpy as np\n\n\ndef normalize(x, axis=-1):\n    ",
        "for i, line in enumerate(open(path)):\n    if line.startswith('#'):\n",
        "def parse_args():\n    parser = argparse.ArgumentParser(description=",
    ],
    "prose": [
        "The history of the city begins in the early middle ages, when",
        "In this tutorial we explain how to install the package and",
        "Dear colleagues, thank you for coming to the meeting today. We will",
        "The weather was cold and the streets were empty when she",
        "Our results show that the proposed method is faster than",
        "Once upon a time there was a small village near the river, and",
    ],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_cos.bench", description=_package_doc().split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="= --preset quick")
    p.add_argument("--full", dest="preset", action="store_const", const="full", help="= --preset full")
    p.add_argument("--models", default=None,
                   help="directory of HF models sharing a tokenizer (default: the trained tiny models, "
                        "built and cached by vllm_cos.tiny_models)")
    p.add_argument("--target", default="large", help="served model (a name in --models)")
    p.add_argument("--small", default="small", help="proposer / draft model (a name in --models)")
    p.add_argument("--third", default=None,
                   help="third model for 3-model configs (default: the first other model dir found)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--batch-sizes", type=_int_list, default=None)
    p.add_argument("--gammas", type=_int_list, default=None,
                   help="gamma grid (batch 1, first prompt set; WE lambda=0.5 and CD first mu)")
    p.add_argument("--gamma", type=int, default=None, help="gamma of the proposer elsewhere")
    p.add_argument("--lambdas", type=_float_list, default=None)
    p.add_argument("--mus", type=_float_list, default=None)
    p.add_argument("--temperatures", type=_float_list, default=None,
                   help="temperatures for every method (default: the preset's; quick: WE T=1, CD T=0)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--prompts-per-set", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per measurement; tok/s is the best (least disturbed) one")
    p.add_argument("--prompt-sets", type=_str_list, default=None)
    p.add_argument("--side-by-side", type=int, default=None, metavar="N",
                   help="engines of one rule configuration started together, taking turns on every "
                        "repetition (default: the preset's; 1: one engine at a time)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-auto", action="store_true", help="skip the gamma: auto rows")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-reexec", action="store_true", help="do not re-exec with LD_PRELOAD / thread settings")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP / torch threads (default: 1 on <= 4 cores, else half the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", metavar="BENCH_JSON", default=None,
                   help="only rewrite the markdown and plots of an earlier run's bench.json (no engines)")
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="clock for speedups, c and targets: cpu (process CPU time, robust to other "
                        "load on a shared box; default) or wall")
    return p


def _package_doc() -> str:
    """The first line of the package docstring is the command's description."""
    return importlib.import_module(__package__).__doc__


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class Settings:
    preset: str
    models_dir: str | None
    target: str
    small: str
    third: str | None
    out: str
    batch_sizes: list[int]
    gammas: list[int]
    gamma: int
    lambdas: list[float]
    mus: list[float]
    temperatures: list[float] | None
    max_tokens: int
    prompts_per_set: int
    prompt_sets: list[str]
    schedules: list[str]
    three_models: bool
    peers: bool
    sd: bool
    single: bool
    rule_temperatures: dict | None
    repeats: int
    peer_batches: list[int]
    gamma_schedules: list[str]
    swap_proposer: bool
    auto_gamma: bool
    sd_batches: list[int]
    side_by_side: int
    plots: bool
    seed: int


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    preset = dict(PRESETS[args.preset])

    def pick(name, arg_name=None):
        value = getattr(args, arg_name or name)
        return preset[name] if value is None else value

    settings = Settings(
        preset=args.preset, models_dir=args.models, target=args.target, small=args.small,
        third=args.third, out=args.out, batch_sizes=pick("batch_sizes"), gammas=pick("gammas"),
        gamma=pick("gamma"), lambdas=pick("lambdas"), mus=pick("mus"),
        temperatures=pick("temperatures"), max_tokens=pick("max_tokens"),
        prompts_per_set=pick("prompts_per_set"), prompt_sets=pick("prompt_sets"),
        schedules=list(preset["schedules"]), three_models=preset["three_models"],
        peers=preset["peers"] and not args.no_peers, sd=preset["sd"], single=preset["single"],
        rule_temperatures=preset["rule_temperatures"] if args.temperatures is None else None,
        repeats=pick("repeats"), peer_batches=list(preset["peer_batches"]), swap_proposer=preset["swap_proposer"],
        gamma_schedules=list(preset["gamma_schedules"]), auto_gamma=preset["auto_gamma"] and not args.no_auto,
        sd_batches=list(preset["sd_batches"]), side_by_side=pick("side_by_side"), plots=not args.no_plots,
        seed=args.seed)
    for name in settings.prompt_sets:
        if name not in PROMPTS:
            raise SystemExit(f"bench: unknown prompt set {name!r} (known: {', '.join(PROMPTS)})")
    if settings.gamma < 1 or any(g < 1 for g in settings.gammas):
        raise SystemExit("bench: gammas must be >= 1")
    if any(not 0.0 < lam < 1.0 for lam in settings.lambdas):
        raise SystemExit("bench: lambdas must be in (0, 1)")
    if settings.side_by_side < 1:
        raise SystemExit("bench: --side-by-side must be >= 1")
    if settings.repeats < 1:
        raise SystemExit("bench: repeats must be >= 1")
    if any(b < 1 for b in settings.batch_sizes):
        raise SystemExit("bench: batch sizes must be >= 1")
    return settings, args

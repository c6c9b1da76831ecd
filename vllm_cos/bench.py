"""CoS benchmark suite: ``python -m vllm_cos.bench`` (or ``scripts/bench.py``).

One run measures, on the same vLLM engine settings and the same models:

* ``single``    - the served model alone (and the proposer alone, to measure c);
* ``sd``        - plain speculative decoding of the served model (vLLM ``draft_model``,
                  the small model drafts from its own distribution);
* ``standard``  - standard collaborative decoding (every model once per token);
* ``naive``     - naive CoS (fixed proposer = the small model, gamma drafts);
* ``alternate`` - CoS with the alternate proposal framework (APF);
* for WE, ``naive`` / ``alternate`` once more with the roles swapped (the small model served,
  the large one proposing; column ``proposer``): the second proposer choice of the lambda plot;

for weighted ensembles (lambda grid with 2 models; equal weights with 3 models) and
contrastive decoding (mu in {0.1, 0.3}), temperatures 0 and 1, a gamma grid, batch sizes
(concurrent requests through ``LLM.generate``) and prompt sets (code, prose).  Peers:
``ref_standard`` (:class:`vllm_cos.reference.ReferenceDecoder`, a plain transformers loop doing
standard collaborative decoding with KV caches) and ``hf_ensemble`` (transformers' assisted
generation with ``assistant_ensemble_weight``, a static 2-model ensemble verification).

Output (``--out``, default ``bench_out/``): ``bench.json`` (every figure and the environment),
``bench.md`` (tables), PNG plots (speedup vs lambda per proposer choice, vs gamma, vs batch
size) when matplotlib is importable.

Clocks: every measurement records wall time and this process's CPU time (``time.process_time``,
all threads).  With one OpenMP thread and the engine in-process (no engine-core subprocess) CPU
time is the work done and excludes the time other processes held the cores, so on the shared
dev box speedups, c and the targets use it (``--clock cpu``, default; ``--clock wall`` for an
idle machine, where the two agree).  Both tok/s columns are in the table.

Timing: every measurement is repeated (``--repeats``, 3 in quick/full) with the same seeds and
tok/s is the fastest repetition (the least disturbed by other processes); all repetitions are in
the JSON.  The 1-minute load average is recorded with every row.  Performance environment: the
bench re-execs itself with ``LD_PRELOAD`` = tcmalloc (if installed; a warning otherwise) + Intel
OpenMP (``libiomp5.so`` of the venv's intel-openmp), ``OMP_NUM_THREADS`` (``--threads``, see
:func:`default_threads`), ``KMP_BLOCKTIME=1`` and ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
(``--no-reexec`` skips this).  Engines: float32, eager, prefix caching off, 256 MiB KV cache.

Durations on the 2-core dev box (1 thread): ``--preset smoke`` 40-60 s (4 engines);
``--quick`` 5.8 min measured at load 1 (7.3 min at load 4-6; 18 engine starts, 57 engine
measurements + 10 peer measurements, 3 repetitions each); ``--full`` 57 min measured at load 1 (57 engine
starts, 321 engine + 76 peer measurements with longer generations).

Theory (what ``predicted`` means)
---------------------------------
Two models: the served model M_p (the verifier) with forward time t_p and the proposer M_q
with forward time t_q; the cost ratio is ``c = t_q / t_p``.  We measure t_p and t_q as the
per-token decode time of each model served alone by the same engine settings at the same
batch size (``single`` rows), so c includes the engine's per-step overhead.

Assumptions shared by both formulas (the paper's): (A1) each draft is accepted independently
with the same probability alpha (so the accepted prefix length is a truncated geometric
variable); (A2) a forward pass that scores gamma+1 tokens costs as much as one that scores one
token; (A3) time outside model forwards (sampling, verification, scheduling) is negligible.

Standard collaborative decoding runs both models once per token: ``t_p + t_q = t_p (1 + c)``
per token.

Theorem 3.1 (naive CoS).  A round: M_q drafts gamma tokens (gamma forwards), M_p scores them in
one forward, and because r at the position after the drafts needs both distributions, M_q
scores that position too (one more forward), so a round costs ``t_p + (gamma + 1) t_q``.  The
round emits the accepted prefix plus one token (the residual sample at the first rejection,
or a sample from r after gamma acceptances): ``E[tokens] = (1 - alpha^(gamma+1)) / (1 - alpha)``.
Hence the speedup over standard collaborative decoding::

    S_naive = (1 - alpha^(gamma+1)) (1 + c) / ((1 - alpha) (1 + (gamma + 1) c))

Theorem 3.6 (APF, two models).  M_p's verification forward also yields a bonus token b
sampled from its own p (not from r); b is the first proposal of the next round and M_q scores
it in the same forward in which it starts drafting, so a round costs ``t_p + gamma t_q`` --
unless b is rejected (probability ``1 - beta``, beta = acceptance of p-proposals under r), in
which case the residual token must be fed to M_q once more (``+ t_q``).  b exists when all
gamma drafts were accepted (``alpha^gamma``).  Counting b's position in the round that made it,
a round again emits ``(1 - alpha^(gamma+1)) / (1 - alpha)`` tokens in expectation, so::

    S_apf = (1 - alpha^(gamma+1)) (1 + c) / ((1 - alpha) (1 + gamma c + alpha^gamma (1 - beta) c))

With beta = alpha (the paper's single acceptance rate) this is the APF formula; with gamma = 1
and alpha = 0 it is 1 (never slower than standard).  alpha = 1 is the limit (gamma + 1).
Note on this engine: its ``naive`` schedule feeds M_p's bonus token to M_q speculatively as a
placeholder for the r-sample (DESIGN.md), so it pays the extra M_q pass only when the r-sample
differs -- measured/predicted > 1 for naive rows is expected.

Measured quantities: alpha from vLLM's per-position acceptance counters, alpha_hat =
accepted / (accepted + rejections) where rejections = rounds that did not accept all drafts
(the maximum-likelihood estimate under A1; ``alpha_raw`` = accepted / drafted is also
reported); beta = served_accepted / served_proposed from the CoS counters
(:func:`vllm_cos.offline.cos_stats`); per-position acceptance ``a_i / a_(i-1)`` (a_0 = rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from vllm_cos.offline import shutdown_llm

REEXEC_FLAG = "VLLM_COS_BENCH_ENV"

# ------------------------------------------------------------------------------------ theory


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """E[tokens emitted per round] = (1 - alpha^(gamma+1)) / (1 - alpha) (= gamma + 1 at alpha 1)."""
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def theorem_3_1(alpha: float, gamma: int, c: float) -> float:
    """Naive CoS speedup over standard collaborative decoding (module docstring)."""
    return expected_tokens_per_round(alpha, gamma) * (1.0 + c) / (1.0 + (gamma + 1) * c)


def theorem_3_6(alpha: float, gamma: int, c: float, beta: float | None = None) -> float:
    """APF speedup over standard collaborative decoding (module docstring); beta defaults to alpha."""
    beta = alpha if beta is None else beta
    cost = 1.0 + gamma * c + (alpha ** gamma) * (1.0 - beta) * c
    return expected_tokens_per_round(alpha, gamma) * (1.0 + c) / cost


def acceptance_from_counters(num_rounds: int, accepted_per_pos: Sequence[int]) -> dict:
    """alpha_hat, alpha_raw and per-position acceptance from vLLM-style spec-decode counters.

    ``num_rounds``: verification rounds with drafts; ``accepted_per_pos[i]``: rounds whose draft
    i (0-based) was accepted (so the sequence is non-increasing)."""
    gamma = len(accepted_per_pos)
    accepted = int(sum(accepted_per_pos))
    if num_rounds <= 0 or gamma == 0:
        return {"alpha_hat": None, "alpha_raw": None, "per_position": []}
    rejections = num_rounds - int(accepted_per_pos[-1])
    per_pos, prev = [], num_rounds
    for a in accepted_per_pos:
        per_pos.append(a / prev if prev else None)
        prev = a
    denominator = accepted + rejections
    return {"alpha_hat": accepted / denominator if denominator else None,
            "alpha_raw": accepted / (num_rounds * gamma),
            "per_position": per_pos}


# ------------------------------------------------------------------------------------ presets

PRESETS: dict[str, dict[str, Any]] = {
    # an engine smoke run (tests): one rule, one schedule pair, tiny budgets
    "smoke": dict(batch_sizes=[1], temperatures=[1.0], lambdas=[0.5], mus=[], gammas=[], gamma=2,
                  schedules=["standard", "alternate"], prompt_sets=["code"], prompts_per_set=1,
                  max_tokens=16, three_models=False, peers=False, sd=False, single=True, rule_temperatures=None,
                  repeats=1, peer_batches=[1], gamma_schedules=["alternate"], swap_proposer=False),
    # the acceptance targets, batch 1 and 8, both prompt sets (< 10 min on 2 cores)
    "quick": dict(batch_sizes=[1, 8], temperatures=None, lambdas=[0.5], mus=[0.1], gammas=[1, 2, 3],
                  gamma=3, schedules=["standard", "naive", "alternate"], prompt_sets=["code", "prose"],
                  prompts_per_set=3, max_tokens=96, three_models=True, peers=True, sd=True, single=True,
                  rule_temperatures={"we": [1.0], "cd": [0.0]}, repeats=3,
                  peer_batches=[1, 8], gamma_schedules=["alternate"], swap_proposer=True),
    # everything in the issue
    "full": dict(batch_sizes=[1, 8, 32], temperatures=None, lambdas=[0.1, 0.3, 0.5, 0.7, 0.9],
                 mus=[0.1, 0.3], gammas=[1, 2, 3, 4, 5, 6], gamma=3,
                 schedules=["standard", "naive", "alternate"], prompt_sets=["code", "prose"],
                 prompts_per_set=4, max_tokens=128, three_models=True, peers=True, sd=True, single=True,
                 rule_temperatures=None, repeats=3, peer_batches=[1, 8],
                 gamma_schedules=["naive", "alternate"], swap_proposer=True),
}
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


# ------------------------------------------------------------------------------------ arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_cos.bench", description=__doc__.split("\n")[0])
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
    p.add_argument("--no-peers", action="store_true")
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
        gamma_schedules=list(preset["gamma_schedules"]), plots=not args.no_plots, seed=args.seed)
    for name in settings.prompt_sets:
        if name not in PROMPTS:
            raise SystemExit(f"bench: unknown prompt set {name!r} (known: {', '.join(PROMPTS)})")
    if settings.gamma < 1 or any(g < 1 for g in settings.gammas):
        raise SystemExit("bench: gammas must be >= 1")
    if any(not 0.0 < lam < 1.0 for lam in settings.lambdas):
        raise SystemExit("bench: lambdas must be in (0, 1)")
    if settings.repeats < 1:
        raise SystemExit("bench: repeats must be >= 1")
    if any(b < 1 for b in settings.batch_sizes):
        raise SystemExit("bench: batch sizes must be >= 1")
    return settings, args


# ------------------------------------------------------------------------------------ environment

def _find_iomp() -> str | None:
    for base in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        candidate = base / "libiomp5.so"
        if candidate.is_file():
            return str(candidate)
    return None


def _find_tcmalloc() -> str | None:
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so"):
            candidate = Path(d) / name
            if candidate.exists():
                return str(candidate)
    return None


def performance_env(threads: int | None = None, base: dict | None = None) -> tuple[dict, list[str]]:
    """The environment the bench runs under, and warnings for what could not be set."""
    env = dict(os.environ if base is None else base)
    warnings = []
    preload = [x for x in env.get("LD_PRELOAD", "").split(":") if x]
    tcmalloc, iomp = _find_tcmalloc(), _find_iomp()
    if tcmalloc is None:
        warnings.append("tcmalloc not found (apt-get install -y libtcmalloc-minimal4); running without it")
    elif tcmalloc not in preload:
        preload.insert(0, tcmalloc)
    if iomp is None:
        warnings.append("libiomp5.so not found in the venv (pip install intel-openmp); running with GNU OpenMP")
    elif iomp not in preload:
        preload.append(iomp)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    n = threads or default_threads()
    env["OMP_NUM_THREADS"] = str(n)
    env.setdefault("KMP_BLOCKTIME", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[REEXEC_FLAG] = "1"
    return env, warnings


def default_threads() -> int:
    """1 thread on small machines: the tiny models gain nothing from intra-op parallelism and OpenMP
    spin-waits collide with other processes (measured on the 2-core dev box at load ~7: one
    thread 144-149 tok/s, two threads 79-103 tok/s for the served model alone); half the cores
    on larger machines.  Override with --threads."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def maybe_reexec(argv: Sequence[str], threads: int | None) -> list[str]:
    """Re-exec this process with the performance environment (once); returns warnings."""
    if os.environ.get(REEXEC_FLAG) == "1":
        return [w for w in os.environ.get("VLLM_COS_BENCH_WARNINGS", "").split("|") if w]
    env, warnings = performance_env(threads)
    env["VLLM_COS_BENCH_WARNINGS"] = "|".join(warnings)
    for w in warnings:
        print(f"bench: warning: {w}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vllm_cos.bench", *argv], env)
    return warnings  # not reached


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------ results

@dataclass
class Row:
    """One measurement: a method on a configuration, temperature, batch size and prompt set."""

    method: str  # single | single_proposer | sd | standard | naive | alternate | ref_standard | hf_ensemble
    rule: str  # none | we | cd
    param: str  # e.g. "lambda=0.5", "mu=0.1", "3 models equal"
    temperature: float
    batch: int
    prompts: str
    gamma: int | None = None
    proposer: str | None = None
    status: str = "ok"  # ok | unsupported: ... | unavailable: ... | error: ...
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float | None = None  # wall clock
    tokens_per_cpu_s: float | None = None  # per CPU-second of this process (load-robust)
    load_avg: list[float] | None = None
    mean_tokens_per_step: float | None = None
    alpha: float | None = None
    alpha_raw: float | None = None
    beta: float | None = None
    per_position: list[float] = field(default_factory=list)
    c: float | None = None
    speedup_vs_standard: float | None = None
    speedup_vs_single: float | None = None
    predicted: float | None = None
    measured_over_predicted: float | None = None
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.rule, self.param, self.temperature, self.batch, self.prompts)


CLOCKS = ("cpu", "wall")


def rate(r: Row, clock: str = "cpu") -> float | None:
    """The throughput speedups are computed from: CPU clock when measured (see module doc)."""
    if clock == "cpu" and r.tokens_per_cpu_s:
        return r.tokens_per_cpu_s
    return r.tokens_per_s


def cost_ratios(rows: list[Row], clock: str = "cpu") -> dict[int, float]:
    """c = t_q / t_p per batch size: the mean decode time per token of the proposer served alone
    over that of the served model alone, pooled over temperatures and prompt sets (a forward
    costs the same whatever is sampled; pooling averages out load noise)."""
    out = {}
    for b in sorted({r.batch for r in rows}):
        def mean_time(method):
            ts = [1.0 / rate(r, clock) for r in rows
                  if r.method == method and r.batch == b and r.status == "ok" and rate(r, clock)]
            return sum(ts) / len(ts) if ts else None
        t_p, t_q = mean_time("single"), mean_time("single_proposer")
        if t_p and t_q:
            out[b] = t_q / t_p
    return out


def derive(rows: list[Row], clock: str = "cpu") -> None:
    """Fill c, speedups and the theorem predictions in place (rows of one run)."""
    def tps(method, rule, param, t, b, p):
        for r in rows:
            if (r.method, r.rule, r.param, r.temperature, r.batch, r.prompts) == (method, rule, param, t, b, p) \
                    and r.status == "ok" and rate(r, clock):
                return rate(r, clock)
        return None

    c_by_batch = cost_ratios(rows, clock)
    for r in rows:
        if r.status != "ok" or not rate(r, clock):
            continue
        single = tps("single", "none", "", r.temperature, r.batch, r.prompts)
        proposer_alone = tps("single_proposer", "none", "", r.temperature, r.batch, r.prompts)
        if single:
            r.speedup_vs_single = rate(r, clock) / single
        if r.rule in ("we", "cd") and r.method != "standard":
            std = tps("standard", r.rule, r.param, r.temperature, r.batch, r.prompts)
            if std:
                r.speedup_vs_standard = rate(r, clock) / std
        elif r.method == "standard":
            r.speedup_vs_standard = 1.0
        if r.method in ("sd", "standard", "naive", "alternate") and r.batch in c_by_batch:
            r.c = c_by_batch[r.batch]
        # the theorems as stated here: two models, the small one proposing (c = t_small / t_large)
        two_models = "3 models" not in r.param and r.proposer == "small"
        if r.method in ("naive", "alternate") and r.alpha is not None and r.c is not None and r.gamma \
                and two_models:
            alpha = min(max(r.alpha, 0.0), 1.0)
            if r.method == "naive":
                r.predicted = theorem_3_1(alpha, r.gamma, r.c)
            else:
                r.predicted = theorem_3_6(alpha, r.gamma, r.c, r.beta)
            if r.speedup_vs_standard is not None and r.predicted:
                r.measured_over_predicted = r.speedup_vs_standard / r.predicted


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return "/".join(_fmt(v, 2) for v in value) if value else "-"
    return str(value)


TABLE_COLUMNS = [
    ("method", "method"), ("rule", "rule"), ("param", "param"), ("T", "temperature"), ("B", "batch"),
    ("prompts", "prompts"), ("proposer", "proposer"), ("γ", "gamma"), ("tok/s", "tokens_per_s"), ("tok/cpu-s", "tokens_per_cpu_s"), ("×std", "speedup_vs_standard"),
    ("×single", "speedup_vs_single"), ("tok/step", "mean_tokens_per_step"), ("α", "alpha"),
    ("β", "beta"), ("per-pos α", "per_position"), ("c", "c"), ("pred", "predicted"),
    ("meas/pred", "measured_over_predicted"), ("load", "load_avg"), ("status", "status"),
]


def markdown_table(rows: Iterable[Row]) -> str:
    head = "| " + " | ".join(h for h, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _, attr in TABLE_COLUMNS:
            v = getattr(r, attr)
            if attr == "load_avg":
                v = _fmt(v[0], 1) if v else "-"
            elif attr == "temperature":
                v = _fmt(v, 1)
            else:
                v = _fmt(v)
            cells.append(v.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_summary(rows: list[Row], clock: str = "cpu") -> list[dict]:
    """The issue's batch-1 targets, checked against the rows (figures, not tests)."""
    def find(method, rule, param, t, prompts=None):
        hits = [r for r in rows if r.method == method and r.rule == rule and r.param == param
                and r.temperature == t and r.batch == 1 and r.status == "ok" and r.proposer == "small"
                and (prompts is None or r.prompts == prompts)]
        return hits

    out = []
    for (rule, param, t, goal) in (("we", "lambda=0.5", 1.0, 1.4), ("cd", "mu=0.1", 0.0, 1.5)):
        for r in find("alternate", rule, param, t):
            out.append({"target": f"alternate {rule} {param} T={t:g} γ={r.gamma} B=1 ({r.prompts}) >= {goal}x over standard",
                        "value": r.speedup_vs_standard,
                        "met": r.speedup_vs_standard is not None and r.speedup_vs_standard >= goal})
    for r in rows:
        if r.batch == 1 and r.measured_over_predicted is not None:
            out.append({"target": f"{r.method} {r.rule} {r.param} T={r.temperature:g} γ={r.gamma} B=1 ({r.prompts}) "
                                  f"measured/predicted >= 0.85",
                        "value": r.measured_over_predicted, "met": r.measured_over_predicted >= 0.85})
    for ref in [r for r in rows if r.method == "ref_standard" and r.status == "ok"]:
        cos = [r for r in rows if r.method == "alternate" and r.key() == ref.key() and r.status == "ok"
               and r.proposer == "small"]
        for r in cos:
            ratio = rate(r, clock) / rate(ref, clock) if rate(ref, clock) else None
            out.append({"target": f"CoS alternate vs transformers standard loop {r.rule} {r.param} "
                                  f"T={r.temperature:g} γ={r.gamma} B={r.batch} ({r.prompts}) >= 3x",
                        "value": ratio, "met": ratio is not None and ratio >= 3.0})
    return out


def write_outputs(out_dir: str | Path, rows: list[Row], meta: dict) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = targets_summary(rows, meta.get("clock", "cpu"))
    data = {"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets}
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    md = [f"# CoS benchmark ({meta.get('preset', '?')})", ""]
    for k in ("command", "started", "duration_s", "models", "target", "small", "third", "device",
              "threads", "ld_preload", "load_avg_start", "load_avg_end", "clock", "c_by_batch", "warnings",
              "notes"):
        if k in meta:
            md.append(f"- {k}: {meta[k]}")
    md += ["", markdown_table(rows), "", "## Targets (batch 1)", ""]
    for t in targets:
        md.append(f"- [{'x' if t['met'] else ' '}] {t['target']}: {_fmt(t['value'])}")
    md.append("")
    paths["md"].write_text("\n".join(md))
    return paths


def write_plots(out_dir: str | Path, rows: list[Row]) -> list[Path] | str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    out = Path(out_dir)
    written = []
    ok = [r for r in rows if r.status == "ok" and r.speedup_vs_standard is not None]

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    # speedup vs lambda, one line per (method, proposer), batch 1, T=1
    labels = {"naive": "naive CoS (proposer {p})", "alternate": "CoS + APF (first proposer {p})",
              "hf_ensemble": "transformers static ensemble", "ref_standard": "transformers standard loop"}
    we = [r for r in ok if r.rule == "we" and r.param.startswith("lambda=") and r.batch == 1
          and r.method in labels]
    if we:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (method, proposer, t) in sorted({(r.method, r.proposer, r.temperature) for r in we},
                                            key=lambda x: tuple(map(str, x))):
            pts = sorted((float(r.param.split("=")[1]), r.speedup_vs_standard) for r in we
                         if (r.method, r.proposer, r.temperature) == (method, proposer, t)
                         and r.gamma in (None, _main_gamma(rows)))
            pts = _mean_by_x(pts)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[method].format(p=proposer) + f", T={t:g}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("λ (weight of the target model; its complement: the small one)")
        ax.set_ylabel("speedup over standard")
        ax.legend(fontsize=7)
        save(fig, "speedup_vs_lambda.png")
    gam = [r for r in ok if r.method in ("naive", "alternate") and r.batch == 1 and r.gamma]
    grid_sets = {r.prompts for r in gam if r.gamma != _main_gamma(rows)}
    if grid_sets:  # the grid runs on one prompt set: compare like with like
        gam = [r for r in gam if r.prompts in grid_sets]
    if len({r.gamma for r in gam}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        _plot_speedup_curves(ax, gam, "gamma")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("γ (proposer draft length)")
        ax.set_ylabel("speedup over standard")
        ax.legend(fontsize=7)
        save(fig, "speedup_vs_gamma.png")
    bat = [r for r in ok if r.method in ("naive", "alternate", "sd") and r.gamma in (None, _main_gamma(rows))]
    if len({r.batch for r in bat}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        _plot_speedup_curves(ax, bat, "batch")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (concurrent requests)")
        ax.set_ylabel("speedup over standard")
        ax.legend(fontsize=7)
        save(fig, "speedup_vs_batch.png")
    return written


def _main_gamma(rows: list[Row]) -> int | None:
    gs = [r.extra.get("main_gamma") for r in rows if r.extra.get("main_gamma")]
    return gs[0] if gs else None


def _plot_speedup_curves(ax, rows, x_attr: str) -> None:
    """One line per (method, rule, param, T): speedup over standard against ``x_attr``."""
    for key in sorted({(r.method, r.rule, r.param, r.temperature) for r in rows}):
        pts = _mean_by_x(sorted((getattr(r, x_attr), r.speedup_vs_standard) for r in rows
                                if (r.method, r.rule, r.param, r.temperature) == key))
        if len(pts) > 1:
            method, rule, param, t = key
            ax.plot(*zip(*pts), marker="o", label=f"{method} {rule} {param} T={t:g}")


def _mean_by_x(pts):
    acc: dict = {}
    for x, y in pts:
        acc.setdefault(x, []).append(y)
    return [(x, sum(v) / len(v)) for x, v in sorted(acc.items())]


# ------------------------------------------------------------------------------------ plan

@dataclass
class EngineJob:
    """One engine start and the measurements made on it."""

    label: str
    method: str
    rule: str  # none | we | cd
    param: str
    gamma: int | None
    temperatures: list[float]
    spec: dict | None = None  # speculative_config (CoS dict or stock draft_model dict)
    served: str = "target"  # target | small
    batch_sizes: list[int] | None = None  # None: all
    prompt_sets: list[str] | None = None  # None: all
    proposer: str = "small"  # who drafts (naive) / drafts after the served model's bonus (alternate)


def _models(settings: Settings) -> dict[str, str]:
    base = Path(settings.models_dir) if settings.models_dir else None
    if base is None:
        from vllm_cos.tiny_models import build_tiny_models

        paths = build_tiny_models(_repo_root() / "models" / "tiny")
        base = Path(next(iter(paths.values()))).parent
    found = {p.name: str(p.resolve()) for p in sorted(base.iterdir()) if (p / "config.json").is_file()}
    for name in (settings.target, settings.small):
        if name not in found:
            raise SystemExit(f"bench: no model {name!r} in {base} (found: {', '.join(found) or 'none'})")
    models = {"target": found[settings.target], "small": found[settings.small]}
    third = settings.third or next((n for n in found if n not in (settings.target, settings.small)), None)
    if third is not None:
        if third not in found:
            raise SystemExit(f"bench: no model {third!r} in {base}")
        models["third"] = found[third]
    models["_names"] = {"target": settings.target, "small": settings.small, "third": third}
    return models


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cos_spec(models: dict, rule: dict, schedule: str, gamma: int, three: bool = False) -> dict:
    names = models["_names"]
    entries = [{"name": names["target"], "path": models["target"], "gamma": 1},
               {"name": names["small"], "path": models["small"], "gamma": gamma}]
    if three:
        entries.append({"name": names["third"], "path": models["third"], "gamma": gamma})
    spec = {"models": entries, "rule": rule, "schedule": schedule}
    if schedule != "standard":
        spec["proposer"] = names["small"]
    return spec


def swapped_spec(models: dict, rule: dict, schedule: str, gamma: int) -> dict:
    """The small model served (verifier, bonus under alternate), the target model drafting."""
    names = models["_names"]
    return {"models": [{"name": names["small"], "path": models["small"], "gamma": 1},
                       {"name": names["target"], "path": models["target"], "gamma": gamma}],
            "rule": rule, "schedule": schedule, "proposer": names["target"]}


def we_rule(models: dict, lam: float) -> dict:
    names = models["_names"]
    return {"name": "weighted_ensemble", "weights": {names["target"]: lam, names["small"]: 1.0 - lam}}


def cd_rule(models: dict, mu: float) -> dict:
    names = models["_names"]
    return {"name": "contrastive", "expert": names["target"], "amateur": names["small"], "mu": mu}


def plan(settings: Settings, models: dict) -> list[EngineJob]:
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    rule_t = settings.rule_temperatures or {}
    jobs: list[EngineJob] = []
    if settings.single:
        jobs.append(EngineJob("single (served model)", "single", "none", "", None, temps))
        jobs.append(EngineJob("single (proposer alone)", "single_proposer", "none", "", None, temps,
                              served="small"))
    if settings.sd:
        jobs.append(EngineJob(f"sd draft_model γ={settings.gamma}", "sd", "none", "", settings.gamma, temps,
                              spec={"method": "draft_model", "model": models["small"],
                                    "num_speculative_tokens": settings.gamma}))
    configs = [("we", f"lambda={lam:g}", we_rule(models, lam)) for lam in settings.lambdas]
    configs += [("cd", f"mu={mu:g}", cd_rule(models, mu)) for mu in settings.mus]
    for rule, param, rule_dict in configs:
        t = rule_t.get(rule, temps)
        for schedule in settings.schedules:
            gamma = None if schedule == "standard" else settings.gamma
            jobs.append(EngineJob(f"{schedule} {rule} {param}", schedule, rule, param, gamma, t,
                                  spec=cos_spec(models, rule_dict, schedule, settings.gamma)))
    if settings.swap_proposer:
        proposer = models["_names"]["target"]
        for rule, param, rule_dict in configs:
            for schedule in [s for s in ("naive", "alternate") if s in settings.schedules and rule == "we"]:
                jobs.append(EngineJob(f"{schedule} {rule} {param} proposer {proposer}", schedule, rule, param,
                                      settings.gamma, rule_t.get(rule, temps)[:1],
                                      spec=swapped_spec(models, rule_dict, schedule, settings.gamma),
                                      served="small", batch_sizes=[1], prompt_sets=settings.prompt_sets[:1],
                                      proposer=proposer))
    # gamma grid (batch 1, first prompt set): WE lambda=0.5 and CD with the first mu
    grid_configs = [("we", "lambda=0.5", we_rule(models, 0.5), 0.5 in settings.lambdas)]
    if settings.mus:
        mu = settings.mus[0]
        grid_configs.append(("cd", f"mu={mu:g}", cd_rule(models, mu), True))
    for rule, param, rule_dict, has_standard in grid_configs:
        if not settings.gammas:
            break
        t = rule_t.get(rule, temps)[:1]
        for g in settings.gammas:
            if g == settings.gamma and has_standard:
                continue
            for schedule in [s for s in settings.gamma_schedules if s in settings.schedules]:
                jobs.append(EngineJob(f"{schedule} {rule} {param} γ={g}", schedule, rule, param, g, t,
                                      spec=cos_spec(models, rule_dict, schedule, g),
                                      batch_sizes=[1], prompt_sets=settings.prompt_sets[:1]))
        if not has_standard and "standard" in settings.schedules:
            jobs.append(EngineJob(f"standard {rule} {param}", "standard", rule, param, None, t,
                                  spec=cos_spec(models, rule_dict, "standard", 1),
                                  batch_sizes=[1], prompt_sets=settings.prompt_sets[:1]))
    if settings.three_models and "third" in models:
        names = models["_names"]
        w = {names["target"]: 1 / 3, names["small"]: 1 / 3, names["third"]: 1 / 3}
        # gamma 1: the paper's 3-model setting (every model proposes one token per turn)
        for schedule, gamma in dict.fromkeys([("standard", None), ("alternate", 1), ("alternate", settings.gamma)]):
            if schedule in settings.schedules:
                jobs.append(EngineJob(f"{schedule} we 3 models" + (f" γ={gamma}" if gamma else ""), schedule,
                                      "we", "3 models equal", gamma, rule_t.get("we", temps)[:1],
                                      spec=cos_spec(models, {"name": "weighted_ensemble", "weights": w},
                                                    schedule, gamma or 1, three=True),
                                      batch_sizes=[1], prompt_sets=settings.prompt_sets[:1]))
    return jobs


def job_measurements(job: EngineJob, settings: Settings) -> list[tuple[float, int, str]]:
    batches = job.batch_sizes or settings.batch_sizes
    sets = job.prompt_sets or settings.prompt_sets
    return [(t, b, s) for t in job.temperatures for b in batches for s in sets]


# ------------------------------------------------------------------------------------ engine runs

# An explicit KV cache size: the CPU worker's automatic size is "0.2 x RAM - this process's RSS",
# which goes negative once a few engines have run in one process (RSS is not given back).
KV_CACHE_BYTES = 256 << 20
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                     kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False,
                     disable_log_stats=False)


def start_engine(job: EngineJob, models: dict, settings: Settings):
    from vllm import LLM

    served = models["small"] if job.served == "small" else models["target"]
    kwargs = dict(ENGINE_KWARGS, max_model_len=512, max_num_seqs=max(settings.batch_sizes), seed=settings.seed)
    if job.spec is not None:
        kwargs["speculative_config"] = job.spec
    return LLM(model=served, **kwargs)


def spec_counters(llm) -> dict:
    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_pos": []}
    try:
        metrics = llm.get_metrics()
    except Exception:
        return out
    for m in metrics:
        if m.name == "vllm:spec_decode_num_drafts":
            out["num_drafts"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_draft_tokens":
            out["num_draft_tokens"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            out["num_accepted_tokens"] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = [int(v) for v in m.values]
    return out


def cos_counters(llm) -> dict | None:
    try:
        from vllm_cos.offline import cos_stats

        stats = [s for s in cos_stats(llm) if s]
    except Exception:
        return None
    if not stats:
        return None
    keys = ("steps", "draft_forwards", "drafts_proposed", "drafts_accepted", "served_proposed",
            "served_accepted", "tokens_emitted", "row_steps")
    return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}


def _diff(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    before = before or {}
    out = {}
    for k, v in after.items():
        if isinstance(v, list):
            b = before.get(k) or [0] * len(v)
            out[k] = [x - y for x, y in zip(v, b + [0] * (len(v) - len(b)))]
        else:
            out[k] = v - before.get(k, 0)
    return out


def generate_timed(llm, prompts: list[list[int]], batch: int, temperature: float, max_tokens: int,
                   seed: int) -> tuple[int, float]:
    """Generated tokens and wall seconds: batch 1 = one request at a time over the prompts;
    batch B = B concurrent requests (prompts cycled) in one ``LLM.generate`` call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(i):
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                              seed=seed + i, top_k=0 if temperature > 0 else -1)

    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    if batch == 1:
        for i, p in enumerate(prompts):
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], params(i), use_tqdm=False)
            tokens += len(out[0].outputs[0].token_ids)
    else:
        reqs = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
        outs = llm.generate(reqs, [params(i) for i in range(batch)], use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def measure_on_engine(llm, job: EngineJob, temperature: float, batch: int, prompt_set: str,
                      prompts: list[list[int]], settings: Settings) -> Row:
    row = Row(method=job.method, rule=job.rule, param=job.param, temperature=temperature, batch=batch,
              prompts=prompt_set, gamma=job.gamma, proposer=None if job.method in ("single", "standard")
              else job.proposer, extra={"main_gamma": settings.gamma, "engine": job.label})
    spec0, cos0 = spec_counters(llm), cos_counters(llm)
    runs = [generate_timed(llm, prompts, batch, temperature, settings.max_tokens, settings.seed)
            for _ in range(settings.repeats)]
    spec = _diff(spec_counters(llm), spec0)
    cos = _diff(cos_counters(llm), cos0)
    _set_timing(row, runs)
    row.load_avg = load_average()
    if job.method == "single" or job.method == "single_proposer" or job.method == "standard":
        row.mean_tokens_per_step = 1.0
    if spec and spec.get("num_drafts"):
        acc = acceptance_from_counters(spec["num_drafts"], spec["per_pos"])
        row.alpha, row.alpha_raw, row.per_position = acc["alpha_hat"], acc["alpha_raw"], acc["per_position"]
        row.mean_tokens_per_step = 1.0 + spec["num_accepted_tokens"] / spec["num_drafts"]
        row.extra["spec_counters"] = spec
    if cos:
        row.extra["cos_counters"] = cos
        # tokens per request per engine step (row_steps: rows verified; older counters: steps)
        steps = cos.get("row_steps") or (cos.get("steps", 0) * (1 if batch == 1 else 0))
        if steps:
            row.mean_tokens_per_step = cos["tokens_emitted"] / steps
        if cos.get("served_proposed"):
            row.beta = cos["served_accepted"] / cos["served_proposed"]
    return row


def _set_timing(row: Row, runs: list[tuple]) -> None:
    """Best repetition (the one least disturbed by other load) per clock; all kept in extra.
    ``runs``: (tokens, wall seconds[, cpu seconds])."""
    wall = [r[0] / r[1] for r in runs if r[1] > 0]
    cpu = [r[0] / r[2] for r in runs if len(r) > 2 and r[2] > 0]
    best = max(range(len(runs)), key=lambda i: runs[i][0] / runs[i][1] if runs[i][1] > 0 else 0.0)
    row.tokens, row.seconds = runs[best][0], runs[best][1]
    row.tokens_per_s = max(wall) if wall else None
    row.tokens_per_cpu_s = max(cpu) if cpu else None
    row.extra["repeats_tok_s"] = [round(r, 2) for r in wall]
    row.extra["repeats_tok_cpu_s"] = [round(r, 2) for r in cpu]


def run_engine_job(job: EngineJob, models: dict, settings: Settings, prompt_ids: dict, progress) -> list[Row]:
    rows = []
    measurements = job_measurements(job, settings)
    progress.set_description(f"start {job.label}")
    try:
        llm = start_engine(job, models, settings)
    except Exception as exc:  # the engine refused the configuration
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        unsupported = "supports" in message or "unsupported" in message.lower() or "CoSStartupError" in repr(exc)
        status = ("unsupported: " if unsupported else "error: ") + message
        for t, b, s in measurements:
            rows.append(Row(method=job.method, rule=job.rule, param=job.param, temperature=t, batch=b,
                            prompts=s, gamma=job.gamma, status=status, load_avg=load_average(),
                            extra={"engine": job.label, "main_gamma": settings.gamma}))
            progress.update(1)
        return rows
    try:
        # warm-up (first-call allocations), not timed
        generate_timed(llm, prompt_ids[settings.prompt_sets[0]][:1], 1, 1.0, 4, settings.seed)
        for t, b, s in measurements:
            progress.set_description(f"{job.label} T={t:g} B={b} {s}")
            rows.append(measure_on_engine(llm, job, t, b, s, prompt_ids[s], settings))
            progress.update(1)
    finally:
        shutdown_llm(llm)
    return rows


# ------------------------------------------------------------------------------------ peers

def _reference_models(models: dict):
    from vllm_cos.reference import CausalLM

    return CausalLM.from_pretrained(models["target"], "float32"), CausalLM.from_pretrained(models["small"], "float32")


def run_reference_peer(models: dict, rule: str, param: str, rule_dict: dict, temperature: float,
                       prompt_set: str, prompts: list[list[int]], settings: Settings, loaded,
                       batch: int = 1) -> Row:
    """``ReferenceDecoder`` with schedule standard: batch 1 = requests one after the other;
    batch B = B requests (prompts cycled) advancing in lockstep in one ``generate`` call."""
    from vllm_cos.config import load_config
    from vllm_cos.reference import ReferenceDecoder, SamplingSpec

    cfg = load_config(cos_spec(models, rule_dict, "standard", 1))
    decoder = ReferenceDecoder(cfg, list(loaded))

    def once():
        tokens, start, cpu = 0, time.perf_counter(), time.process_time()
        if batch > 1:
            reqs = [prompts[i % len(prompts)] for i in range(batch)]
            specs = [SamplingSpec(max_tokens=settings.max_tokens, temperature=temperature, seed=settings.seed + i)
                     for i in range(batch)]
            outs = decoder.generate(reqs, specs)
            return sum(len(o.token_ids) for o in outs), time.perf_counter() - start, time.process_time() - cpu
        for i, p in enumerate(prompts):
            out = decoder.generate([p], SamplingSpec(max_tokens=settings.max_tokens, temperature=temperature,
                                                     seed=settings.seed + i))
            tokens += len(out[0].token_ids)
        return tokens, time.perf_counter() - start, time.process_time() - cpu

    row = Row(method="ref_standard", rule=rule, param=param, temperature=temperature, batch=batch,
              prompts=prompt_set, mean_tokens_per_step=1.0, extra={"main_gamma": settings.gamma})
    _set_timing(row, [once() for _ in range(settings.repeats if batch == 1 else 1)])
    row.load_avg = load_average()
    return row


def hf_ensemble_available() -> tuple[bool, str]:
    try:
        import transformers
        from transformers import GenerationConfig
    except ImportError as exc:
        return False, f"transformers not importable: {exc}"
    if not hasattr(GenerationConfig(), "assistant_ensemble_weight"):
        return False, f"transformers {transformers.__version__} has no assistant_ensemble_weight"
    return True, f"transformers {transformers.__version__}"


def run_hf_ensemble_peer(models: dict, lam: float, temperature: float, prompt_set: str,
                         prompts: list[list[int]], settings: Settings, loaded) -> Row:
    """transformers assisted generation with ``assistant_ensemble_weight = lam`` (weight of the
    served model): drafts from the small model verified against lam p + (1 - lam) q."""
    import torch

    large, small = loaded[0].model, loaded[1].model
    runs = [_hf_ensemble_once(large, small, lam, temperature, prompts, settings) for _ in range(settings.repeats)]
    row = Row(method="hf_ensemble", rule="we", param=f"lambda={lam:g}", temperature=temperature, batch=1,
              prompts=prompt_set, gamma=settings.gamma, proposer="small",
              extra={"main_gamma": settings.gamma, "note": "static ensemble verification; greedy bonus "
                     "token from the served model only (not the ensemble)"})
    _set_timing(row, runs)
    row.load_avg = load_average()
    return row


def _hf_ensemble_once(large, small, lam, temperature, prompts, settings) -> tuple[int, float, float]:
    import torch

    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        torch.manual_seed(settings.seed + i)
        ids = torch.tensor([p], dtype=torch.long)
        kwargs = dict(assistant_model=small, assistant_ensemble_weight=lam, max_new_tokens=settings.max_tokens,
                      min_new_tokens=settings.max_tokens, num_assistant_tokens=settings.gamma,
                      num_assistant_tokens_schedule="constant", pad_token_id=1,
                      attention_mask=torch.ones_like(ids))
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = large.generate(ids, **kwargs)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def run_peers(models: dict, settings: Settings, prompt_ids: dict, progress, threads: int) -> list[Row]:
    import torch

    torch.set_num_threads(threads)
    loaded = _reference_models(models)
    rows = []
    rule_t = settings.rule_temperatures or {}
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    configs = [("we", f"lambda={lam:g}", we_rule(models, lam), lam) for lam in settings.lambdas]
    configs += [("cd", f"mu={mu:g}", cd_rule(models, mu), None) for mu in settings.mus]
    ok, why = hf_ensemble_available()
    for rule, param, rule_dict, lam in configs:
        for t in rule_t.get(rule, temps):
            for s in settings.prompt_sets:
                progress.set_description(f"peer ref_standard {rule} {param} T={t:g} {s}")
                rows.append(run_reference_peer(models, rule, param, rule_dict, t, s, prompt_ids[s], settings, loaded))
                progress.update(1)
                for b in settings.peer_batches:
                    if b > 1 and b in settings.batch_sizes:
                        progress.set_description(f"peer ref_standard {rule} {param} T={t:g} B={b} {s}")
                        rows.append(run_reference_peer(models, rule, param, rule_dict, t, s, prompt_ids[s],
                                                       settings, loaded, batch=b))
                        progress.update(1)
                if lam is None:
                    continue
                progress.set_description(f"peer hf_ensemble {param} T={t:g} {s}")
                if ok:
                    try:
                        rows.append(run_hf_ensemble_peer(models, lam, t, s, prompt_ids[s], settings, loaded))
                    except Exception as exc:
                        rows.append(Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1,
                                        prompts=s, status="error: " + " ".join(str(exc).split())[:200]))
                else:
                    rows.append(Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1,
                                    prompts=s, status="unavailable: " + why))
                progress.update(1)
    return rows


def count_peer_measurements(settings: Settings) -> int:
    if not settings.peers:
        return 0
    rule_t = settings.rule_temperatures or {}
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    ref = 1 + len([b for b in settings.peer_batches if b > 1 and b in settings.batch_sizes])
    n = (len(settings.lambdas) * len(rule_t.get("we", temps)) * (1 + ref)
         + len(settings.mus) * len(rule_t.get("cd", temps)) * ref)
    return n * len(settings.prompt_sets)


# ------------------------------------------------------------------------------------ main

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


def load_rows(path: str | Path) -> tuple[list[Row], dict]:
    data = json.loads(Path(path).read_text())
    return [Row(**r) for r in data["rows"]], data.get("meta", {})


def replot(path: str | Path) -> int:
    rows, meta = load_rows(path)
    out = Path(path).parent
    paths = write_outputs(out, rows, meta)
    plots = write_plots(out, rows)
    print(plots if isinstance(plots, str) else "bench: wrote " + ", ".join(map(str, [paths["md"], *plots])))
    return 0


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
        for job in jobs:
            rows += run_engine_job(job, models, settings, prompt_ids, progress)
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
        "notes": "tok/s = generated tokens / wall time; load = 1-min load average after each measurement; "
                 "×std over standard collaborative decoding of the same rule/T/B/prompts",
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


if __name__ == "__main__":
    sys.exit(main())

"""One measurement (:class:`Row`), its timing, and what is derived from a run's rows: c, speedups,
the theorem predictions."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_cos.bench.theory import paper_theorem_3_1, paper_theorem_3_6, theorem_3_1, theorem_3_6

MIXTURE = "mixture (reference)"  # vllm_cos.mixture.MixtureDecoder
# the plain-PyTorch peers (vllm_cos.reference / vllm_cos.mixture), also reported over ref_standard
REF_PEERS = ("ref_standard", MIXTURE, "ref alternate")


@dataclass
class Row:
    """One measurement: a method on a configuration, temperature, batch size and prompt set."""

    # single | single_proposer | sd | standard | naive | alternate | ref_standard | ref alternate |
    # mixture (reference) | hf_ensemble
    method: str
    rule: str  # none | we | cd
    param: str  # e.g. "lambda=0.5", "mu=0.1", "3 models equal"
    temperature: float
    batch: int
    prompts: str
    gamma: int | str | None = None  # "auto": cos.yaml gamma: auto (adaptive draft length)
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
    speedup_vs_ref_standard: float | None = None  # REF_PEERS rows: over ref_standard of the same key
    predicted: float | None = None  # our accounting (theory.theorem_3_1 / theorem_3_6)
    predicted_paper: float | None = None  # the paper's (theory.paper_theorem_3_1 / paper_theorem_3_6)
    measured_over_predicted: float | None = None
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.rule, self.param, self.temperature, self.batch, self.prompts)


CLOCKS = ("cpu", "wall")


def rate(r: Row, clock: str = "cpu") -> float | None:
    """The throughput speedups are computed from: CPU clock when measured (see the package docstring)."""
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
        if r.rule in ("we", "cd", "cosd") and r.method != "standard":
            std = tps("standard", r.rule, r.param, r.temperature, r.batch, r.prompts)
            if std:
                r.speedup_vs_standard = rate(r, clock) / std
        elif r.method == "standard":
            r.speedup_vs_standard = 1.0
        if r.method in REF_PEERS:
            ref = tps("ref_standard", r.rule, r.param, r.temperature, r.batch, r.prompts)
            if ref:
                r.speedup_vs_ref_standard = rate(r, clock) / ref
        if r.method in ("sd", "standard", "naive", "alternate") and r.batch in c_by_batch:
            r.c = c_by_batch[r.batch]
        _predict(r)


def _predict(r: Row) -> None:
    """Both accountings of the theorems, for two models with the small one proposing
    (c = t_small / t_large) and a fixed gamma (none for gamma: auto rows)."""
    two_models = "3 models" not in r.param and r.proposer == "small"
    fixed_gamma = isinstance(r.gamma, int) and not isinstance(r.gamma, bool) and r.gamma >= 1
    if r.method not in ("naive", "alternate") or r.alpha is None or r.c is None or not fixed_gamma \
            or not two_models:
        return
    alpha = min(max(r.alpha, 0.0), 1.0)
    if r.method == "naive":
        r.predicted = theorem_3_1(alpha, r.gamma, r.c)
        r.predicted_paper = paper_theorem_3_1(alpha, r.gamma, r.c)
    else:
        r.predicted = theorem_3_6(alpha, r.gamma, r.c, r.beta)
        r.predicted_paper = paper_theorem_3_6(alpha, r.gamma, r.c)
    if r.speedup_vs_standard is not None and r.predicted:
        r.measured_over_predicted = r.speedup_vs_standard / r.predicted


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

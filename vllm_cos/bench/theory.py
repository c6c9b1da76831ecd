"""Theory: the speedup formulas behind the bench's ``predicted`` / ``predicted_paper`` columns, and
alpha from counters.

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

The paper's own statements (Fu et al., ICML 2025; ../shared/PAPER.md), the ``pred (paper)``
column.  Theorem 3.1 counts ``(1 - alpha^gamma) / (1 - alpha)`` tokens per cycle (no token
after gamma accepted drafts: r is not known there without another M_q call) at cost
``1 + gamma c``::

    S_naive_paper = (1 - alpha^gamma) (1 + c) / ((1 - alpha) (1 + gamma c))

Theorem 3.6, with gamma_q the current proposer's draft length and gamma_p the previous one's
(a bonus token exists with probability alpha^gamma_p and saves one M_q call)::

    S_apf_paper = (1 - alpha^gamma_q) (1 + c) / ((1 - alpha) (1 + gamma_q c - alpha^gamma_p c))

In the bench the proposer (the small model) drafts gamma_q = gamma and the served model
gamma_p = :data:`SERVED_GAMMA` = 1.  Our accounting (``pred (ours)``) counts the token emitted
after gamma accepted drafts (the engine spends that M_q call): one token more per fully accepted
round at one M_q call more (naive), so neither bound is always the larger (small alpha, large c:
the paper's is).

Measured quantities: alpha from vLLM's per-position acceptance counters, alpha_hat =
accepted / (accepted + rejections) where rejections = rounds that did not accept all drafts
(the maximum-likelihood estimate under A1; ``alpha_raw`` = accepted / drafted is also
reported); beta = served_accepted / served_proposed from the CoS counters
(:func:`vllm_cos.offline.cos_stats`); per-position acceptance ``a_i / a_(i-1)`` (a_0 = rounds).
"""

from __future__ import annotations

from typing import Sequence

SERVED_GAMMA = 1  # the bench's served model drafts one token (its bonus) under alternate: gamma_p


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


def paper_theorem_3_1(alpha: float, gamma: int, c: float) -> float:
    """The paper's naive CoS speedup: (1 - alpha^gamma)(1 + c) / ((1 - alpha)(1 + gamma c))."""
    if gamma < 1:
        raise ValueError("gamma must be >= 1")
    return expected_tokens_per_round(alpha, gamma - 1) * (1.0 + c) / (1.0 + gamma * c)


def paper_theorem_3_6(alpha: float, gamma_q: int, c: float, gamma_p: int = SERVED_GAMMA) -> float:
    """The paper's APF speedup:
    (1 - alpha^gamma_q)(1 + c) / ((1 - alpha)(1 + gamma_q c - alpha^gamma_p c))."""
    if gamma_q < 1 or gamma_p < 1:
        raise ValueError("gamma_q and gamma_p must be >= 1")
    cost = 1.0 + gamma_q * c - (alpha ** gamma_p) * c
    return expected_tokens_per_round(alpha, gamma_q - 1) * (1.0 + c) / cost


PREDICTION_NOTES = {
    "pred (ours)": "this bench's accounting (vllm_cos.bench.theory): a round emits "
                   "(1 - α^(γ+1))/(1 - α) tokens (the token from r after γ accepted drafts counted); "
                   "naive (1 - α^(γ+1))(1 + c)/((1 - α)(1 + (γ+1)c)), alternate "
                   "(1 - α^(γ+1))(1 + c)/((1 - α)(1 + γc + α^γ(1 - β)c)); meas/pred uses this one",
    "pred (paper)": "the paper's accounting (Fu et al. 2025, Thm 3.1 / 3.6): a cycle emits "
                    "(1 - α^γ)/(1 - α) tokens (no token after γ accepted drafts); naive "
                    "(1 - α^γ)(1 + c)/((1 - α)(1 + γc)), alternate (1 - α^γq)(1 + c)/((1 - α)(1 + γq c - α^γp c)) "
                    f"with γq = γ (the small proposer) and γp = {SERVED_GAMMA} (the served model)",
    "auto": "γ = auto rows (cos.yaml gamma: auto: served model 1, others up to 4, draft_length auto): "
            "no prediction (the draft length changes per step; the theorems assume a fixed γ); the γ cell "
            "shows the measured mean drafts per request and step (cos_stats drafts_proposed / row_steps); "
            "α and per-pos α: the first draft position only (later positions are not comparable when the "
            "draft length varies); the engine generates once per batch size untimed before the timed runs",
}


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

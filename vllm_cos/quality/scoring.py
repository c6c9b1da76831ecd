"""Teacher-forced scores from prompt logprobs (pure arithmetic, no vLLM).

vLLM's ``prompt_logprobs=k`` gives, per prompt position i >= 1, a dict token id -> Logprob
(``.logprob``, ``.rank``) holding the actual token prompt[i] (with its rank) and the top k
(ranks 1..k, inserted after it); position 0 is None.  Per window: the log-probability of each
actual next token and whether the top-1 token is it.  NLL = -mean logprob; top-1 accuracy =
mean of the hits; a domain pools its windows' positions (equal-length windows: the window mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

MIXED = "mixed"


@dataclass(frozen=True)
class WindowScore:
    logprobs: tuple[float, ...]  # log r(actual token) per scored position (len(window) - 1)
    top1: tuple[int, ...]  # the top-1 token per scored position

    def hits(self, token_ids: Sequence[int]) -> list[bool]:
        return [t == a for t, a in zip(self.top1, token_ids[1:])]


def top1_token(entry: Mapping) -> int:
    """The rank-1 token of one position's dict (the last rank-1 entry: vLLM inserts the actual
    token first and the top-k after it, so a tie of the actual token with the top-1 token that
    the top-k did not pick does not count as a hit)."""
    ranked = [token for token, lp in entry.items() if lp.rank == 1]
    if not ranked:
        raise ValueError(f"no rank-1 token among {sorted(entry)} (prompt_logprobs must be >= 1)")
    return ranked[-1]


def window_score(prompt_logprobs: Sequence, token_ids: Sequence[int]) -> WindowScore:
    """One window's scores from its ``RequestOutput.prompt_logprobs``."""
    if len(prompt_logprobs) != len(token_ids) or prompt_logprobs[0] is not None:
        raise ValueError(f"prompt logprobs of {len(prompt_logprobs)} positions for {len(token_ids)} tokens "
                         "(the first must be None)")
    logprobs, top1 = [], []
    for entry, actual in zip(prompt_logprobs[1:], token_ids[1:]):
        if actual not in entry:
            raise ValueError(f"the actual token {actual} is missing from a prompt-logprob entry")
        logprobs.append(float(entry[actual].logprob))
        top1.append(top1_token(entry))
    return WindowScore(tuple(logprobs), tuple(top1))


def nll(score: WindowScore) -> float:
    return -sum(score.logprobs) / len(score.logprobs)


def summarize(scores: Sequence[WindowScore], windows: Sequence, domains: Sequence[str]) -> dict:
    """{domain: {nll, top1, positions, windows}} for each domain and ``mixed`` (all windows pooled);
    ``windows[i].domain`` / ``.token_ids`` belong to ``scores[i]``."""
    groups = {d: [i for i, w in enumerate(windows) if w.domain == d] for d in domains}
    groups[MIXED] = list(range(len(windows)))
    out = {}
    for name, index in groups.items():
        logprobs = [lp for i in index for lp in scores[i].logprobs]
        hits = [h for i in index for h in scores[i].hits(windows[i].token_ids)]
        out[name] = {"nll": -sum(logprobs) / len(logprobs) if logprobs else math.nan,
                     "top1": sum(hits) / len(hits) if hits else math.nan,
                     "positions": len(logprobs), "windows": len(index)}
    return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a - b over paired windows and its standard error."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return (d[0] if d else math.nan), math.nan
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))

"""Cross-check of the engine's scores with the reference path: plain transformers models and
:mod:`vllm_cos.combine`'s rule (what :mod:`vllm_cos.reference` decodes with), on a few windows.

Per checked window: the engine's NLL equals the reference's within ``tolerance`` (every row
but CoSD, whose prompt logprobs are no NLL), and the engine's top-1 token at every position is
a top-1 token of the reference's log r (within ``tolerance`` of its maximum: exact ties of
float32 logits may go either way; for CoSD, whose r is one-hot, this is CoSD's choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

TOLERANCE = 2e-3


@dataclass
class ReferenceScorer:
    """Transformers models by name (loaded once) and their logits per checked window."""

    paths: dict  # name -> model directory
    models: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)  # (name, window index) -> [len, vocab] float32

    def member_logits(self, name: str, index: int, token_ids: Sequence[int]) -> torch.Tensor:
        if (name, index) not in self.logits:
            if name not in self.models:
                from transformers import AutoModelForCausalLM

                self.models[name] = AutoModelForCausalLM.from_pretrained(self.paths[name], dtype=torch.float32).eval()
            with torch.inference_mode():
                out = self.models[name](torch.tensor([list(token_ids)])).logits[0].float()
            self.logits[(name, index)] = out
        return self.logits[(name, index)]

    def log_r(self, row, index: int, token_ids: Sequence[int]) -> torch.Tensor:
        """log r [len, vocab] of a row at every position of one window."""
        if row.spec is None:
            return torch.log_softmax(self.member_logits(row.members[0], index, token_ids), dim=-1)
        from vllm_cos.combine import build_combiner
        from vllm_cos.config import load_config

        cfg = load_config(row.spec)
        member = [self.member_logits(n, index, token_ids) for n in cfg.model_names]
        vocab = min(m.shape[-1] for m in member)
        combined = build_combiner(cfg.rule, cfg.model_names)(torch.stack([m[:, :vocab] for m in member]))
        return torch.log_softmax(combined.float(), dim=-1)


def check_row(scorer: ReferenceScorer, row, scores: Sequence, windows: Sequence, indices: Sequence[int],
              tolerance: float = TOLERANCE) -> dict:
    """Worst differences over the checked windows, and ``ok``."""
    worst_nll = worst_token = 0.0
    mismatches, positions = 0, 0
    for i in indices:
        ids = windows[i].token_ids
        log_r = scorer.log_r(row, i, ids)[:-1]  # position p predicts token p + 1
        actual = torch.tensor(ids[1:])
        ref_lp = log_r.gather(1, actual.unsqueeze(1)).squeeze(1)
        engine_lp = torch.tensor(scores[i].logprobs, dtype=torch.float32)
        if row.nll:
            worst_nll = max(worst_nll, abs(float(-ref_lp.mean()) + float(engine_lp.mean())))
            worst_token = max(worst_token, float((ref_lp - engine_lp).abs().max()))
        top = torch.tensor(scores[i].top1)
        at_top = log_r.gather(1, top.unsqueeze(1)).squeeze(1)
        mismatches += int((at_top < log_r.max(dim=1).values - tolerance).sum())
        positions += len(actual)
    ok = worst_nll < tolerance and mismatches == 0
    return {"windows": list(indices), "positions": positions, "worst_nll_diff": worst_nll if row.nll else None,
            "worst_token_logprob_diff": worst_token if row.nll else None, "top1_mismatches": mismatches,
            "ok": ok}


def check_indices(windows: Sequence, per_row: int) -> list[int]:
    """The first ``per_row`` windows, taking the domains in turn."""
    by_domain: dict = {}
    for i, w in enumerate(windows):
        by_domain.setdefault(w.domain, []).append(i)
    order = [idx for group in zip(*by_domain.values()) for idx in group]
    return order[:per_row]


def agreement(a: Sequence, b: Sequence) -> dict:
    """Two rows' scores on the same windows (WE under alternate vs standard): worst per-window
    NLL difference and top-1 disagreements."""
    from vllm_cos.quality.scoring import nll

    worst = max(abs(nll(x) - nll(y)) for x, y in zip(a, b))
    differ = sum(s != t for x, y in zip(a, b) for s, t in zip(x.top1, y.top1))
    return {"worst_nll_diff": worst, "top1_differences": differ, "ok": worst < TOLERANCE}

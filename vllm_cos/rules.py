"""Example custom combination rules (select with ``rule: {name: custom, function: vllm_cos.rules:NAME}``)."""

from __future__ import annotations

import torch


def geometric_mean(member_probs: torch.Tensor, weights=None) -> torch.Tensor:
    """Weighted geometric mean (a product of experts): [num_models, num_tokens, vocab] -> [num_tokens, vocab]."""
    num_models = member_probs.shape[0]
    w = torch.full((num_models,), 1.0 / num_models) if weights is None else torch.tensor(weights, dtype=torch.float32)
    log_probs = member_probs.clamp_min(1e-30).log()  # [num_models, num_tokens, vocab]
    return torch.exp((w.view(-1, 1, 1) * log_probs).sum(0))

"""Losses for training a proposer (drafter) toward the collaboration's combined distribution r.

Pure torch math: imports nothing from vLLM or transformers.

Setting.  A proposer q drafts a block of ``gamma`` tokens; draft position ``j`` (1-based) is
accepted with probability ``min(1, r/q)``, so its acceptance probability is

    alpha_j = sum_x min(q_j(x), r_j(x)) = 1 - TV(q_j, r_j)

and the expected number of accepted draft tokens of the block (the bonus / correction token
that every verification step adds is NOT counted) is

    L = sum_{j=1..gamma} prod_{i<=j} alpha_i .

Every function here takes a batch of blocks: ``draft_logits`` ``[B, gamma, V]`` (the drafter's
raw logits at the block's positions, q = softmax) and ``combined_probs`` ``[B, gamma, V]`` (r,
rows sum to 1, treated as a constant target: no gradient flows into it).  In teacher-forced
training position ``j`` of a block is conditioned on the TRUE previous tokens, not on the
drafter's own drafts, so ``prod alpha`` is the accepted length of a drafter that happens to
draft the true text's prefix; it is the standard offline surrogate.

Terms (all combined by :func:`drafter_loss`):

- distillation: ``KL(r || q)`` or ``TV(q, r)`` per position (:func:`divergence_per_position`),
  averaged over positions with :func:`positional_weights`;
- first-error focal term (:func:`first_error_focal`): the divergence at the first position of
  each block where ``argmax q != argmax r``;
- chain term (:func:`chain_loss`): ``-L``, the negative expected accepted length.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("kl", "tv")


def _upcast(draft_logits: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 logits -> float32 (softmax and log in full precision); float32 and
    float64 are kept."""
    return draft_logits if draft_logits.dtype in (torch.float32, torch.float64) else draft_logits.float()


def acceptance_probs(
    draft_probs: torch.Tensor,  # [B, gamma, V] q, rows sum to 1
    combined_probs: torch.Tensor,  # [B, gamma, V] r, rows sum to 1
) -> torch.Tensor:  # [B, gamma] alpha = sum_x min(q, r) = 1 - TV(q, r)
    """Per-position speculative acceptance probability; differentiable in ``draft_probs``
    (the gradient of ``min`` goes to q where q < r)."""
    return torch.minimum(draft_probs, combined_probs).sum(dim=-1)


def divergence_per_position(
    draft_logits: torch.Tensor,  # [B, gamma, V]
    combined_probs: torch.Tensor,  # [B, gamma, V]
    divergence: str = "kl",
) -> torch.Tensor:  # [B, gamma]
    """``kl``: KL(r || q) = sum_x r(x) (log r(x) - log q(x)), terms with r(x) = 0 are 0 (the
    forward KL, i.e. cross-entropy to r minus r's entropy: mass-covering, what sampling from r
    needs).  ``tv``: TV(q, r) = 1/2 sum_x |q(x) - r(x)| = 1 - alpha."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: must be one of {DIVERGENCES}, got {divergence!r}")
    target = combined_probs.detach()
    draft_logprobs = torch.log_softmax(_upcast(draft_logits), dim=-1)  # [B, gamma, V]
    if divergence == "tv":
        return 0.5 * (draft_logprobs.exp() - target).abs().sum(dim=-1)
    cross = torch.where(target > 0, target * draft_logprobs, torch.zeros_like(draft_logprobs))
    return torch.xlogy(target, target).sum(dim=-1) - cross.sum(dim=-1)


def positional_weights(
    gamma: int,
    decay: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [gamma], sums to 1
    """Weights of a block's positions: ``w_j = decay^(j-1) / sum_i decay^(i-1)`` for
    ``j = 1..gamma`` (``decay`` in (0, 1]: earlier positions count more, because a draft
    position only matters if every earlier one was accepted -- ``decay`` plays the role of a
    typical acceptance probability, and ``decay^(j-1)`` of the probability that the block
    reaches position j).  ``decay=None`` (or 1): uniform ``1/gamma``."""
    if gamma < 1:
        raise ValueError(f"gamma: must be >= 1, got {gamma}")
    if decay is not None and not 0.0 < decay <= 1.0:
        raise ValueError(f"positional decay: must be in (0, 1], got {decay}")
    base = 1.0 if decay is None else float(decay)
    raw = base ** torch.arange(gamma, dtype=torch.float32, device=device)  # [gamma]
    return raw / raw.sum()


def first_error_mask(
    draft_logits: torch.Tensor,  # [B, gamma, V]
    combined_probs: torch.Tensor,  # [B, gamma, V]
) -> torch.Tensor:  # [B, gamma] bool, at most one True per row
    """The first position of each block where the drafter is WRONG, defined as
    ``argmax_x q_j(x) != argmax_x r_j(x)`` (greedy disagreement; ties go to the lowest token
    id, torch's argmax).  A block with no wrong position has an all-False row."""
    wrong = draft_logits.argmax(dim=-1) != combined_probs.argmax(dim=-1)  # [B, gamma]
    wrong_so_far = torch.cumsum(wrong.long(), dim=-1)  # [B, gamma]
    return wrong & (wrong_so_far == 1)


def first_error_focal(
    draft_logits: torch.Tensor,  # [B, gamma, V]
    combined_probs: torch.Tensor,  # [B, gamma, V]
    divergence: str = "kl",
) -> torch.Tensor:  # scalar
    """``(1/B) sum_b D(r_{b,f(b)}, q_{b,f(b)})`` with ``f(b)`` the block's first wrong position
    (:func:`first_error_mask`); blocks without one contribute 0 (the sum is divided by all B
    blocks, so the term shrinks as errors disappear).  The position is selected by a hard mask
    (argmax is piecewise constant: no gradient through the choice); the gradient flows into the
    drafter through the divergence at the selected position."""
    per_position = divergence_per_position(draft_logits, combined_probs, divergence)  # [B, gamma]
    mask = first_error_mask(draft_logits.detach(), combined_probs)  # [B, gamma]
    selected = torch.where(mask, per_position, torch.zeros_like(per_position))
    return selected.sum() / per_position.shape[0]


def expected_accepted_length(
    acceptance: torch.Tensor,  # [B, gamma] alpha
) -> torch.Tensor:  # [B] sum_j prod_{i<=j} alpha_i
    """Expected accepted draft tokens per block (bonus token not counted)."""
    return torch.cumprod(acceptance, dim=-1).sum(dim=-1)


def chain_loss(
    draft_logits: torch.Tensor,  # [B, gamma, V]
    combined_probs: torch.Tensor,  # [B, gamma, V]
) -> torch.Tensor:  # scalar
    """``-(1/B) sum_b sum_j prod_{i<=j} alpha_{b,i}``, ``alpha = sum_x min(q, r)``: the negative
    expected accepted length, differentiable in the drafter (through every alpha, earlier
    positions also through the products of the later ones)."""
    draft_probs = torch.softmax(_upcast(draft_logits), dim=-1)
    acceptance = acceptance_probs(draft_probs, combined_probs.detach())  # [B, gamma]
    return -expected_accepted_length(acceptance).mean()


def drafter_loss(
    draft_logits: torch.Tensor,  # [B, gamma, V]
    combined_probs: torch.Tensor,  # [B, gamma, V]
    *,
    divergence: str = "kl",
    positional: float | None = None,
    focal: float = 0.0,
    chain: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss = sum_j w_j * mean_b D_{b,j} + focal * first_error_focal + chain * chain_loss``.

    ``w`` = :func:`positional_weights` (``positional`` = decay, None = uniform), ``D`` =
    :func:`divergence_per_position`.  Returns the loss (scalar, differentiable) and its parts
    as floats: ``distill``, ``focal``, ``chain`` (unweighted terms; 0 where weighted 0 and not
    computed), ``acceptance`` (mean alpha) and ``accepted_length`` (mean per block)."""
    if draft_logits.shape != combined_probs.shape or draft_logits.dim() != 3:
        raise ValueError(f"draft_logits {tuple(draft_logits.shape)} and combined_probs "
                         f"{tuple(combined_probs.shape)} must both be [B, gamma, V]")
    gamma = draft_logits.shape[1]
    weights = positional_weights(gamma, positional, device=draft_logits.device)  # [gamma]
    per_position = divergence_per_position(draft_logits, combined_probs, divergence)  # [B, gamma]
    distill = (per_position.mean(dim=0) * weights).sum()
    loss = distill
    focal_term = chain_term = torch.zeros((), device=draft_logits.device)
    if focal:
        focal_term = first_error_focal(draft_logits, combined_probs, divergence)
        loss = loss + focal * focal_term
    if chain:
        chain_term = chain_loss(draft_logits, combined_probs)
        loss = loss + chain * chain_term
    with torch.no_grad():
        acceptance = acceptance_probs(torch.softmax(_upcast(draft_logits), dim=-1), combined_probs)
        parts = {"distill": float(distill), "focal": float(focal_term), "chain": float(chain_term),
                 "acceptance": float(acceptance.mean()),
                 "accepted_length": float(expected_accepted_length(acceptance).mean())}
    return loss, parts

"""Batched speculative verification against the combined distribution r.

Terms, per request (row) b with ``num_drafts[b]`` pending draft tokens:

* **accepted** tokens: draft i is accepted with probability min(1, r_i(x_i) / q_i(x_i)),
  where q_i is the distribution the draft was *really* sampled from (under ``alternate``
  that is a different model at different positions) and r_i the tempered combined
  distribution at that position.  Acceptance stops at the first rejection.
* **recovered** token: at the first rejected position j, a token is drawn from
  norm(max(0, r_j - q_j)) and everything after it is discarded.
* **final** token: if every draft is accepted and r is known one position further
  (``has_final[b]``: every model has scored that position), one more token is drawn
  from r there.  A verifier's own bonus token is *not* produced here: it is sampled from
  that model's p, not from r, and goes back to the ledger as a new proposal.

Each emitted token is distributed exactly as r (the standard speculative-sampling proof).
Greedy rows need no special case: with one-hot q and r (see :mod:`vllm_cos.sampling`) a
draft is accepted iff it is argmax r, and the recovered token is argmax r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cos.sampling import draw_uniforms, sample_from_probs

PLACEHOLDER = -1


@dataclass
class VerifyOutput:
    token_ids: torch.Tensor  # [batch, max_drafts + 1] int64, PLACEHOLDER after the emitted ones
    num_emitted: torch.Tensor  # [batch] int64
    num_accepted: torch.Tensor  # [batch] int64, accepted drafts
    rejected: torch.Tensor  # [batch] bool, a draft was rejected (pending state is void)


def verify(
    draft_token_ids: torch.Tensor,  # [batch, max_drafts] int64 (padding ignored)
    num_drafts: torch.Tensor,  # [batch] int64
    proposal_probs: torch.Tensor,  # [batch, max_drafts, vocab] q each draft was sampled from
    target_probs: torch.Tensor,  # [batch, max_drafts + 1, vocab] tempered r per position
    has_final: torch.Tensor,  # [batch] bool, target_probs[b, num_drafts[b]] is valid
    generators: list[torch.Generator | None] | None = None,
) -> VerifyOutput:
    batch, max_drafts = draft_token_ids.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    num_drafts = num_drafts.to(device=device, dtype=torch.int64)

    # Two uniforms per position and row (accept, sample); a seeded row draws 2 * (num_drafts + 1)
    # from its own generator (none when it emits nothing), whatever the rest of the batch does.
    uniforms = torch.rand(batch, max_drafts + 1, 2, dtype=torch.float64, device=device)
    seeded = []
    if generators and any(g is not None for g in generators):  # host lists only for seeded rows
        drafts_per_row, final_per_row = num_drafts.tolist(), has_final.tolist()
        seeded = [b for b, g in enumerate(generators) if g is not None
                  and (drafts_per_row[b] > 0 or final_per_row[b])]
    if seeded:
        counts = [2 * (drafts_per_row[b] + 1) for b in seeded]
        for b, count, u in zip(seeded, counts, draw_uniforms(counts, [generators[b] for b in seeded], device)):
            uniforms[b, : count // 2] = u.view(-1, 2)
    accept_u, sample_u = uniforms[..., 0], uniforms[..., 1]  # [batch, max_drafts + 1]

    positions = torch.arange(max_drafts, device=device)
    is_draft = positions.unsqueeze(0) < num_drafts.unsqueeze(1)  # [batch, max_drafts]
    safe_drafts = torch.where(is_draft, draft_token_ids, 0).unsqueeze(-1)
    draft_q = proposal_probs.gather(-1, safe_drafts).squeeze(-1).double()  # [batch, max_drafts]
    draft_r = target_probs[:, :max_drafts].gather(-1, safe_drafts).squeeze(-1).double()
    accepted = accept_u[:, :max_drafts] * draft_q < draft_r  # P = min(1, r / q)
    rejected_at = is_draft & ~accepted
    any_rejected = rejected_at.any(dim=1)
    # index of the first rejection (a column of True appended so argmax is defined)
    first_rejected = torch.cat([rejected_at, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1).int().argmax(dim=1)
    num_accepted = torch.where(any_rejected, first_rejected, num_drafts)

    # Distribution of the token after the accepted run: residual on rejection, r if final.
    last = num_accepted  # [batch]
    r_last = target_probs[rows, last].double()  # [batch, vocab]
    if max_drafts > 0:
        q_last = proposal_probs[rows, last.clamp(max=max_drafts - 1)].double()
        residual = (r_last - q_last).clamp_(min=0)
        # r == q leaves nothing to resample from (a rejection there has probability 0).
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, r_last)
        next_dist = torch.where(any_rejected.unsqueeze(-1), residual, r_last)
    else:
        next_dist = r_last
    next_token = sample_from_probs(next_dist, sample_u[rows, last])  # [batch]
    emits_next = any_rejected | has_final.to(device)

    token_ids = torch.full((batch, max_drafts + 1), PLACEHOLDER, dtype=torch.int64, device=device)
    keep = positions.unsqueeze(0) < num_accepted.unsqueeze(1)
    token_ids[:, :max_drafts] = torch.where(keep, draft_token_ids, PLACEHOLDER)
    token_ids[rows, last] = torch.where(emits_next, next_token, token_ids[rows, last])
    return VerifyOutput(token_ids=token_ids,
                        num_emitted=num_accepted + emits_next.long(),
                        num_accepted=num_accepted,
                        rejected=any_rejected)

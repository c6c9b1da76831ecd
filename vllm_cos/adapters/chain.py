"""The tokens a row's proposer verifies after the group's first pass (no vLLM imports).

A row's *pending chain* is its lazily scored drafts (:class:`~vllm_cos.adapters.step.PendingDrafts`,
usually none) followed by the served model's proposal, in consecutive columns of the
sampled-token tensor from ``start`` = proposal slot - count.  Column j of the chain tensors
(L = P + 1 columns) is the chain's token j for j <= count; columns past a row's proposal repeat
the proposal (same slot, same values), so every write-back is deterministic and no row's chain
leaves the tensor.

Verification is :func:`vllm_cos.verify.verify` over the chain: under ``alternate`` the proposal
is one more draft (q = the served model's distribution); under ``naive`` (or a step that drafts
nothing, ``final``) its position is drawn from r once the drafts before it are accepted.  Seeded
rows race at each position instead (:func:`vllm_cos.coupling.coupled_verify`), which emits r's
own race winner at the proposal's position either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cos.coupling import coupled_verify
from vllm_cos.verify import VerifyOutput, verify


def seeded_races(sampling, layout, drafts, num_drafts, r, token_ids, accepted, rejected):
    """Seeded rows' verification replaced by :func:`vllm_cos.coupling.coupled_verify` (``layout``:
    the (request, position) of each of the B x K rows of r [B, K, V]); unseeded rows keep the
    min(1, r/q) result (``token_ids``, ``accepted``, ``rejected`` of :func:`vllm_cos.verify.verify`)."""
    batch, k, vocab = r.shape
    noise = sampling.noise(layout.position, vocab, layout.request).view(batch, k, vocab)
    coupled = coupled_verify(drafts, num_drafts, r, noise)
    seeded = sampling.seeded
    return (torch.where(seeded.unsqueeze(1), coupled.token_ids, token_ids),
            torch.where(seeded, coupled.num_accepted, accepted), torch.where(seeded, coupled.rejected, rejected))


@dataclass
class PendingChain:
    count: torch.Tensor  # [B] int64 lazily scored drafts before the proposal
    start: torch.Tensor  # [B] int64 slot of the chain's first token
    offset: torch.Tensor  # [B, L] int64 chain token of each column: min(column, count)
    target_logits: torch.Tensor  # [B, L, V] the served model's raw logits there
    proposal_probs: torch.Tensor  # [B, L, V] the q each token was drawn from
    grammar: torch.Tensor | None  # [B, L, V] additive structured-output mask, or None
    pending: bool  # the step has lazily scored drafts (P > 0)

    @property
    def width(self) -> int:
        return self.offset.shape[1]

    @classmethod
    def of(cls, proposals, batch: int) -> "PendingChain":
        """The chain of the first ``batch`` rows of a step's :class:`ServedProposals`."""
        slot, lazy = proposals.slot[:batch], proposals.pending
        if lazy is None:
            zeros = torch.zeros_like(slot)
            grammar = None if proposals.grammar is None else proposals.grammar[:batch, None]
            return cls(zeros, slot, zeros.unsqueeze(1), proposals.target_logits[:batch, None],
                       proposals.proposal_probs[:batch, None], grammar, False)
        count = lazy.count[:batch]
        columns = torch.arange(lazy.target_logits.shape[1] + 1, device=slot.device)
        offset = torch.minimum(columns.unsqueeze(0), count.unsqueeze(1))  # [B, L]

        def columns_of(drafts, proposal):  # [B, P, V] + [B, V] -> [B, L, V] by offset
            both = torch.cat([drafts[:batch], proposal[:batch, None]], dim=1)
            index = torch.where(offset < count.unsqueeze(1), offset, both.shape[1] - 1)
            return both.gather(1, index.unsqueeze(-1).expand(-1, -1, both.shape[-1]))

        grammar = None if proposals.grammar is None else columns_of(lazy.grammar, proposals.grammar)
        return cls(count, slot - count, offset, columns_of(lazy.target_logits, proposals.target_logits),
                   columns_of(lazy.proposal_probs, proposals.proposal_probs), grammar, True)

    def slots(self) -> torch.Tensor:
        """[B, L] the sampled-token column of each chain column."""
        return self.start.unsqueeze(1) + self.offset

    def grammar_rows(self) -> torch.Tensor | None:
        return None if self.grammar is None else self.grammar.reshape(-1, self.grammar.shape[-1])

    def verify(self, r, tokens, live, sampling, layout, final: bool) -> VerifyOutput:
        """Verify ``tokens`` [B, L] against r [B, L, V] in the ``live`` [B] rows; the output's
        columns past a row's proposal repeat its proposal column."""
        batch, width, vocab = r.shape
        lengths = torch.where(live, self.count + 1, 0) if self.pending else live.long()  # [B] tokens to verify
        extended = torch.cat([r, r.new_zeros(batch, 1, vocab)], dim=1)  # [B, L+1, V]
        if final:  # the drafts only; r at the proposal's position is the final distribution
            out = verify(tokens, (lengths - 1).clamp(min=0), self.proposal_probs, extended, live)
        else:
            out = verify(tokens, lengths, self.proposal_probs, extended, torch.zeros_like(live))
        token_ids, accepted, rejected, emitted = out.token_ids, out.num_accepted, out.rejected, out.num_emitted
        if sampling.seeded is not None:  # r's own race at every position (vllm_cos.coupling)
            token_ids, accepted, rejected = seeded_races(sampling, layout, tokens, lengths, r, token_ids,
                                                         accepted, rejected)
            emitted = torch.where(sampling.seeded, accepted + rejected.long(), emitted)
        token_ids = token_ids[:, :width].gather(1, self.offset) if self.pending else token_ids[:, :width]
        return VerifyOutput(token_ids=token_ids, num_emitted=emitted, num_accepted=accepted, rejected=rejected)

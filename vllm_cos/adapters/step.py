"""One CoS engine step as one object, with every hand-off asserted (no vLLM imports).

A step crosses three runner calls, in this order:

1. the runner applies the structured-output bitmask: the grammar hook hands the mask to
   :class:`GrammarHandoff` instead of writing it into the served model's logits;
2. the runner samples: our sampler (plain or rejection) takes the mask, verifies the pending
   drafts against r and draws the served model's *proposal* -- the token T proposes at the
   next position, sampled from T's own (controlled) distribution, **not yet an output token**
   (vLLM's rejection sampler would call it the bonus token and emit it; we do not).  It opens
   a :class:`CoSStep` holding those proposals on the :class:`StepChannel`;
3. the proposer (same step, before the runner's bookkeeping) gets the sampled-token tensor
   attached through ``prepare_next_token_ids_padded``, consumes the step, lets the draft
   group score each proposal, and accepts or replaces it in that tensor.

A broken hand-off raises :class:`StepInvariantError` naming the invariant; nothing is ever
emitted unverified.  Profiling runs (rows without requests) open steps nobody consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class StepInvariantError(RuntimeError):
    """A CoS step hand-off did not happen as the step requires; the message names it."""

    def __init__(self, invariant: str, detail: str):
        self.invariant = invariant
        super().__init__(f"cos step invariant '{invariant}' broken: {detail}")


@dataclass
class PendingDrafts:
    """The group's drafts some member scored lazily (:mod:`vllm_cos.lazy`): written into
    sampled_token_ids before the served proposal, verified with it after the group's first pass.
    Column j of row i is slot ``slot[i] - count[i] + j`` (j < count[i]; P columns in all)."""

    count: torch.Tensor  # [B] int64, drafts pending before the row's proposal (0: none)
    target_logits: torch.Tensor  # [B, P, V] T's raw logits at those slots
    proposal_probs: torch.Tensor  # [B, P, V] the q each was drafted from
    grammar: torch.Tensor | None  # [B, P, V] additive structured-output mask there, or None


@dataclass
class ServedProposals:
    """The served model's unverified proposals of one step, at most one per row (B rows)."""

    rows: torch.Tensor  # [B] bool, the row ends in a proposal the group must verify
    slot: torch.Tensor  # [B] int64, its column in sampled_token_ids (= drafts before it)
    target_logits: torch.Tensor  # [B, V] T's raw logits at that position
    proposal_probs: torch.Tensor  # [B, V] the distribution it was sampled from
    grammar: torch.Tensor | None  # [B, V] additive structured-output mask there, or None
    pending: PendingDrafts | None = None  # lazily scored drafts before the proposal, or None


@dataclass
class CoSStep:
    """Everything the proposer needs from the sampler call of the same step."""

    index: int
    req_ids: tuple[str, ...]
    proposals: ServedProposals
    controls: Any  # vllm_cos.adapters.controls.Controls of this batch
    sampling: Any  # vllm_cos.adapters.controls.RowSampling of this batch
    logprobs: Any = None  # LogprobRows to refill with r at the proposals' slots
    sampled: torch.Tensor | None = None  # [B, K+1] the runner's sampled-token tensor
    discard: torch.Tensor | None = None  # [B] bool, partial-prefill rows that emit nothing
    fused: bool = False  # drawn straight from r (vllm_cos.adapters.fusion): nothing to verify
    consumed: bool = False

    @property
    def profiling(self) -> bool:
        return len(self.req_ids) < self.proposals.rows.shape[0]


@dataclass
class StepChannel:
    """Carries one :class:`CoSStep` from the sampler to the proposer of the same engine step."""

    current: CoSStep | None = None
    opened: int = 0

    def open(self, req_ids, proposals: ServedProposals, controls, sampling, logprobs=None,
             fused: bool = False) -> CoSStep:
        previous = self.current
        if previous is not None and not previous.consumed and not previous.profiling:
            raise StepInvariantError(
                "proposals-consumed", f"step {previous.index} ({len(previous.req_ids)} requests) was sampled "
                f"but its proposer never ran; its served-model proposals would be emitted unverified")
        self.opened += 1
        self.current = CoSStep(self.opened, tuple(req_ids), proposals, controls, sampling, logprobs, fused=fused)
        return self.current

    def attach_sampled(self, sampled: torch.Tensor, discard: torch.Tensor | None) -> None:
        step = self._live("sampled-attached")
        if step.sampled is not None:
            raise StepInvariantError("sampled-attached", f"step {step.index} got a second sampled-token tensor")
        if sampled.shape[0] < step.proposals.rows.shape[0]:
            raise StepInvariantError("same-batch", f"step {step.index} sampled {step.proposals.rows.shape[0]} "
                                     f"rows but the runner hands over {sampled.shape[0]}")
        step.sampled, step.discard = sampled, discard

    def consume(self, req_ids) -> CoSStep:
        step = self._live("step-open")
        req_ids = tuple(req_ids)
        if req_ids != step.req_ids:
            raise StepInvariantError("same-batch", f"step {step.index} sampled requests {list(step.req_ids)[:4]}... "
                                     f"but the proposer drafts for {list(req_ids)[:4]}...")
        if step.sampled is None:
            raise StepInvariantError("sampled-attached", f"step {step.index}: the proposer ran without the "
                                     f"sampled-token tensor, so a verified proposal could not be written back")
        step.consumed = True
        return step

    def _live(self, invariant: str) -> CoSStep:
        step = self.current
        if step is None or step.consumed:
            which = "no step was sampled" if step is None else f"step {step.index} was already consumed"
            raise StepInvariantError(invariant, f"{which}; the sampler and the proposer are out of step")
        return step


@dataclass
class GrammarHandoff:
    """The structured-output mask of the logits the runner is about to sample (one at a time)."""

    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # additive: 0 allowed, -inf not, same rows as ``logits``
    _taken: bool = field(default=True, repr=False)

    def put(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        if not self._taken:
            raise StepInvariantError("grammar-consumed", "a structured-output mask was handed over and "
                                     "never reached the CoS sampler")
        self.logits, self.mask, self._taken = logits, mask, False

    def take(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self._taken:
            return None
        if self.logits is not logits:
            raise StepInvariantError("grammar-same-logits", "the structured-output mask belongs to other "
                                     "logits than the ones being sampled")
        mask, self.logits, self.mask, self._taken = self.mask, None, None, True
        return mask

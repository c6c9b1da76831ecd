"""The pending-token ledger of one request (DESIGN.md).

Entries are the positions after the emitted text, in order.  Each holds the raw logits of
every model that has scored it so far and, once somebody proposed a token there, that
token, its proposer and the proposal distribution q it was drawn from.  The entry after
the last proposed token is the *frontier*: it may carry scores but no token yet.

Verification is lazy: :meth:`Ledger.ready` reports how many leading entries every model
has scored.  Those are verified against r (:mod:`vllm_cos.verify`); if the frontier is
complete too, the next token is drawn from r directly.  Schedules only decide who scores
and proposes next, so every mode shares this one structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    member_logits: list[torch.Tensor | None]  # per model: raw logits [vocab] or None
    token: int | None = None
    proposer: int | None = None
    proposal_probs: torch.Tensor | None = None  # [vocab], what `token` was sampled from

    def scored_by_all(self) -> bool:
        return all(x is not None for x in self.member_logits)


@dataclass
class Ledger:
    num_models: int
    entries: list[Entry] = field(default_factory=list)

    @property
    def num_proposed(self) -> int:
        """Pending tokens; also the index of the frontier entry."""
        return sum(e.token is not None for e in self.entries)

    def pending_tokens(self) -> list[int]:
        return [e.token for e in self.entries if e.token is not None]

    def _entry(self, index: int) -> Entry:
        while len(self.entries) <= index:
            self.entries.append(Entry(member_logits=[None] * self.num_models))
        return self.entries[index]

    def add_scores(self, model: int, first_index: int, logits: torch.Tensor) -> None:
        """Model ``model`` scored entries first_index.. (``logits`` [m, vocab], one row each)."""
        if first_index + logits.shape[0] > self.num_proposed + 1:
            raise ValueError("scores reach past the frontier")
        for offset, row in enumerate(logits):
            self._entry(first_index + offset).member_logits[model] = row

    def has_scored_frontier(self, model: int) -> bool:
        index = self.num_proposed
        return index < len(self.entries) and self.entries[index].member_logits[model] is not None

    def propose(self, model: int, token: int, proposal_probs: torch.Tensor) -> None:
        entry = self.entries[self.num_proposed]
        entry.token, entry.proposer, entry.proposal_probs = token, model, proposal_probs

    def frontier_logits(self, model: int) -> torch.Tensor:
        return self.entries[self.num_proposed].member_logits[model]

    def ready(self) -> tuple[int, bool]:
        """(complete proposed entries from the front, whether the next one is a complete frontier)."""
        count = 0
        for entry in self.entries:
            if not entry.scored_by_all():
                return count, False
            if entry.token is None:
                return count, True
            count += 1
        return count, False

    def consume(self, num_entries: int) -> None:
        """Drop the first entries (emitted tokens)."""
        del self.entries[:num_entries]

    def clear(self) -> None:
        self.entries.clear()

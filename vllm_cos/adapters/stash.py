"""The draft group's proposals between two steps, in one preallocated buffer (no vLLM imports).

The proposer drafts in step s; the served model verifies in step s+1, where r at draft
position j needs every group member's logits there.  They live in a buffer allocated once at
model load, ``[max_num_seqs, max_drafts, num_members, vocab]`` in the members' logits dtype,
so vLLM's memory profiling (which runs after load) counts it and nothing grows per request.
The drafter's q is *not* stored: it is recomputed from the drafting member's logits with the
same function and shape (:meth:`CoSCore.draft_proposals`), which gives the same q.

Requests get a slot on first use and give it back when they finish, are aborted or are
preempted (:meth:`free`); a request's drafts are read once (:meth:`take`).
"""

from __future__ import annotations

import torch

NO_DRAFT = -2  # never a token id, never vLLM's placeholder (-1)


class DraftStash:
    def __init__(self, max_requests: int, max_drafts: int, num_members: int, vocab: int,
                 device="cpu", dtype=torch.float32):
        self.token_ids = torch.full((max_requests, max(max_drafts, 1)), NO_DRAFT, dtype=torch.long, device=device)
        self.member_logits = torch.zeros(max_requests, max(max_drafts, 1), num_members, vocab,
                                         dtype=dtype, device=device)  # [S, K, M, V]
        self.complete_counts = torch.zeros(max_requests, dtype=torch.long, device=device)  # [S]
        self.slots: dict[str, int] = {}
        self._free = list(range(max_requests - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return self.member_logits.numel() * self.member_logits.element_size() + \
            self.token_ids.numel() * self.token_ids.element_size()

    def bytes_per_request(self) -> int:
        return self.nbytes // self.token_ids.shape[0]

    def _slots(self, req_ids, create: bool) -> list[int]:
        out = []
        for req_id in req_ids:
            slot = self.slots.get(req_id, -1)
            if slot < 0 and create:
                if not self._free:
                    raise RuntimeError(f"cos: draft stash full ({len(self.slots)} requests hold slots); "
                                       f"a finished request was not freed")
                slot = self._free.pop()
                self.slots[req_id] = slot
            out.append(slot)
        return out

    def put(self, req_ids, drafts: torch.Tensor, member_logits: torch.Tensor,
            void: torch.Tensor | None = None, complete: int | None = None) -> None:
        """drafts [B, K] int64, member_logits [B, K, M, V] of the B requests ``req_ids``;
        ``void`` [B] bool: rows whose drafts must not be verified (stored as NO_DRAFT);
        ``complete``: how many leading drafts have every member's logits (None: all K; the
        rest were scored lazily, :mod:`vllm_cos.lazy`)."""
        slots = torch.tensor(self._slots(req_ids, create=True), dtype=torch.long, device=self.token_ids.device)
        k = drafts.shape[1]
        drafts = drafts.to(self.token_ids.device)
        if void is not None:
            drafts = torch.where(void.to(drafts.device).unsqueeze(1), NO_DRAFT, drafts)
        self.token_ids[slots] = NO_DRAFT
        self.token_ids[slots, :k] = drafts
        self.member_logits[slots, :k] = member_logits.to(self.member_logits.dtype)
        self.complete_counts[slots] = k if complete is None else complete

    def take(self, req_ids, max_drafts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids [B, K] with NO_DRAFT where none, member logits [B, K, M, V], leading drafts
        with every member's logits [B] (0: none)); read once."""
        slot_list = self._slots(req_ids, create=False)
        slots = torch.tensor(slot_list, dtype=torch.long, device=self.token_ids.device)
        known = (slots >= 0).unsqueeze(1)
        safe = slots.clamp(min=0)
        k = min(max_drafts, self.token_ids.shape[1])
        ids = torch.where(known, self.token_ids[safe, :k], NO_DRAFT)
        logits = self.member_logits[safe, :k]
        if k < max_drafts:
            pad = max_drafts - k
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), NO_DRAFT)], dim=1)
            logits = torch.cat([logits, logits.new_zeros(logits.shape[0], pad, *logits.shape[2:])], dim=1)
        complete = torch.where(slots >= 0, self.complete_counts[safe], 0)
        self.token_ids[slots[slots >= 0]] = NO_DRAFT
        return ids, logits, complete

    def free(self, req_ids) -> None:
        for req_id in req_ids:
            slot = self.slots.pop(req_id, None)
            if slot is not None:
                self.token_ids[slot] = NO_DRAFT
                self._free.append(slot)

    def __len__(self) -> int:
        return len(self.slots)

"""The proposer's pending chain (vllm_cos.adapters.chain): lazily scored drafts, then the served
proposal, laid out in the sampled-token columns and verified against r.

* layout: columns past a row's proposal repeat it (same slot, same values);
* greedy: a draft survives iff it is argmax r, the first miss emits argmax r and ends the row;
* exactness (chi-square, 200k rows): under ``alternate`` the two chain tokens come out as r at
  each position (the second given the first was accepted); under ``final`` (naive, or a step
  that drafts nothing) the proposal's position is drawn from r.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from stats import P_THRESHOLD, chi2_pvalue

from vllm_cos.adapters.chain import PendingChain
from vllm_cos.adapters.controls import RowLayout
from vllm_cos.adapters.step import PendingDrafts, ServedProposals

V = 6


def _proposals(count, slot, q_drafts, q_served, width=2):
    batch = len(count)
    return ServedProposals(rows=torch.ones(batch, dtype=torch.bool), slot=torch.tensor(slot),
                           target_logits=torch.zeros(batch, V), proposal_probs=q_served, grammar=None,
                           pending=PendingDrafts(count=torch.tensor(count), target_logits=torch.zeros(batch, width, V),
                                                 proposal_probs=q_drafts, grammar=None))


def _unseeded():
    return SimpleNamespace(seeded=None)


def test_columns_past_the_proposal_repeat_it():
    q_drafts = torch.rand(2, 2, V)
    q_served = torch.rand(2, V)
    chain = PendingChain.of(_proposals([2, 0], [3, 1], q_drafts, q_served), 2)
    assert chain.width == 3 and chain.offset.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert chain.slots().tolist() == [[1, 2, 3], [1, 1, 1]]
    assert torch.equal(chain.proposal_probs[0], torch.cat([q_drafts[0], q_served[:1]]))
    assert torch.equal(chain.proposal_probs[1], q_served[1].expand(3, V))


def test_greedy_chain_keeps_argmax_r_and_ends_at_the_first_miss():
    r = torch.zeros(3, 2, V)
    r[:, 0, 1] = 1.0
    r[:, 1, 4] = 1.0  # argmax r: 1 then 4
    tokens = torch.tensor([[1, 4], [1, 5], [2, 4]])
    one_hot = torch.nn.functional.one_hot(tokens, V).float()
    chain = PendingChain(count=torch.ones(3, dtype=torch.long), start=torch.ones(3, dtype=torch.long),
                         offset=torch.tensor([[0, 1]] * 3), target_logits=torch.zeros(3, 2, V),
                         proposal_probs=one_hot, grammar=None, pending=True)
    live = torch.ones(3, dtype=torch.bool)
    out = chain.verify(r, tokens, live, _unseeded(), None, final=False)
    assert out.token_ids.tolist() == [[1, 4], [1, 4], [1, -1]]
    assert out.num_emitted.tolist() == [2, 2, 1] and out.rejected.tolist() == [False, True, True]
    final = chain.verify(r, tokens, live, _unseeded(), None, final=True)
    assert final.token_ids.tolist() == [[1, 4], [1, 4], [1, -1]]  # the proposal's position is argmax r


def test_chain_tokens_follow_r_in_both_modes():
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    r = torch.softmax(torch.randn(2, V, generator=gen) * 1.5, dim=-1)  # r at the two chain positions
    q = torch.softmax(torch.randn(2, V, generator=gen) * 1.5, dim=-1)  # drafter's q, then T's p
    tokens = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(2)], dim=1)
    chain = PendingChain(count=torch.ones(n, dtype=torch.long), start=torch.ones(n, dtype=torch.long),
                         offset=torch.tensor([[0, 1]]).expand(n, 2), target_logits=torch.zeros(1, 2, V),
                         proposal_probs=q.expand(n, 2, V), grammar=None, pending=True)
    torch.manual_seed(4)
    for final in (False, True):
        out = chain.verify(r.expand(n, 2, V), tokens, torch.ones(n, dtype=torch.bool), _unseeded(),
                           RowLayout.grid(n, 2, "cpu"), final=final)
        first = out.token_ids[:, 0]
        assert chi2_pvalue(np.bincount(first.numpy(), minlength=V), r[0].numpy()) > P_THRESHOLD
        # after an accepted draft the second token is emitted and follows r there
        after = out.token_ids[(out.num_accepted >= 1), 1]
        assert (after >= 0).all() and after.numel() > n // 3
        assert chi2_pvalue(np.bincount(after.numpy(), minlength=V), r[1].numpy()) > P_THRESHOLD, final

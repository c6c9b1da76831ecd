"""The step hand-offs (vllm_cos.adapters.step): each broken invariant raises with its name,
and the draft stash's slots (vllm_cos.adapters.stash) are read once and freed."""

from __future__ import annotations

import pytest
import torch

from vllm_cos.adapters.stash import NO_DRAFT, DraftStash
from vllm_cos.adapters.step import GrammarHandoff, ServedProposals, StepChannel, StepInvariantError


def _proposals(batch: int = 2) -> ServedProposals:
    return ServedProposals(rows=torch.ones(batch, dtype=torch.bool), slot=torch.zeros(batch, dtype=torch.long),
                           target_logits=torch.zeros(batch, 4), proposal_probs=torch.full((batch, 4), 0.25),
                           grammar=None)


def _invariant(fn) -> str:
    with pytest.raises(StepInvariantError) as info:
        fn()
    return info.value.invariant


def test_a_full_step_passes():
    channel = StepChannel()
    channel.open(["a", "b"], _proposals(), None, None)
    channel.attach_sampled(torch.zeros(2, 3, dtype=torch.int32), None)
    step = channel.consume(["a", "b"])
    assert step.consumed and step.index == 1
    channel.open(["a", "b"], _proposals(), None, None)  # the next step may open


def test_a_step_never_consumed_is_refused_at_the_next_sampler_call():
    channel = StepChannel()
    channel.open(["a", "b"], _proposals(), None, None)
    assert _invariant(lambda: channel.open(["a", "b"], _proposals(), None, None)) == "proposals-consumed"


def test_profiling_steps_need_no_proposer():
    channel = StepChannel()
    channel.open([], _proposals(), None, None)  # rows without requests: a profiling run
    channel.open(["a", "b"], _proposals(), None, None)


def test_the_proposer_without_a_step_is_refused():
    assert _invariant(lambda: StepChannel().consume(["a"])) == "step-open"
    channel = StepChannel()
    channel.open(["a", "b"], _proposals(), None, None)
    channel.attach_sampled(torch.zeros(2, 3), None)
    channel.consume(["a", "b"])
    assert _invariant(lambda: channel.consume(["a", "b"])) == "step-open"  # consumed once


def test_the_proposer_without_the_sampled_tensor_is_refused():
    channel = StepChannel()
    channel.open(["a", "b"], _proposals(), None, None)
    assert _invariant(lambda: channel.consume(["a", "b"])) == "sampled-attached"


def test_other_requests_or_a_smaller_tensor_are_refused():
    channel = StepChannel()
    channel.open(["a", "b"], _proposals(), None, None)
    assert _invariant(lambda: channel.attach_sampled(torch.zeros(1, 3), None)) == "same-batch"
    channel.attach_sampled(torch.zeros(2, 3), None)
    assert _invariant(lambda: channel.attach_sampled(torch.zeros(2, 3), None)) == "sampled-attached"
    assert _invariant(lambda: channel.consume(["b", "a"])) == "same-batch"


def test_grammar_mask_goes_to_its_own_logits_once():
    handoff = GrammarHandoff()
    logits, other = torch.zeros(2, 4), torch.zeros(2, 4)
    assert handoff.take(logits) is None  # no structured output this step
    mask = torch.zeros(2, 4)
    handoff.put(logits, mask)
    assert _invariant(lambda: handoff.put(logits, mask)) == "grammar-consumed"
    assert _invariant(lambda: handoff.take(other)) == "grammar-same-logits"
    assert handoff.take(logits) is mask
    assert handoff.take(logits) is None


def test_stash_put_take_free():
    stash = DraftStash(max_requests=2, max_drafts=3, num_members=2, vocab=5)
    logits = torch.randn(2, 2, 2, 5)
    stash.put(["a", "b"], torch.tensor([[1, 2], [3, 4]]), logits)
    ids, got, complete = stash.take(["b", "x", "a"], 3)
    assert complete.tolist() == [2, 0, 2]  # put without ``complete``: every member scored all
    assert ids.tolist() == [[3, 4, NO_DRAFT], [NO_DRAFT] * 3, [1, 2, NO_DRAFT]]
    assert torch.equal(got[0, :2], logits[1]) and torch.equal(got[2, :2], logits[0])
    assert (stash.take(["a", "b"], 3)[0] == NO_DRAFT).all()  # read once
    stash.free(["a"])
    assert len(stash) == 1
    stash.put(["c"], torch.tensor([[0]]), logits[:1, :1])  # a's slot is reused
    with pytest.raises(RuntimeError, match="draft stash full"):
        stash.put(["d"], torch.tensor([[0]]), logits[:1, :1])
    assert stash.bytes_per_request() == 3 * 2 * 5 * 4 + 3 * 8


def test_stash_void_rows_are_never_verifiable():
    stash = DraftStash(max_requests=3, max_drafts=2, num_members=1, vocab=4)
    stash.put(["a", "b", "c"], torch.tensor([[1, 2], [3, 0], [2, 2]]), torch.randn(3, 2, 1, 4),
              void=torch.tensor([False, True, False]))
    ids, _, _ = stash.take(["a", "b", "c"], 2)
    assert ids.tolist() == [[1, 2], [NO_DRAFT, NO_DRAFT], [2, 2]]

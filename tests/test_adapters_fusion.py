"""Fused verify-only steps: the hand-off, the plan and the forward hook (fakes, no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_cos.adapters.fusion import FusedGroup, fusable, model_forward_hook
from vllm_cos.adapters.step import StepInvariantError


def test_handoff_carries_one_steps_logits_once():
    fusion = FusedGroup()
    fusion.plan(True)
    logits = torch.randn(2, 3, 7)  # [M, B, V]
    fusion.put(logits)
    assert not fusion.planned
    assert fusion.take(3) is logits
    assert fusion.take(3) is None  # taken: the next sampler call is not fused


def test_unplanned_step_is_not_fused():
    fusion = FusedGroup()
    fusion.plan(False)
    assert fusion.take(4) is None
    with pytest.raises(StepInvariantError) as err:
        fusion.put(torch.zeros(1, 4, 5))
    assert err.value.invariant == "fused-planned"


@pytest.mark.parametrize("forward_ran,sampled_rows,invariant", [
    (False, 4, "fused-forward"),  # planned, but the forward never put the group's logits
    (True, 3, "fused-same-batch"),  # the forward scored 4 requests, the sampler samples 3
])
def test_broken_handoff_raises(forward_ran, sampled_rows, invariant):
    fusion = FusedGroup()
    fusion.plan(True)
    if forward_ran:
        fusion.put(torch.zeros(1, 4, 5))
    with pytest.raises(StepInvariantError) as err:
        fusion.take(sampled_rows)
    assert err.value.invariant == invariant


def test_replanning_drops_a_stale_result():
    fusion = FusedGroup()
    fusion.plan(True)
    fusion.put(torch.zeros(1, 2, 5))
    fusion.plan(False)  # the next step's _update_states
    assert fusion.take(2) is None


def _runner(generators=None, prompt_logprobs=None):
    return SimpleNamespace(input_batch=SimpleNamespace(generators=generators or {}),
                           num_prompt_logprobs=prompt_logprobs or {})


def _scheduled(drafts=None):
    return SimpleNamespace(scheduled_spec_decode_tokens=drafts or {})


@pytest.mark.parametrize("runner,scheduled,expected", [
    (_runner(), _scheduled(), True),
    (_runner(), _scheduled({"a": []}), True),  # an empty draft list is no draft
    (_runner(), _scheduled({"a": [], "b": [5, 6]}), False),  # drafts to verify
    (_runner(generators={0: torch.Generator()}), _scheduled(), True),  # seeded rows race (vllm_cos.coupling)
    (_runner(prompt_logprobs={"a": 2}), _scheduled(), False),  # prompt logprobs come from the first pass
], ids=["plain", "empty-drafts", "drafts", "seeded", "prompt-logprobs"])
def test_fusable(runner, scheduled, expected):
    assert fusable(runner, scheduled) is expected


class _Group(torch.nn.Module):
    """A draft group of two members: hidden = the token id; member m's logits = hidden * (m + 1)."""

    def forward(self, input_ids, positions):
        self.seen = (input_ids.clone(), positions.clone())
        return input_ids.float().unsqueeze(1)  # [N, 1]

    def member_logits(self, hidden):
        return torch.stack([hidden.repeat(1, 3) * (m + 1) for m in range(2)])  # [2, rows, 3]


class _Runner:
    pass


def _hooked_runner(planned: bool):
    from vllm_cos.adapters.core import CoSStats

    core = SimpleNamespace(fusion=FusedGroup(), stats=CoSStats())
    core.fusion.plan(planned)
    runner = _Runner()  # hashable, as the runners keyed in COS_RUNNERS
    runner.drafter = SimpleNamespace(model=_Group())
    runner.input_batch = SimpleNamespace(num_reqs=2)
    runner.query_start_loc = SimpleNamespace(gpu=torch.tensor([0, 3, 5, 5], dtype=torch.int32))
    calls = []

    def stock(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        calls.append(input_ids)
        return torch.zeros(input_ids.shape[0], 4)

    return runner, core, model_forward_hook(stock, {runner: core}), calls


def test_forward_hook_runs_the_group_on_a_planned_step_at_each_last_token():
    runner, core, hooked, calls = _hooked_runner(planned=True)
    input_ids, positions = torch.tensor([11, 12, 13, 21, 22, 0]), torch.arange(6)  # one padding token
    out = hooked(runner, input_ids=input_ids, positions=positions)
    assert out.shape == (6, 4) and len(calls) == 1  # the served model's output is untouched
    assert torch.equal(runner.drafter.model.seen[0], input_ids)  # the group saw the step's tokens
    group_logits = core.fusion.take(2)
    assert group_logits.shape == (2, 2, 3)
    assert group_logits[0, :, 0].tolist() == [13.0, 22.0]  # rows 2 and 4: each request's last token
    assert group_logits[1, :, 0].tolist() == [26.0, 44.0]
    stats = core.stats.as_dict()
    assert stats["fused_steps"] == 1 and stats["draft_forwards"] == 1


def test_forward_hook_leaves_an_unplanned_step_alone():
    runner, core, hooked, calls = _hooked_runner(planned=False)
    hooked(runner, input_ids=torch.tensor([1, 2]), positions=torch.arange(2))
    assert len(calls) == 1 and not hasattr(runner.drafter.model, "seen")
    assert core.fusion.take(2) is None and core.stats.as_dict()["fused_steps"] == 0


# --- the drafter's shortcut after a fused step (propose_hook, cos_close_fused_step) ---

def _proposer_with_open_step(fused: bool, k: int):
    """A CoS proposer (no vLLM drafter behind it) whose channel holds an open, sampled step of two
    requests, and whose draft-length choice is ``k``."""
    from vllm_cos.adapters.core import CoSStats
    from vllm_cos.adapters.proposer import CoSProposerMixin
    from vllm_cos.adapters.step import ServedProposals, StepChannel

    proposer = object.__new__(CoSProposerMixin)
    proposer.cos_core = SimpleNamespace(steps=StepChannel(), draft_length=object(), stats=CoSStats(), metrics=None)
    proposer.cos_runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b"]))
    proposer._cos_chosen, proposer.chosen_calls = None, []
    proposer._draft_length = lambda batch, max_drafts, query_len: proposer.chosen_calls.append(batch) or k
    zeros = torch.zeros(2, dtype=torch.long)
    proposals = ServedProposals(rows=torch.zeros(2, dtype=torch.bool), slot=zeros, target_logits=torch.zeros(2, 5),
                                proposal_probs=torch.zeros(2, 5), grammar=None)
    step = proposer.cos_core.steps.open(("a", "b"), proposals, None, None, fused=fused)
    cad = SimpleNamespace(batch_size=lambda: 2, max_query_len=1)
    return proposer, step, cad


def test_fused_step_that_drafts_nothing_is_closed_by_the_shortcut():
    proposer, step, cad = _proposer_with_open_step(fused=True, k=0)
    sampled = torch.tensor([[7], [9]])
    drafts = proposer.cos_close_fused_step(sampled, None, cad, 3)
    assert drafts.shape == (2, 0) and step.consumed and step.sampled is sampled
    assert proposer.chosen_calls == [2]  # k chosen once, for the whole batch


def test_fused_step_that_drafts_again_keeps_its_k_for_the_stock_path():
    proposer, step, cad = _proposer_with_open_step(fused=True, k=2)
    assert proposer.cos_close_fused_step(torch.tensor([[7], [9]]), None, cad, 3) is None
    assert not step.consumed  # the stock path attaches the sampled tokens and drafts
    proposer._draft_length = lambda *a: pytest.fail("k was chosen twice for one step")
    assert proposer._fused_draft_length(step, 2, 3, 1) == 2


def test_unfused_step_takes_the_stock_path():
    proposer, step, cad = _proposer_with_open_step(fused=False, k=0)
    assert proposer.cos_close_fused_step(torch.tensor([[7], [9]]), None, cad, 3) is None
    assert not step.consumed and proposer.chosen_calls == []  # its k is chosen after verifying


@pytest.mark.parametrize("closed", [True, False])
def test_propose_hook_returns_the_shortcuts_drafts_or_runs_stock(closed):
    from vllm_cos.adapters.fusion import propose_hook

    no_drafts = torch.empty(2, 0, dtype=torch.int64)
    runner = _Runner()
    runner.drafter = SimpleNamespace(cos_close_fused_step=lambda *a: no_drafts if closed else None)
    runner.discard_request_mask = SimpleNamespace(gpu=None)
    runner._draft_probs = runner._draft_prob_req_ids = "stale"
    stock_calls = []
    hooked = propose_hook(lambda self, *a: stock_calls.append(a) or "stock drafts", {runner: object()})
    scheduler_output = SimpleNamespace(num_spec_tokens_to_schedule=3)
    out = hooked(runner, scheduler_output, torch.tensor([[1], [2]]), None, None, None, None, None,
                 SimpleNamespace(), None)
    if closed:
        assert out is no_drafts and not stock_calls and runner._draft_probs is None
    else:
        assert out == "stock drafts" and len(stock_calls) == 1

"""Lazy scoring (vllm_cos.lazy): which draft-group members run each pass, and how many drafts
every member has scored by the end of the step."""

from __future__ import annotations

import pytest

from vllm_cos.lazy import complete_drafts, last_drafts, member_passes_saved, pass_members


def test_the_papers_three_model_round_runs_each_member_once_plus_the_next_drafter():
    """plan [a, b] (gamma 1 each): a is done after draft 0, so only b scores a's draft."""
    assert last_drafts([0, 1], 2) == [0, 1]
    assert pass_members([0, 1], 2, 2, lazy=True) == [(1,)]
    assert complete_drafts([0, 1], 2, 2, lazy=True) == 1  # b's draft waits for the next first pass
    assert member_passes_saved([0, 1], 2, 2, lazy=True) == 1


def test_a_member_that_only_scores_skips_every_drafting_pass():
    """naive, three models: the proposer drafts 3, the other member scores them once, next step."""
    assert pass_members([0, 0, 0], 3, 2, lazy=True) == [(0,), (0,)]
    assert complete_drafts([0, 0, 0], 3, 2, lazy=True) == 1
    assert member_passes_saved([0, 0, 0], 3, 2, lazy=True) == 2


def test_a_member_keeps_running_until_its_last_draft():
    """plan [a, b, a, b, b]: a runs the passes over drafts 0..1 (it drafts 2), then skips."""
    assert pass_members([0, 1, 0, 1, 1], 5, 2, lazy=True) == [(0, 1), (0, 1), (1,), (1,)]
    assert complete_drafts([0, 1, 0, 1, 1], 5, 2, lazy=True) == 3


@pytest.mark.parametrize("plan,k", [([0, 0, 0, 0], 4), ([0, 1], 2), ([0, 1, 1, 0], 3), ([0], 1)])
def test_every_pass_scoring_and_a_one_member_group_skip_nothing(plan, k):
    members = max(plan) + 1
    assert pass_members(plan, k, members, lazy=False) == [tuple(range(members))] * (k - 1)
    assert complete_drafts(plan, k, members, lazy=False) == k
    assert member_passes_saved(plan, k, members, lazy=False) == 0
    if members == 1:
        assert complete_drafts(plan, k, 1, lazy=True) == k


def test_fewer_drafts_than_the_plan_cut_the_plan():
    """gamma: auto drafting k < len(plan): only the first k drafts decide who runs."""
    assert pass_members([0, 1, 0, 1], 2, 2, lazy=True) == [(1,)]
    assert complete_drafts([0, 1, 0, 1], 3, 2, lazy=True) == 2
    assert complete_drafts([0, 1], 0, 2, lazy=True) == 0

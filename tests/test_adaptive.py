"""The adaptive draft-length controller (vllm_cos.adaptive) on simulated step costs."""

from __future__ import annotations

import pytest

from vllm_cos.adaptive import DraftLengthController, bucket_of, expected_tokens


def test_expected_tokens_is_theorem_3_1s_count():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.0, 5) == 1.0


def test_buckets_are_powers_of_two():
    assert [bucket_of(b) for b in (0, 1, 2, 3, 8, 31, 32, 33)] == [1, 1, 2, 2, 8, 16, 32, 32]


def _simulate(controller, batch, cost, acceptance, steps=400):
    """Run the controller against a step-cost function cost(k) and an acceptance rate."""
    for _ in range(steps):
        k = controller.choose(batch)
        controller.observe(batch, k, cost(k), proposed=batch * k, accepted=round(batch * k * acceptance))
    return controller.chosen()[bucket_of(batch)]


def test_cheap_drafts_and_high_acceptance_draft_the_maximum():
    c = DraftLengthController(max_drafts=4)
    assert _simulate(c, 1, lambda k: 1.0 + 0.1 * k, acceptance=0.9) == 4


def test_expensive_verification_under_load_drafts_nothing():
    c = DraftLengthController(max_drafts=4)
    assert _simulate(c, 32, lambda k: 1.0 + 0.8 * k, acceptance=0.4) == 0


def test_the_optimum_in_between_is_found_and_buckets_are_independent():
    c = DraftLengthController(max_drafts=4)
    # E(k)/t(k) at a = 0.8, t = 1 + 0.35 k: 1.0, 1.33, 1.43, 1.43, 1.40 -> best 2 (or 3, within noise)
    assert _simulate(c, 1, lambda k: 1.0 + 0.35 * k, acceptance=0.8) in (2, 3)
    assert _simulate(c, 32, lambda k: 1.0 + 2.0 * k, acceptance=0.8) == 0
    assert c.chosen()[1] in (2, 3)


def test_unmeasured_lengths_are_interpolated_linearly():
    c = DraftLengthController(max_drafts=4)
    c.choose(1)  # creates the bucket
    c.buckets[1].cost.update({0: 1.0, 4: 3.0})
    assert c.estimated_cost(1, 2) == pytest.approx(2.0)
    assert c.estimated_cost(8, 2) is None

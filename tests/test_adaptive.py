"""The adaptive draft-length controller (vllm_cos.adaptive) on simulated step costs."""

from __future__ import annotations

import random

import pytest

from vllm_cos.adaptive import DraftLengthController, bucket_of, expected_tokens


def test_expected_tokens_is_theorem_3_1s_count():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.0, 5) == 1.0


def test_buckets_are_powers_of_two():
    assert [bucket_of(b) for b in (0, 1, 2, 3, 8, 31, 32, 33)] == [1, 1, 2, 2, 8, 16, 32, 32]


def _simulate(controller, batch, cost, acceptance, steps=400, seed=0):
    """Run the controller against a step-cost function cost(k) and a per-draft acceptance:
    each row accepts drafts until its first rejection (the verifier's stopping rule)."""
    rng = random.Random(seed)
    for _ in range(steps):
        k = controller.choose(batch)
        accepted = rejected = 0
        for _ in range(batch):
            run = 0
            while run < k and rng.random() < acceptance:
                run += 1
            accepted += run
            rejected += run < k
        controller.observe(batch, k, cost(k), accepted=accepted, rejected=rejected)
    return controller.chosen()[bucket_of(batch)]


def test_acceptance_estimate_is_per_draft_not_per_proposed():
    # at k = 4 and a = 0.8, accepted / proposed is (0.8 + ... + 0.8^4) / 4 = 0.59; the estimate is a
    c = DraftLengthController(max_drafts=4, explore_every=10 ** 9)
    _simulate(c, 8, lambda k: 1.0, acceptance=0.8, steps=600)
    assert c.acceptance == pytest.approx(0.8, abs=0.05)


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


def test_a_new_bucket_measures_both_ends_first():
    c = DraftLengthController(max_drafts=4)
    ks = []
    for _ in range(5):
        k = c.choose(8)
        ks.append(k)
        c.observe(8, k, 1.0 + k, accepted=0, rejected=8 if k else 0)
    assert ks[:4] == [4, 4, 0, 0] and set(c.buckets[8].cost) == {0, 4}
    assert ks[4] == 0  # nothing accepted: drafting does not pay


def _explorations(c: DraftLengthController, batch: int, cost, steps: int) -> list[int]:
    """Step indices at which the controller left its best k (a re-measurement started)."""
    starts, previous_trial = [], False
    for i in range(steps):
        k = c.choose(batch)
        state = c.buckets[bucket_of(batch)]
        in_trial = bool(state.trial) or (i > 4 and k != state.best)
        if in_trial and not previous_trial:
            starts.append(i)
        previous_trial = in_trial
        c.observe(batch, k, cost(k), accepted=0, rejected=batch if k else 0)
    return starts


def test_confirmed_best_is_re_measured_ever_less_often():
    c = DraftLengthController(max_drafts=4, explore_every=32)
    starts = _explorations(c, 32, lambda k: 1.0 + k, steps=4000)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert c.chosen()[32] == 0
    assert gaps[0] <= 40 and max(gaps) <= 16 * 32 + 8  # doubling, capped
    assert gaps == sorted(gaps) and gaps[-1] >= 8 * 32  # never more often again while confirmed


def test_a_new_best_resets_the_interval():
    c = DraftLengthController(max_drafts=4, explore_every=32)
    _explorations(c, 8, lambda k: 1.0 + k, steps=2000)  # best 0, interval grown
    assert c.buckets[8].interval > 32
    c.buckets[8].best = 3  # as if the costs had moved and k = 3 had won
    c.buckets[8].next_explore = c.buckets[8].steps
    c.buckets[8].explored_from = 0
    c._explore(c.buckets[8], 3)
    assert c.buckets[8].interval == 32


def test_voided_drafts_count_as_not_drafted():
    # a = 0.9 and t = 1 + 0.5 k: with every row's drafts verified, k = 4 wins (E/t = 4.1/3 > 1);
    # when 80% of the drafting rows have theirs voided, E(k) = 1 + 0.2 (E - 1) and k = 0 wins
    assert expected_tokens(0.9, 4, kept=0.2) == pytest.approx(1 + 0.2 * (expected_tokens(0.9, 4) - 1))
    kept = DraftLengthController(max_drafts=4)
    voided = DraftLengthController(max_drafts=4)
    for c, share in ((kept, 0.0), (voided, 0.8)):
        for _ in range(400):
            k = c.choose(8)
            drafted = 8 if k else 0
            c.observe(8, k, 1.0 + 0.5 * k, accepted=int(7 * k * 0.9 * (1 - share)), rejected=1 if k else 0,
                      voided=int(share * drafted), drafted=drafted)
    assert kept.chosen()[8] >= 3 and kept.kept == pytest.approx(1.0)
    assert voided.chosen()[8] == 0 and voided.kept < 0.6  # moves towards 0.2 only on drafting steps


def test_prefill_steps_and_pauses_do_not_move_the_cost_estimates():
    # k = 0 truly costs 1.0 and k = 2 costs 1.6 at a = 0.2 (E(2)/t = 1.24/1.6 < 1): k = 0 is best.
    # Every 10th step is a prefill chunk costing 6x, every 25th a 50x pause (a collection, an idle
    # engine): counted, either would make k = 0 look dearer than drafting
    c = DraftLengthController(max_drafts=2, explore_every=10 ** 9)
    rng = random.Random(0)
    for step in range(1, 401):
        k = c.choose(8)
        accepted = sum(rng.random() < 0.2 for _ in range(8 * k))
        prefill = step % 10 == 0
        seconds = (1.0 + 0.3 * k) * (6.0 if prefill else 50.0 if step % 25 == 0 else 1.0)
        c.observe(8, k, seconds, accepted=accepted, rejected=8 * k - accepted, decode_only=not prefill)
    costs = c.buckets[8].cost
    assert costs[0] == pytest.approx(1.0, rel=0.35) and costs[2] == pytest.approx(1.6, rel=0.35)
    assert c.chosen()[8] == 0


def test_a_prefill_step_is_no_cost_sample():
    c = DraftLengthController(max_drafts=2)
    c.observe(8, 1, 1.0, accepted=0, rejected=0)
    c.observe(8, 1, 1.0, accepted=0, rejected=0)  # steady: t(8, 1) = 1.0
    c.observe(8, 1, 9.0, accepted=0, rejected=0, decode_only=False)
    assert c.buckets[8].cost[1] == 1.0
    c.observe(8, 1, 9.0, accepted=0, rejected=0)  # a pause: counted as at most 2x the mean
    assert c.buckets[8].cost[1] == pytest.approx(1.0 + (2.0 - 1.0) / 2)  # the second sample: weight 1/2


def test_a_new_bucket_borrows_a_near_buckets_shape_and_runs_no_trial():
    # bucket 32 learnt that drafting does not pay; batch 21 (bucket 16, e.g. the end of that batch,
    # as requests finish) starts at k = 0 straight away instead of measuring k = 4 and k = 0 first
    c = DraftLengthController(max_drafts=4, explore_every=10 ** 9)
    _simulate(c, 32, lambda k: 1.0 + k, acceptance=0.2, steps=50)
    assert c.chosen()[32] == 0
    ks = []
    for _ in range(6):
        ks.append(c.choose(21))
        c.observe(21, ks[-1], 0.6 + 0.6 * ks[-1], accepted=0, rejected=21 if ks[-1] else 0)
    assert ks == [0] * 6 and c.buckets[16].trial == [] and c.buckets[16].cost == {0: pytest.approx(0.6)}
    # t(16, k) is bucket 32's shape scaled to the one measured point
    assert c.estimated_cost(16, 4) == pytest.approx(0.6 * c.estimated_cost(32, 4) / c.estimated_cost(32, 0))


def test_a_borrowed_shape_that_drafts_measures_zero_drafts_first():
    # bucket 8 learnt that drafting pays (cheap drafts); at batch 32 drafts are dear (t = 1 + k,
    # a = 0.6: k = 0 is best), but bucket 32 starts from bucket 8's shape at k > 0.  It measures
    # k = 0 after its best k's first samples, not after explore_every steps, and switches.
    c = DraftLengthController(max_drafts=4, explore_every=10 ** 9)
    _simulate(c, 8, lambda k: 1.0 + 0.1 * k, acceptance=0.6, steps=40)
    first = c.chosen()[8]
    assert first > 0
    ks = []
    for _ in range(10):
        k = c.choose(32)
        ks.append(k)  # 32 rows at a = 0.6: accepted a + ... + a^k each, rejected 1 - a^k of them
        c.observe(32, k, 1.0 + k, accepted=round(32 * sum(0.6 ** j for j in range(1, k + 1))),
                  rejected=round(32 * (1 - 0.6 ** k)))
    assert ks[0] == first and 0 in ks[:7] and ks[-1] == 0 and c.chosen()[32] == 0


def test_no_donor_farther_than_four_times_the_batch():
    c = DraftLengthController(max_drafts=4, explore_every=10 ** 9)
    _simulate(c, 1, lambda k: 1.0 + 0.1 * k, acceptance=0.9, steps=20)
    assert c.estimated_cost(4, 2) is not None and c.estimated_cost(8, 2) is None
    assert c.choose(8) == 4 and c.buckets[8].trial == [4, 0, 0]  # measures both ends itself


def test_a_re_measurement_tries_the_neighbour_above_the_best_or_every_other_time_zero():
    c = DraftLengthController(max_drafts=4, explore_every=32)
    c.choose(8)
    c.buckets[8].cost = {2: 1.0, 4: 3.0}
    assert c._explore(c.buckets[8], 2) == 3
    assert c._explore(c.buckets[8], 4) == 0  # the second: verify-only steps, standard's cost
    assert c._explore(c.buckets[8], 4) == 3
    assert c._explore(c.buckets[8], 0) == 1
    assert c._explore(c.buckets[8], 1) == 2


def test_an_early_too_high_verify_only_time_is_corrected():
    """t(8, 0) first measured 3x too high (one noisy step): k = 3 looks best at first, but the
    k = 0 re-measurements bring the truth back and the controller settles on k = 0."""
    c = DraftLengthController(max_drafts=4, explore_every=16)
    true_cost = lambda k: 1.0 + 0.8 * k  # a = 0.6: E(3)/t(3) = 2.18/3.4 < 1 = E(0)/t(0)
    first_zero = True
    for _ in range(600):
        k = c.choose(8)
        seconds = true_cost(k)
        if k == 0 and c._last == (8, 0) and first_zero:
            seconds, first_zero = 3.0, False
        c.observe(8, k, seconds, accepted=int(8 * 0.6 * k), rejected=8 if k else 0)
    state = c.buckets[8]  # t(8, 0) x the pace: what a k = 0 step is expected to take now
    assert c.chosen()[8] == 0 and state.cost[0] * state.pace < 1.3


def test_the_first_samples_of_a_length_are_averaged_plainly():
    c = DraftLengthController(max_drafts=2, explore_every=10 ** 9)
    c.choose(4)
    for seconds in (1.0, 2.0, 3.0):
        c._last = (4, 1)
        c.observe(4, 1, seconds, accepted=0, rejected=0)
    assert c.buckets[4].cost[1] == pytest.approx(2.0)


TRUE_COST = {0: 1.0, 1: 1.8}  # at a = 0.6: E(1)/t(1) = 1.6/1.8 = 0.89 < 1, k = 0 is best


def _phased_run(c, slow_phase: int, quiet_phase: int, pace_of_k1: float = 1.0) -> int:
    """k = 0 is the best length (measured); the machine then runs 1.6x slow for ``slow_phase``
    steps and quiet for ``quiet_phase``, after which k = 1 is re-measured (two steps, the second
    steady) at ``pace_of_k1``.  Returns the length chosen next."""
    from vllm_cos.adaptive import _Bucket

    c.acceptance = 0.6
    c.buckets[8] = _Bucket(cost=dict(TRUE_COST), best=0, samples={0: 20, 1: 20}, steps=1, next_explore=10 ** 9)
    c._last = (8, 0)
    for pace in [1.6] * slow_phase + [1.0] * quiet_phase:
        assert c.choose(8) == 0
        c.observe(8, 0, TRUE_COST[0] * pace, accepted=0, rejected=0)
    for _ in range(2):
        c.observe(8, 1, TRUE_COST[1] * pace_of_k1, accepted=5, rejected=8)
    c._last = (8, 0)
    return c.choose(8)


def test_a_slow_phase_does_not_make_a_re_measured_length_look_cheap():
    """After 30 steps of k = 0 at 1.6x and 8 quiet ones, a running mean of k = 0's step times
    still says 1.25, and k = 1 re-measured in the quiet would look better (1.6/1.8 > 1/1.25); at
    the pace of the steps around it, it does not."""
    c = DraftLengthController(max_drafts=1)
    assert _phased_run(c, 30, 8) == 0
    assert c.buckets[8].cost[1] / c.buckets[8].cost[0] == pytest.approx(1.8, rel=0.1)
    # re-measured within the slow phase, k = 1 is as dear relative to k = 0 as in a quiet one
    slow = DraftLengthController(max_drafts=1)
    assert _phased_run(slow, 30, 0, pace_of_k1=1.6) == 0
    assert slow.buckets[8].cost[1] / slow.buckets[8].cost[0] == pytest.approx(1.8, rel=0.1)


@pytest.mark.parametrize("batch", [1, 32])
def test_acceptance_is_unbiased_at_batch_one(batch):
    # a ratio of sums over drafts tried: at batch 1, k = 4, a = 0.6 the mean of each step's own
    # ratio would be 0.41 (a first-draft rejection counts 0 however few drafts were tried)
    c = DraftLengthController(max_drafts=4)
    rng, ratios = random.Random(0), []
    for _ in range(4000 // batch):
        runs = [next(j for j in range(5) if j == 4 or rng.random() >= 0.6) for _ in range(batch)]
        accepted, rejected = sum(runs), sum(run < 4 for run in runs)
        c.observe(batch, 4, 1.0, accepted=accepted, rejected=rejected)
        ratios.append(accepted / (accepted + rejected))
    assert c.acceptance == pytest.approx(0.6, abs=0.06)
    if batch == 1:
        assert sum(ratios) / len(ratios) < 0.45  # what a running mean of step ratios converges to

"""Adaptive draft length (``gamma: auto``): pick each step's number of drafts k in [0, K].

Per engine step every request emits its accepted drafts plus one more token (the recovered
token, or the served model's proposal once the group has verified it), so with a per-draft
acceptance rate a the expected tokens per request and step are

    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)       (Theorem 3.1's count)

and the step's cost t(B, k) is *measured*, per batch-size bucket, not assumed constant:
on CPU at batch >= 8 verifying k tokens per request costs far more than one, which is why a
fixed gamma is slower than standard under load.  The controller maximises B * E(k) / t(B, k),
k = 0 included (the collaborators then only verify each other's single proposals).

Estimates: a is the per-draft acceptance accepted / (accepted + rejections) over about the last
``ACCEPTANCE_WINDOW`` drafts tried (both sums decay per draft tried): a row's drafts stop at its
first rejection, so the drafts after it were never tried (accepted / proposed would be (a + a^2
+ ... + a^k) / k, biased low for k > 1 and so towards short drafts).  It is a ratio of sums, not
a running mean of each step's ratio: at batch 1 and k = 4, a = 0.6, a step's own ratio averages
0.41 (a step that rejects its first draft counts 0 however few drafts it tried), which once led
the controller to stop drafting where drafting paid.  With a share ``kept`` of the drafting rows
whose drafts are verified at all (a row whose served proposal the group changed has its drafts
voided), E(k) = 1 + kept * (a + ... + a^k).  t(B, k) comes from the wall times of steady steps
(the previous step used the same k, so that the step verified k drafts and drafted k), divided
by the bucket's *pace*.  A shared machine runs slow for tens of steps at a time (other tenants):
with plain running means a k measured in a quiet phase looked cheaper than one measured in a
slow phase, and the controller drafted where drafting ran at 0.85x (measured: t(8, 0) held at
6.1 ms where the steps took 4.8 ms, its samples ranging 4.4-8 ms in phases).  So step times are
modelled as t(B, k) x pace: the bucket's best k, which runs most, sets the pace (its t(B, k) is
fixed after its first ``FIRST_SAMPLES`` samples and its steps update the pace, weight
``PACE_WEIGHT``), and any other k is measured at the pace of the steps around it (a running mean,
weight ``COST_WEIGHT``, of its step times / pace).  Only the ratios between the ks matter to the
choice, and those compare steps taken at the same pace.  A k never
measured in a bucket is estimated from the measured ones (linear in k).  A new bucket borrows
the shape of t(B, k) in k from the nearest bucket (within 4x) that has measured two ks and starts
at the k that shape makes best (no trial steps: a batch that passes through a bucket, e.g. the
last steps of a batch whose requests finish, pays none); without one it first measures both ends
(k = max and k = 0, two steps each).  Every bucket re-measures the neighbour above its best k
(below at the maximum) every ``explore_every`` steps, for two steps (the second is the steady
one), and every other time k = 0 instead (when the best k is not 0): a step time measured
early and too high would otherwise keep the verify-only steps, the "never slower than standard"
anchor, out of reach for good.  The interval doubles while the re-measurements confirm the
best k (at most 16x).  A k's first samples are averaged plainly (each counts 1/n until the
running mean's weight takes over): one noisy step does not decide a bucket.  Pure
Python: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field


OUTLIER = 2.0  # a step-time sample counts as at most this multiple of its expected time
FIRST_SAMPLES = 3  # a k's first steady samples: a plain mean (the best k's t(B, k) is then fixed)
COST_WEIGHT = 0.3  # weight of a new pace-normalised step time in the running t(B, k) of a k but the best
PACE_WEIGHT = 0.3  # weight of a best-k step in the bucket's pace
ACCEPTANCE_WINDOW = 256  # drafts tried: the acceptance estimate's memory
PRIOR_WEIGHT = 8  # drafts tried that the prior acceptance counts for
DONOR_RANGE = 4  # a new bucket borrows the shape of t(B, k) from a bucket at most this many x away


def expected_tokens(acceptance: float, k: int, kept: float = 1.0) -> float:
    """E(k) tokens per request and step for k drafts at per-draft acceptance ``acceptance``,
    when a share ``kept`` of the rows' drafts is verified at all (the rest were drafted after a
    proposal the group then changed, and are voided: those rows emit one token)."""
    a = min(max(acceptance, 0.0), 1.0)
    tokens = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    return 1.0 + min(max(kept, 0.0), 1.0) * (tokens - 1.0)


def _interpolate(cost: dict[int, float], k: int) -> float:
    """Linear in k through two or more measured points (extrapolated past the ends)."""
    ks = sorted(cost)
    lo, hi = (ks[0], ks[1]) if k < ks[0] else (ks[-2], ks[-1]) if k > ks[-1] else \
        max((a, b) for a, b in zip(ks, ks[1:]) if a <= k <= b)
    if k == lo:
        return cost[lo]
    slope = (cost[hi] - cost[lo]) / (hi - lo)
    return max(cost[lo] + slope * (k - lo), 1e-9)


def bucket_of(batch: int) -> int:
    """Batch sizes grouped by powers of two: 1, 2, 4, 8, ..."""
    b = 1
    while b * 2 <= max(batch, 1):
        b *= 2
    return b


@dataclass
class _Bucket:
    cost: dict[int, float] = field(default_factory=dict)  # k -> running mean step seconds
    best: int | None = None
    steps: int = 0
    trial: list[int] = field(default_factory=list)  # ks still to run for a re-measurement
    interval: int = 0  # steps between re-measurements (0: not set yet)
    next_explore: int = 0  # the step count of the next re-measurement
    explored_from: int | None = None  # the best k when the last re-measurement started
    explorations: int = 0  # re-measurements started
    samples: dict[int, int] = field(default_factory=dict)  # k -> steady steps measured
    pace: float = 1.0  # how slow the machine runs now: step time / t(B, k) (see the module)


@dataclass
class DraftLengthController:
    max_drafts: int
    acceptance: float = 0.7  # prior until drafts are verified
    kept: float = 1.0  # share of drafting rows whose drafts were not voided
    smoothing: float = 0.1  # weight of a new observation in the running mean of ``kept``
    explore_every: int = 32  # steps between re-measurements (doubling while confirmed, up to 16x)
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    _last: tuple[int, int] | None = None  # (bucket, k) of the previous step
    _tried: float = 0.0  # decayed sums behind ``acceptance``: drafts tried, and accepted
    _accepted: float = 0.0

    def __post_init__(self):
        self._tried, self._accepted = float(PRIOR_WEIGHT), PRIOR_WEIGHT * self.acceptance

    def estimated_cost(self, bucket: int, k: int) -> float | None:
        """t(B, k): measured; else linear in k through the bucket's measured points; with fewer
        than two, the shape of the nearest bucket that has two (:meth:`_donor`), scaled to this
        bucket's one point (unscaled without one: only the ratios between ks matter to the
        choice); else each draft assumed to add half a step.  None: nothing to go on."""
        cost = self.buckets.get(bucket, _Bucket()).cost
        if k in cost:
            return cost[k]
        if len(cost) >= 2:
            return _interpolate(cost, k)
        donor = self._donor(bucket)
        if donor is not None:
            scale = next((t / _interpolate(donor, k0) for k0, t in cost.items()), 1.0)
            return scale * _interpolate(donor, k)
        if not cost:
            return None
        (k0, t0), = cost.items()  # one point: assume each draft adds half a step (refined once measured)
        return t0 * (1.0 + 0.5 * (k - k0) / (k0 + 1)) if k > k0 else t0

    def _donor(self, bucket: int) -> dict[int, float] | None:
        """The measured costs of the nearest other bucket within ``DONOR_RANGE`` x that has at
        least two measured ks: how t(B, k) grows with k changes slowly with B."""
        near = [(abs(b.bit_length() - bucket.bit_length()), b) for b, s in self.buckets.items()
                if b != bucket and len(s.cost) >= 2 and max(b, bucket) <= DONOR_RANGE * min(b, bucket)]
        return self.buckets[min(near)[1]].cost if near else None

    def rate(self, bucket: int, k: int) -> float | None:
        """Expected tokens per second per request with k drafts (None without any cost)."""
        t = self.estimated_cost(bucket, k)
        return None if t is None else expected_tokens(self.acceptance, k, self.kept) / t

    def choose(self, batch: int) -> int:
        """k for a step of ``batch`` requests."""
        b = bucket_of(batch)
        state = self.buckets.setdefault(b, _Bucket())
        state.steps += 1
        if state.trial:
            return state.trial.pop(0)
        rates = {k: self.rate(b, k) for k in range(self.max_drafts + 1)}
        if rates[0] is None:  # nothing to go on: two steady steps at each end, max drafts first
            state.best = self.max_drafts
            state.trial = [self.max_drafts, 0, 0]
            state.next_explore = self.explore_every
            return self.max_drafts
        best = max(rates, key=lambda k: rates[k])
        if state.steps == 1:  # a new bucket with a donor's shape: its best k first, measured as it runs
            self._start_borrowed(state, best)
        state.best = best
        if state.steps >= state.next_explore:
            return self._explore(state, best)
        return best

    def _start_borrowed(self, state: _Bucket, best: int) -> None:
        """A bucket that starts from a donor's shape and drafts measures k = 0, standard's own
        cost, right after its best k's first samples: the shape of another batch size can be
        wrong here, and the re-measurements that would correct it try k = 0 only every other
        time, ever less often (seen: a batch of 32 drafting at 0.75x standard after batch 8)."""
        state.next_explore = self.explore_every
        if best > 0:
            state.next_explore = FIRST_SAMPLES + 2
            state.explorations = 1  # the next re-measurement is an even one: k = 0

    def _explore(self, state: _Bucket, best: int) -> int:
        """Re-measure a neighbour of the best k for two steps (the second is steady).  While
        re-measurements keep confirming the same best k the interval doubles (up to 16x
        ``explore_every``): each one costs steps off the best k."""
        if state.explored_from == best and state.interval:
            state.interval = min(state.interval * 2, 16 * self.explore_every)
        else:
            state.interval = self.explore_every
        state.explored_from = best
        state.next_explore = state.steps + state.interval
        neighbour = best + 1 if best < self.max_drafts else max(best - 1, 0)  # the others: interpolated
        state.explorations += 1
        if best > 0 and state.explorations % 2 == 0:  # every other time k = 0, standard's own cost
            neighbour = 0
        state.trial = [neighbour]
        return neighbour

    def observe(self, batch: int, k: int, seconds: float, accepted: int, rejected: int,
                voided: int = 0, drafted: int = 0, decode_only: bool = True) -> None:
        """One finished step: its k, wall time, the drafts it accepted, the number of rows
        whose drafts met a rejection, and of the rows that drafted, how many had them voided;
        ``decode_only``: the step scheduled no prompt tokens (a prefill chunk's time says
        nothing about t(B, k), so it is not a cost sample).  A sample above
        ``OUTLIER`` x the running mean (a pause, a collection) counts as that bound."""
        if accepted + rejected > 0:
            decay = (1.0 - 1.0 / ACCEPTANCE_WINDOW) ** (accepted + rejected)
            self._tried = decay * self._tried + accepted + rejected
            self._accepted = decay * self._accepted + accepted
            self.acceptance = self._accepted / self._tried
        if drafted > 0:
            self.kept += self.smoothing * (1.0 - voided / drafted - self.kept)
        b = bucket_of(batch)
        state = self.buckets.setdefault(b, _Bucket())
        if self._last == (b, k) and seconds > 0 and decode_only:  # steady: verified k and drafted k
            _measure(state, k, seconds)
        self._last = (b, k)

    def chosen(self) -> dict[int, int]:
        """The current best k per batch-size bucket (for logs and metrics)."""
        return {b: s.best for b, s in sorted(self.buckets.items()) if s.best is not None}


def _measure(state: _Bucket, k: int, seconds: float) -> None:
    """One steady step of k drafts taking ``seconds``: past its first samples the best k's steps
    move the pace, any other k's move its t(B, k) at that pace (see the module)."""
    old, n = state.cost.get(k), state.samples.get(k, 0) + 1
    state.samples[k] = n
    if old is not None and k == state.best and n > FIRST_SAMPLES:
        state.pace *= 1.0 + PACE_WEIGHT * (min(seconds / (old * state.pace), OUTLIER) - 1.0)
        return
    sample = seconds / state.pace
    weight = max(COST_WEIGHT, 1.0 / n)  # a plain mean of the first samples, then a running one
    state.cost[k] = sample if old is None else old + weight * (min(sample, OUTLIER * old) - old)

"""χ² goodness-of-fit with pooling of sparse bins."""

from __future__ import annotations

import numpy as np
from scipy import stats

P_THRESHOLD = 1e-3  # fixed seeds: a correct sampler passes deterministically


def chi2_pvalue(observed_counts, expected_probs, min_expected: float = 5.0) -> float:
    """p-value of observed counts against expected probabilities (bins with expected
    count < min_expected are pooled into one).  Observations in zero-probability bins
    make the test fail outright."""
    observed = np.asarray(observed_counts, dtype=np.float64).ravel()
    probs = np.asarray(expected_probs, dtype=np.float64).ravel()
    probs = probs / probs.sum()
    total = observed.sum()
    if observed[probs <= 0].sum() > 0:
        return 0.0
    expected = probs * total
    big = expected >= min_expected
    obs = list(observed[big])
    exp = list(expected[big])
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    if len(obs) < 2:
        return 1.0
    return float(stats.chisquare(obs, exp).pvalue)

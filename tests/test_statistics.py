"""Means with Student-t intervals and Wilson intervals, against textbook values (no SciPy)."""

import math

import pytest

from llama_mimi_tt.statistics import mean_ci, student_t_ppf, wilson_interval


def test_student_t_quantiles_against_the_table():
    # t_{0.975} (two-sided 95%) from the standard table
    table = {1: 12.7062, 2: 4.3027, 5: 2.5706, 10: 2.2281, 30: 2.0423, 100: 1.9840}
    for df, t in table.items():
        assert student_t_ppf(0.975, df) == pytest.approx(t, abs=1e-4)
    assert student_t_ppf(0.995, 10) == pytest.approx(3.1693, abs=1e-4)
    assert student_t_ppf(0.95, 3) == pytest.approx(2.3534, abs=1e-4)
    assert student_t_ppf(0.025, 10) == pytest.approx(-2.2281, abs=1e-4)
    assert student_t_ppf(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert student_t_ppf(0.975, 1e7) == pytest.approx(1.95996, abs=1e-4)  # -> the normal
    for p, df in [(1.0, 5), (0.0, 5), (0.9, 0)]:
        with pytest.raises(ValueError, match="0 < p < 1 and df > 0"):
            student_t_ppf(p, df)


def test_mean_ci():
    values = [6, 7, 8, 9, 5, 7]
    ci = mean_ci(values)
    sd = math.sqrt(sum((v - 7) ** 2 for v in values) / 5)  # sample sd, n - 1
    half = 2.5706 * sd / math.sqrt(6)
    assert ci["mean"] == pytest.approx(7.0) and ci["std"] == pytest.approx(sd)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((7 - half, 7 + half), abs=1e-3)
    assert ci["method"] == "student-t" and ci["n"] == 6 and ci["confidence"] == 0.95
    wide = mean_ci(values, confidence=0.99)  # t_{0.995}(5) = 4.0321
    assert wide["ci_high"] - 7 == pytest.approx(4.0321 * sd / math.sqrt(6), abs=1e-3)
    assert mean_ci([4])["ci_low"] is None and mean_ci([4])["mean"] == 4
    assert mean_ci([])["mean"] is None and mean_ci([])["n"] == 0


def test_wilson_interval():
    assert wilson_interval(0.5, 0) == (None, None)
    lo, hi = wilson_interval(0.7, 100)  # textbook value: [0.604, 0.781]
    assert lo == pytest.approx(0.6040, abs=1e-3) and hi == pytest.approx(0.7810, abs=1e-3)
    lo, hi = wilson_interval(1.0, 10)  # not the empty [1, 1] of the normal approximation
    assert hi == pytest.approx(1.0) and hi <= 1.0 and lo == pytest.approx(0.7225, abs=1e-3)

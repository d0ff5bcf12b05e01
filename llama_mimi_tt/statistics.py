"""The statistics of evaluation: a mean with its Student-t confidence interval (``mean_ci``, for
the judge's scores, speaker similarity, GenPPL and Auto-BLEU) and the Wilson score interval of a
proportion (``wilson_interval``, for benchmark accuracies in the report).

The t quantile is our own (``student_t_ppf``: bisection on the exact CDF through the regularised
incomplete beta function) so that evaluation does not need SciPy.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

__all__ = ["mean_ci", "student_t_ppf", "wilson_interval"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t distribution (no SciPy needed): bisection on the exact CDF.
    ``student_t_ppf(0.975, 10)`` = 2.2281..."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and its two-sided confidence interval from Student's t distribution:
    ``mean +- t((1 + confidence) / 2, n - 1) * sd / sqrt(n)`` with the sample standard
    deviation (``n - 1``). With fewer than two values the interval is None.

    Returns:
        ``{n, mean, std, ci_low, ci_high, confidence, method}``.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    out = dict(
        n=n,
        mean=None,
        std=None,
        ci_low=None,
        ci_high=None,
        confidence=confidence,
        method="student-t",
    )
    if n == 0:
        return out
    mean = sum(vals) / n
    out["mean"] = mean
    if n < 2:
        return out
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = student_t_ppf((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def wilson_interval(
    p: float, n: int, z: float = 1.959964
) -> Tuple[Optional[float], Optional[float]]:
    """The 95% Wilson score interval of a proportion ``p`` observed over ``n`` trials
    (``(None, None)`` without trials)."""
    if n <= 0:
        return (None, None)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))

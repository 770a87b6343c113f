"""Comparisons between two rows of a study: the difference of their means with its 95 % confidence
interval and Welch's t-test, and, where both rows ran the same seeds on one machine (same
``train.seed``: the same initialisation and data order; one machine: the same kernels, since the same
seed on another CPU is another sample), the paired t-test over those seeds; Holm's adjustment of the
Welch p-values of all the comparisons a page makes.

The Student t distribution is computed here (regularized incomplete beta function by its continued
fraction), so that the report needs no scipy; ``tests/test_study.py`` checks it against scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class TTest:
    """A t-test of a mean difference: the difference, its confidence interval, t, degrees of freedom
    and the two-sided p-value."""

    difference: float
    low: float
    high: float
    t: float
    df: float
    p: float


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` against row ``b`` on one metric; ``welch`` needs two or more seeds in each row,
    ``paired`` two or more seeds that both rows ran (``pairs``)."""

    a: str
    b: str
    metric: str
    values_a: list[float]
    values_b: list[float]
    difference: float | None  # mean(a) - mean(b)
    welch: TTest | None
    paired: TTest | None
    pairs: int

    def to_json(self) -> dict:
        return asdict(self)


def compare(
    a: str,
    b: str,
    metric: str,
    seeds_a: dict[int, float],
    seeds_b: dict[int, float],
    pairable: Iterable[int] | None = None,
) -> Comparison:
    """Compare two rows' values of ``metric``, each given per seed (seed -> value); ``pairable``: the
    seeds that may be paired (both rows trained them on one machine; default: every shared seed)."""
    values_a, values_b = list(seeds_a.values()), list(seeds_b.values())
    difference = statistics.fmean(values_a) - statistics.fmean(values_b) if values_a and values_b else None
    welch = welch_test(values_a, values_b) if len(values_a) > 1 and len(values_b) > 1 else None
    shared = sorted(set(seeds_a) & set(seeds_b) & (set(pairable) if pairable is not None else set(seeds_a)))
    paired = (
        paired_test([seeds_a[s] for s in shared], [seeds_b[s] for s in shared]) if len(shared) > 1 else None
    )
    return Comparison(a, b, metric, values_a, values_b, difference, welch, paired, len(shared))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order): the i-th smallest times (m - i),
    never below the one before, at most 1. It keeps the chance of any false finding among the m tests
    at the level, which one p-value below 0.05 among many does not."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def smallest_permutation_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided p an exact permutation test of two groups of n_a and n_b values can give:
    2 of the C(n_a + n_b, n_a) ways to split them (0.10 for 3 against 3)."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def welch_test(a: list[float], b: list[float]) -> TTest:
    """Welch's unequal-variances t-test of mean(a) - mean(b), with the Welch-Satterthwaite df."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    df = (
        (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
        if se > 0
        else float(len(a) + len(b) - 2)
    )
    return _t_test(difference, se, df)


def paired_test(a: list[float], b: list[float]) -> TTest:
    """The paired t-test of the differences a_i - b_i (the same seed in both rows)."""
    differences = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    return _t_test(statistics.fmean(differences), se, float(len(differences) - 1))


def _t_test(difference: float, se: float, df: float) -> TTest:
    if se == 0:  # identical values in every seed: no spread to test against
        p = 1.0 if difference == 0 else 0.0
        return TTest(
            difference,
            difference,
            difference,
            math.copysign(math.inf, difference) if difference else 0.0,
            df,
            p,
        )
    t = difference / se
    half_width = t_quantile(1 - (1 - CONFIDENCE) / 2, df) * se
    return TTest(difference, difference - half_width, difference + half_width, t, df, 2 * t_sf(abs(t), df))


# ------------------------------------------------------------------------------ the t distribution
def t_sf(t: float, df: float) -> float:
    """P(T > t) for t >= 0 under Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    return 0.5 * regularized_beta(df / 2, 0.5, x)


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q (q in (0.5, 1)), by bisection on :func:`t_sf`."""
    low, high = 0.0, 1.0
    while t_sf(high, df) > 1 - q:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if t_sf(middle, df) > 1 - q:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction (Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - regularized_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a

"""Statistics for runs: 95% intervals on every metric and paired tests between two runs.

Everything here is plain numpy (no scipy), seeded, and vectorized.

    wilson(k, n)                        -> (lo, hi)      interval for a proportion
    bootstrap(stats, value_fn)          -> (lo, hi)      percentile bootstrap over examples
    paired_bootstrap(sa, sb, value_fn)  -> PairedResult  B minus A, its interval and p-value
    mcnemar_exact(a_ok, b_ok)           -> (b, c, p)     exact (binomial) McNemar test
    verdict(metric, result)             -> str           the result in plain words

The bootstrap works on *sufficient statistics*: each example contributes a row of numbers
(`stats`, shape n x k: e.g. [correct] for accuracy, [tp, fp, fn] per label for macro-F1), and a
metric is a function of their column sums (`value_fn(sums, n)`, vectorized over leading axes).
A resample is then a matrix of resample counts times `stats`, so 2,000 resamples of any metric
cost one matrix product.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 2000
SEED = 0

ValueFn = Callable[[np.ndarray, int], np.ndarray]


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """A (resamples x n) matrix: how often each example is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((resamples, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _resampled_values(stats_list: list[np.ndarray], value_fn: ValueFn, resamples: int, seed: int) -> list[np.ndarray]:
    """The metric value on each resample, for each of several stat matrices (same resamples)."""
    n = stats_list[0].shape[0]
    out: list[list[np.ndarray]] = [[] for _ in stats_list]
    # Chunk the resamples so memory stays at about 16 MB for any n.
    chunk = max(1, min(resamples, 2_000_000 // max(1, n)))
    counts = resample_counts(n, resamples, seed)
    for start in range(0, resamples, chunk):
        w = counts[start:start + chunk]
        for i, stats in enumerate(stats_list):
            out[i].append(value_fn(w @ stats, n))
    return [np.concatenate(parts) for parts in out]


def _as_stats(stats) -> np.ndarray:
    arr = np.asarray(stats, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    return arr


def bootstrap(stats, value_fn: ValueFn, *, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `value_fn` over examples (rows of `stats`)."""
    stats = _as_stats(stats)
    if stats.shape[0] == 0:
        return (float("nan"), float("nan"))
    (values,) = _resampled_values([stats], value_fn, resamples, seed)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


@dataclass
class PairedResult:
    """B minus A on the same examples."""

    metric: str
    a: float
    b: float
    diff: float  # b - a
    lo: float
    hi: float
    p: float
    n: int
    test: str  # "mcnemar-exact" | "paired-bootstrap"
    higher_is_better: bool = True
    discordant: tuple[int, int] | None = None  # McNemar: (A right & B wrong, A wrong & B right)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def significant(self) -> bool:
        return self.p < 0.05


def paired_bootstrap(stats_a, stats_b, value_fn: ValueFn, *, metric: str = "metric",
                     resamples: int = RESAMPLES, seed: int = SEED, higher_is_better: bool = True) -> PairedResult:
    """Paired bootstrap of value(B) - value(A): both runs resampled with the same example draws.

    The p-value is two-sided: twice the smaller share of resampled differences on either side of
    zero (at least 1/resamples)."""
    sa, sb = _as_stats(stats_a), _as_stats(stats_b)
    if sa.shape[0] != sb.shape[0]:
        raise ValueError("paired statistics need the same examples in both runs")
    n = sa.shape[0]
    a = float(value_fn(sa.sum(0), n))
    b = float(value_fn(sb.sum(0), n))
    va, vb = _resampled_values([sa, sb], value_fn, resamples, seed)
    d = vb - va
    d = d[~np.isnan(d)]
    if d.size == 0:
        return PairedResult(metric, a, b, b - a, float("nan"), float("nan"), 1.0, n, "paired-bootstrap",
                            higher_is_better)
    lo, hi = np.quantile(d, [0.025, 0.975])
    if np.all(d == 0):
        p = 1.0
    else:
        p = 2 * min(np.mean(d <= 0), np.mean(d >= 0))
        p = float(min(1.0, max(p, 1.0 / d.size)))
    return PairedResult(metric, a, b, b - a, float(lo), float(hi), p, n, "paired-bootstrap", higher_is_better)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided binomial p-value for k of n at p=0.5 (twice the smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def mcnemar_exact(a_ok, b_ok) -> tuple[int, int, float]:
    """Exact McNemar test on paired 0/1 outcomes: (A right & B wrong, A wrong & B right, p)."""
    a_ok = np.asarray(a_ok, dtype=bool)
    b_ok = np.asarray(b_ok, dtype=bool)
    b = int(np.sum(a_ok & ~b_ok))
    c = int(np.sum(~a_ok & b_ok))
    return b, c, binom_two_sided(b, b + c)


def paired_proportion(a_ok, b_ok, *, metric: str = "accuracy") -> PairedResult:
    """McNemar's exact test for the p-value, with a Newcombe-style (Wald on discordant pairs)
    interval for the difference of the two proportions."""
    a_ok = np.asarray(a_ok, dtype=float)
    b_ok = np.asarray(b_ok, dtype=float)
    n = a_ok.size
    b, c, p = mcnemar_exact(a_ok > 0.5, b_ok > 0.5)
    pa, pb = float(a_ok.mean()) if n else float("nan"), float(b_ok.mean()) if n else float("nan")
    diff = pb - pa
    if n:
        # Variance of the paired difference of proportions (Agresti): ((b+c) - (c-b)^2/n) / n^2
        var = ((b + c) - (c - b) ** 2 / n) / (n * n)
        half = Z95 * math.sqrt(max(var, 0.0))
    else:
        half = float("nan")
    return PairedResult(metric, pa, pb, diff, diff - half, diff + half, p, n, "mcnemar-exact",
                        True, (b, c))


def _fmt_points(x: float, scale: float) -> str:
    return f"{x * scale:.1f}"


def verdict(result: PairedResult, *, a_name: str = "A", b_name: str = "B", percent: bool = True) -> str:
    """The result of a paired test in plain words."""
    scale = 100.0 if percent else 1.0
    unit = " points" if percent else ""
    if result.n == 0 or math.isnan(result.diff):
        return f"{result.metric}: no examples in common; nothing to compare"
    p_text = "p<0.001" if result.p < 0.001 else f"p={result.p:.3f}"
    better = result.diff > 0 if result.higher_is_better else result.diff < 0
    # The interval of the winner's margin: B - A when B wins, A - B when A wins.
    lo, hi = (result.lo, result.hi) if result.diff >= 0 else (-result.hi, -result.lo)
    ci = f"(95% CI {_fmt_points(lo, scale)} to {_fmt_points(hi, scale)})"
    if result.diff == 0:
        head = f"{result.metric}: {b_name} and {a_name} score the same"
    else:
        winner, loser = (b_name, a_name) if better else (a_name, b_name)
        head = (f"{result.metric}: {winner} is better than {loser} by "
                f"{_fmt_points(abs(result.diff), scale)}{unit} {ci}, {p_text}")
    if result.significant and result.diff != 0:
        return head + ": the difference is real"
    return head + f": not distinguishable from noise at this sample size (n={result.n})"

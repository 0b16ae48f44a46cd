"""tunelab.stats against hand-computed values and plain-loop reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab import stats as st


def test_wilson_matches_hand_computation():
    # 8 of 10: p=0.8, z=1.96 -> center 0.71674, half-width 0.22658
    lo, hi = st.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    # the formula, written out independently
    z, n, p = 1.959963984540054, 50, 0.3
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert st.wilson(15, 50) == pytest.approx((center - half, center + half))


def test_wilson_edges():
    lo, hi = st.wilson(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # 0/20 -> [0, 0.161]
    lo, hi = st.wilson(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    assert all(math.isnan(x) for x in st.wilson(0, 0))


def test_binomial_two_sided_exact():
    # P(X<=1) for Bin(10, .5) = 11/1024; two-sided doubles it
    assert st.binom_two_sided(1, 10) == pytest.approx(2 * 11 / 1024)
    assert st.binom_two_sided(9, 10) == pytest.approx(2 * 11 / 1024)
    assert st.binom_two_sided(5, 10) == 1.0
    assert st.binom_two_sided(0, 0) == 1.0


def test_mcnemar_counts_discordant_pairs():
    a = [1, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    b = [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    bb, cc, p = st.mcnemar_exact(a, b)
    assert (bb, cc) == (1, 3)  # A right/B wrong once; A wrong/B right three times
    assert p == pytest.approx(2 * (1 + 4) / 16)  # Bin(4,.5): P(X<=1)=5/16


def test_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2, size=60).astype(float)
    lo, hi = st.bootstrap(x, lambda s, n: s[..., 0] / n, resamples=500, seed=3)
    # reference: the same resample counts, one resample at a time
    counts = st.resample_counts(60, 500, 3)
    values = []
    for row in counts:
        sample = np.repeat(x, row.astype(int))
        assert sample.size == 60
        values.append(sample.mean())
    ref = np.quantile(values, [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(ref))
    assert lo < x.mean() < hi


def test_bootstrap_is_seeded_and_close_to_wilson_for_a_proportion():
    x = np.array([1.0] * 140 + [0.0] * 60)
    fn = lambda s, n: s[..., 0] / n  # noqa: E731
    a = st.bootstrap(x, fn)
    assert a == st.bootstrap(x, fn)  # same seed, same interval
    w = st.wilson(140, 200)
    assert a[0] == pytest.approx(w[0], abs=0.02) and a[1] == pytest.approx(w[1], abs=0.02)


def test_paired_bootstrap_identical_runs_is_noise():
    x = np.array([1.0, 0, 1, 1, 0, 1, 0, 1] * 10)
    r = st.paired_bootstrap(x, x, lambda s, n: s[..., 0] / n, metric="acc")
    assert r.diff == 0 and r.p == 1.0 and r.lo == 0 and r.hi == 0
    assert "not distinguishable from noise" in st.verdict(r)


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.6).astype(float)
    b = np.maximum(a, (rng.random(300) < 0.5).astype(float))  # B fixes about half of A's misses
    r = st.paired_bootstrap(a, b, lambda s, n: s[..., 0] / n, metric="accuracy")
    assert r.diff == pytest.approx(b.mean() - a.mean())
    assert 0 < r.lo < r.diff < r.hi
    assert r.p < 0.01
    text = st.verdict(r)
    assert text.startswith("accuracy: B is better than A by ")
    assert "the difference is real" in text


def test_paired_proportion_interval_and_verdict_direction():
    a = np.array([1] * 70 + [0] * 30, float)
    b = a.copy()
    b[:10] = 0  # B breaks 10 that A got right
    r = st.paired_proportion(a, b, metric="accuracy")
    assert r.discordant == (10, 0)
    assert r.diff == pytest.approx(-0.10)
    assert r.p == pytest.approx(2 / 2 ** 10)
    # Agresti's variance of a paired difference: ((b+c) - (c-b)^2/n) / n^2
    half = 1.959963984540054 * math.sqrt((10 - 100 / 100) / 100 ** 2)
    assert (r.lo, r.hi) == pytest.approx((-0.1 - half, -0.1 + half))
    text = st.verdict(r, a_name="v1", b_name="v2")
    assert text.startswith("accuracy: v1 is better than v2 by 10.0 points (95% CI ")
    assert f"{(0.1 - half) * 100:.1f} to {(0.1 + half) * 100:.1f}" in text
    assert "p=0.002" in text and "real" in text


def test_verdict_lower_is_better_metric():
    r = st.PairedResult("latency", a=2.0, b=1.0, diff=-1.0, lo=-1.5, hi=-0.5, p=0.001, n=50,
                        test="paired-bootstrap", higher_is_better=False)
    text = st.verdict(r, percent=False)
    assert text.startswith("latency: B is better than A by 1.0 (95% CI 0.5 to 1.5)")

"""The cost model: horizon cost, break-even volume, payback."""

from __future__ import annotations

import math

import pytest

from tunelab.compare import CandidateEntry, break_even_pairs, break_even_volume, horizon_cost, payback_months, volume_grid


def test_horizon_cost():
    assert horizon_cost(10.0, 0.001, 1000) == pytest.approx(10 + 12 * 1000 * 0.001)
    assert horizon_cost(10.0, 0.001, 1000, months=1) == pytest.approx(11.0)


def test_break_even_volume_equalises_horizon_costs():
    v = break_even_volume(setup_a=50.0, cost_a=0.0001, setup_b=2.0, cost_b=0.0005)
    assert v == pytest.approx(48 / (12 * 0.0004))
    assert horizon_cost(50.0, 0.0001, v) == pytest.approx(horizon_cost(2.0, 0.0005, v))
    # below it the cheap setup wins, above it the cheap requests win
    assert horizon_cost(50.0, 0.0001, v * 0.9) > horizon_cost(2.0, 0.0005, v * 0.9)
    assert horizon_cost(50.0, 0.0001, v * 1.1) < horizon_cost(2.0, 0.0005, v * 1.1)


def test_break_even_symmetric_in_argument_order():
    assert break_even_volume(2.0, 0.0005, 50.0, 0.0001) == pytest.approx(break_even_volume(50.0, 0.0001, 2.0, 0.0005))


@pytest.mark.parametrize("setup_a,cost_a,setup_b,cost_b", [
    (50.0, 0.0005, 2.0, 0.0001),   # a costs more to set up AND per request: never breaks even
    (50.0, 0.0001, 50.0, 0.0005),  # same setup: b never catches up
    (50.0, 0.0001, 2.0, 0.0001),   # same per-request cost
])
def test_no_break_even(setup_a, cost_a, setup_b, cost_b):
    assert break_even_volume(setup_a, cost_a, setup_b, cost_b) is None
    assert payback_months(setup_a, cost_a, setup_b, cost_b, 1000) is None


def test_payback_months():
    # $48 more setup, $0.0004 cheaper per request, 10,000 requests a month: $4/month saved -> 12 months
    assert payback_months(50.0, 0.0001, 2.0, 0.0005, 10_000) == pytest.approx(12.0)
    assert payback_months(50.0, 0.0001, 2.0, 0.0005, 0) is None


def _c(name, setup, per_request):
    return CandidateEntry(name=name, kind="prompt", setup={"total_cost": setup}, cost_per_request=per_request)


def test_break_even_pairs_orders_the_pair():
    pairs = break_even_pairs([_c("p", 0.0, 0.0003), _c("ft", 12.0, 0.0001), _c("h", 12.0, 0.0004)], 10_000)
    assert [(p.a, p.b) for p in pairs] == [("ft", "p")]  # h: more setup and dearer requests than p
    assert pairs[0].volume_per_month == pytest.approx(5000)
    assert pairs[0].payback_months == pytest.approx(6.0)


def test_volume_grid_covers_break_even_and_expected_volume():
    grid = volume_grid(1000, [5000.0, math.inf])
    assert grid[0] == 0 and grid[-1] >= 5000 and len(grid) == 61

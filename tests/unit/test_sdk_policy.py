import math

import pytest

from ckpt_sdk._policy import FIRST_AUTO_SAVE_SECONDS, SavePolicy, daly_interval, expected_overhead


def test_daly_matches_young_for_small_costs():
    cost, mtbp = 10.0, 3600.0
    young = math.sqrt(2 * cost * mtbp)
    assert daly_interval(cost, mtbp) == pytest.approx(young - cost, rel=0.05)


def test_daly_caps_at_mtbp_when_saving_is_very_expensive():
    assert daly_interval(10_000.0, 3600.0) == 3600.0


def test_expected_overhead_is_minimal_near_the_optimum():
    cost, mtbp = 5.0, 7200.0
    best = daly_interval(cost, mtbp)
    assert expected_overhead(best, cost, mtbp) < expected_overhead(best / 3, cost, mtbp)
    assert expected_overhead(best, cost, mtbp) < expected_overhead(best * 3, cost, mtbp)


def test_every_steps_and_after():
    policy = SavePolicy(every_steps=10, every_seconds=None, after=25, mtbp_seconds=3600)
    assert [s for s in range(1, 60) if policy.due(s, 0.0) and (policy.record(s, 0.0, 0.1) or True)] == [25, 35, 45, 55]


def test_every_seconds():
    policy = SavePolicy(every_steps=None, every_seconds=30, after=0, mtbp_seconds=3600, last_time=100.0)
    assert not policy.due(1, 129.0)
    assert policy.due(1, 130.0)


def test_automatic_interval_uses_measured_cost():
    policy = SavePolicy(every_steps=None, every_seconds=None, after=0, mtbp_seconds=3600)
    assert policy.automatic and policy.interval_seconds() == FIRST_AUTO_SAVE_SECONDS
    policy.record(1, 0.0, 2.0)
    assert policy.interval_seconds() == pytest.approx(daly_interval(2.0, 3600))

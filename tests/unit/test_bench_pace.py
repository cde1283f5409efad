"""bench.common.Pace: a sample counts as the machine's steady pace only within 1.15x of the
fastest reference seen in the run, so a benchmark held to an absolute figure can leave out
what the machine ran in a slow phase."""

from __future__ import annotations

from bench.common import Pace


def test_the_fastest_reference_seen_is_the_yardstick():
    pace = Pace()
    timings = [pace.now() for _ in range(5)]
    assert pace.best == min(timings) > 0
    assert pace.steady(pace.best) and pace.steady(pace.best * Pace.SLOW)


def test_a_reference_slower_than_the_threshold_is_a_slow_phase():
    pace = Pace()
    pace.now()
    assert not pace.steady(pace.best * 1.2)
    assert not pace.steady(pace.best * 1.4)


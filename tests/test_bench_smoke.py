"""A CI-sized run of every benchmark scenario, so the harness cannot rot (completion, not speed)."""

from __future__ import annotations

import os

import pytest

from bench.scenarios import BACKENDS, SCENARIOS, fairness

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", ["throughput", "results", "latency", "scaling", "memory"])
def test_scenario_completes(name):
    figures = SCENARIOS[name](300, 2, lambda fraction: None)
    assert figures
    if "tasks_per_s" in figures:
        assert figures["tasks_per_s"] > 0
    if name in ("results", "latency"):
        assert set(figures) == set(BACKENDS)
        for backend, numbers in figures.items():
            if "skipped" in numbers:  # redis, where no redis-server can be started
                assert backend == "redis" and os.environ.get("CI") != "true", numbers
            else:
                assert numbers["tasks"] > 0


def test_fairness_scenario_completes_with_short_durations():
    figures = fairness(0, 2, lambda fraction: None, long_s=0.2, short_s=0.001)
    assert set(figures) == {"fifo", "fair_cold", "fair_warm", "fair_restarted"}
    assert all(f["makespan_s"] > 0.2 for f in figures.values())

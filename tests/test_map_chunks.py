"""Task.map, Task.starmap and Task.chunks with Celery's meaning (issue 14, part): equal to the plain calls."""

from __future__ import annotations

import pytest

from engine import Engine
from engine.canvas import MAP_TASK, STARMAP_TASK, GroupResult


@pytest.fixture
def eager():
    app = Engine("mapping", backend="memory://", task_always_eager=True, set_as_current=False)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def double(x):
        return 2 * x

    yield app
    app.close()


def test_every_app_has_the_map_tasks(eager):
    assert MAP_TASK in eager.tasks and STARMAP_TASK in eager.tasks


def test_map_and_starmap_equal_the_plain_calls_in_order(eager):
    add, double = eager.tasks["tests.test_map_chunks.add"], eager.tasks["tests.test_map_chunks.double"]
    pairs = [(i, 10 * i) for i in range(20)]
    assert add.starmap(pairs).delay().get() == [add(x, y) for x, y in pairs]
    assert double.map(range(5)).apply_async().get() == [double(x) for x in range(5)]
    assert double.map([]).delay().get() == []


def test_chunks_are_one_task_each_and_their_results_a_list_of_lists(eager):
    add = eager.tasks["tests.test_map_chunks.add"]
    pairs = list(zip(range(10), range(10)))
    parts = add.chunks(iter(pairs), 4)  # any iterable, read once
    group = parts.group()
    assert len(group) == 3 and {sig.task for sig in group.tasks} == {STARMAP_TASK}
    result = add.chunks(pairs, 4)()
    assert isinstance(result, GroupResult)
    assert result.get() == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    with pytest.raises(ValueError):
        add.chunks(pairs, 0)


def test_a_failing_item_fails_the_whole_map_task(eager):
    @eager.task
    def inverse(x):
        return 1 / x

    with pytest.raises(ZeroDivisionError):
        inverse.map([1, 0, 2]).delay().get()


@pytest.mark.slow
def test_map_starmap_and_chunks_through_a_real_worker(worker_setup):
    from tests import workerapp

    worker_setup("--concurrency", "2")
    pairs = [(i, i) for i in range(50)]
    assert workerapp.add.starmap(pairs).delay().get(timeout=30) == [2 * i for i in range(50)]
    assert workerapp.add.chunks(pairs, 7)().get(timeout=30) == \
        [[2 * i for i in range(start, min(start + 7, 50))] for start in range(0, 50, 7)]

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


@pytest.fixture
def sending():
    """An app whose sent messages are kept in a list (no worker)."""
    app = Engine("sending", backend="memory://", set_as_current=False)

    @app.task
    def add(x, y):
        return x + y

    class Custom(app.Task):
        def apply_async(self, *args, **kwargs):
            self.app.custom_calls += 1
            return super().apply_async(*args, **kwargs)

    @app.task(base=Custom)
    def custom(x):
        return x

    app.custom_calls = 0
    app.sent = []
    app.send_message = app.sent.append
    yield app
    app.close()


def test_a_group_of_a_generator_sends_members_as_they_come_without_keeping_them(sending):
    from engine import group

    add = sending.tasks["tests.test_map_chunks.add"]
    made = []

    def members():
        for i in range(1000):
            made.append(i)
            yield add.s(i, i)
            assert len(sending.sent) >= i  # the one before was sent before the next was made

    g = group(members())
    assert len(made) == 1  # only the first, to know the app
    result = g.apply_async((), queue="q1", countdown=0)
    assert len(result.results) == 1000 and [r.id for r in result.results] == [m.id for m in sending.sent]
    assert [m.args for m in sending.sent[:2]] == [(0, 0), (1, 1)] and {m.queue for m in sending.sent} == {"q1"}
    with pytest.raises(RuntimeError, match="used up"):
        g.apply_async()

    listed = group(add.s(i, i) for i in range(3))
    assert len(listed) == 3  # read first: a list, which can be sent again
    listed.apply_async()
    listed.apply_async()
    assert len(sending.sent) == 1006


def test_group_members_keep_their_own_options_arguments_and_custom_sending(sending):
    from engine import group

    add, custom = sending.tasks["tests.test_map_chunks.add"], sending.tasks["tests.test_map_chunks.custom"]
    result = group([add.s(1), add.s(2).set(queue="other"), add.si(5, 5), custom.s()]).apply_async((10,))
    sent = sending.sent
    assert [m.args for m in sent] == [(10, 1), (10, 2), (5, 5), (10,)]  # prepended, except the immutable one
    assert sent[1].queue == "other" and sent[0].queue != "other"
    assert sending.custom_calls == 1 and len(result.results) == 4
    with pytest.raises(TypeError):
        group([add.s(1, 2, 3)]).apply_async()  # arguments checked (typing) as for delay()

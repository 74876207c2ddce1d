"""Signatures and chains, result handles, and task loggers."""

from __future__ import annotations

import logging
import time

import pytest

from engine import Engine, chain, states
from engine.exceptions import ResultsDisabledError, TimeoutError
from engine.log import get_task_logger
from tests.test_task import run_in_worker

logger = get_task_logger(__name__)


def test_signatures_prepend_partial_arguments_unless_immutable(app):
    @app.task
    def add(x, y):
        return x + y

    assert add.s(2)(3) == 5
    assert add.s(2).apply((3,)).get() == 5
    assert add.si(2, 2).apply((100,)).get() == 4
    sig = add.signature((1,), {"y": 2}, countdown=5)
    assert sig.options == {"countdown": 5} and sig.args == (1,) and sig.kwargs == {"y": 2}
    assert sig.clone((9,)).args == (9, 1)
    sig.delay()
    assert app.sent[-1].args == (1,) and app.sent[-1].kwargs == {"y": 2}


def test_signature_is_a_plain_dict_for_messages(app):
    @app.task
    def add(x, y):
        return x + y

    assert dict(add.s(1)) == {"task": add.name, "args": [1], "kwargs": {}, "options": {}, "immutable": False}


def make_pipeline(app, store, fail_parse=False):
    @app.task
    def fetch_page(url):
        return f"<html>{url}</html>"

    @app.task
    def parse_page(page):
        if fail_parse:
            raise ValueError("unparseable")
        return page.upper()

    @app.task
    def store_page_info(info, url):
        store.append((url, info))
        return len(store)

    return fetch_page, parse_page, store_page_info


def test_chain_fetch_parse_store_runs_in_order(eager_app):
    stored = []
    fetch_page, parse_page, store_page_info = make_pipeline(eager_app, stored)
    url = "http://example"
    result = (fetch_page.s(url) | parse_page.s() | store_page_info.s(url))()
    assert stored == [(url, "<HTML>HTTP://EXAMPLE</HTML>")]
    assert result.get() == 1


def test_chain_with_a_failing_middle_step_runs_no_later_step(eager_app):
    stored = []
    fetch_page, parse_page, store_page_info = make_pipeline(eager_app, stored, fail_parse=True)
    result = chain(fetch_page.s("u"), parse_page.s(), store_page_info.s("u")).apply_async()
    assert stored == []
    assert result.state == states.FAILURE
    with pytest.raises(ValueError, match="unparseable"):
        result.get()


def test_chain_sends_first_step_carrying_the_rest(app):
    stored = []
    fetch_page, parse_page, store_page_info = make_pipeline(app, stored)
    result = (fetch_page.s("u") | parse_page.s() | store_page_info.s("u")).apply_async()
    (message,) = app.sent
    assert message.task == fetch_page.name
    steps = message.options["chain"]
    assert [s["task"] for s in steps] == [store_page_info.name, parse_page.name]
    assert result.id == steps[0]["options"]["task_id"]
    assert result.parent.parent.id == message.id


def test_chain_step_failure_in_a_worker_fails_every_later_step(app):
    stored = []
    fetch_page, parse_page, store_page_info = make_pipeline(app, stored, fail_parse=True)
    (fetch_page.s("u") | parse_page.s() | store_page_info.s("u")).apply_async()
    first = app.sent[-1]
    # Worker run of step 1 sends step 2 with the result prepended.
    outcome, recorder = run_in_worker(fetch_page, "u", task_id=first.id, options=first.options)
    second = app.sent[-1]
    assert second.task == parse_page.name and second.args == ("<html>u</html>",)
    outcome, recorder = run_in_worker(parse_page, *second.args, task_id=second.id, options=second.options,
                                      recorder=recorder)
    last_id = second.options["chain"][0]["options"]["task_id"]
    assert recorder.state_of(second.id) == recorder.state_of(last_id) == states.FAILURE
    assert len(app.sent) == 2 and stored == []


def test_async_result_of_unknown_id_is_pending_and_get_times_out(app):
    result = app.AsyncResult("never-sent")
    assert result.state == states.PENDING and not result.ready()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.2)
    assert time.monotonic() - started < 2
    assert issubclass(TimeoutError, __builtins__["TimeoutError"] if isinstance(__builtins__, dict)
                      else __builtins__.TimeoutError)


def test_async_result_reads_states_stored_by_a_recorder_and_forgets(app):
    @app.task
    def job(x):
        return x * 3

    outcome, recorder = run_in_worker(job, 4, task_id="r1")
    for record in recorder.flush():
        app.backend.store_state(record.task_id, record.state, record.result, record.traceback)
    result = app.AsyncResult("r1")
    assert result.state == states.SUCCESS and result.successful() and result.get(timeout=1) == 12
    result.forget()
    assert result.state == states.PENDING


def test_results_without_a_backend_raise_a_clear_error():
    app = Engine("nobackend")
    with pytest.raises(ResultsDisabledError, match="no result backend is configured"):
        app.AsyncResult("x").get(timeout=1)


def test_get_inside_a_task_is_refused(eager_app):
    @eager_app.task
    def waits():
        return eager_app.AsyncResult("other").get(timeout=0.1)

    result = waits.apply()
    assert isinstance(result.result, RuntimeError)


def test_task_logger_records_carry_task_name_and_id(app, caplog):
    @app.task
    def talks():
        logger.info("hello from a task")

    with caplog.at_level(logging.INFO, logger=__name__):
        talks.apply(task_id="log-1")
        logger.info("outside")
    inside, outside = [r for r in caplog.records if r.name == __name__]
    assert (inside.task_name, inside.task_id) == (talks.name, "log-1")
    assert (outside.task_name, outside.task_id) == ("???", "???")
    assert logger.parent.name == "engine.task"


def test_group_runs_members_and_returns_a_list(eager_app):
    from engine import group

    @eager_app.task
    def square(x):
        return x * x

    result = group(square.s(i) for i in range(5))()
    assert result.get() == [0, 1, 4, 9, 16] and result.ready() and len(result) == 5

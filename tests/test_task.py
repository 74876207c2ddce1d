"""Task calls: the request, handlers, semipredicates, retries, backoff and sending."""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta

import pytest

from engine import states
from engine.core import StateRecorder, TaskMessage
from engine.exceptions import Ignore, MaxRetriesExceededError, Reject, ResultsDisabledError, Retry
from engine.request import Request
from engine.task import Task
from tests.support import RecordingRequest, RecordingRequestTask


def run_in_worker(task, *args, recorder=None, dispatched=None, **message_fields):
    """Run ``task`` the way a worker child does: a message, a Request, a recorder (not eager)."""
    message = TaskMessage(message_fields.pop("task_id", "id-1"), task.name, args, message_fields.pop("kwargs", {}),
                          **message_fields)
    recorder = recorder if recorder is not None else StateRecorder()
    request = task.request_class(message, task, recorder=recorder, hostname="w1@host",
                                 retry_dispatcher=(dispatched.append if dispatched is not None else None))
    return request.execute(), recorder


# --- calling and the request ------------------------------------------------------


def test_calling_a_task_runs_the_function_directly(app):
    @app.task(bind=True)
    def whoami(self, x):
        return (x, self.request.called_directly, self.request.id)

    assert whoami(5) == (5, True, None)


def test_bound_task_sees_its_request_in_an_eager_apply(app):
    @app.task(bind=True)
    def inspect_request(self, x, y=0):
        r = self.request
        return dict(id=r.id, args=r.args, kwargs=r.kwargs, retries=r.retries, is_eager=r.is_eager,
                    hostname=r.hostname, queue=r.delivery_info["queue"], root_id=r.root_id,
                    called_directly=r.called_directly)

    info = inspect_request.apply((1,), {"y": 2}, task_id="abc").get()
    assert info["id"] == "abc" and info["root_id"] == "abc"
    assert (info["args"], info["kwargs"], info["retries"]) == ((1,), {"y": 2}, 0)
    assert info["is_eager"] is True and info["called_directly"] is False
    assert info["hostname"] and info["queue"] == "celery"


def test_request_in_a_worker_run_carries_the_message_fields(app):
    seen = {}

    @app.task(bind=True)
    def job(self):
        seen.update(vars(self.request))

    outcome, _ = run_in_worker(job, task_id="t-9", retries=2, queue="batch", reply_to="tcp://x:1",
                               parent_id="p", root_id="r", eta=123.0)
    assert outcome.state == states.SUCCESS
    assert (seen["id"], seen["retries"], seen["reply_to"], seen["parent_id"], seen["root_id"], seen["eta"]) \
        == ("t-9", 2, "tcp://x:1", "p", "r", 123.0)
    assert seen["delivery_info"]["queue"] == "batch" and seen["hostname"] == "w1@host"
    assert seen["is_eager"] is False


def test_a_custom_call_keeps_the_message_request(app):
    calls = []

    class Wrapping(Task):
        def __call__(self, *args, **kwargs):
            calls.append(self.request.id)
            return super().__call__(*args, **kwargs)

    @app.task(base=Wrapping, bind=True)
    def job(self):
        return self.request.id

    assert job.apply(task_id="x1").get() == "x1"
    assert calls == ["x1"]


# --- handlers --------------------------------------------------------------------


class Recording(Task):
    """Records handler calls in order."""

    events: list

    def before_start(self, task_id, args, kwargs):
        self.events.append(("before_start", task_id))

    def on_success(self, retval, task_id, args, kwargs):
        self.events.append(("on_success", retval, task_id, args, kwargs))

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        self.events.append(("on_failure", type(exc).__name__, task_id, args, "Traceback" in einfo.traceback))

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        self.events.append(("on_retry", type(exc).__name__, task_id))

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        self.events.append(("after_return", status))


def make_recording(app, fun, **options):
    task = app.task(base=Recording, **options)(fun)
    task.events = []
    return task


def test_handlers_on_success(app):
    def ok(x):
        return x * 2

    task = make_recording(app, ok)
    task.apply((2,), task_id="i")
    assert task.events == [("before_start", "i"), ("on_success", 4, "i", (2,), {}), ("after_return", "SUCCESS")]


def test_handlers_given_as_options_or_set_on_the_task_are_called(app):
    events = []

    def ok(x):
        return x

    task = app.task(on_success=lambda self, retval, *rest: events.append(("on_success", retval)))(ok)
    task.after_return = lambda status, *rest: events.append(("after_return", status))  # on the instance
    task.apply((3,))
    assert events == [("on_success", 3), ("after_return", "SUCCESS")]


def test_handlers_on_failure_as_in_the_guide(app):
    def add(x, y):
        raise KeyError()

    task = make_recording(app, add)
    result = task.apply((1, 2), task_id="f")
    assert result.state == states.FAILURE and isinstance(result.result, KeyError)
    assert "KeyError" in result.traceback
    assert task.events == [("before_start", "f"), ("on_failure", "KeyError", "f", (1, 2), True),
                           ("after_return", "FAILURE")]
    with pytest.raises(KeyError):
        result.get()


def test_retry_ignore_and_reject_skip_after_return(app):
    def retrying(self):
        raise self.retry(exc=ValueError("x"), max_retries=1)

    def ignoring():
        raise Ignore()

    def rejecting():
        raise Reject("no", requeue=False)

    for fun in (ignoring, rejecting):
        task = make_recording(app, fun)
        task.apply(task_id="q")
        assert [e[0] for e in task.events] == ["before_start"]
    task = make_recording(app, retrying, bind=True)
    outcome, _ = run_in_worker(task, dispatched=[])
    assert outcome.state == states.RETRY
    assert [e[0] for e in task.events] == ["before_start", "on_retry"]


def test_semipredicates_in_a_worker_run_record_nothing(app):
    @app.task
    def ignoring():
        raise Ignore()

    @app.task
    def rejecting():
        raise Reject("bad", requeue=True)

    for task, state in ((ignoring, states.IGNORED), (rejecting, states.REJECTED)):
        outcome, recorder = run_in_worker(task)
        assert outcome.state == state
        assert len(recorder) == 0
    assert rejecting.apply().result.requeue is True


def test_a_custom_request_class_sees_failures_and_successes(app):
    RecordingRequest.seen = []

    @app.task(base=RecordingRequestTask)
    def fails():
        raise OSError("disk")

    @app.task(Request=RecordingRequest)
    def works():
        return 7

    fails.apply()
    works.apply()
    assert RecordingRequest.seen == [("failure", fails.name, "OSError"), ("success", works.name, 7)]
    assert fails.request_class is RecordingRequest


def test_a_failing_on_success_handler_does_not_change_a_worker_outcome(app):
    class Broken(Task):
        def on_success(self, retval, task_id, args, kwargs):
            raise RuntimeError("handler bug")

    @app.task(base=Broken)
    def job():
        return 1

    outcome, recorder = run_in_worker(job)
    assert outcome.state == states.SUCCESS and recorder.state_of("id-1") == states.SUCCESS
    with pytest.raises(RuntimeError):  # eager callers see the handler's error
        job.apply()


# --- states recorded by a worker run -----------------------------------------------


def test_worker_run_records_started_then_success(app):
    @app.task(track_started=True)
    def job(x):
        return x + 1

    recorder = StateRecorder()
    seen = []
    original = recorder.record

    class Spy:
        def record(self, *args):
            seen.append(args[1])
            return original(*args)

    outcome, _ = run_in_worker(job, 1, recorder=Spy())
    assert outcome.retval == 2 and seen == [states.STARTED, states.SUCCESS]
    assert recorder.get("id-1").result == 2


def test_track_started_follows_the_app_setting(app):
    app.conf.task_track_started = True

    @app.task
    def job():
        return job.request.recorder.state_of(job.request.id)

    outcome, _ = run_in_worker(job)
    assert outcome.retval == states.STARTED


def test_worker_run_records_failure_with_traceback(app):
    @app.task
    def job():
        raise ValueError("bad value")

    outcome, recorder = run_in_worker(job)
    record = recorder.get("id-1")
    assert outcome.state == record.state == states.FAILURE
    assert isinstance(record.result, ValueError) and "bad value" in record.traceback


@pytest.mark.parametrize("level", ["app", "task", "call"])
def test_ignore_result_at_every_level_records_nothing(app, level):
    if level == "app":
        app.conf.task_ignore_result = True
    options = {"ignore_result": True} if level == "task" else {}

    @app.task(**options)
    def job():
        return 1

    fields = {"options": {"ignore_result": True}} if level == "call" else {}
    outcome, recorder = run_in_worker(job, **fields)
    assert outcome.state == states.SUCCESS and recorder.get("id-1") is None


def test_call_level_ignore_result_overrides_the_task_option(app):
    @app.task(ignore_result=True)
    def job():
        return 1

    job.apply_async(ignore_result=False)
    job.delay()
    assert [m.ignore_result for m in app.sent] == [False, True]
    assert [m.options.get("ignore_result") for m in app.sent] == [False, None]
    # The worker honours the call's False over the task option.
    outcome, recorder = run_in_worker(job, options=app.sent[0].options)
    assert recorder.get("id-1").state == states.SUCCESS
    outcome, recorder = run_in_worker(job, options=app.sent[1].options)
    assert recorder.get("id-1") is None
    assert job.apply(ignore_result=False).get() == 1


def test_expired_message_is_revoked_not_run(app):
    ran = []

    @app.task
    def job():
        ran.append(1)

    outcome, recorder = run_in_worker(job, expires=time.time() - 1)
    assert outcome.state == states.REVOKED and recorder.state_of("id-1") == states.REVOKED
    assert ran == []


def test_update_state_is_visible_in_the_runs_recorder(app):
    @app.task(bind=True)
    def long_job(self):
        self.update_state(state="PROGRESS", meta={"done": 50})
        return self.request.recorder.get(self.request.id).result

    assert long_job.apply().get() == {"done": 50}
    with pytest.raises(ValueError, match="upper-case"):
        long_job.update_state(task_id="x", state="progress")


def test_update_state_for_another_task_goes_to_the_backend(app):
    @app.task
    def job():
        job.update_state(task_id="other", state="PROGRESS", meta={"n": 1})

    job.apply()
    assert app.AsyncResult("other").state == "PROGRESS"
    assert app.AsyncResult("other").info == {"n": 1}


def test_update_state_without_a_backend_says_results_are_disabled():
    from engine import Engine

    app = Engine("nobackend")

    @app.task
    def job():
        pass

    with pytest.raises(ResultsDisabledError, match="no result backend"):
        job.update_state(task_id="x", state="PROGRESS")


# --- retries -----------------------------------------------------------------------


def test_eager_retry_runs_again_with_the_same_id_and_more_retries(app):
    seen = []

    @app.task(bind=True, default_retry_delay=60)
    def flaky(self, n):
        seen.append((self.request.id, self.request.retries))
        if self.request.retries < n:
            raise self.retry()
        return "done"

    started = time.monotonic()
    result = flaky.apply((2,), task_id="same")
    assert time.monotonic() - started < 5  # the 60 s countdown is ignored eagerly
    assert result.get() == "done" and result.id == "same"
    assert seen == [("same", 0), ("same", 1), ("same", 2)]


def test_retry_past_max_retries_raises_the_given_exception(app):
    @app.task(bind=True, max_retries=2)
    def fails(self):
        raise self.retry(exc=ConnectionError("down"), countdown=0)

    result = fails.apply()
    assert result.state == states.FAILURE and isinstance(result.result, ConnectionError)


def test_retry_past_max_retries_without_exc_raises_max_retries_exceeded(app):
    @app.task(bind=True, max_retries=1)
    def fails(self):
        raise self.retry(countdown=0)

    result = fails.apply((), task_id="m")
    assert isinstance(result.result, MaxRetriesExceededError)
    assert "m" in str(result.result)


def test_max_retries_none_retries_until_success(app):
    @app.task(bind=True, max_retries=None)
    def eventually(self):
        if self.request.retries < 10:
            raise self.retry(countdown=0)
        return self.request.retries

    assert eventually.apply().get() == 10


def test_retry_called_directly_raises_the_exception(app):
    @app.task(bind=True)
    def job(self):
        raise self.retry(exc=KeyError("direct"))

    with pytest.raises(KeyError):
        job()


def test_worker_retry_sends_same_id_same_queue_with_countdown(app):
    @app.task(bind=True)
    def job(self, x):
        raise self.retry(countdown=5, exc=OSError("later"))

    dispatched = []
    outcome, recorder = run_in_worker(job, 1, task_id="keep", queue="slow", dispatched=dispatched)
    assert outcome.state == states.RETRY
    assert recorder.state_of("keep") == states.RETRY and isinstance(recorder.get("keep").result, OSError)
    (sig,) = dispatched
    assert sig.options["task_id"] == "keep" and sig.options["retries"] == 1
    assert sig.options["queue"] == "slow" and sig.options["countdown"] == 5
    assert sig.args == (1,)
    # The signature sends a message with that id, queue and an eta 5 s ahead.
    sig.apply_async()
    message = app.sent[-1]
    assert (message.id, message.retries, message.queue) == ("keep", 1, "slow")
    assert 4 < message.eta - time.time() <= 5.5


def test_retry_default_countdown_is_default_retry_delay(app):
    @app.task(bind=True, default_retry_delay=42)
    def job(self):
        raise self.retry()

    dispatched = []
    run_in_worker(job, dispatched=dispatched)
    assert dispatched[0].options["countdown"] == 42


def test_retry_with_throw_false_returns_the_retry(app):
    @app.task(bind=True)
    def job(self):
        ret = self.retry(countdown=1, throw=False)
        return isinstance(ret, Retry)

    dispatched = []
    outcome, _ = run_in_worker(job, dispatched=dispatched)
    assert outcome.retval is True and len(dispatched) == 1


def test_autoretry_for_retries_known_exceptions_with_retry_kwargs(app):
    attempts = []

    class FailWhaleError(Exception):
        pass

    @app.task(autoretry_for=(FailWhaleError,), retry_kwargs={"max_retries": 5})
    def refresh_timeline(user):
        attempts.append(user)
        raise FailWhaleError("whale")

    result = refresh_timeline.apply(("ann",))
    assert len(attempts) == 6  # the first run and five retries
    assert isinstance(result.result, FailWhaleError)


def test_autoretry_does_not_catch_other_exceptions_or_dont_autoretry_for(app):
    attempts = []

    @app.task(autoretry_for=(Exception,), dont_autoretry_for=(KeyError,))
    def job(exc_type):
        attempts.append(1)
        raise exc_type("x")

    assert isinstance(job.apply((KeyError,)).result, KeyError)
    assert len(attempts) == 1


def test_autoretry_with_backoff_uses_exponential_countdowns(app):
    @app.task(autoretry_for=(OSError,), retry_backoff=0.2, retry_jitter=False, max_retries=10)
    def job():
        raise OSError("x")

    countdowns = []
    for retries in range(4):
        dispatched = []
        run_in_worker(job, retries=retries, dispatched=dispatched)
        countdowns.append(dispatched[0].options["countdown"])
    assert countdowns == pytest.approx([0.2, 0.4, 0.8, 1.6])


@pytest.mark.parametrize("backoff,expected", [(True, [1, 2, 4, 8, 16]), (3, [3, 6, 12, 24, 48])])
def test_backoff_sequences_match_the_guide(app, backoff, expected):
    @app.task(retry_backoff=backoff, retry_jitter=False)
    def job():
        pass

    assert [job.backoff_delay(n) for n in range(5)] == expected


def test_backoff_is_capped_and_jitter_stays_below_the_delay(app):
    @app.task(retry_backoff=True, retry_backoff_max=10, retry_jitter=True)
    def job():
        pass

    random.seed(7)
    delays = [job.backoff_delay(n) for n in range(20)]
    assert all(0 <= d <= min(10, 2**n) for n, d in enumerate(delays))
    assert len(set(delays)) > 10  # really random


# --- sending --------------------------------------------------------------------------


def test_delay_builds_a_message_and_returns_its_result(app):
    @app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 3)
    (message,) = app.sent
    assert (message.id, message.task, message.args, message.kwargs) == (result.id, add.name, (2, 3), {})
    assert message.queue == "celery" and message.eta is None and message.retries == 0
    assert result.state == states.PENDING


def test_apply_async_options_land_in_the_message(app):
    @app.task(time_limit=30)
    def add(x, y):
        return x + y

    eta = datetime.now() + timedelta(hours=1)
    add.apply_async((1,), {"y": 2}, task_id="fixed", eta=eta, expires=60, queue="fast",
                    link=add.s(10), link_error=add.si(0, 0))
    message = app.sent[-1]
    assert message.id == "fixed" and message.queue == "fast" and message.kwargs == {"y": 2}
    assert message.eta == pytest.approx(eta.timestamp())
    assert 55 < message.expires - time.time() <= 60
    assert message.options["link"][0]["task"] == add.name and message.options["link"][0]["args"] == [10]
    assert message.options["link_error"][0]["immutable"] is True
    assert message.options["time_limit"] == 30
    add.apply_async((1, 2), countdown=10)
    assert 9 < app.sent[-1].eta - time.time() <= 10.5


def test_queue_precedence_call_then_task_then_routes_then_default(app):
    app.conf.task_routes = [{"t.slow_*": "slow"}, lambda name, *a: {"queue": "routed"} if "fn" in name else None]
    app.conf.task_default_queue = "default"

    @app.task(name="t.slow_one")
    def slow_one():
        pass

    @app.task(name="t.fn_job")
    def fn_job():
        pass

    @app.task(name="t.plain")
    def plain():
        pass

    @app.task(name="t.slow_pinned", queue="pinned")
    def slow_pinned():
        pass

    for task in (slow_one, fn_job, plain, slow_pinned):
        task.delay()
    slow_one.apply_async(queue="explicit")
    assert [m.queue for m in app.sent] == ["slow", "routed", "default", "pinned", "explicit"]


def test_wrong_arguments_fail_at_call_time(app):
    @app.task(bind=True)
    def add(self, x, y):
        return x + y

    with pytest.raises(TypeError, match="add"):
        add.delay(1)
    with pytest.raises(TypeError, match="unknown options"):
        add.apply_async((1, 2), routing_key="x")
    assert app.sent == []
    add.delay(1, 2)  # the checker is known now: counts are checked without it, and still refused
    for args in ((1,), (1, 2, 3)):
        with pytest.raises(TypeError, match="add"):
            add.delay(*args)
    assert len(app.sent) == 1


def test_always_eager_runs_delay_in_process(eager_app):
    @eager_app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 2)
    assert result.get() == 4 and result.state == states.SUCCESS


def test_eager_propagates_raises_in_the_caller(eager_app):
    eager_app.conf.task_eager_propagates = True

    @eager_app.task
    def boom():
        raise ZeroDivisionError()

    with pytest.raises(ZeroDivisionError):
        boom.delay()


def test_link_callback_receives_the_result_in_eager_mode(eager_app):
    got = []

    @eager_app.task
    def add(x, y):
        return x + y

    @eager_app.task
    def collect(value, tag):
        got.append((value, tag))

    add.apply_async((2, 3), link=collect.s("tag"))
    assert got == [(5, "tag")]


def test_link_error_receives_the_failed_task_id(eager_app):
    got = []

    @eager_app.task
    def boom():
        raise ValueError()

    @eager_app.task
    def on_error(task_id):
        got.append(task_id)

    boom.apply_async(task_id="dead", link_error=on_error.s())
    assert got == ["dead"]


def test_send_task_by_name_without_the_code(app):
    result = app.send_task("remote.only", (1,), {"k": 2}, queue="q")
    message = app.sent[-1]
    assert (message.task, message.args, message.kwargs, message.queue) == ("remote.only", (1,), {"k": 2}, "q")
    assert result.id == message.id


def test_request_class_is_the_workers_request(app):
    @app.task
    def job():
        pass

    assert job.request_class is Request
    job.Request = "tests.support:RecordingRequest"  # resolved once, then again when it changes
    assert job.request_class is RecordingRequest and job.request_class is RecordingRequest
    job.Request = Request
    assert job.request_class is Request


def test_s_builds_a_signature_and_honours_a_subclass_s_own_signature(app):
    @app.task
    def mul(x, y):
        return x * y

    sig = mul.s(2, y=3)
    assert dict(sig) == {"task": mul.name, "args": [2], "kwargs": {"y": 3}, "options": {}, "immutable": False}
    assert sig.app is app and sig() == 6

    class Tagged(Task):
        def signature(self, args=None, kwargs=None, **options):
            return super().signature(args, kwargs, queue="tagged", **options)

    @app.task(base=Tagged)
    def tagged(x):
        return x

    assert tagged.s(1)["options"] == {"queue": "tagged"}


def test_a_task_class_that_checks_arguments_its_own_way_is_asked_at_every_call(app):
    checked = []

    class Checked(app.Task):
        def check_arguments(self, args, kwargs):
            checked.append(args)

    @app.task(base=Checked)
    def add(x, y):
        return x + y

    add.delay(1, 2)
    add.delay(3, 4)
    assert checked == [(1, 2), (3, 4)] and len(app.sent) == 2

"""Settings: every value is checked, and every setting does something (task_serializer, task_store_eager_result)."""

from __future__ import annotations

import datetime
import time

import pytest

from engine import Engine, states
from engine.config import DEFAULTS, RULES, Settings
from engine.exceptions import EncodeError, ImproperlyConfigured, UnknownSettingError


def test_every_setting_has_a_rule_and_its_default_passes_it():
    assert set(RULES) == set(DEFAULTS)
    Settings(DEFAULTS)  # no error


@pytest.mark.parametrize(("name", "bad"), [
    ("task_serializer", "yaml"),
    ("task_serializer", "json"),
    ("task_acks_late", 1),
    ("task_acks_late", "yes"),
    ("task_time_limit", "30"),
    ("task_time_limit", 0),
    ("task_time_limit", True),
    ("task_soft_time_limit", -1),
    ("worker_prefetch_multiplier", 0),
    ("worker_prefetch_multiplier", 2.5),
    ("worker_concurrency", 0),
    ("producer_outbox_full", "drop"),
    ("producer_flush_timeout", -1),
    ("producer_flush_timeout", float("nan")),
    ("transport", []),
    ("transport", 5555),
    ("result_backend", "mysql://localhost/db"),
    ("result_expires", -5),
    ("task_default_queue", ""),
    ("task_routes", "proj.tasks.*"),
    ("max_message_size", None),
])
def test_a_bad_value_is_refused_however_it_is_set(name, bad):
    app = Engine("proj")
    setters = [
        lambda: Engine("proj", **{name: bad}),
        lambda: Settings({name: bad}),
        lambda: app.conf.update({name: bad}),
        lambda: app.conf.update(**{name: bad}),
        lambda: setattr(app.conf, name, bad),
        lambda: app.conf.__setitem__(name, bad),
    ]
    for setter in setters:
        with pytest.raises(ImproperlyConfigured) as info:
            setter()
        message = str(info.value)
        assert repr(name) in message and repr(bad) in message and "expected" in message
        assert not isinstance(info.value, UnknownSettingError)  # that one is for names
    assert app.conf[name] == DEFAULTS[name]


def test_update_changes_nothing_when_one_value_is_bad():
    app = Engine("proj")
    with pytest.raises(ImproperlyConfigured, match="task_time_limit"):
        app.conf.update(task_acks_late=True, task_time_limit="soon")
    assert app.conf.task_acks_late is False


@pytest.mark.parametrize(("name", "good"), [
    ("transport", ["tcp://127.0.0.1:5555", "ipc:///tmp/engine.sock"]),
    ("transport", ("tcp://127.0.0.1:5555",)),
    ("result_backend", "redis://localhost:6379/0"),
    ("result_backend", "rpc://"),
    ("result_expires", datetime.timedelta(hours=1)),
    ("result_expires", None),
    ("result_expires", 0),
    ("task_routes", {"proj.*": "slow"}),
    ("task_routes", [{"a": {"queue": "b"}}, lambda *a: None]),
    ("task_time_limit", 2.5),
    ("producer_flush_timeout", 0),
    ("worker_concurrency", None),
    ("transport_curve_server_key", "/etc/engine/worker.key"),
])
def test_good_values_are_taken(name, good):
    app = Engine("proj", **{name: good})
    assert app.conf[name] == good


def test_reading_a_setting_stays_a_plain_attribute_read():
    conf = Engine("proj", task_acks_late=True).conf
    assert conf.__dict__["task_acks_late"] is True
    assert type(conf).__getattribute__ is object.__getattribute__  # no per-read hook


# --- task_serializer ---------------------------------------------------------------


def test_task_serializer_pickle_means_accept_pickle():
    app = Engine("proj", backend="memory://", task_serializer="pickle")
    assert app.conf.accept_pickle is True

    @app.task
    def returns_a_complex():
        return complex(1, 2)  # msgpack cannot pack a complex

    assert returns_a_complex.apply().get() == complex(1, 2)
    assert app.backend.accept_pickle is True


def test_task_serializer_msgpack_refuses_what_msgpack_cannot_pack():
    app = Engine("proj", backend="memory://", task_serializer="msgpack", task_store_eager_result=True)

    @app.task
    def returns_a_complex():
        return complex(1, 2)

    result = returns_a_complex.apply()
    stored = app.AsyncResult(result.id)
    assert stored.state == states.FAILURE and isinstance(stored.result, EncodeError)


def test_task_serializer_pickle_contradicting_accept_pickle_false_is_an_error():
    with pytest.raises(ImproperlyConfigured, match="accept_pickle"):
        Engine("proj", task_serializer="pickle", accept_pickle=False)
    app = Engine("proj", task_serializer="pickle")
    with pytest.raises(ImproperlyConfigured, match="contradicts task_serializer='pickle'"):
        app.conf.accept_pickle = False
    app.conf.update(task_serializer="msgpack", accept_pickle=False)
    assert app.conf.accept_pickle is False


# --- task_store_eager_result ---------------------------------------------------------


def make_app(**settings):
    app = Engine("proj", backend="memory://", **settings)

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def fails():
        raise KeyError("nope")

    @app.task(bind=True, default_retry_delay=60)
    def flaky(self):
        if self.request.retries < 2:
            raise self.retry()
        return self.request.retries

    @app.task(ignore_result=True)
    def ignored():
        return 1

    return app, add, fails, flaky, ignored


def test_eager_results_are_not_stored_by_default():
    app, add, *_ = make_app()
    result = add.apply((2, 2))
    assert result.get() == 4
    assert app.AsyncResult(result.id).state == states.PENDING


def test_task_store_eager_result_stores_apply_results_in_the_backend():
    app, add, fails, flaky, ignored = make_app(task_store_eager_result=True)
    result = add.apply((2, 2))
    assert app.AsyncResult(result.id).get(timeout=1) == 4
    failed = fails.apply()
    assert app.AsyncResult(failed.id).state == states.FAILURE
    with pytest.raises(KeyError):
        app.AsyncResult(failed.id).get(timeout=1)
    started = time.monotonic()
    retried = flaky.apply()
    assert time.monotonic() - started < 5
    assert app.AsyncResult(retried.id).get(timeout=1) == 2  # the final state, not a RETRY
    assert app.AsyncResult(ignored.apply().id).state == states.PENDING  # ignored results stay unstored


def test_task_store_eager_result_stores_always_eager_delay_results():
    app, add, fails, *_ = make_app(task_store_eager_result=True, task_always_eager=True)
    result = add.delay(40, 2)
    assert app.AsyncResult(result.id).get(timeout=1) == 42


def test_task_store_eager_result_stores_a_failure_that_propagates():
    app, add, fails, *_ = make_app(task_store_eager_result=True, task_always_eager=True,
                                   task_eager_propagates=True)
    with pytest.raises(KeyError):
        fails.apply(task_id="propagated")
    assert app.AsyncResult("propagated").state == states.FAILURE


def test_the_task_option_overrides_the_setting():
    app = Engine("proj", backend="memory://", task_store_eager_result=True)

    @app.task(store_eager_result=False)
    def not_stored():
        return 1

    @app.task
    def stored():
        return 2

    assert app.AsyncResult(not_stored.apply().id).state == states.PENDING
    assert app.AsyncResult(stored.apply().id).get(timeout=1) == 2


def test_task_store_eager_result_without_a_backend_does_nothing():
    app = Engine("proj", task_store_eager_result=True)

    @app.task
    def add(x, y):
        return x + y

    assert add.apply((1, 1)).get() == 2


# --- result_expires ------------------------------------------------------------------


@pytest.mark.parametrize("never", [0, None])
def test_sqlite_keeps_results_forever_when_result_expires_is_0_or_none(tmp_path, never):
    app = Engine("proj", backend=f"sqlite:///{tmp_path / 'r.db'}", result_expires=never,
                 task_store_eager_result=True)

    @app.task
    def add(x, y):
        return x + y

    result = add.apply((1, 2))
    assert app.backend.cleanup(now=time.time() + 10 * 365 * 86400) == 0
    assert app.AsyncResult(result.id).get(timeout=1) == 3
    app.close()


def test_sqlite_takes_a_timedelta_for_result_expires(tmp_path):
    app = Engine("proj", backend=f"sqlite:///{tmp_path / 'r.db'}", result_expires=datetime.timedelta(seconds=60),
                 task_store_eager_result=True)

    @app.task
    def add(x, y):
        return x + y

    result = add.apply((1, 2))
    assert app.backend.cleanup(now=time.time() + 30) == 0
    assert app.backend.cleanup(now=time.time() + 120) == 1
    assert app.AsyncResult(result.id).state == states.PENDING
    app.close()

"""Celery code running unchanged but for the import (issue 12): the app-level API Celery documents."""

from __future__ import annotations

import sys
import textwrap

import pytest

import engine
from engine import AsyncResult, Engine, current_app, current_task, shared_task, signature
from engine.core import StateRecord
from engine.exceptions import CeleryCompatibilityWarning, UnknownSettingError
from engine.serialization import dumps


@pytest.fixture
def capturing():
    """Make a fresh app current whose sent messages land in ``app.sent``; restore the previous one."""
    previous = engine.current.get_current_app()

    def make(name: str = "compat", **settings) -> Engine:
        app = Engine(name, backend="memory://", **settings)
        app.sent = []
        app.send_message = app.sent.append
        return app

    yield make
    previous.set_current()


def test_the_last_app_created_is_current_and_set_current_switches(capturing):
    first = capturing("first")
    assert current_app.main == "first"
    second = capturing("second")
    assert current_app._get_current_object() is second
    first.set_current()
    assert current_app.main == "first" and current_app.conf is first.conf


def test_an_app_created_with_set_as_current_false_leaves_the_current_app_alone(capturing):
    app = capturing("current")
    Engine("side", set_as_current=False)
    assert current_app._get_current_object() is app


def test_async_result_and_signature_without_app_use_the_current_app(capturing):
    app = capturing()

    @app.task
    def add(x, y):
        return x + y

    sig = signature(add.name, (2, 2))
    result = sig.delay()
    assert [m.task for m in app.sent] == [add.name] and app.sent[0].args == (2, 2)
    app.backend.store([StateRecord(result.id, "SUCCESS", dumps(4), None, 0.0)])
    assert AsyncResult(result.id).get(timeout=1) == 4


def test_a_shared_task_is_registered_with_every_app_and_uses_the_current_one(capturing):
    before = capturing("before")

    @shared_task(name="compat.shared_mul")
    def mul(x, y):
        return x * y

    after = capturing("after")
    assert "compat.shared_mul" in before.tasks and "compat.shared_mul" in after.tasks
    mul.delay(2, 3)
    assert [m.task for m in after.sent] == ["compat.shared_mul"] and before.sent == []
    before.set_current()
    mul.apply_async((4, 5))
    assert [m.args for m in before.sent] == [(4, 5)]
    assert mul(6, 7) == 42  # called directly, as a function


def test_current_task_is_the_running_task(capturing):
    app = capturing(task_always_eager=True)
    seen = []

    @app.task
    def who():
        seen.append((current_task.name, current_task.request.id))

    result = who.delay()
    assert seen == [(who.name, result.id)]
    assert not current_task  # nothing runs now


def test_a_broker_url_is_accepted_with_a_warning_that_says_what_it_means_here():
    with pytest.warns(CeleryCompatibilityWarning, match="no broker.*ZeroMQ"):
        app = Engine("proj", broker="redis://localhost:6379/0", set_as_current=False)
    assert app.conf.transport == "tcp://127.0.0.1:5555"


def test_config_from_object_reads_a_module_path_an_object_and_a_namespaced_mapping(tmp_path, monkeypatch):
    (tmp_path / "compatconfig.py").write_text(textwrap.dedent("""
        import os
        task_acks_late = True
        worker_prefetch_multiplier = 2
        def helper():
            return 1
        _private = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Engine("proj", set_as_current=False)
    app.config_from_object("compatconfig")
    assert (app.conf.task_acks_late, app.conf.worker_prefetch_multiplier) == (True, 2)

    class Config:
        task_default_queue = "batch"

    app.config_from_object(Config)
    assert app.conf.task_default_queue == "batch"

    flask_config = {"CELERY_TASK_ALWAYS_EAGER": True, "CELERY_RESULT_BACKEND": "memory://", "DEBUG": True}
    app.config_from_object(flask_config, namespace="CELERY")
    assert (app.conf.task_always_eager, app.conf.result_backend) == (True, "memory://")

    with pytest.raises(UnknownSettingError, match="did you mean 'task_acks_late'"):
        app.config_from_object({"CELERY_TASK_ACKS_LAT": True}, namespace="CELERY")
    with pytest.raises(ImportError):
        app.config_from_object("no_such_config_module")
    app.config_from_object("no_such_config_module", silent=True)


def test_autodiscover_tasks_imports_each_packages_tasks_module_when_the_worker_starts(tmp_path, monkeypatch):
    for package, tasks in {"shop": "from engine import shared_task\n@shared_task(name='shop.buy')\n"
                                   "def buy():\n    return 1\n",
                           "empty": None}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        if tasks:
            (tmp_path / package / "tasks.py").write_text(tasks)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Engine("proj", set_as_current=False)

    app.autodiscover_tasks(lambda: ["shop", "empty"])
    assert "shop.tasks" not in sys.modules  # lazy, as in Celery (Django apps are not ready yet)
    app.finalize()
    assert "shop.buy" in app.tasks

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "__init__.py").write_text("")
    (tmp_path / "broken" / "tasks.py").write_text("import no_such_dependency\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency"):
        app.autodiscover_tasks(["broken"], force=True)


def test_include_modules_are_imported_by_finalize(tmp_path, monkeypatch):
    (tmp_path / "included_tasks.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Engine("proj", include=["included_tasks"], set_as_current=False)
    assert "included_tasks" not in sys.modules
    app.finalize()
    assert sys.modules["included_tasks"].IMPORTED


def test_app_task_can_be_assigned_and_called_directly_with_options(capturing):
    app = capturing()

    class Base(engine.Task):
        custom = "yes"

    app.Task = Base

    def plain(x):
        return x

    task = app.task(plain, name="compat.plain", queue="slow")
    assert isinstance(task, Base) and task.custom == "yes"
    assert app.tasks["compat.plain"] is task and task.queue == "slow"
    with pytest.raises(Exception, match="subclass of engine.Task"):
        app.Task = dict


def test_send_task_takes_celerys_arguments(capturing):
    app = capturing()
    result = app.send_task("remote.add", [1, 2], {"z": 3}, countdown=10, queue="math")
    [message] = app.sent
    assert (message.task, message.args, message.kwargs, message.queue) == ("remote.add", (1, 2), {"z": 3}, "math")
    assert message.eta is not None and message.id == result.id
    app.send_task("remote.noargs")
    assert app.sent[1].args == ()


def test_new_style_errbacks_get_request_exc_and_traceback_and_old_style_the_task_id(capturing):
    app = capturing(task_always_eager=True)
    calls = []

    @app.task
    def fails():
        raise KeyError("missing")

    @app.task
    def new_style(request, exc, traceback):
        calls.append(("new", request.id, type(exc).__name__, "KeyError" in traceback))

    @app.task
    def old_style(task_id):
        calls.append(("old", task_id))

    result = fails.apply_async(link_error=[new_style.s(), old_style.s()])
    assert calls == [("new", result.id, "KeyError", True), ("old", result.id)]


def test_on_error_adds_an_errback_and_returns_the_signature_to_chain_on(capturing):
    app = capturing()

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def report(request, exc, traceback):
        return None

    sig = add.s(2, 2)
    assert sig.on_error(report.s()) is sig
    sig.delay()
    assert app.sent[0].options["link_error"][0]["task"] == report.name


def test_celery_settings_without_meaning_here_are_accepted_with_one_warning_each(monkeypatch):
    import warnings

    from engine import config
    from engine.config import Settings

    monkeypatch.setattr(config, "_warned", set())  # once per process: start this test with none said

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conf = Settings(timezone="Europe/Paris", broker_url="redis://localhost", accept_content=["json"],
                        task_default_priority=5)
        conf.update(timezone="UTC")  # the same name again: no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, CeleryCompatibilityWarning)]
    assert len(messages) == 4
    assert any("broker_url" in m and "no broker" in m for m in messages)
    assert conf.timezone == "UTC" and conf["broker_url"] == "redis://localhost"  # they read back
    with pytest.raises(UnknownSettingError, match="did you mean 'task_acks_late'"):
        conf.update(task_acks_lat=True)  # a misspelled name still raises


def test_flask_style_upper_case_celery_keys_load_through_config_from_object(monkeypatch):
    from engine import config

    monkeypatch.setattr(config, "_warned", set())
    app = Engine("proj", set_as_current=False)
    with pytest.warns(CeleryCompatibilityWarning):
        app.config_from_object({"CELERY_BROKER_URL": "redis://", "CELERY_TASK_ACKS_LATE": True,
                                "SECRET_KEY": "flask's own"}, namespace="CELERY")
    assert app.conf.task_acks_late is True


def test_retry_in_an_eagerly_applied_task_raises_retry_after_one_run_with_eager_propagates(capturing):
    from engine.exceptions import Retry

    app = capturing(task_always_eager=True, task_eager_propagates=True)
    runs = []

    @app.task(bind=True, default_retry_delay=1)
    def flaky(self):
        runs.append(self.request.retries)
        raise self.retry()

    with pytest.raises(Retry):
        flaky.delay()
    assert runs == [0]


def test_chains_and_groups_of_signatures_by_name_use_the_current_app(capturing):
    from engine import chain, group

    app = capturing()
    chain(signature("remote.first", (1,)), signature("remote.second")).apply_async()
    group(signature("remote.each", (i,)) for i in range(2)).apply_async()
    assert [m.task for m in app.sent] == ["remote.first", "remote.each", "remote.each"]


def test_config_from_object_keeps_a_routing_function_and_skips_helper_functions(tmp_path, monkeypatch):
    (tmp_path / "routingconfig.py").write_text(textwrap.dedent("""
        def task_routes(name, args, kwargs, options):
            return "fast" if name.endswith("ping") else None

        def helper():
            return 1
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Engine("proj", set_as_current=False)
    app.config_from_object("routingconfig")
    assert callable(app.conf.task_routes) and app.conf.task_routes("x.ping", (), {}, {}) == "fast"
    app.config_from_object({"CELERY_TASK_ROUTES": lambda *a: None}, namespace="CELERY")
    assert callable(app.conf.task_routes)

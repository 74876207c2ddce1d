"""The app: settings, the decorator, task names and the registry."""

from __future__ import annotations

import pytest

import engine
from engine import Engine, Task
from engine.core import TaskRegistry
from engine.exceptions import (
    DuplicateTaskError,
    ImproperlyConfigured,
    NotRegistered,
    UnknownSettingError,
)
from tests.support import DatabaseTask, FakeDatabase, decorator1, decorator2


def test_settings_are_readable_writable_and_updatable():
    app = Engine("proj", transport=["tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002"],
                 backend="memory://", task_acks_late=True)
    assert app.conf.transport == ["tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002"]
    assert app.conf.result_backend == "memory://"
    assert app.conf.task_acks_late is True
    assert app.conf.task_ignore_result is False
    assert app.conf.worker_prefetch_multiplier == 4
    app.conf.task_track_started = True
    app.conf.update(task_default_queue="batch", worker_prefetch_multiplier=1)
    assert (app.conf.task_track_started, app.conf.task_default_queue, app.conf["worker_prefetch_multiplier"]) \
        == (True, "batch", 1)


@pytest.mark.parametrize("action", [
    lambda app: app.conf.task_acks_lat,
    lambda app: setattr(app.conf, "task_acks_lat", True),
    lambda app: app.conf.update(task_ignore_results=True),
    lambda app: Engine("x", task_always_eagre=True),
])
def test_unknown_setting_names_raise_a_clear_error(action):
    app = Engine("proj")
    with pytest.raises(UnknownSettingError, match="unknown setting"):
        action(app)


def test_unknown_setting_error_suggests_the_close_name():
    with pytest.raises(UnknownSettingError, match="did you mean 'task_acks_late'"):
        Engine("x").conf.task_acks_lat  # noqa: B018 - reading it is what raises
    assert issubclass(UnknownSettingError, AttributeError)  # hasattr() works on conf


def test_update_checks_every_name_before_changing_any():
    app = Engine("proj")
    with pytest.raises(UnknownSettingError):
        app.conf.update(task_acks_late=True, nonsense=1)
    assert app.conf.task_acks_late is False


def test_decorator_forms_register_and_return_task_instances():
    app = Engine("proj")

    @app.task
    def plain(x):
        return x

    @app.task()
    def called(x):
        return x

    @app.task(name="custom.name", max_retries=7)
    def named(x):
        return x

    assert all(isinstance(t, Task) for t in (plain, called, named))
    assert plain.name == f"{__name__}.plain"
    assert named.name == "custom.name" and named.max_retries == 7
    assert app.tasks["custom.name"] is named
    assert set(app.tasks) >= {plain.name, called.name, "custom.name"}
    assert plain(3) == 3


def test_default_options_match_celery():
    app = Engine("proj")

    @app.task
    def t():
        pass

    assert (t.max_retries, t.default_retry_delay, t.retry_backoff, t.retry_backoff_max, t.retry_jitter) \
        == (3, 180, False, 600, True)
    assert t.autoretry_for == () and t.retry_kwargs == {}


def test_unknown_task_option_is_an_error():
    app = Engine("proj")
    with pytest.raises(ImproperlyConfigured, match="max_retry"):
        @app.task(max_retry=3)
        def t():
            pass


def test_registry_is_the_core_mapping_and_lookup_raises_not_registered():
    app = Engine("proj")
    assert isinstance(app.tasks, TaskRegistry)
    with pytest.raises(NotRegistered, match="nope"):
        app.tasks.lookup("nope")
    with pytest.raises(KeyError):
        app.tasks["nope"]


def test_registry_uses_the_compiled_core_in_a_normal_install():
    import os

    if os.environ.get("ENGINE_NO_EXTENSIONS"):
        pytest.skip("pure twin forced by ENGINE_NO_EXTENSIONS")
    assert engine.HAS_EXTENSION
    assert type(Engine("x").tasks).__module__ == "engine._core"


def test_gen_task_name_can_be_overridden_to_strip_tasks_suffix():
    class MyEngine(Engine):
        def gen_task_name(self, name, module):
            module = module.removesuffix(".tasks")
            return super().gen_task_name(name, module)

    app = MyEngine("main")

    def add(x, y):
        return x + y

    add.__module__ = "proj.tasks"
    task = app.task(add)
    assert task.name == "proj.add"
    assert "proj.add" in app.tasks


def test_tasks_defined_in_main_are_named_after_the_app():
    app = Engine("proj")

    def job():
        pass

    job.__module__ = "__main__"
    assert app.task(job).name == "proj.job"


def test_two_functions_under_one_name_is_an_error_naming_both():
    app = Engine("proj")

    @app.task(name="dup")
    def first():
        pass

    with pytest.raises(DuplicateTaskError) as info:
        @app.task(name="dup")
        def second():
            pass

    assert "first" in str(info.value) and "second" in str(info.value)


def test_registering_the_same_function_twice_returns_the_same_task():
    app = Engine("proj")

    def job():
        return 1

    assert app.task(job) is app.task(job)


def test_multiple_decorators_beneath_the_task_decorator():
    app = Engine("proj")

    @app.task
    @decorator2
    @decorator1
    def add(x, y):
        return x + y

    assert add.name == f"{__name__}.add"
    assert add(1, 2) == 8
    assert add.apply((1, 2)).get() == 8


def test_task_is_instantiated_once_per_process_like_an_actor():
    app = Engine("proj")
    created = []

    class Counting(Task):
        def __init__(self):
            created.append(self)
            self.calls = 0

    @app.task(base=Counting, bind=True)
    def tick(self):
        self.calls += 1
        return self.calls

    assert [tick.apply().get() for _ in range(3)] == [1, 2, 3]
    assert len(created) == 1


def test_database_task_attribute_persists_across_calls():
    app = Engine("proj")
    FakeDatabase.opened = 0

    @app.task(base=DatabaseTask)
    def process_rows():
        process_rows.db.rows.append("row")
        return len(process_rows.db.rows)

    assert [process_rows.apply().get() for _ in range(3)] == [1, 2, 3]
    assert FakeDatabase.opened == 1


@pytest.mark.parametrize("task_cls", [DatabaseTask, "tests.support:DatabaseTask", "tests.support.DatabaseTask"])
def test_task_cls_sets_the_base_of_every_task(task_cls):
    app = Engine("proj", task_cls=task_cls)

    @app.task
    def job():
        return job.db

    assert isinstance(job, DatabaseTask)
    assert isinstance(job.apply().get(), FakeDatabase)


def test_task_cls_that_is_not_a_task_is_refused():
    app = Engine("proj", task_cls="tests.support:FakeDatabase")
    with pytest.raises(ImproperlyConfigured, match="subclass of engine.Task"):
        @app.task
        def job():
            pass


def test_register_task_accepts_a_task_class():
    app = Engine("proj")

    class Multiply(Task):
        name = "proj.multiply"

        def run(self, x, y):
            return x * y

    task = app.register_task(Multiply)
    assert app.tasks.lookup("proj.multiply") is task
    assert task.apply((3, 4)).get() == 12


def test_the_rpc_reply_address_follows_the_producer_and_the_backend_setting():
    app = Engine("reply", transport="tcp://127.0.0.1:9", backend="rpc://", producer_flush_timeout=0.1,
                 set_as_current=False)
    try:
        first = app.reply_address()
        assert first is not None and first == app.producer.client_id
        assert app.reply_address() == first  # asked again: the same producer
        app.close()  # a new producer (as after a fork): a new address
        second = app.reply_address()
        assert second == app.producer.client_id and second != first
        app.conf.result_backend = "sqlite:///unused.db"
        assert app.reply_address() is None
        app.conf.result_backend = "rpc://"
        assert app.reply_address() == app.producer.client_id
    finally:
        app.close()

"""The client's one-step send of plain calls (``engine.core.PlainSender``), on both twins, in this process.

``Task.delay(*args)`` and a group's plain members go to the PlainSender first,
which builds the message, queues its bytes in the producer's outbox and returns
the AsyncResult, or declines (None, nothing queued) when anything customises the
call: then the general path (``apply_async``) sends it. No worker runs here: the
messages stay in the outbox, where these tests read them.
"""

from __future__ import annotations

from unittest import mock

import msgpack
import pytest

import engine.core
import engine.task
import engine.transport.producer
from engine import Engine, group, signals
from engine.core import decode_message
from engine.exceptions import OutboxFull
from engine.result import AsyncResult
from engine.task import Task
from tests.support import CORE_TWINS


class Spy:
    """The twin's PlainSender, counting the calls it sent."""

    def __init__(self, sender) -> None:
        self.sender = sender
        self.sent = 0

    def send(self, *args):
        result = self.sender.send(*args)
        self.sent += result is not None
        return result


@pytest.fixture(params=CORE_TWINS)
def twin(request, monkeypatch):
    """The twin under test: its PlainSender sends for engine.task, into producers' outboxes of its own classes."""
    core = request.param
    monkeypatch.setattr(engine.transport.producer, "Outbox", core.Outbox)
    monkeypatch.setattr(engine.transport.producer, "Pending", core.Pending)
    monkeypatch.setattr(engine.transport.producer, "queue_pending", core.queue_pending)
    sender = core.PlainSender({name: getattr(Task, name) for name in engine.task._SENDING_METHODS}, AsyncResult,
                              signals.before_task_publish, signals.after_task_publish, engine.task._load_transport)
    monkeypatch.setattr(engine.task, "_plain_sender", Spy(sender))
    return core


@pytest.fixture
def app(twin):
    """An app whose producer points at a port no worker listens on: what is sent stays in the outbox."""
    app = Engine("plainsender", transport="tcp://127.0.0.1:9", backend="rpc://", producer_flush_timeout=0.1,
                 set_as_current=False)
    app.reply_address()  # known before the first call, as after any first send
    yield app
    app._producer.close(timeout=0)  # nothing is delivered: no flush wait
    app._producer = None


def queued(app) -> list:
    """The messages waiting in the app's outbox, oldest first, decoded."""
    return [decode_message(p.raw) for items in app.producer._outbox.by_queue.values() for p in items]


def fields(message) -> dict:
    """What a message says, but its id."""
    return {key: value for key, value in message.to_dict().items() if key != "id"}


def sent_plainly(app, call) -> bool:
    """True when ``call()`` was sent by the PlainSender (not the general way)."""
    before = engine.task._plain_sender.sent
    call()
    return engine.task._plain_sender.sent == before + 1


def test_a_plain_delay_queues_the_message_the_general_path_builds(app):
    @app.task
    def add(x, y):
        return x + y

    result = add.delay(2, 3)

    (message,) = queued(app)
    expected = add.build_message((2, 3), {}, reply_to=app.reply_address())
    assert fields(message) == fields(expected)
    assert message.id == result.id and len(result.id) == 36
    assert type(result) is AsyncResult and result.task_name == add.name and result.app is app
    assert result._backend is None and result.parent is None
    assert msgpack.unpackb(message.payload) == [[2, 3], {}]


def test_task_options_travel_as_the_general_path_sends_them(app):
    @app.task(queue="slow", time_limit=30, soft_time_limit=20, ignore_result=True)
    def limited(x):
        return x

    limited.delay("é" * 40)
    app.conf.task_ignore_result = True

    @app.task
    def plain(x):
        return x

    plain.delay([1, 2.5, None, {"k": b"v"}])

    first, second = queued(app)
    assert first.queue == "slow" and first.options == {"time_limit": 30, "soft_time_limit": 20}
    assert first.ignore_result is True and first.args == ("é" * 40,)
    assert fields(first) == fields(limited.build_message(("é" * 40,), {}, reply_to=app.reply_address()))
    assert second.ignore_result is True  # the app's setting, resolved at sending
    assert second.args == ([1, 2.5, None, {"k": b"v"}],)


def test_a_plain_call_is_sent_in_one_step_and_each_customisation_goes_the_general_way(app):
    @app.task
    def add(x, y):
        return x + y

    assert not sent_plainly(app, lambda: add.delay(1, 2))  # the first call checks the arguments the general way
    assert sent_plainly(app, lambda: add.delay(1, 2))
    assert not sent_plainly(app, lambda: add.delay(1, y=2))  # keyword arguments

    def receiver(**kwargs):
        pass

    for signal in (signals.before_task_publish, signals.after_task_publish):
        signal.connect(receiver)
        try:
            assert not sent_plainly(app, lambda: add.delay(1, 2))
        finally:
            signal.disconnect(receiver)
    app.conf.task_routes = {"*": {"queue": "routed"}}
    assert not sent_plainly(app, lambda: add.delay(1, 2))
    assert queued(app)[-1].queue == "routed"
    app.conf.task_routes = None
    assert sent_plainly(app, lambda: add.delay(1, 2))
    assert len(queued(app)) == 7


def test_a_wrong_argument_count_is_refused_as_before(app):
    @app.task
    def add(x, y):
        return x + y

    with pytest.raises(TypeError, match="add"):
        add.delay(1)
    with pytest.raises(TypeError, match="add"):
        add.delay(1, 2, 3)
    assert queued(app) == []


def test_a_patched_apply_async_is_called_by_delay(app):
    @app.task
    def add(x, y):
        return x + y

    add.delay(1, 2)  # a first plain call: nothing is remembered that a patch would miss
    with mock.patch.object(add, "apply_async") as on_task:
        add.delay(3, 4)
    on_task.assert_called_once_with((3, 4), {})
    with mock.patch.object(Task, "apply_async") as on_class:
        add.delay(5, 6)
    on_class.assert_called_once_with((5, 6), {})
    assert len(queued(app)) == 1


def test_a_task_class_or_app_class_with_its_own_sending_is_called(twin):
    sent = []

    class Audited(Task):
        def build_message(self, *args, **kwargs):
            message = super().build_message(*args, **kwargs)
            sent.append(message.id)
            return message

    class AuditedApp(Engine):
        def send_message(self, message):
            sent.append(message.task)
            super().send_message(message)

    app = AuditedApp("plainsender", transport="tcp://127.0.0.1:9", producer_flush_timeout=0.1, set_as_current=False)
    try:
        @app.task(base=Audited)
        def audited(x):
            return x

        @app.task
        def plain(x):
            return x

        result = audited.delay(1)
        plain.delay(2)
        assert sent == [result.id, audited.name, plain.name]
        assert [m.task for m in queued(app)] == [audited.name, plain.name]
    finally:
        app._producer.close(timeout=0)
        app._producer = None


def test_eager_mode_runs_the_task_here(app):
    @app.task
    def add(x, y):
        return x + y

    app.conf.task_always_eager = True
    assert add.delay(2, 3).get() == 5
    assert queued(app) == []


def test_the_first_call_makes_the_producer_and_the_reply_address_the_general_way(twin):
    app = Engine("plainsender", transport="tcp://127.0.0.1:9", backend="rpc://", producer_flush_timeout=0.1,
                 set_as_current=False)
    try:
        @app.task
        def add(x, y):
            return x + y

        assert app._producer is None
        add.delay(1, 2)  # the general path: made the producer and the reply address
        assert app._producer is not None and app._reply_to is not None
        app.producer._outbox.by_queue.clear()
        app.producer._outbox.count = 0
        assert sent_plainly(app, lambda: add.delay(1, 2))
        assert queued(app)[0].reply_to == app.producer.client_id
        old = app._producer
        old._closing = True  # closed (or inherited through a fork): not used again
        add.delay(1, 2)
        assert app._producer is not old and len(queued(app)) == 1
        assert queued(app)[0].reply_to == app.producer.client_id != old.client_id
        old.close(timeout=0)
    finally:
        if app._producer is not None:
            app._producer.close(timeout=0)


def test_a_group_of_plain_members_goes_out_in_one_step_each(app):
    @app.task
    def add(x, y):
        return x + y

    add.delay(0, 0)  # the first call checks the arguments the general way
    before = engine.task._plain_sender.sent
    result = group(add.s(i, i) for i in range(5)).apply_async()
    assert engine.task._plain_sender.sent == before + 5
    messages = queued(app)[1:]
    assert [m.id for m in messages] == [r.id for r in result.results]
    assert [m.args for m in messages] == [(i, i) for i in range(5)]
    assert {m.reply_to for m in messages} == {app.reply_address()}


def test_a_group_with_arguments_or_options_of_its_own_or_a_patched_send_goes_the_general_way(app):
    @app.task
    def add(x, y, z=0):
        return x + y + z

    add.delay(0, 0)
    before = engine.task._plain_sender.sent
    partial = group(add.s(i) for i in range(3)).apply_async((10,))  # the group's args go before each member's
    keyword = group([add.s(1, 2), add.s(3, 4, z=5)]).apply_async()
    assert engine.task._plain_sender.sent == before + 4  # all but the one with a keyword argument
    with mock.patch.object(Task, "_send", autospec=True, side_effect=Task._send) as on_class:
        group(add.s(i, i) for i in range(2)).apply_async()
    assert on_class.call_count == 2  # a changed Task._send is called for each member
    messages = queued(app)[1:]
    assert [(m.args, m.kwargs) for m in messages] == [((10, 0), {}), ((10, 1), {}), ((10, 2), {}), ((1, 2), {}),
                                                      ((3, 4), {"z": 5}), ((0, 0), {}), ((1, 1), {})]
    assert [m.id for m in messages[:5]] == [r.id for r in partial.results + keyword.results]


def test_a_full_outbox_is_refused_when_so_configured(app):
    @app.task
    def add(x, y):
        return x + y

    app.conf.producer_outbox_full = "raise"
    app.producer.max_outbox = 2
    add.delay(1, 2)
    add.delay(3, 4)
    with pytest.raises(OutboxFull):
        add.delay(5, 6)
    assert len(queued(app)) == 2


def test_a_message_too_large_is_refused_by_the_general_path(app):
    @app.task
    def echo(x):
        return x

    app.producer.max_batch_bytes = 1000
    with pytest.raises(Exception, match="bytes; max_message_size"):
        echo.delay("x" * 2000)
    assert queued(app) == []


def test_a_send_replaced_on_the_app_or_the_producer_or_their_classes_is_called(app):
    @app.task
    def add(x, y):
        return x + y

    add.delay(0, 0)  # the first call checks the arguments the general way
    captured = []
    app.send_message = captured.append  # as the worker's chord counter sends a chord's body
    try:
        assert not sent_plainly(app, lambda: add.delay(1, 2))
    finally:
        del app.send_message
    assert [m.args for m in captured] == [(1, 2)]
    with mock.patch.object(Engine, "send_message") as on_class:
        assert not sent_plainly(app, lambda: add.delay(3, 4))
    on_class.assert_called_once()
    with mock.patch.object(app.producer, "send") as on_producer:
        assert not sent_plainly(app, lambda: add.delay(5, 6))
    on_producer.assert_called_once()
    with mock.patch.object(engine.transport.producer.Producer, "send") as on_producer_class:
        assert not sent_plainly(app, lambda: add.delay(7, 8))
    on_producer_class.assert_called_once()
    assert sent_plainly(app, lambda: add.delay(9, 10))
    assert [m.args for m in queued(app)] == [(0, 0), (9, 10)]


def test_the_result_has_the_attributes_its_class_gives_and_a_changed_init_is_called(app, monkeypatch):
    @app.task
    def add(x, y):
        return x + y

    add.delay(0, 0)
    result = add.delay(1, 2)
    assert vars(result) == vars(AsyncResult(result.id, None, add.name, app, None))
    assert list(vars(result)) == list(vars(AsyncResult(result.id, None, add.name, app, None)))
    made = []
    original = AsyncResult.__init__

    def init(self, *args, **kwargs):
        made.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncResult, "__init__", init)  # the class changed after plain calls
    result = add.delay(3, 4)
    assert made == [result.id] and result.task_name == add.name and result.app is app


def test_a_producer_replaced_usable_or_one_of_another_process_goes_the_general_way(app):
    @app.task
    def add(x, y):
        return x + y

    add.delay(0, 0)
    producer = app.producer
    asked = []

    def usable():
        asked.append(True)
        return True

    producer.usable = usable
    try:
        assert not sent_plainly(app, lambda: add.delay(1, 2))
    finally:
        del producer.usable
    assert asked  # the general path asked the replacement
    assert sent_plainly(app, lambda: add.delay(3, 4))
    sender = engine.task._plain_sender.sender
    pid, producer.pid = producer.pid, -1  # as if inherited through a fork
    try:
        assert sender.send(add, (5, 6)) is None
    finally:
        producer.pid = pid
    producer._closing = True
    try:
        assert sender.send(add, (7, 8)) is None
    finally:
        producer._closing = False
    assert [m.args for m in queued(app)] == [(0, 0), (1, 2), (3, 4)]

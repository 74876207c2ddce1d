"""Pure-Python twin of the compiled core (``engine._core``).

Same public names, same behaviour, same bytes on the wire; only slower. It is
used when ``ENGINE_NO_EXTENSIONS=1`` is set or the extension is not built (see
``engine.core``), and it is the reference the compiled core is tested against.

Wire format v1
==============

A task message is a msgpack array of exactly 13 elements::

    [1, id:str, task:str, payload:bin, retries:int>=0, eta:float|nil, expires:float|nil,
     queue:str, reply_to:str|nil, parent_id:str|nil, root_id:str|nil, ignore_result:bool,
     options:map|nil]

``payload`` is ``msgpack.packb([list(args), dict(kwargs)])`` kept as opaque bytes, so a
supervisor can route a message without decoding its arguments; ``kwargs`` keys must be
str. ``eta``/``expires`` are float64 unix timestamps (an int on the wire is accepted and
read as float). ``options`` is nil when empty, else a map with str keys. Strings are UTF-8.

A batch is a msgpack array of bin, each item one encoded message.

Decoding never trusts a length: msgpack bounds every declared length by the input size,
and every problem is reported as ``engine.exceptions.MessageDecodeError``.
"""

from __future__ import annotations

import bisect
import collections
import operator
import os
import random
import struct
import time
from collections import OrderedDict
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any

import msgpack
from msgpack import ExtraData

from engine.exceptions import EncodeError, MessageDecodeError, NotRegistered
from engine.states import CUSTOM_PRECEDENCE, PRECEDENCE_INDEX, READY_STATES

__all__ = (
    "ENVELOPE_SIZE",
    "IMPLEMENTATION",
    "MAX_OPTIONS_DEPTH",
    "MAX_PIPE_FRAME",
    "PIPE_HEADER_SIZE",
    "WIRE_VERSION",
    "Outbox",
    "Pending",
    "PlainRunner",
    "PlainSender",
    "QueuedTask",
    "StateRecord",
    "StateRecorder",
    "TaskMessage",
    "TaskRegistry",
    "compute_backoff",
    "count_runs",
    "decode_batch",
    "decode_message",
    "decode_results",
    "encode_batch",
    "encode_message",
    "finish_done",
    "fold_runtimes",
    "hand_out",
    "new_task_id",
    "pack_done",
    "pack_frame",
    "push_named",
    "queue_pending",
    "read_done",
    "read_record",
    "records_from_flat",
    "records_from_rows",
    "request_fields",
    "split_batch",
    "split_frames",
    "take_plain",
    "write_assigned",
)

#: Which twin this is: ``"python"`` here, ``"cython"`` in ``engine._core``.
IMPLEMENTATION = "python"
#: The first element of every encoded task message.
WIRE_VERSION = 1
#: Number of elements in the message envelope array.
ENVELOPE_SIZE = 13
#: Deepest nesting of containers accepted in ``options`` (the map itself counts as 1,
#: empty containers count too). This is msgpack's own limit (1024 containers including
#: the envelope), spelled out so that the compiled decoder, which reads ``options`` itself,
#: rejects exactly what ``msgpack.unpackb`` rejects.
MAX_OPTIONS_DEPTH = 1023

_FIELDS = (
    "id", "task", "args", "kwargs", "retries", "eta", "expires", "queue",
    "reply_to", "parent_id", "root_id", "ignore_result", "options",
)
_FIELD_SET = frozenset(_FIELDS)
_KINDS = {
    type(None): "nil", bool: "bool", int: "int", float: "float",
    str: "str", bytes: "bin", list: "array", dict: "map",
}
_PRECEDENCE_INDEX = PRECEDENCE_INDEX
_CUSTOM_PRECEDENCE = CUSTOM_PRECEDENCE


def _kind(value: object) -> str:
    # msgpack type names, so errors read the same as the compiled decoder's.
    return _KINDS.get(type(value), "ext")


# -- validation shared by the constructor and the setters -----------------------------------

def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"TaskMessage.{name} must be str, got {type(value).__name__}")
    return value


def _check_opt_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"TaskMessage.{name} must be str or None, got {type(value).__name__}")
    return value


def _check_time(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TaskMessage.{name} must be a float or None, got {type(value).__name__}")
    return float(value)


def _check_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"TaskMessage.retries must be int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"TaskMessage.retries must be >= 0, got {value}")
    return int(value)


def _check_str_keys(value: Any, name: str) -> dict:
    if value is None:
        return {}
    result = dict(value)
    for key in result:
        if not isinstance(key, str):
            raise TypeError(f"TaskMessage.{name} keys must be str, got {type(key).__name__}")
    return result


def _unpack_payload(payload: bytes) -> tuple[tuple, dict]:
    # Map keys may be any hashable here: args can legitimately hold {1: "a"}.
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:
        raise MessageDecodeError(f"task message payload is not valid msgpack: {exc!r}") from exc
    if type(obj) is not list or len(obj) != 2:
        raise MessageDecodeError("task message payload must be a 2-element array [args, kwargs]")
    args, kwargs = obj
    if type(args) is not list:
        raise MessageDecodeError(f"task message payload args must be an array, got {_kind(args)}")
    if type(kwargs) is not dict:
        raise MessageDecodeError(f"task message payload kwargs must be a map, got {_kind(kwargs)}")
    for key in kwargs:
        if type(key) is not str:
            raise MessageDecodeError(
                f"task message payload kwargs keys must be str, got {_kind(key)}")
    return tuple(args), kwargs


#: Packers not in use, taken off the list while they pack (the compiled twin explains why).
_free_packers: list[Any] = []
#: A kept Packer keeps the largest buffer it ever grew to: after a larger message it is let go.
_PACKER_KEEP_BYTES = 1 << 20
#: Packers kept (one per thread that packs at once).
_PACKERS_KEPT = 8


def _pack(obj: Any) -> bytes:
    try:
        packer = _free_packers.pop()
    except IndexError:
        packer = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)
    out: bytes = packer.pack(obj)
    if len(out) <= _PACKER_KEEP_BYTES and len(_free_packers) < _PACKERS_KEPT:
        _free_packers.append(packer)
    return out


def new_task_id() -> str:
    """Return a new unique task id: a time-ordered UUID (version 7, RFC 9562) in its usual text form.

    The first 48 bits are the Unix time in milliseconds, the other 74 free bits random.
    """
    # 10 random bytes per call (the compiled twin draws blocks): simple, and thread- and fork-safe.
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TaskMessage:
    """One task invocation: what the producer sends and the worker executes.

    A message decoded by ``decode_message`` keeps its arguments as the raw ``payload``
    bytes until ``args`` or ``kwargs`` is first read, so routing never pays for them.
    Reading either hands out live objects, so the cached payload is dropped then and
    re-packed when next needed; assign a new value rather than relying on in-place edits
    of nested objects being noticed.
    """

    __slots__ = (
        "_args",
        "_eta",
        "_expires",
        "_id",
        "_ignore_result",
        "_kwargs",
        "_options",
        "_parent_id",
        "_payload",
        "_queue",
        "_reply_to",
        "_retries",
        "_root_id",
        "_task",
    )
    # The fields, as engine/_core.pxd declares them for the compiled twin.
    _id: str
    _task: str
    _args: tuple[Any, ...] | None  # None while the payload has not been unpacked
    _kwargs: dict[str, Any] | None  # None while the payload has not been unpacked
    _payload: bytes | None  # None when it must be (re)packed from _args/_kwargs
    _retries: int
    _eta: float | None
    _expires: float | None
    _queue: str
    _reply_to: str | None
    _parent_id: str | None
    _root_id: str | None
    _ignore_result: bool
    _options: dict[str, Any]
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, id: str, task: str, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None, *, retries: int = 0,
                 eta: float | None = None, expires: float | None = None,
                 queue: str = "celery", reply_to: str | None = None,
                 parent_id: str | None = None, root_id: str | None = None,
                 ignore_result: bool = False, options: Mapping[str, Any] | None = None) -> None:
        self._id = _check_str(id, "id")
        self._task = _check_str(task, "task")
        self._args = tuple(args) if args is not None else ()
        self._kwargs = _check_str_keys(kwargs, "kwargs")
        self._payload = None
        self._retries = _check_retries(retries)
        self._eta = _check_time(eta, "eta")
        self._expires = _check_time(expires, "expires")
        self._queue = _check_str(queue, "queue")
        self._reply_to = _check_opt_str(reply_to, "reply_to")
        self._parent_id = _check_opt_str(parent_id, "parent_id")
        self._root_id = _check_opt_str(root_id, "root_id")
        self._ignore_result = bool(ignore_result)
        self._options = _check_str_keys(options, "options")

    def _decode(self) -> None:
        # _args is None only while the payload has not been unpacked yet.
        if self._args is None:
            if self._payload is None:
                self._args, self._kwargs = (), {}
            else:
                self._args, self._kwargs = _unpack_payload(self._payload)

    @property
    def id(self) -> str:
        """The task id (a UUID string by convention)."""
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = _check_str(value, "id")

    @property
    def task(self) -> str:
        """The registered name of the task to run."""
        return self._task

    @task.setter
    def task(self, value: str) -> None:
        self._task = _check_str(value, "task")

    @property
    def args(self) -> tuple:
        """Positional arguments (decoded from the payload on first read)."""
        self._decode()
        self._payload = None
        return self._args  # type: ignore[return-value]  # not None: _decode() unpacked it

    @args.setter
    def args(self, value: Iterable[Any]) -> None:
        self._decode()
        self._args = tuple(value) if value is not None else ()
        self._payload = None

    @property
    def kwargs(self) -> dict:
        """Keyword arguments (decoded from the payload on first read)."""
        self._decode()
        self._payload = None
        return self._kwargs  # type: ignore[return-value]  # not None: _decode() unpacked it

    @kwargs.setter
    def kwargs(self, value: Mapping[str, Any] | None) -> None:
        self._decode()
        self._kwargs = _check_str_keys(value, "kwargs")
        self._payload = None

    @property
    def payload(self) -> bytes:
        """The packed ``[args, kwargs]`` as sent on the wire (packed once, then cached)."""
        if self._payload is None:
            self._decode()
            self._payload = _pack([list(self._args), self._kwargs])  # type: ignore[arg-type]  # _decode() unpacked it
        return self._payload

    @property
    def retries(self) -> int:
        """How many times this task has been retried so far."""
        return self._retries

    @retries.setter
    def retries(self, value: int) -> None:
        self._retries = _check_retries(value)

    @property
    def eta(self) -> float | None:
        """Earliest time to run, as a unix timestamp, or None for now."""
        return self._eta

    @eta.setter
    def eta(self, value: float | None) -> None:
        self._eta = _check_time(value, "eta")

    @property
    def expires(self) -> float | None:
        """Unix timestamp after which the task is revoked instead of run, or None."""
        return self._expires

    @expires.setter
    def expires(self, value: float | None) -> None:
        self._expires = _check_time(value, "expires")

    @property
    def queue(self) -> str:
        """Name of the queue the message was sent to."""
        return self._queue

    @queue.setter
    def queue(self, value: str) -> None:
        self._queue = _check_str(value, "queue")

    @property
    def reply_to(self) -> str | None:
        """Where the result should be sent, or None."""
        return self._reply_to

    @reply_to.setter
    def reply_to(self, value: str | None) -> None:
        self._reply_to = _check_opt_str(value, "reply_to")

    @property
    def parent_id(self) -> str | None:
        """Id of the task that sent this one, or None."""
        return self._parent_id

    @parent_id.setter
    def parent_id(self, value: str | None) -> None:
        self._parent_id = _check_opt_str(value, "parent_id")

    @property
    def root_id(self) -> str | None:
        """Id of the first task of the workflow, or None."""
        return self._root_id

    @root_id.setter
    def root_id(self, value: str | None) -> None:
        self._root_id = _check_opt_str(value, "root_id")

    @property
    def ignore_result(self) -> bool:
        """True when no result should be stored."""
        return self._ignore_result

    @ignore_result.setter
    def ignore_result(self, value: bool) -> None:
        self._ignore_result = bool(value)

    @property
    def options(self) -> dict:
        """Free-form execution options (links, time limits...): str keys, msgpack values."""
        return self._options

    @options.setter
    def options(self, value: Mapping[str, Any] | None) -> None:
        self._options = _check_str_keys(value, "options")

    def copy(self, **changes: Any) -> TaskMessage:
        """Return a new message with the given attributes replaced.

        An undecoded payload is shared, not decoded, unless only one of args/kwargs changes.
        """
        for name in changes:
            if name not in _FIELD_SET:
                raise TypeError(f"copy() got an unexpected keyword argument {name!r}")
        new = TaskMessage.__new__(TaskMessage)
        new._id = self._id
        new._task = self._task
        new._args = self._args
        new._kwargs = dict(self._kwargs) if self._kwargs is not None else None
        new._payload = self._payload
        new._retries = self._retries
        new._eta = self._eta
        new._expires = self._expires
        new._queue = self._queue
        new._reply_to = self._reply_to
        new._parent_id = self._parent_id
        new._root_id = self._root_id
        new._ignore_result = self._ignore_result
        new._options = dict(self._options)
        if "args" in changes and "kwargs" in changes:
            new._args, new._kwargs, new._payload = (), {}, None  # nothing to keep: no decode
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def to_dict(self) -> dict[str, Any]:
        """Return every field as a plain dict (``args`` as a tuple)."""
        return {
            "id": self._id, "task": self._task, "args": self.args, "kwargs": dict(self.kwargs),
            "retries": self._retries, "eta": self._eta, "expires": self._expires,
            "queue": self._queue, "reply_to": self._reply_to, "parent_id": self._parent_id,
            "root_id": self._root_id, "ignore_result": self._ignore_result,
            "options": dict(self._options),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskMessage):
            return NotImplemented
        if self is other:
            return True
        if not (self._id == other._id and self._task == other._task
                and self._retries == other._retries and self._eta == other._eta
                and self._expires == other._expires and self._queue == other._queue
                and self._reply_to == other._reply_to and self._parent_id == other._parent_id
                and self._root_id == other._root_id
                and self._ignore_result == other._ignore_result
                and self._options == other._options):
            return False
        if self._args is None and other._args is None and self._payload == other._payload:
            return True
        self._decode()
        other._decode()
        return self._args == other._args and self._kwargs == other._kwargs

    def __repr__(self) -> str:
        return f"<TaskMessage {self._task}[{self._id}] retries={self._retries}>"


def _check_message(msg: Any) -> TaskMessage:
    if not isinstance(msg, TaskMessage):
        raise TypeError(f"expected a TaskMessage, got {type(msg).__name__}")
    return msg


def request_fields(msg: TaskMessage, eager: bool, hostname: str, retry_dispatcher: Any) -> dict[str, Any]:
    """The fields of ``task.request`` for running ``msg`` (``engine.request.Request.context``).

    Built here, once per task run: reading the message's fields directly and
    filling one dict is most of what making a task's context costs.
    """
    options = msg.options
    queue = msg.queue
    task_id = msg.id
    return {
        "id": task_id,
        "task": msg.task,
        "args": msg.args,
        "kwargs": msg.kwargs,
        "retries": msg.retries,
        "eta": msg.eta,
        "expires": msg.expires,
        "is_eager": eager,
        "hostname": hostname,
        "delivery_info": {"queue": queue, "routing_key": queue},
        "reply_to": msg.reply_to,
        "parent_id": msg.parent_id,
        "root_id": msg.root_id or task_id,
        "correlation_id": task_id,
        # The call's own choice (None when it made none): call > task option > setting.
        "ignore_result": options.get("ignore_result"),
        # What the sender resolved from its own settings, for tasks that set nothing.
        "sender_ignore_result": msg.ignore_result,
        "called_directly": False,
        "callbacks": options.get("link"),
        "errbacks": options.get("link_error"),
        "chain": options.get("chain"),
        "timelimit": (options.get("time_limit"), options.get("soft_time_limit")),
        "options": options,
        "retry_dispatcher": retry_dispatcher,
        # Headers a before_task_publish receiver added (tracing context, ...).
        "headers": options.get("headers"),
    }


def encode_message(msg: TaskMessage) -> bytes:
    """Encode ``msg`` as a wire-format v1 message (see the module docstring)."""
    _check_message(msg)
    return _pack([
        WIRE_VERSION, msg._id, msg._task, msg.payload, msg._retries, msg._eta, msg._expires,
        msg._queue, msg._reply_to, msg._parent_id, msg._root_id, msg._ignore_result,
        msg._options or None,
    ])


def _as_buffer(data: Any, what: str) -> Any:
    # bytes, bytearray and flat byte memoryviews go to msgpack as they are; any other
    # memoryview is copied, so both twins read exactly the same bytes.
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        try:
            if data.c_contiguous and data.itemsize == 1:
                return data
            return data.tobytes()
        except ValueError as exc:  # released memoryview
            raise MessageDecodeError(f"{what} is not readable: {exc}") from exc
    raise MessageDecodeError(f"{what} must be bytes-like, got {type(data).__name__}")


def _unpack(data: Any, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except ExtraData as exc:
        raise MessageDecodeError(
            f"{what} has {len(exc.extra)} trailing bytes") from exc
    except Exception as exc:
        raise MessageDecodeError(f"{what} is not valid msgpack: {exc!r}") from exc


def _field_error(name: str, expected: str, got: str) -> MessageDecodeError:
    return MessageDecodeError(f"task message field {name!r} must be {expected}, got {got}")


def _str_field(value: Any, name: str) -> str:
    if type(value) is not str:
        raise _field_error(name, "str", _kind(value))
    return value


def _opt_str_field(value: Any, name: str) -> str | None:
    if value is not None and type(value) is not str:
        raise _field_error(name, "str or nil", _kind(value))
    return value


def _time_field(value: Any, name: str) -> float | None:
    if value is None or type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _field_error(name, "a float or nil", _kind(value))


def _from_envelope(obj: Any) -> TaskMessage:
    if type(obj) is not list:
        raise MessageDecodeError(f"task message must be an array, got {_kind(obj)}")
    if len(obj) != ENVELOPE_SIZE:
        raise MessageDecodeError(
            f"task message must be a {ENVELOPE_SIZE}-element array, got {len(obj)} elements")
    (version, id_, task, payload, retries, eta, expires, queue, reply_to, parent_id,
     root_id, ignore_result, options) = obj
    if type(version) is not int:
        raise _field_error("version", "int", _kind(version))
    if version != WIRE_VERSION:
        raise MessageDecodeError(
            f"unsupported task message version {version} (this engine reads {WIRE_VERSION})")
    msg = TaskMessage.__new__(TaskMessage)
    msg._id = _str_field(id_, "id")
    msg._task = _str_field(task, "task")
    if type(payload) is not bytes:
        raise _field_error("payload", "bin", _kind(payload))
    msg._payload = payload
    msg._args = msg._kwargs = None
    if type(retries) is not int:
        raise _field_error("retries", "a non-negative int", _kind(retries))
    if retries < 0:
        raise _field_error("retries", "a non-negative int", str(retries))
    msg._retries = retries
    msg._eta = _time_field(eta, "eta")
    msg._expires = _time_field(expires, "expires")
    msg._queue = _str_field(queue, "queue")
    msg._reply_to = _opt_str_field(reply_to, "reply_to")
    msg._parent_id = _opt_str_field(parent_id, "parent_id")
    msg._root_id = _opt_str_field(root_id, "root_id")
    if type(ignore_result) is not bool:
        raise _field_error("ignore_result", "bool", _kind(ignore_result))
    msg._ignore_result = ignore_result
    if options is None:
        options = {}
    elif type(options) is not dict:
        raise _field_error("options", "a map or nil", _kind(options))
    else:
        for key in options:
            if type(key) is not str:
                raise MessageDecodeError(
                    f"task message field 'options' keys must be str, got {_kind(key)}")
    msg._options = options
    return msg


def decode_message(data: bytes | bytearray | memoryview) -> TaskMessage:
    """Decode one wire-format v1 message; any problem raises MessageDecodeError.

    The arguments stay packed until ``.args``/``.kwargs`` is read; a bad payload raises
    MessageDecodeError then.
    """
    return _from_envelope(_unpack(_as_buffer(data, "task message"), "task message"))


def encode_batch(messages: Iterable[TaskMessage]) -> bytes:
    """Encode several messages as one msgpack array of bin (each an encoded message)."""
    return _pack([encode_message(msg) for msg in messages])


def split_batch(data: bytes | bytearray | memoryview) -> list[bytes]:
    """Return the encoded messages of a batch without decoding them."""
    items = _unpack(_as_buffer(data, "task batch"), "task batch")
    if type(items) is not list:
        raise MessageDecodeError(f"task batch must be an array, got {_kind(items)}")
    for index, item in enumerate(items):
        if type(item) is not bytes:
            raise MessageDecodeError(f"task batch item {index} must be bin, got {_kind(item)}")
    return items


def decode_batch(data: bytes | bytearray | memoryview) -> list[TaskMessage]:
    """Decode a batch; a malformed item makes the whole batch raise MessageDecodeError."""
    messages = []
    for index, item in enumerate(split_batch(data)):
        try:
            messages.append(decode_message(item))
        except MessageDecodeError as exc:
            raise MessageDecodeError(f"task batch item {index}: {exc}") from exc
    return messages


#: A pipe frame (supervisor <-> child) is ``<u32 length, little-endian><u8 kind><payload>``.
PIPE_HEADER_SIZE = 5
#: A frame declaring a longer payload means a corrupt stream.
MAX_PIPE_FRAME = 512 * 1024 * 1024
_PIPE_HEADER = struct.Struct("<IB")


def pack_frame(buffer: bytearray, kind: int, payload: bytes | bytearray | memoryview) -> None:
    """Append one pipe frame of ``kind`` carrying ``payload`` (bytes-like) to ``buffer``."""
    if type(buffer) is not bytearray:
        raise TypeError(f"pack_frame appends to a bytearray, not {type(buffer).__name__}")
    if not 0 <= kind <= 255:
        raise OverflowError(f"a pipe frame's kind is one byte, not {kind}")
    with memoryview(payload) as view:
        if not view.c_contiguous:
            raise BufferError("a pipe frame's payload must be contiguous")
        size = view.nbytes
        if size > MAX_PIPE_FRAME:
            raise ValueError(f"a pipe frame holds at most {MAX_PIPE_FRAME} bytes, not {size}")
        # Header and payload in one append: nothing is added when the payload cannot be.
        buffer += _PIPE_HEADER.pack(size, kind) + view.cast("B")


def split_frames(buffer: bytes | bytearray | memoryview) -> tuple[list[tuple[int, bytes]], int]:
    """The complete ``(kind, payload)`` frames at the start of ``buffer``, and the bytes they take.

    Raises ValueError for a frame longer than :data:`MAX_PIPE_FRAME` (a corrupt stream).
    """
    out = []
    offset = 0
    with memoryview(buffer) as raw, raw.cast("B") as view:  # offsets count bytes, whatever the format
        size = view.nbytes
        while size - offset >= PIPE_HEADER_SIZE:
            length, kind = _PIPE_HEADER.unpack_from(view, offset)
            if length > MAX_PIPE_FRAME:
                raise ValueError(f"corrupt pipe stream: frame of {length} bytes")
            end = offset + PIPE_HEADER_SIZE + length
            if end > size:
                break
            out.append((kind, bytes(view[offset + PIPE_HEADER_SIZE:end])))
            offset = end
    return out, offset


class PlainRunner:
    """A pool child's whole step for a *plain* task message in one call: decode, run, report DONE.

    Most tasks a child runs are plain: their task is of the default request class,
    without a soft time limit, ``track_started``, its own ``__call__`` or overridden
    ``before_start``/``on_success``/``after_return`` (``is_plain(task)`` says so,
    asked once per task object), and the message carries no expiry, soft limit, link
    or chain. :meth:`run` runs one as the tracer would (``engine.tracer.trace_task``):
    the task's request is pushed on ``running`` while its body runs, SUCCESS goes to
    ``store`` unless the result is ignored, an exception goes to ``raised`` (the
    tracer's own handling: Retry, Reject, Ignore, failure), and the DONE report is
    written to ``writer``'s buffer. Any other message, or any state in which the
    tracer would do more (a connected task_prerun/task_postrun/task_success
    receiver, INFO logging of each success, a revoked id), makes :meth:`run`
    return None having done nothing: the child runs it the general way.
    (This twin is not compiled: it only keeps the two cores' behaviour the same.)
    """

    __slots__ = ("context_class", "done_kind", "hostname", "info_enabled", "is_plain", "last_run_times",
                 "outside_error", "plain", "postrun", "prerun", "raised", "registry", "report_slower_than",
                 "revoked", "running", "store", "success", "writer")

    def __init__(self, registry: TaskRegistry, hostname: str, writer: Any, store: Any, running: list,
                 context_class: Any, is_plain: Any, raised: Any, info_enabled: Any, outside_error: Any,
                 last_run_times: dict, revoked: set, receivers: tuple, report_slower_than: float,
                 done_kind: int) -> None:
        for value, kind, what in ((running, list, "running"),
                                  (last_run_times, dict, "last_run_times"), (revoked, set, "revoked"),
                                  (receivers, tuple, "receivers")):
            if not isinstance(value, kind):
                raise TypeError(f"PlainRunner's {what} must be a {kind.__name__}, not {type(value).__name__}")
        if not 0 <= done_kind <= 255:
            raise OverflowError(f"a pipe frame's kind is one byte, not {done_kind}")
        self.registry = registry
        self.hostname = hostname
        self.writer = writer
        self.store = store
        self.running = running
        self.context_class = context_class
        self.is_plain = is_plain
        self.raised = raised
        self.info_enabled = info_enabled
        self.outside_error = outside_error
        self.last_run_times = last_run_times
        self.revoked = revoked
        self.prerun, self.postrun, self.success = receivers
        self.report_slower_than = float(report_slower_than)
        self.done_kind = done_kind
        #: Task name -> (the task object, whether it is plain).
        self.plain: dict[str, tuple[Any, bool]] = {}

    def run(self, payload: bytes) -> float | None:
        """Run one task message if it is plain and return its run time (seconds); else None, nothing done."""
        if self.prerun or self.postrun or self.success:
            return None
        started = time.monotonic()
        try:
            msg = decode_message(payload)
            options = msg.options
            args, kwargs = msg.args, msg.kwargs
        except MessageDecodeError:
            return None
        name = msg.task
        if msg.expires is not None or (self.revoked and msg.id in self.revoked):
            return None
        task = self.registry.get(name)
        if task is None:
            return None
        known = self.plain.get(name)
        if known is None or known[0] is not task:  # asked once per task object (re-registered: asked again)
            try:
                known = self.plain[name] = (task, bool(self.is_plain(task)))
            except Exception:  # the general path tells what is wrong with it
                return None
        if known[1] is not True or (options and (options.get("soft_time_limit") or options.get("link")
                                                 or options.get("chain"))) or self.info_enabled():
            return None
        # Whether the result is stored: the call's choice, the task's, the sender's settings or ours.
        ignore = options.get("ignore_result") if options else None
        if ignore is None:
            ignore = task.ignore_result
            if ignore is None:
                ignore = msg.ignore_result or task.app.conf.task_ignore_result
        store = None if ignore else self.store
        task_id = msg.id
        state = "SUCCESS"
        requeue = False
        try:
            if self.writer.buffer and self.last_run_times.get(name, self.report_slower_than) \
                    >= self.report_slower_than:
                self.writer.flush()  # it may run long: what finished before it is reported first
            fields = request_fields(msg, False, self.hostname, None)
            fields["recorder"] = store
            request = self.context_class.__new__(self.context_class)
            request.__dict__ = fields
            self.running.append((task, request))
            try:
                try:
                    retval = task.run(*args, **kwargs)
                except Exception as exc:
                    state, retval, _ = self.raised(task, request, store, exc)
                    if state == "REJECTED":
                        requeue = bool(getattr(retval, "requeue", False))
                else:
                    if store is not None:
                        try:
                            store.record(task_id, "SUCCESS", retval)
                        except EncodeError as exc:  # the result cannot travel: the task fails
                            state, retval, _ = self.raised(task, request, store, exc)
            finally:
                self.running.pop()
        except (SystemExit, Exception) as exc:  # sys.exit() in the task, a handler's or the engine's own failure
            state = "FAILURE"
            self.outside_error(task_id, exc)
        runtime = time.monotonic() - started
        self.last_run_times[name] = runtime
        pack_done(self.writer.buffer, self.done_kind, task_id, state, runtime, requeue, msg.retries)
        return runtime

    def run_many(self, frames: list, index: int, done: int, read_at: float, last_flush: float,
                 last_checkpoint: float, max_tasks: int, task_kind: int, report_every: float, report_bytes: int,
                 log_every: float, lookahead: float) -> tuple[int, int, float, float, int]:
        """The child loop's steps for a run of plain tasks: ``frames[index:]`` while each is one.

        Runs each ``(kind, payload)`` frame of ``task_kind`` that :meth:`run` takes,
        then does what the child's loop does after a task: the writer is flushed when
        the task ran longer than ``report_slower_than``, ``report_every`` seconds
        passed since ``last_flush`` or its buffer holds more than ``report_bytes``;
        otherwise it is checkpointed when ``log_every`` passed since ``last_checkpoint``.
        Returns ``(index, done, last_flush, last_checkpoint, due)`` where ``index`` is the
        next frame to look at and ``done`` counts tasks run; ``due`` is 0 when it stopped
        at a frame it does not run (or the end), 1 when ``lookahead`` seconds passed since
        ``read_at`` (the loop looks for revokes in the pipe), 2 when ``done`` reached
        ``max_tasks`` (0: no limit).
        """
        while index < len(frames):
            kind, payload = frames[index]
            if kind != task_kind:
                return index, done, last_flush, last_checkpoint, 0
            runtime = self.run(payload)
            if runtime is None:
                return index, done, last_flush, last_checkpoint, 0
            index += 1
            done += 1
            now = time.monotonic()
            if runtime > self.report_slower_than or now - last_flush > report_every \
                    or len(self.writer.buffer) > report_bytes:
                self.writer.flush()
                last_flush = last_checkpoint = now
            elif now - last_checkpoint > log_every:
                self.writer.checkpoint()
                last_checkpoint = now
            if max_tasks and done >= max_tasks:
                return index, done, last_flush, last_checkpoint, 2
            if now - read_at > lookahead:
                return index, done, last_flush, last_checkpoint, 1
        return index, done, last_flush, last_checkpoint, 0


def pack_done(buffer: bytearray, kind: int, task_id: str, state: str, runtime: float, requeue: bool,
              retries: int) -> None:
    """Append a child's DONE report to ``buffer`` as a pipe frame of ``kind`` (:func:`read_done` reads it).

    The payload is what ``msgpack.packb((task_id, state, runtime, requeue, retries))``
    packs, byte for byte: two strings, a float64, a bool and an int.
    """
    for value, what in ((task_id, "task_id"), (state, "state")):
        if not isinstance(value, str):
            raise TypeError(f"a DONE report's {what} must be str, not {type(value).__name__}")
    pack_frame(buffer, kind, _pack_done((task_id, state, float(runtime), bool(requeue), retries)))


#: DONE reports are small and take no ``default`` hook: one kept Packer serves them all (a pack
#: runs no Python code, so no other thread can pack in the middle of one).
_pack_done = msgpack.Packer(use_bin_type=True, autoreset=True).pack


class Pending:
    """A task message in a client's outbox, or sent and not yet acknowledged: its queue, id and bytes.

    ``peer`` is the link it was sent on (None while it waits) and ``sent_at`` when
    (``time.monotonic()`` seconds).
    """

    __slots__ = ("id", "peer", "queue", "raw", "sent_at")

    def __init__(self, queue: str, task_id: str, raw: bytes) -> None:
        self.queue = queue
        self.id = task_id
        self.raw = raw
        self.peer: Any = None
        self.sent_at = 0.0


class Outbox:
    """A client's messages waiting for credit, one FIFO per queue (so a queue without credit costs nothing).

    Not locked: the producer's lock guards it.
    """

    def __init__(self) -> None:
        #: Queue name -> its waiting Pending messages, oldest first.
        self.by_queue: dict[str, collections.deque[Pending]] = {}
        #: Messages waiting in all queues.
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, pending: Pending) -> bool:
        """Queue ``pending``; True when its queue was empty (the I/O thread has nothing of it to send yet)."""
        items = self.by_queue.get(pending.queue)
        if items is None:
            items = self.by_queue[pending.queue] = collections.deque()
        items.append(pending)
        self.count += 1
        return len(items) == 1

    def put_back(self, items: Iterable[Pending]) -> None:
        """Return messages to the front of their queues, in their order."""
        items = list(items)
        for pending in reversed(items):
            self.by_queue.setdefault(pending.queue, collections.deque()).appendleft(pending)
        self.count += len(items)

    def queues(self) -> list[str]:
        """The queues with messages waiting, in the order they first had some."""
        return [queue for queue, items in self.by_queue.items() if items]

    def has(self, queue: str) -> bool:
        """True when messages of ``queue`` wait."""
        return bool(self.by_queue.get(queue))

    def take(self, queue: str, most: int, most_bytes: int) -> list[Pending]:
        """Pop up to ``most`` messages of ``queue`` whose sizes add up to at most ``most_bytes`` (at least one)."""
        items = self.by_queue[queue]
        out: list[Pending] = []
        size = 0
        while items and len(out) < most:
            size += len(items[0].raw) + 8
            if out and size > most_bytes:
                break
            out.append(items.popleft())
        self.count -= len(out)
        return out

    def demand(self) -> dict[str, int]:
        """Waiting messages per queue."""
        return {queue: len(items) for queue, items in self.by_queue.items() if items}


_NO_REPLY_TO: Any = object()


def _keeps(obj: Any, methods: dict[str, Any]) -> bool:
    """True when ``obj``'s class has each of ``methods`` (name -> the original) and ``obj`` shadows none."""
    cls = type(obj)
    if any(getattr(cls, name, None) is not method for name, method in methods.items()):
        return False
    instance = getattr(obj, "__dict__", None)
    return not (instance and any(name in instance for name in methods))  # patched on the object itself


class PlainSender:
    """A client's whole send of a *plain* call in one step: build, encode, queue, return its result.

    Most calls a batch pipeline makes are plain: ``task.delay(*args)`` with
    positional arguments only, or a group member without options of its own. For
    such a call :meth:`send` does what ``Task._send`` and ``Producer.send`` do:
    it builds the same message ``Task.build_message`` would, queues its bytes in
    the producer's outbox (waking the producer's I/O thread when its queue was
    empty) and returns ``result_class(id, None, name, app, None)``, as
    ``Task.AsyncResult`` does. A plain call needs:

    * no before/after_task_publish receiver, eager mode and ``task_routes`` off;
    * a task, an app and a producer that keep the sending methods of ``Task``
      (``task_methods``), ``Engine`` and ``Producer`` (what ``load_transport()``
      returns, once a producer exists): compared at every call, on their classes
      and on the objects themselves, so a patched or overridden method is called;
    * an argument count the task body takes, as ``Task._send`` checks it;
    * a usable producer of exactly the ``Producer`` class (a child's own producer
      or a test's stand-in is called as such) whose reply address, with an
      rpc:// backend, the app already knows (``Engine.reply_address``).

    Any other call makes :meth:`send` return None having sent nothing: the caller
    goes the general way, which also makes the producer and the reply address.
    (This twin is not compiled: it only keeps the two cores' behaviour the same.)
    """

    __slots__ = ("after_publish", "app_methods", "before_publish", "load_transport", "producer_class",
                 "producer_methods", "result_class", "task_methods")

    def __init__(self, task_methods: dict[str, Any], result_class: Any, before_publish: Any, after_publish: Any,
                 load_transport: Any) -> None:
        self.task_methods = task_methods
        self.result_class = result_class
        self.before_publish = before_publish
        self.after_publish = after_publish
        # Called once a producer exists: (Engine's sending methods by name, the Producer class,
        # Producer's sending methods by name), each as its module defined it.
        self.load_transport = load_transport
        self.app_methods: Any = None
        self.producer_methods: Any = None
        self.producer_class: Any = None

    def send(self, task: Any, args: tuple, reply_to: Any = _NO_REPLY_TO) -> Any:
        """Send ``task(*args)`` if the call is plain and return its AsyncResult; else None, nothing sent.

        ``reply_to`` is the reply address when the caller has it (a group's members
        share one); without it the app's known address is used.
        """
        if type(args) is not tuple:
            raise TypeError(f"args must be a tuple, not {type(args).__name__}")
        if self.before_publish.receivers or self.after_publish.receivers:
            return None
        if not _keeps(task, self.task_methods):
            return None
        app = task.app
        producer: Any = getattr(app, "_producer", None)
        if producer is None:
            return None
        if self.app_methods is None:
            self.app_methods, self.producer_class, self.producer_methods = self.load_transport()
        if type(producer) is not self.producer_class or not _keeps(app, self.app_methods) \
                or not _keeps(producer, self.producer_methods) or not producer.usable():
            return None
        conf = app.conf
        if conf.task_always_eager or conf.task_routes:
            return None
        if task.typing:  # the count Task._send checks; anything else is left to check_arguments
            checker = type(task).__dict__.get("_arguments_checker")
            if checker is None or not checker.least <= len(args) <= checker.most:
                return None
        if reply_to is _NO_REPLY_TO:
            url = conf.result_backend
            reply_to = None
            if url and str(url).startswith("rpc"):  # Engine.reply_address's answer, when it holds
                known = app._reply_to
                if known is None or known[0] != url or known[1] is not app._backend or known[2] is not producer:
                    return None
                reply_to = known[3]
        # The message Task.build_message builds for a call without options.
        options = {}
        if task.time_limit is not None:
            options["time_limit"] = task.time_limit
        if task.soft_time_limit is not None:
            options["soft_time_limit"] = task.soft_time_limit
        ignore = task.ignore_result
        if ignore is None:
            ignore = conf.task_ignore_result
        message = TaskMessage(new_task_id(), task.name, args, {}, queue=task.queue or conf.task_default_queue,
                              reply_to=reply_to, ignore_result=bool(ignore), options=options)
        raw = encode_message(message)
        if len(raw) > producer.max_batch_bytes:
            return None  # the general path refuses it, saying why
        queue_pending(producer, Pending(message.queue, message.id, raw))
        return self.result_class(message.id, None, message.task, app, None)


def queue_pending(producer: Any, pending: Pending) -> None:
    """Queue ``pending`` in ``producer``'s outbox: ``Producer.send``'s step after packing, and a plain call's.

    Under the producer's lock, waiting for room first when the outbox and the
    messages not yet acknowledged fill ``producer.max_outbox``; the producer's
    I/O thread is woken when the message went into an empty queue. (The
    compiled twin appends to a queue's existing deque without the lock: its
    append runs whole under the GIL, which this pure one's does not.)
    """
    outbox = producer._outbox
    with producer._mutex:
        if outbox.count + len(producer._unacked) >= producer.max_outbox:
            producer._wait_for_room()  # waits on the condition, which releases this same lock
        first_in_queue = outbox.append(pending)
    # Only a message into an empty queue of the outbox wakes the I/O thread: one behind
    # others of its queue goes with them, in the dispatch already due or on the next
    # credit frame (a queue is left non-empty only when its credit ran out). Waking per
    # message costs a pipe write and a GIL hand-over each: a large share of the client's
    # CPU in a send loop (bench/RESULTS.md).
    if first_in_queue:
        producer._wake()


class QueuedTask:
    """A received task message waiting for (or assigned to) a child."""

    __slots__ = ("expected", "journal_ref", "message", "peer", "rate_slot", "raw", "received", "started", "task")

    def __init__(self, message: Any, raw: Any, task: Any, peer: Any = None, journal_ref: Any = None) -> None:
        #: The task message (a TaskMessage).
        self.message = message
        #: The message as it came, what a child is handed.
        self.raw = raw
        #: The registered task it names.
        self.task = task
        #: The client link it came on (None: from this worker's children, or replayed).
        self.peer = peer
        #: How the journal knows this task (released when its final state is out); None without a journal.
        self.journal_ref = journal_ref
        #: When it was received and when it started (``time.monotonic()`` seconds; 0.0: not started).
        self.received = time.monotonic()
        self.started = 0.0
        #: ``--fair``: the run time expected when it was handed to a child (counted in ``queued_seconds``).
        self.expected = 0.0
        #: True while it waits in the timer heap for its kind's rate-limit slot (taken already).
        self.rate_slot = False

    @property
    def name(self) -> str:
        """The task name."""
        name: str = self.message.task
        return name

    def __repr__(self) -> str:
        return f"<QueuedTask {self.message.task}[{self.message.id}]>"


def finish_done(child: Any, payloads: list, start: int, end: int, now: float, runs: dict, released: list,
                requeued: list) -> tuple[int, int]:
    """Apply ``child``'s DONE reports ``payloads[start:end]`` in order: each ends the task it holds first.

    For each report the task ``child.outstanding`` holds first is taken off, its
    expected run time leaves ``child.queued_seconds``, its state, run time and wait
    (received to started) are appended to ``runs[name]`` (three lists, made when
    missing), the task held next is marked started at ``now``, and
    ``child.last_done`` is the report. The task then goes to ``requeued`` when it
    was REJECTED with requeue, else its journal reference (if any) to ``released``.
    It stops at a report it cannot apply: one that does not read as a DONE report
    (the supervisor reads it again, and says what is wrong), or one of a task the
    child was not given. Returns ``(index, applied)``: where it stopped (``end``
    when it applied all) and how many it applied.
    """
    index, applied = start, 0
    outstanding = child.outstanding
    queued = child.queued_seconds
    end = min(end, len(payloads))
    try:
        while index < end:
            payload = payloads[index]
            try:
                task_id, state, runtime, requeue, _ = read_done(payload)
            except Exception:  # the supervisor's own reading says what is wrong with it
                break
            if not outstanding:
                break
            child.last_done = payload  # where this child's report log is read from should it die
            entry = outstanding.popleft()
            applied += 1
            index += 1
            queued = max(0.0, queued - entry.expected) if outstanding else 0.0
            name = entry.message.task
            run = runs.get(name)
            if run is None:
                run = runs[name] = [[], [], []]
            run[0].append(state)
            run[1].append(runtime)
            run[2].append(max(0.0, entry.started - entry.received))
            if requeue and state == "REJECTED":
                requeued.append(entry)
            elif entry.journal_ref is not None:
                released.append(entry.journal_ref)
            if outstanding:
                outstanding[0].started = now
    finally:
        child.queued_seconds = queued
    return index, applied


def take_plain(raws: list, start: int, registry: TaskRegistry, peer: Any, journal_ref: Any, queued: list,
               ids: list, per_queue: dict, remember: Any, watch: Any) -> int:
    """The supervisor's receive step for the plain tasks of one frame: ``raws[start:]`` while each is plain.

    A plain task message decodes, names a registered task without a rate limit and
    carries no eta: it is counted in ``per_queue`` (queue -> tasks) and ``ids``, given
    to ``remember(message, peer)`` and ``watch(message)`` when these are not None,
    and appended to ``queued`` as a QueuedTask received now, of ``peer`` and
    ``journal_ref``. Returns the index of the first message it did not take (a
    malformed one, or one the supervisor's ``accept()`` handles): ``len(raws)``
    when it took them all.
    """
    now = time.monotonic()
    for index in range(start, len(raws)):
        raw = raws[index]
        try:
            message = decode_message(raw)
        except MessageDecodeError:
            return index
        task = registry.get(message.task)
        if task is None or message.eta is not None or task.rate_limit is not None:
            return index
        queue = message.queue
        per_queue[queue] = per_queue.get(queue, 0) + 1
        ids.append(message.id)
        if remember is not None:
            remember(message, peer)
        if watch is not None:
            watch(message)
        entry = QueuedTask(message, raw, task, peer, journal_ref)
        entry.received = now
        queued.append(entry)
    return len(raws)


def push_named(by_name: dict, seen: dict, entries: list, deque_class: Any) -> None:
    """Append each of ``entries`` to its task name's queue in ``by_name`` (made by ``deque_class()``), in order.

    ``seen[name]`` becomes the entry's receive time. The fair scheduler's
    ``push_many`` step.
    """
    for item in entries:  # all checked first: a bad one raises before any is queued
        if not isinstance(item, QueuedTask):
            raise TypeError(f"push_named queues QueuedTasks, not {type(item).__name__}")
    for entry in entries:
        name = entry.message.task
        queue = by_name.get(name)
        if queue is None:
            queue = by_name[name] = deque_class()
        queue.append(entry)
        seen[name] = entry.received


def hand_out(queue: Any, child: Any, count: int, cost: float, step: float, budget: float, out: list) -> float:
    """Give ``child`` the next ``count`` entries of ``queue``; return ``budget`` less ``step`` per entry.

    Each entry is expected to run ``cost`` seconds (added to ``child.queued_seconds``),
    goes to ``child.outstanding`` and, as ``(child, entry)``, to ``out``: the fair
    scheduler's step of handing a batch of one kind to a child.
    """
    for _ in range(count):
        entry = queue[0]  # checked before it leaves the queue
        if not isinstance(entry, QueuedTask):
            raise TypeError(f"hand_out hands QueuedTasks, not {type(entry).__name__}")
        queue.popleft()
        entry.expected = cost
        child.queued_seconds += cost
        child.outstanding.append(entry)
        out.append((child, entry))
        budget -= step
    return budget


def write_assigned(assigned: list, now: float, kind: int) -> dict:
    """Add each assigned task's message to its child's pipe buffer as a frame of ``kind``; return the children.

    ``assigned`` holds ``(child, entry)`` pairs; an entry that is its child's first
    outstanding task starts ``now``. Each child's ``writer.buffer`` (a bytearray)
    gets the frames, in order; the result maps child pid -> child, each child once.
    """
    touched = {}
    for child, entry in assigned:
        if not isinstance(entry, QueuedTask):
            raise TypeError(f"write_assigned writes QueuedTasks, not {type(entry).__name__}")
        if child.outstanding[0] is entry:
            entry.started = now
        buffer = child.writer.buffer
        if buffer is None:
            raise TypeError("a child's writer has no buffer")
        pack_frame(buffer, kind, entry.raw)
        touched[child.pid] = child
    return touched


def count_runs(by_state: dict, histogram: list, buckets: tuple, run_states: list, runtimes: list) -> None:
    """Count each state of ``run_states`` in ``by_state``, and each run time in ``histogram``'s bucket.

    A run time's bucket is ``bisect.bisect_left(buckets, runtime)`` (``buckets``
    sorted; ``histogram`` one longer).
    """
    if len(histogram) <= len(buckets):
        raise ValueError(f"a histogram of {len(buckets)} bucket bounds has {len(buckets) + 1} counts, "
                         f"not {len(histogram)}")
    for state in run_states:
        by_state[state] = by_state.get(state, 0) + 1
    for runtime in runtimes:
        histogram[bisect.bisect_left(buckets, runtime)] += 1


def fold_runtimes(average: float, overall: float, count: int, runtimes: list, alpha: float,
                  overall_runs: int) -> tuple[float, float, int]:
    """Fold ``runtimes`` into a moving average and a slow overall mean; return ``(average, overall, count)``.

    Each run time moves ``average`` by ``alpha`` of the difference, and ``overall``
    by the difference over the run count (at most ``overall_runs``).
    """
    average, overall = float(average), float(overall)
    for runtime in runtimes:
        runtime = float(runtime)
        average += alpha * (runtime - average)
        count += 1
        overall += (runtime - overall) / (count if count < overall_runs else overall_runs)
    return average, overall, count


def read_record(payload: bytes) -> tuple:
    """A child's RECORD report, ``(task_id, state, body, traceback, timestamp)``: what ``msgpack.unpackb`` reads."""
    return tuple(msgpack.unpackb(payload, raw=False))


def read_done(payload: bytes) -> tuple:
    """A child's DONE report, ``(task_id, state, runtime, requeue, retries)``: what ``msgpack.unpackb`` reads.

    The report :func:`pack_done` packs (two strings, a float64, a bool, a small int)
    is read here directly; anything else, valid or not, goes to ``msgpack.unpackb``
    (which raises for a malformed one).
    """
    return tuple(msgpack.unpackb(payload, raw=False))


class TaskRegistry:
    """Task name -> task object; ``lookup`` is the worker's hot path.

    A ``collections.abc.Mapping`` (virtual subclass). Refusing a second, different task
    under a registered name is the app's job, not the registry's.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: dict[str, Any] = {}

    def register(self, name: str, task: Any) -> None:
        """Register ``task`` under ``name``, replacing any previous one."""
        if not isinstance(name, str):
            raise TypeError(f"task name must be str, got {type(name).__name__}")
        self._tasks[name] = task

    def unregister(self, name: str) -> None:
        """Remove the task ``name``; NotRegistered if there is none."""
        try:
            del self._tasks[name]
        except KeyError:
            raise NotRegistered(name) from None

    def lookup(self, name: str) -> Any:
        """Return the task registered as ``name``; NotRegistered if there is none."""
        try:
            return self._tasks[name]
        except KeyError:
            raise NotRegistered(name) from None

    __getitem__ = lookup

    def get(self, name: str, default: Any = None) -> Any:
        """Return the task registered as ``name``, or ``default``."""
        return self._tasks.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def keys(self) -> KeysView[str]:
        """The registered names."""
        return self._tasks.keys()

    def values(self) -> ValuesView[Any]:
        """The registered tasks."""
        return self._tasks.values()

    def items(self) -> ItemsView[str, Any]:
        """``(name, task)`` pairs."""
        return self._tasks.items()

    def __repr__(self) -> str:
        return f"<TaskRegistry {sorted(self._tasks)!r}>"


Mapping.register(TaskRegistry)


def _real(value: Any, name: str) -> float:
    # Like C's double conversion in the compiled twin: numbers only, never strings.
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}")
    return float(value)


def compute_backoff(retries: int, factor: float = 1.0, maximum: float = 600.0,
                    jitter: bool = True, rand: float | None = None) -> float:
    """Seconds to wait before retry number ``retries``: ``min(maximum, factor * 2**retries)``.

    Negative ``retries`` count as 0; ``factor <= 0`` gives 0.0. With ``jitter`` the delay
    is multiplied by ``rand`` (for tests) or ``random.random()``. Never negative.
    """
    retries = operator.index(retries)
    factor = _real(factor, "factor")
    maximum = _real(maximum, "maximum")
    if not factor > 0.0:
        return 0.0
    if retries <= 0:
        delay = factor
    elif retries <= 1023:
        delay = factor * 2.0 ** retries
    else:  # 2.0 ** 1024 raises OverflowError; the cap applies long before
        delay = maximum
    delay = delay if delay < maximum else maximum  # noqa: FURB136 - NaN handled as in C
    if jitter:
        if rand is None:
            r = random.random()
        else:
            r = _real(rand, "rand")
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"rand must be in [0, 1], got {r}")
        delay = delay * r
    return delay if delay > 0.0 else 0.0  # noqa: FURB136


class StateRecord:
    """The state of one task at one moment (immutable)."""

    __slots__ = ("_result", "_state", "_task_id", "_timestamp", "_traceback")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, task_id: str, state: str, result: Any = None,
                 traceback: str | None = None, timestamp: float = 0.0) -> None:
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be str, got {type(task_id).__name__}")
        if not isinstance(state, str):
            raise TypeError(f"state must be str, got {type(state).__name__}")
        if traceback is not None and not isinstance(traceback, str):
            raise TypeError(f"traceback must be str or None, got {type(traceback).__name__}")
        self._task_id = task_id
        self._state = state
        self._result = result
        self._traceback = traceback
        self._timestamp = _real(timestamp, "timestamp")

    @property
    def task_id(self) -> str:
        """Id of the task."""
        return self._task_id

    @property
    def state(self) -> str:
        """State name (see ``engine.states``)."""
        return self._state

    @property
    def result(self) -> Any:
        """Return value, exception or progress metadata."""
        return self._result

    @property
    def traceback(self) -> str | None:
        """Formatted traceback for failures, else None."""
        return self._traceback

    @property
    def timestamp(self) -> float:
        """Unix time the state was recorded."""
        return self._timestamp

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return {"task_id": self._task_id, "state": self._state, "result": self._result,
                "traceback": self._traceback, "timestamp": self._timestamp}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateRecord):
            return NotImplemented
        return (self._task_id == other._task_id and self._state == other._state
                and self._timestamp == other._timestamp and self._traceback == other._traceback
                and self._result == other._result)

    def __repr__(self) -> str:
        return f"<StateRecord {self._task_id} {self._state} at {self._timestamp:.6f}>"


def records_from_rows(rows: Iterable, found: dict) -> None:
    """Put a StateRecord per ``(task_id, state, result, traceback, timestamp)`` row of ``rows`` in ``found`` by id.

    A bulk read's loop (``SQLiteBackend.get_many_encoded``): ``rows`` is any
    iterable of such rows, a database cursor included.
    """
    for task_id, state, result, traceback, timestamp in rows:
        found[task_id] = StateRecord(task_id, state, result, traceback, timestamp)


def records_from_flat(task_ids: Any, flat: Any, found: dict) -> None:
    """Put a StateRecord per id of ``task_ids`` that has a state in ``flat`` in ``found`` by id.

    ``flat`` holds four values per id, in order: state, result, traceback and
    timestamp, as bytes or None (a Redis reply; no state: nothing stored). The
    state is read as UTF-8, the traceback as UTF-8 with bad bytes replaced, the
    timestamp as a float (0.0 when missing): ``RedisBackend.get_many_encoded``'s loop.
    """
    ids, values = tuple(task_ids), tuple(flat)
    if len(values) != 4 * len(ids):
        raise ValueError(f"{len(values)} values for {len(ids)} ids (4 per id)")
    for index, task_id in enumerate(ids):
        state, result, traceback, date_done = values[4 * index:4 * index + 4]
        if state is not None:
            found[task_id] = StateRecord(task_id, state.decode(), result,
                                         None if traceback is None else traceback.decode("utf-8", "replace"),
                                         float(date_done) if date_done is not None else 0.0)


def decode_results(records: Any, load: Any) -> dict:
    """``records`` (task id -> record) with each bytes-like result decoded: ``Backend.decode_many``'s loop.

    Each record becomes a StateRecord of the same fields (read as attributes
    unless it is one already). A result that is one msgpack scalar (nil, a bool,
    an int, a float, a str or a bin) is read here, as ``msgpack.unpackb`` reads
    it; any other goes to ``load(bytes)``. (This twin gives every result to
    ``load``: the same values.)
    """
    decoded = {}
    for task_id, record in records.items():
        result = record.result
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = load(bytes(result))
        decoded[task_id] = StateRecord(record.task_id, record.state, result, record.traceback, record.timestamp)
    return decoded


class StateRecorder:
    """Latest state per task id, plus the records changed since the last ``flush``.

    Precedence: once a task is ready (SUCCESS/FAILURE/REVOKED) only a strictly stronger
    ready state replaces it, so a late STARTED or a duplicate FAILURE after SUCCESS is
    dropped. Before that the latest record wins.

    Memory is bounded by ``max_entries``: past it the least recently flushed entries are
    evicted (pending ones never are). An evicted id loses its precedence memory: a late
    record for it is accepted as if the task were new.
    """

    __slots__ = ("_batch_size", "_clean", "_max_entries", "_pending", "_table")

    def __init__(self, batch_size: int = 512, max_entries: int = 100_000) -> None:
        if batch_size < 1 or max_entries < 1:
            raise ValueError("batch_size and max_entries must be >= 1")
        self._batch_size = int(batch_size)
        self._max_entries = int(max_entries)
        self._table: dict[str, StateRecord] = {}
        #: Ids changed since the last flush, in first-change order (a dict as ordered set).
        self._pending: dict[str, None] = {}
        #: Ids in the table that are not pending, least recently flushed first. An
        #: OrderedDict because popping the oldest from a plain dict degrades to O(n).
        self._clean: OrderedDict[str, None] = OrderedDict()

    @property
    def batch_size(self) -> int:
        """Pending count at which ``should_flush`` becomes true."""
        return self._batch_size

    @property
    def max_entries(self) -> int:
        """Table size past which old flushed entries are evicted."""
        return self._max_entries

    def record(self, task_id: str, state: str, result: Any = None,
               traceback: str | None = None, timestamp: float | None = None) -> bool:
        """Record a state; return False if precedence dropped it (see the class docstring)."""
        if not isinstance(state, str) or not state:
            raise ValueError(f"state must be a non-empty str, got {state!r}")
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be str, got {type(task_id).__name__}")
        if traceback is not None and not isinstance(traceback, str):
            raise TypeError(f"traceback must be str or None, got {type(traceback).__name__}")
        current = self._table.get(task_id)
        if current is not None and current._state in READY_STATES and (
                state not in READY_STATES
                or _PRECEDENCE_INDEX.get(state, _CUSTOM_PRECEDENCE)
                >= _PRECEDENCE_INDEX.get(current._state, _CUSTOM_PRECEDENCE)):
            return False
        rec = StateRecord.__new__(StateRecord)
        rec._task_id = task_id
        rec._state = state
        rec._result = result
        rec._traceback = traceback
        rec._timestamp = time.time() if timestamp is None else _real(timestamp, "timestamp")
        self._table[task_id] = rec
        if task_id not in self._pending:
            self._pending[task_id] = None
            if current is not None:
                del self._clean[task_id]  # not pending yet present: it was clean
            elif len(self._table) > self._max_entries:
                self._evict()
        return True

    def _evict(self) -> None:
        table, clean = self._table, self._clean
        while len(table) > self._max_entries and clean:
            del table[clean.popitem(last=False)[0]]

    def get(self, task_id: str) -> StateRecord | None:
        """Return the latest record of ``task_id``, or None."""
        return self._table.get(task_id)

    def state_of(self, task_id: str) -> str:
        """Return the latest state of ``task_id``; ``"PENDING"`` when unknown."""
        rec = self._table.get(task_id)
        return "PENDING" if rec is None else rec._state

    def forget(self, task_id: str) -> None:
        """Drop everything known about ``task_id`` (no error if unknown)."""
        self._table.pop(task_id, None)
        self._pending.pop(task_id, None)
        self._clean.pop(task_id, None)

    def flush(self) -> list[StateRecord]:
        """Return the latest record of every task changed since the last flush.

        Ordered by first change; the pending set is cleared.
        """
        table, clean = self._table, self._clean
        out = [table[task_id] for task_id in self._pending]
        for task_id in self._pending:
            clean[task_id] = None
        self._pending.clear()
        if len(table) > self._max_entries:
            self._evict()
        return out

    @property
    def pending(self) -> int:
        """Number of tasks changed since the last flush."""
        return len(self._pending)

    @property
    def should_flush(self) -> bool:
        """True when ``pending`` has reached ``batch_size``."""
        return len(self._pending) >= self._batch_size

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._table

    def __repr__(self) -> str:
        return f"<StateRecorder entries={len(self._table)} pending={len(self._pending)}>"

# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
# cython: initializedcheck=False, cdivision=True
"""Compiled core of the engine: task messages, the registry, backoff, the state recorder, plain sends, pipe frames, plain task runs.

``engine._core_py`` is the pure-Python twin with the same names and behaviour; import
from ``engine.core``, which picks one of them.

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

Here the envelope is read by a small bounds-checked msgpack reader over the raw buffer
(that is where the speed over the twin comes from). A non-empty ``options`` map is first
measured and validated by a depth-limited skip, then read by the same reader; only if it
holds an ext type is the slice handed to ``msgpack.unpackb`` instead.
Every declared length is checked against the bytes left before it is used, so a tiny
buffer can never make the decoder allocate much. The encoder writes the envelope itself
and produces exactly the bytes ``msgpack.packb`` would (the tests check it).
"""

cimport cython
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_GetItem
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport ldexp
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import operator
import os
import random
from collections import OrderedDict, deque as _deque
from collections.abc import Mapping
from time import monotonic as _py_monotonic

import msgpack

from engine.exceptions import EncodeError, MessageDecodeError, NotRegistered
from engine.utils import process as _process
from engine.states import CUSTOM_PRECEDENCE, PRECEDENCE_INDEX, READY_STATES

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)

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

#: Which twin this is: ``"cython"`` here, ``"python"`` in ``engine._core_py``.
IMPLEMENTATION = "cython"
#: The first element of every encoded task message.
WIRE_VERSION = 1
#: Number of elements in the message envelope array.
ENVELOPE_SIZE = 13
#: Deepest nesting of containers accepted in ``options`` (the map itself counts as 1,
#: empty containers count too). This is msgpack's own limit (1024 containers including
#: the envelope), so this decoder rejects exactly what the twin's ``msgpack.unpackb`` does.
MAX_OPTIONS_DEPTH = 1023

cdef enum:
    _MAX_DEPTH = 1023
    _ENVELOPE_SIZE = 13

cdef object _packb = msgpack.packb
cdef object _unpackb = msgpack.unpackb
cdef object _MDE = MessageDecodeError
cdef object _MISSING = object()
cdef object _FALLBACK = object()
cdef frozenset _READY = frozenset(READY_STATES)
cdef dict _PRECEDENCE_INDEX = PRECEDENCE_INDEX
cdef object _CUSTOM_PRECEDENCE = CUSTOM_PRECEDENCE
cdef frozenset _FIELD_SET = frozenset((
    "id", "task", "args", "kwargs", "retries", "eta", "expires", "queue",
    "reply_to", "parent_id", "root_id", "ignore_result", "options",
))


# -- validation shared by the constructor and the setters -----------------------------------

cdef object _check_str(object value, str name):
    if not isinstance(value, str):
        raise TypeError(f"TaskMessage.{name} must be str, got {type(value).__name__}")
    return value


cdef object _check_opt_str(object value, str name):
    if value is not None and not isinstance(value, str):
        raise TypeError(f"TaskMessage.{name} must be str or None, got {type(value).__name__}")
    return value


cdef object _check_time(object value, str name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"TaskMessage.{name} must be a float or None, got {type(value).__name__}")
    return float(value)


cdef object _check_retries(object value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"TaskMessage.retries must be int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"TaskMessage.retries must be >= 0, got {value}")
    return int(value)


cdef dict _check_str_keys(object value, str name):
    if value is None:
        return {}
    cdef dict result = dict(value)
    for key in result:
        if not isinstance(key, str):
            raise TypeError(f"TaskMessage.{name} keys must be str, got {type(key).__name__}")
    return result


cdef str _kind_of(object value):
    # msgpack type names, so errors read the same as the envelope reader's.
    if value is None:
        return "nil"
    if type(value) is bool:
        return "bool"
    if type(value) is int:
        return "int"
    if type(value) is float:
        return "float"
    if type(value) is str:
        return "str"
    if type(value) is bytes:
        return "bin"
    if type(value) is list:
        return "array"
    if type(value) is dict:
        return "map"
    return "ext"


cdef tuple _unpack_payload(bytes payload):
    cdef tuple simple = _unpack_simple_payload(<const unsigned char*>PyBytes_AS_STRING(payload),
                                               PyBytes_GET_SIZE(payload))
    if simple is not None:
        return simple
    # Map keys may be any hashable here: args can legitimately hold {1: "a"}.
    try:
        obj = _unpackb(payload, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:
        raise _MDE(f"task message payload is not valid msgpack: {exc!r}") from exc
    if type(obj) is not list or len(<list>obj) != 2:
        raise _MDE("task message payload must be a 2-element array [args, kwargs]")
    args = (<list>obj)[0]
    kwargs = (<list>obj)[1]
    if type(args) is not list:
        raise _MDE(f"task message payload args must be an array, got {_kind_of(args)}")
    if type(kwargs) is not dict:
        raise _MDE(f"task message payload kwargs must be a map, got {_kind_of(kwargs)}")
    for key in <dict>kwargs:
        if type(key) is not str:
            raise _MDE(f"task message payload kwargs keys must be str, got {_kind_of(key)}")
    return tuple(<list>args), kwargs


cdef tuple _unpack_simple_payload(const unsigned char* p, Py_ssize_t size):
    """``(args, {})`` for the payload of most calls, read here; None for any other, left to msgpack.

    Most calls pass a few scalars and no keyword arguments: ``[[x, y], {}]`` with x and y
    ints, floats, strings, bytes, booleans or None. msgpack.unpackb with keyword options
    costs several times this whole read. Everything else (containers, exts, keyword
    arguments, anything malformed) returns None, and msgpack reads it as before,
    errors included; what is read here equals msgpack's value, type for type.
    """
    cdef Py_ssize_t n, i, pos = 2
    if size < 3 or p[0] != 0x92 or (p[1] & 0xf0) != 0x90 or p[size - 1] != 0x80:
        return None
    n = p[1] & 0x0f
    args = PyTuple_New(n)
    for i in range(n):
        value = _read_scalar(p, size - 1, &pos)  # the last byte is the empty kwargs map
        if value is _MISSING:
            return None
        Py_INCREF(value)
        PyTuple_SET_ITEM(args, i, value)
    if pos != size - 1:
        return None
    return args, {}


cdef object _read_scalar(const unsigned char* p, Py_ssize_t end, Py_ssize_t* pos):
    """The msgpack scalar at ``p[pos[0]:end]`` as ``msgpack.unpackb(raw=False)`` reads it, ``pos`` moved past it.

    Scalars are nil, a bool, an int of any width, a float32 or float64, a str (valid
    UTF-8) and a bin. Anything else, one cut short by ``end`` or a str that is not
    UTF-8 returns ``_MISSING``, ``pos`` unmoved: msgpack reads it, and says why.
    """
    cdef Py_ssize_t at = pos[0], n, head
    cdef unsigned char c
    if at >= end:
        return _MISSING
    c = p[at]
    if c <= 0x7f or c >= 0xe0 or c == 0xc0 or c == 0xc2 or c == 0xc3:
        pos[0] = at + 1
        if c <= 0x7f:
            return <long>c
        if c >= 0xe0:
            return <long>c - 256
        return None if c == 0xc0 else c == 0xc3
    if 0xcc <= c <= 0xd3:
        n = 1 << ((c - 0xcc) & 3)  # uint8, 16, 32, 64, then int8, 16, 32, 64
        if at + 1 + n > end:
            return _MISSING
        pos[0] = at + 1 + n
        if c == 0xcc:
            return <long>p[at + 1]
        if c == 0xcd:
            return <long>_be16(p + at + 1)
        if c == 0xce:
            return <long long>_be32(p + at + 1)
        if c == 0xcf:
            return _be64(p + at + 1)
        if c == 0xd0:
            return <long><int8_t>p[at + 1]
        if c == 0xd1:
            return <long><int16_t>_be16(p + at + 1)
        if c == 0xd2:
            return <long><int32_t>_be32(p + at + 1)
        return <long long><int64_t>_be64(p + at + 1)
    if c == 0xcb or c == 0xca:
        n = 8 if c == 0xcb else 4
        if at + 1 + n > end:
            return _MISSING
        pos[0] = at + 1 + n
        return _be_float64(p + at + 1) if c == 0xcb else _be_float32(p + at + 1)
    if 0xa0 <= c <= 0xbf:
        n, head = c & 0x1f, 1
    elif c == 0xd9 or c == 0xc4:
        if at + 2 > end:
            return _MISSING
        n, head = p[at + 1], 2
    elif c == 0xda or c == 0xc5:
        if at + 3 > end:
            return _MISSING
        n, head = _be16(p + at + 1), 3
    elif c == 0xdb or c == 0xc6:
        if at + 5 > end:
            return _MISSING
        n, head = _be32(p + at + 1), 5
    else:
        return _MISSING
    if at + head + n > end:
        return _MISSING
    if 0xc4 <= c <= 0xc6:
        value = PyBytes_FromStringAndSize(<const char*>(p + at + head), n)
    else:
        try:
            value = PyUnicode_DecodeUTF8(<const char*>(p + at + head), n, NULL)
        except UnicodeDecodeError:
            return _MISSING
    pos[0] = at + head + n
    return value


#: Packers not in use. A Packer is taken off the list while it packs (list pop and append are
#: atomic), so threads and nested calls never share one.
cdef list _free_packers = []
#: A kept Packer keeps the largest buffer it ever grew to: after a larger message it is let go.
_PACKER_KEEP_BYTES = 1 << 20
#: Packers kept (one per thread that packs at once).
_PACKERS_KEPT = 8


cdef bytes _pack(object obj):
    # msgpack.packb builds a Packer, and its buffer, per call: a large share of encoding a
    # small message, so Packers are kept. A finalizer run by the collector mid-pack that
    # sends a task takes another one.
    cdef bytes out
    if _free_packers:
        packer = _free_packers.pop()
    else:
        packer = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True)
    out = packer.pack(obj)
    if PyBytes_GET_SIZE(out) <= _PACKER_KEEP_BYTES and len(_free_packers) < _PACKERS_KEPT:
        _free_packers.append(packer)
    return out


# Task ids ------------------------------------------------------------------------

cdef enum:
    _ID_POOL_SIZE = 4096  # random bytes drawn per os.urandom() call: 256 ids

cdef bytes _id_pool = b""
cdef Py_ssize_t _id_pos = _ID_POOL_SIZE
cdef const char* _HEX_DIGITS = b"0123456789abcdef"


def _discard_id_pool():
    """Forget the random bytes drawn before a fork, so parent and child never share an id."""
    global _id_pos
    _id_pos = _ID_POOL_SIZE


os.register_at_fork(after_in_child=_discard_id_pool)


def new_task_id():
    """Return a new unique task id: a time-ordered UUID (version 7, RFC 9562) in its usual text form.

    The first 48 bits are the Unix time in milliseconds, the other 74 free bits
    random: ids made in a later millisecond sort later (within one, in any order),
    so a results table or index keyed by id grows at its end instead of rewriting
    pages all over (see ``engine.utils.ids``).
    The random bytes come from ``os.urandom`` in blocks of 256 ids; a forked child
    draws a fresh block (see ``_discard_id_pool``).
    """
    return _new_task_id()


cdef str _new_task_id():
    # new_task_id() itself, called from C without a Python call.
    global _id_pool, _id_pos
    cdef Py_ssize_t pos
    cdef bytes pool
    cdef const unsigned char* raw
    cdef unsigned char octets[16]
    cdef char text[36]
    cdef int i, j = 0
    cdef unsigned char byte
    cdef timespec now
    cdef uint64_t millis
    if _id_pos + 16 > _ID_POOL_SIZE:
        # os.urandom may let another thread run; each thread takes its slice below,
        # with the GIL held from reading the position to advancing it.
        _id_pool = os.urandom(_ID_POOL_SIZE)
        _id_pos = 0
    pool = _id_pool
    pos = _id_pos
    _id_pos = pos + 16
    raw = <const unsigned char*>PyBytes_AS_STRING(pool) + pos
    clock_gettime(CLOCK_REALTIME, &now)
    millis = <uint64_t>now.tv_sec * 1000 + <uint64_t>(now.tv_nsec // 1000000)
    for i in range(6):
        octets[i] = (millis >> (40 - 8 * i)) & 0xFF
    memcpy(octets + 6, raw + 6, 10)
    octets[6] = (octets[6] & 0x0F) | 0x70
    octets[8] = (octets[8] & 0x3F) | 0x80
    for i in range(16):
        byte = octets[i]
        if i == 4 or i == 6 or i == 8 or i == 10:
            text[j] = b"-"
            j += 1
        text[j] = _HEX_DIGITS[byte >> 4]
        text[j + 1] = _HEX_DIGITS[byte & 0x0F]
        j += 2
    return PyUnicode_DecodeASCII(text, 36, NULL)


# Not tracked by the cyclic collector: thousands of messages in flight would otherwise make
# every collection walk them all. A message's fields are decoded values or a caller's
# arguments, which do not refer back to the message made from them; a cycle through one
# (arguments that keep the traceback of a frame holding the message, in an eager call)
# would never be collected.
@cython.no_gc
@cython.freelist(32)
cdef class TaskMessage:
    """One task invocation: what the producer sends and the worker executes.

    TaskMessage(id, task, args=(), kwargs=None, *, retries=0, eta=None, expires=None,
    queue="celery", reply_to=None, parent_id=None, root_id=None, ignore_result=False,
    options=None)

    A message decoded by ``decode_message`` keeps its arguments as the raw ``payload``
    bytes until ``args`` or ``kwargs`` is first read, so routing never pays for them.
    Reading either hands out live objects, so the cached payload is dropped then and
    re-packed when next needed; assign a new value rather than relying on in-place edits
    of nested objects being noticed.
    """

    def __init__(self, id, task, args=(), kwargs=None, *, retries=0, eta=None, expires=None,
                 queue="celery", reply_to=None, parent_id=None, root_id=None,
                 ignore_result=False, options=None):
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

    cdef int _decode(self) except -1:
        # _args is None only while the payload has not been unpacked yet.
        if self._args is None:
            if self._payload is None:
                self._args = ()
                self._kwargs = {}
            else:
                self._args, self._kwargs = _unpack_payload(self._payload)
        return 0

    cdef bytes _get_payload(self):
        if self._payload is None:
            self._decode()
            self._payload = _pack_payload(self._args, self._kwargs)
        return self._payload

    @property
    def id(self):
        """The task id (a UUID string by convention)."""
        return self._id

    @id.setter
    def id(self, value):
        self._id = _check_str(value, "id")

    @property
    def task(self):
        """The registered name of the task to run."""
        return self._task

    @task.setter
    def task(self, value):
        self._task = _check_str(value, "task")

    @property
    def args(self):
        """Positional arguments (decoded from the payload on first read)."""
        self._decode()
        self._payload = None
        return self._args

    @args.setter
    def args(self, value):
        self._decode()
        self._args = tuple(value) if value is not None else ()
        self._payload = None

    @property
    def kwargs(self):
        """Keyword arguments (decoded from the payload on first read)."""
        self._decode()
        self._payload = None
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value):
        self._decode()
        self._kwargs = _check_str_keys(value, "kwargs")
        self._payload = None

    @property
    def payload(self):
        """The packed ``[args, kwargs]`` as sent on the wire (packed once, then cached)."""
        return self._get_payload()

    @property
    def retries(self):
        """How many times this task has been retried so far."""
        return self._retries

    @retries.setter
    def retries(self, value):
        self._retries = _check_retries(value)

    @property
    def eta(self):
        """Earliest time to run, as a unix timestamp, or None for now."""
        return self._eta

    @eta.setter
    def eta(self, value):
        self._eta = _check_time(value, "eta")

    @property
    def expires(self):
        """Unix timestamp after which the task is revoked instead of run, or None."""
        return self._expires

    @expires.setter
    def expires(self, value):
        self._expires = _check_time(value, "expires")

    @property
    def queue(self):
        """Name of the queue the message was sent to."""
        return self._queue

    @queue.setter
    def queue(self, value):
        self._queue = _check_str(value, "queue")

    @property
    def reply_to(self):
        """Where the result should be sent, or None."""
        return self._reply_to

    @reply_to.setter
    def reply_to(self, value):
        self._reply_to = _check_opt_str(value, "reply_to")

    @property
    def parent_id(self):
        """Id of the task that sent this one, or None."""
        return self._parent_id

    @parent_id.setter
    def parent_id(self, value):
        self._parent_id = _check_opt_str(value, "parent_id")

    @property
    def root_id(self):
        """Id of the first task of the workflow, or None."""
        return self._root_id

    @root_id.setter
    def root_id(self, value):
        self._root_id = _check_opt_str(value, "root_id")

    @property
    def ignore_result(self):
        """True when no result should be stored."""
        return self._ignore_result

    @ignore_result.setter
    def ignore_result(self, value):
        self._ignore_result = bool(value)

    @property
    def options(self):
        """Free-form execution options (links, time limits...): str keys, msgpack values."""
        return self._options

    @options.setter
    def options(self, value):
        self._options = _check_str_keys(value, "options")

    def copy(self, **changes):
        """Return a new message with the given attributes replaced.

        An undecoded payload is shared, not decoded, unless only one of args/kwargs changes.
        """
        for name in changes:
            if name not in _FIELD_SET:
                raise TypeError(f"copy() got an unexpected keyword argument {name!r}")
        cdef TaskMessage new = TaskMessage.__new__(TaskMessage)
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
        new._options = dict(self._options) if self._options is not None else {}
        if "args" in changes and "kwargs" in changes:
            new._args, new._kwargs, new._payload = (), {}, None  # nothing to keep: no decode
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def to_dict(self):
        """Return every field as a plain dict (``args`` as a tuple)."""
        return {
            "id": self._id, "task": self._task, "args": self.args, "kwargs": dict(self.kwargs),
            "retries": self._retries, "eta": self._eta, "expires": self._expires,
            "queue": self._queue, "reply_to": self._reply_to, "parent_id": self._parent_id,
            "root_id": self._root_id, "ignore_result": self._ignore_result,
            "options": dict(self._options),
        }

    def __eq__(self, other):
        if not isinstance(other, TaskMessage):
            return NotImplemented
        cdef TaskMessage o = <TaskMessage>other
        if self is o:
            return True
        if not (self._id == o._id and self._task == o._task
                and self._retries == o._retries and self._eta == o._eta
                and self._expires == o._expires and self._queue == o._queue
                and self._reply_to == o._reply_to and self._parent_id == o._parent_id
                and self._root_id == o._root_id
                and self._ignore_result == o._ignore_result
                and self._options == o._options):
            return False
        if self._args is None and o._args is None and self._payload == o._payload:
            return True
        self._decode()
        o._decode()
        return self._args == o._args and self._kwargs == o._kwargs

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # mutable

    def __repr__(self):
        return f"<TaskMessage {self._task}[{self._id}] retries={self._retries}>"


# -- encoder --------------------------------------------------------------------------------
# Writes what msgpack.packb writes: the smallest header for every length and integer,
# str8 allowed (use_bin_type=True), floats as float64.

cdef inline unsigned char* _put16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v
    return p + 2


cdef inline unsigned char* _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v
    return p + 4


cdef inline unsigned char* _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    return _put32(p + 4, <uint32_t>v)


cdef inline Py_ssize_t _str_size(Py_ssize_t n) except -1:
    if n < 32:
        return 1 + n
    if n < 256:
        return 2 + n
    if n < 65536:
        return 3 + n
    if (<uint64_t>n >> 32) == 0:
        return 5 + n
    raise ValueError("unicode string is too large")


cdef inline Py_ssize_t _bin_size(Py_ssize_t n) except -1:
    if n < 256:
        return 2 + n
    if n < 65536:
        return 3 + n
    if (<uint64_t>n >> 32) == 0:
        return 5 + n
    raise ValueError("memoryview is too large")


cdef inline Py_ssize_t _uint_size(uint64_t v) noexcept nogil:
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if (v >> 32) == 0:
        return 5
    return 9


cdef inline unsigned char* _put_str(unsigned char* p, const char* s, Py_ssize_t n) noexcept nogil:
    if n < 32:
        p[0] = <unsigned char>(0xa0 | n)
        p += 1
    elif n < 256:
        p[0] = 0xd9
        p[1] = <unsigned char>n
        p += 2
    elif n < 65536:
        p[0] = 0xda
        p = _put16(p + 1, <uint16_t>n)
    else:
        p[0] = 0xdb
        p = _put32(p + 1, <uint32_t>n)
    memcpy(p, s, n)
    return p + n


cdef inline unsigned char* _put_bin(unsigned char* p, const char* s, Py_ssize_t n) noexcept nogil:
    if n < 256:
        p[0] = 0xc4
        p[1] = <unsigned char>n
        p += 2
    elif n < 65536:
        p[0] = 0xc5
        p = _put16(p + 1, <uint16_t>n)
    else:
        p[0] = 0xc6
        p = _put32(p + 1, <uint32_t>n)
    memcpy(p, s, n)
    return p + n


cdef inline unsigned char* _put_uint(unsigned char* p, uint64_t v) noexcept nogil:
    if v < 128:
        p[0] = <unsigned char>v
        return p + 1
    if v < 256:
        p[0] = 0xcc
        p[1] = <unsigned char>v
        return p + 2
    if v < 65536:
        p[0] = 0xcd
        return _put16(p + 1, <uint16_t>v)
    if (v >> 32) == 0:
        p[0] = 0xce
        return _put32(p + 1, <uint32_t>v)
    p[0] = 0xcf
    return _put64(p + 1, v)


cdef inline unsigned char* _put_time(unsigned char* p, object value):
    cdef double d
    cdef uint64_t bits
    if value is None:
        p[0] = 0xc0
        return p + 1
    d = value
    memcpy(&bits, &d, 8)
    p[0] = 0xcb
    return _put64(p + 1, bits)


cdef inline unsigned char* _put_opt_str(unsigned char* p, const char* s,
                                        Py_ssize_t n) noexcept nogil:
    if s == NULL:
        p[0] = 0xc0
        return p + 1
    return _put_str(p, s, n)


cdef inline const char* _utf8(object value, Py_ssize_t* n, Py_ssize_t* size) except? NULL:
    # NULL with size 1 stands for nil.
    if value is None:
        size[0] += 1
        return NULL
    cdef const char* s = PyUnicode_AsUTF8AndSize(value, n)
    size[0] += _str_size(n[0])
    return s


# The arguments of most task calls are a few numbers and strings: packed here, byte for byte
# as msgpack would, without msgpack's per-call overhead. Anything else goes to msgpack.
cdef enum:
    _SIMPLE_DEPTH = 8  # deeper containers go to msgpack


cdef bytes _pack_payload(tuple args, dict kwargs):
    """``_pack([list(args), kwargs])``'s bytes, packed directly when every value is plain."""
    cdef Py_ssize_t size = _simple_size(args, 0)
    cdef Py_ssize_t kwargs_size = _simple_size(kwargs, 0) if size >= 0 else -1
    cdef bytes out
    cdef unsigned char* p
    if kwargs_size < 0:
        return _pack([list(args), kwargs])
    out = PyBytes_FromStringAndSize(NULL, 1 + size + kwargs_size)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = 0x92
    p = _put_simple(p + 1, args)
    # Measured and written with the GIL held and no Python code run between: the sizes agree.
    if _put_simple(p, kwargs) != <unsigned char*>PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out):
        raise SystemError("task arguments changed while they were packed")
    return out


cdef Py_ssize_t _simple_size(object value, int depth) except -2:
    """Bytes msgpack packs ``value`` into; -1 when it is not plain (not an exact None, bool,
    int64, float, str, bytes, or a list, tuple or dict of those nested at most _SIMPLE_DEPTH)."""
    cdef Py_ssize_t n, size, item
    cdef int overflow
    cdef long long number
    if value is None or value is True or value is False:
        return 1
    kind = type(value)
    if kind is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return -1
        if -32 <= number < 128:
            return 1
        if -128 <= number < 256:
            return 2
        if -32768 <= number < 65536:
            return 3
        if -2147483648 <= number < 4294967296:
            return 5
        return 9
    if kind is float:
        return 9
    if kind is str:
        try:
            PyUnicode_AsUTF8AndSize(value, &n)
        except UnicodeError:  # msgpack says what is wrong with it
            return -1
        return _str_size(n) if (<uint64_t>n >> 32) == 0 else -1
    if kind is bytes:
        n = PyBytes_GET_SIZE(value)
        return _bin_size(n) if (<uint64_t>n >> 32) == 0 else -1
    if depth >= _SIMPLE_DEPTH:
        return -1
    if kind is tuple or kind is list:
        n = len(value)
        if (<uint64_t>n >> 32) != 0:
            return -1
        size = 1 if n < 16 else 3 if n < 65536 else 5
        for element in value:
            item = _simple_size(element, depth + 1)
            if item < 0:
                return -1
            size += item
        return size
    if kind is dict:
        n = len(value)
        if (<uint64_t>n >> 32) != 0:
            return -1
        size = 1 if n < 16 else 3 if n < 65536 else 5
        for key, element in (<dict>value).items():
            item = _simple_size(key, depth + 1)
            if item < 0:
                return -1
            size += item
            item = _simple_size(element, depth + 1)
            if item < 0:
                return -1
            size += item
        return size
    return -1


cdef unsigned char* _put_simple(unsigned char* p, object value) except NULL:
    """Pack ``value``, which :func:`_simple_size` measured, at ``p``; the end of what it wrote."""
    cdef Py_ssize_t n
    cdef int overflow
    cdef long long number
    cdef double d
    cdef uint64_t bits
    cdef const char* text
    if value is None:
        p[0] = 0xc0
        return p + 1
    if value is True:
        p[0] = 0xc3
        return p + 1
    if value is False:
        p[0] = 0xc2
        return p + 1
    kind = type(value)
    if kind is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if number >= 0:
            return _put_uint(p, <uint64_t>number)
        if number >= -32:
            p[0] = <unsigned char>(<int8_t>number)
            return p + 1
        if number >= -128:
            p[0] = 0xd0
            p[1] = <unsigned char>(<int8_t>number)
            return p + 2
        if number >= -32768:
            p[0] = 0xd1
            return _put16(p + 1, <uint16_t>(<int16_t>number))
        if number >= -2147483648:
            p[0] = 0xd2
            return _put32(p + 1, <uint32_t>(<int32_t>number))
        p[0] = 0xd3
        return _put64(p + 1, <uint64_t>number)
    if kind is float:
        d = value
        memcpy(&bits, &d, 8)
        p[0] = 0xcb
        return _put64(p + 1, bits)
    if kind is str:
        text = PyUnicode_AsUTF8AndSize(value, &n)
        return _put_str(p, text, n)
    if kind is bytes:
        return _put_bin(p, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
    if kind is tuple or kind is list:
        p = _put_container(p, len(value), 0x90, 0xdc)
        for element in value:
            p = _put_simple(p, element)
        return p
    p = _put_container(p, len(value), 0x80, 0xde)  # a dict: the only other kind measured
    for key, element in (<dict>value).items():
        p = _put_simple(p, key)
        p = _put_simple(p, element)
    return p


cdef inline unsigned char* _put_container(unsigned char* p, Py_ssize_t n, unsigned char fix,
                                          unsigned char wide) noexcept nogil:
    # fixarray/fixmap below 16 items, else array16/map16 (wide) or array32/map32 (wide + 1).
    if n < 16:
        p[0] = <unsigned char>(fix | n)
        return p + 1
    if n < 65536:
        p[0] = wide
        return _put16(p + 1, <uint16_t>n)
    p[0] = wide + 1
    return _put32(p + 1, <uint32_t>n)


cdef bytes _encode(TaskMessage msg):
    cdef Py_ssize_t n_id, n_task, n_queue, n_reply = 0, n_parent = 0, n_root = 0
    cdef Py_ssize_t size = 2  # array header + version
    cdef const char* s_id = _utf8(msg._id, &n_id, &size)
    cdef const char* s_task = _utf8(msg._task, &n_task, &size)
    cdef const char* s_queue = _utf8(msg._queue, &n_queue, &size)
    cdef const char* s_reply = _utf8(msg._reply_to, &n_reply, &size)
    cdef const char* s_parent = _utf8(msg._parent_id, &n_parent, &size)
    cdef const char* s_root = _utf8(msg._root_id, &n_root, &size)
    if s_id == NULL or s_task == NULL or s_queue == NULL:
        raise TypeError("TaskMessage id, task and queue must be str")
    cdef bytes payload = msg._get_payload()
    cdef Py_ssize_t n_payload = PyBytes_GET_SIZE(payload)
    size += _bin_size(n_payload)
    cdef uint64_t retries = PyLong_AsUnsignedLongLong(msg._retries)
    size += _uint_size(retries)
    size += 1 if msg._eta is None else 9
    size += 1 if msg._expires is None else 9
    size += 1  # ignore_result
    cdef bytes options = _pack(msg._options) if msg._options else None
    size += 1 if options is None else PyBytes_GET_SIZE(options)

    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* start = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char* p = start
    p[0] = 0x90 | _ENVELOPE_SIZE
    p[1] = 1
    p = _put_str(p + 2, s_id, n_id)
    p = _put_str(p, s_task, n_task)
    p = _put_bin(p, PyBytes_AS_STRING(payload), n_payload)
    p = _put_uint(p, retries)
    p = _put_time(p, msg._eta)
    p = _put_time(p, msg._expires)
    p = _put_str(p, s_queue, n_queue)
    p = _put_opt_str(p, s_reply, n_reply)
    p = _put_opt_str(p, s_parent, n_parent)
    p = _put_opt_str(p, s_root, n_root)
    p[0] = 0xc3 if msg._ignore_result else 0xc2
    p += 1
    if options is None:
        p[0] = 0xc0
        p += 1
    else:
        memcpy(p, PyBytes_AS_STRING(options), PyBytes_GET_SIZE(options))
        p += PyBytes_GET_SIZE(options)
    if p - start != size:  # pragma: no cover - a bug in the size computation
        raise AssertionError("encode_message size mismatch")
    return out


def request_fields(TaskMessage msg, bint eager, hostname, retry_dispatcher):
    """The fields of ``task.request`` for running ``msg`` (``engine.request.Request.context``).

    Built here, once per task run: reading the message's fields directly and
    filling one dict is most of what making a task's context costs.
    """
    return _request_fields(msg, eager, hostname, retry_dispatcher)


#: The keys of a request's fields, in their order; a message's fields start as a copy of this
#: (a dict copy is one block copy; building 25 entries one by one costs several times more).
cdef dict _REQUEST_TEMPLATE = dict.fromkeys((
    "id", "task", "args", "kwargs", "retries", "eta", "expires", "is_eager", "hostname", "delivery_info",
    "reply_to", "parent_id", "root_id", "correlation_id", "ignore_result", "sender_ignore_result",
    "called_directly", "callbacks", "errbacks", "chain", "timelimit", "options", "retry_dispatcher", "headers"))
# The values most runs have: a field keeps its template's value unless the message says otherwise.
_REQUEST_TEMPLATE.update(retries=0, is_eager=False, sender_ignore_result=False, called_directly=False,
                         timelimit=(None, None))


cdef dict _request_fields(TaskMessage msg, bint eager, hostname, retry_dispatcher):
    msg._decode()
    cdef dict options = msg._options
    cdef object queue = msg._queue
    cdef object task_id = msg._id
    cdef dict fields = _REQUEST_TEMPLATE.copy()
    fields["id"] = task_id
    fields["task"] = msg._task
    fields["args"] = msg._args
    fields["kwargs"] = msg._kwargs
    fields["hostname"] = hostname
    fields["delivery_info"] = {"queue": queue, "routing_key": queue}
    fields["root_id"] = msg._root_id or task_id
    fields["correlation_id"] = task_id
    fields["options"] = options
    # Set only where the template's value is not already the message's (a dict store each costs).
    if msg._retries != 0:
        fields["retries"] = msg._retries
    if msg._eta is not None:
        fields["eta"] = msg._eta
    if msg._expires is not None:
        fields["expires"] = msg._expires
    if eager:
        fields["is_eager"] = True
    if msg._reply_to is not None:
        fields["reply_to"] = msg._reply_to
    if msg._parent_id is not None:
        fields["parent_id"] = msg._parent_id
    # What the sender resolved from its own settings, for tasks that set nothing.
    if msg._ignore_result:
        fields["sender_ignore_result"] = True
    if retry_dispatcher is not None:
        fields["retry_dispatcher"] = retry_dispatcher
    if options:
        # The call's own choice (None when it made none): call > task option > setting.
        fields["ignore_result"] = options.get("ignore_result")
        fields["callbacks"] = options.get("link")
        fields["errbacks"] = options.get("link_error")
        fields["chain"] = options.get("chain")
        fields["timelimit"] = (options.get("time_limit"), options.get("soft_time_limit"))
        # Headers a before_task_publish receiver added (tracing context, ...).
        fields["headers"] = options.get("headers")
    return fields


def encode_message(msg):
    """Encode ``msg`` as a wire-format v1 message (see the module docstring)."""
    if not isinstance(msg, TaskMessage):
        raise TypeError(f"expected a TaskMessage, got {type(msg).__name__}")
    return _encode(<TaskMessage>msg)


def encode_batch(messages):
    """Encode several messages as one msgpack array of bin (each an encoded message)."""
    return _pack([encode_message(msg) for msg in messages])


# -- decoder --------------------------------------------------------------------------------

cdef inline uint16_t _be16(const unsigned char* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef inline double _be_float64(const unsigned char* p) noexcept nogil:
    # A msgpack float64's 8 bytes (big-endian), as a double.
    cdef uint64_t bits = _be64(p)
    cdef double value
    memcpy(&value, &bits, 8)
    return value


cdef inline double _be_float32(const unsigned char* p) noexcept nogil:
    # A msgpack float32's 4 bytes (big-endian), widened to a double as msgpack widens it.
    cdef uint32_t bits = _be32(p)
    cdef float value
    memcpy(&value, &bits, 4)
    return <double>value


cdef str _kind(unsigned char c):
    # The msgpack type a first byte announces, as the twin's error messages name it.
    if c <= 0x7f or c >= 0xe0 or 0xcc <= c <= 0xd3:
        return "int"
    if c <= 0x8f or c == 0xde or c == 0xdf:
        return "map"
    if c <= 0x9f or c == 0xdc or c == 0xdd:
        return "array"
    if c <= 0xbf or 0xd9 <= c <= 0xdb:
        return "str"
    if c == 0xc0:
        return "nil"
    if c == 0xc2 or c == 0xc3:
        return "bool"
    if c == 0xca or c == 0xcb:
        return "float"
    if 0xc4 <= c <= 0xc6:
        return "bin"
    if c == 0xc1:
        return "invalid byte 0xc1"
    return "ext"


cdef object _field_error(str field, str expected, str got):
    return _MDE(f"task message field {field!r} must be {expected}, got {got}")


cdef inline int _need(_Reader* r, Py_ssize_t n, str what) except -1:
    if n > r.end - r.pos:
        raise _MDE(f"{what} is truncated")
    return 0


cdef inline int _need_field(_Reader* r, Py_ssize_t n, str field) except -1:
    if n > r.end - r.pos:
        raise _MDE(f"task message is truncated (in field {field!r})")
    return 0


cdef object _read_int(_Reader* r, str field, str expected):
    """Return the integer at r.pos as a Python int; raise if it is not an integer."""
    _need_field(r, 1, field)
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    if c <= 0x7f:
        r.pos += 1
        return <long>c
    if c >= 0xe0:
        r.pos += 1
        return <long>(<int8_t>c)
    if c == 0xcc:
        _need_field(r, 2, field)
        r.pos += 2
        return <long>p[1]
    if c == 0xcd:
        _need_field(r, 3, field)
        r.pos += 3
        return <long>_be16(p + 1)
    if c == 0xce:
        _need_field(r, 5, field)
        r.pos += 5
        return <uint64_t>_be32(p + 1)
    if c == 0xcf:
        _need_field(r, 9, field)
        r.pos += 9
        return _be64(p + 1)
    if c == 0xd0:
        _need_field(r, 2, field)
        r.pos += 2
        return <long>(<int8_t>p[1])
    if c == 0xd1:
        _need_field(r, 3, field)
        r.pos += 3
        return <long>(<int16_t>_be16(p + 1))
    if c == 0xd2:
        _need_field(r, 5, field)
        r.pos += 5
        return <long>(<int32_t>_be32(p + 1))
    if c == 0xd3:
        _need_field(r, 9, field)
        r.pos += 9
        return <int64_t>_be64(p + 1)
    raise _field_error(field, expected, _kind(c))


cdef Py_ssize_t _str_header(_Reader* r, str field, bint nil_ok) except -2:
    """Read a str's header: its length in bytes, the reader at its first byte; -1 for nil (when ``nil_ok``)."""
    _need_field(r, 1, field)
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    cdef Py_ssize_t n
    if 0xa0 <= c <= 0xbf:
        n = c & 0x1f
        r.pos += 1
    elif c == 0xd9:
        _need_field(r, 2, field)
        n = p[1]
        r.pos += 2
    elif c == 0xda:
        _need_field(r, 3, field)
        n = _be16(p + 1)
        r.pos += 3
    elif c == 0xdb:
        _need_field(r, 5, field)
        n = _be32(p + 1)
        r.pos += 5
    elif c == 0xc0 and nil_ok:
        r.pos += 1
        return -1
    else:
        raise _field_error(field, "str or nil" if nil_ok else "str", _kind(c))
    _need_field(r, n, field)
    return n


cdef object _str_body(_Reader* r, str field, Py_ssize_t n):
    try:
        s = PyUnicode_DecodeUTF8(<char*>r.buf + r.pos, n, NULL)
    except UnicodeDecodeError:
        raise _MDE(f"task message field {field!r} is not valid UTF-8") from None
    r.pos += n
    return s


cdef object _read_str(_Reader* r, str field, bint nil_ok):
    cdef Py_ssize_t n = _str_header(r, field, nil_ok)
    if n < 0:
        return None
    return _str_body(r, field, n)


#: The last value read of each field that repeats from message to message: task name, queue, reply
#: address, and a child's report's state.
cdef list _repeated = [None, None, None, None]
cdef enum:
    _TASK_FIELD = 0
    _QUEUE_FIELD = 1
    _REPLY_FIELD = 2
    _STATE_FIELD = 3


cdef object _read_repeated_str(_Reader* r, str field, bint nil_ok, int slot):
    """``_read_str`` for a field whose value repeats: the last one read is given again when its bytes are the same.

    A batch's messages name the same task, queue and reply address: given again,
    the string is not decoded, allocated and hashed anew (the hash is what every
    registry and queue lookup of it needs).
    """
    cdef Py_ssize_t n = _str_header(r, field, nil_ok)
    cdef Py_ssize_t known_size
    cdef const char* known_bytes
    if n < 0:
        return None
    known = _repeated[slot]
    if known is not None:
        known_bytes = PyUnicode_AsUTF8AndSize(known, &known_size)
        if known_size == n and memcmp(known_bytes, r.buf + r.pos, n) == 0:
            r.pos += n
            return known
    s = _str_body(r, field, n)
    _repeated[slot] = s
    return s


cdef bytes _read_bin(_Reader* r, str field):
    _need_field(r, 1, field)
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    cdef Py_ssize_t n
    if c == 0xc4:
        _need_field(r, 2, field)
        n = p[1]
        r.pos += 2
    elif c == 0xc5:
        _need_field(r, 3, field)
        n = _be16(p + 1)
        r.pos += 3
    elif c == 0xc6:
        _need_field(r, 5, field)
        n = _be32(p + 1)
        r.pos += 5
    else:
        raise _field_error(field, "bin", _kind(c))
    _need_field(r, n, field)
    cdef bytes b = PyBytes_FromStringAndSize(<char*>r.buf + r.pos, n)
    r.pos += n
    return b


cdef object _read_time(_Reader* r, str field):
    _need_field(r, 1, field)
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    if c == 0xc0:
        r.pos += 1
        return None
    if c == 0xcb:
        _need_field(r, 9, field)
        r.pos += 9
        return _be_float64(p + 1)
    if c == 0xca:
        _need_field(r, 5, field)
        r.pos += 5
        return _be_float32(p + 1)
    return float(_read_int(r, field, "a float or nil"))


cdef Py_ssize_t _skip_object(_Reader* r, str field) except -1:
    """Advance r.pos past one msgpack object; return its nesting depth of containers.

    No recursion: an explicit stack of "items left" per open container. A container that
    announces more items than bytes left is rejected before anything else happens.
    """
    cdef uint64_t stack[_MAX_DEPTH]
    cdef Py_ssize_t depth = 0, max_depth = 0
    cdef uint64_t todo = 1, children
    cdef bint container
    cdef Py_ssize_t skip
    cdef const unsigned char* p
    cdef unsigned char c
    while True:
        if todo == 0:
            if depth == 0:
                return max_depth
            depth -= 1
            todo = stack[depth]
            continue
        todo -= 1
        _need_field(r, 1, field)
        p = r.buf + r.pos
        c = p[0]
        r.pos += 1
        children = 0
        skip = 0
        container = (0x80 <= c <= 0x9f) or 0xdc <= c <= 0xdf
        if c <= 0x7f or c >= 0xe0 or c == 0xc0 or c == 0xc2 or c == 0xc3:
            pass
        elif c <= 0x8f:
            children = (c & 0x0f) * 2
        elif c <= 0x9f:
            children = c & 0x0f
        elif c <= 0xbf:
            skip = c & 0x1f
        elif c == 0xc4 or c == 0xd9:
            _need_field(r, 1, field)
            skip = p[1]
            r.pos += 1
        elif c == 0xc5 or c == 0xda:
            _need_field(r, 2, field)
            skip = _be16(p + 1)
            r.pos += 2
        elif c == 0xc6 or c == 0xdb:
            _need_field(r, 4, field)
            skip = _be32(p + 1)
            r.pos += 4
        elif c == 0xc7:
            _need_field(r, 1, field)
            skip = <Py_ssize_t>p[1] + 1
            r.pos += 1
        elif c == 0xc8:
            _need_field(r, 2, field)
            skip = <Py_ssize_t>_be16(p + 1) + 1
            r.pos += 2
        elif c == 0xc9:
            _need_field(r, 4, field)
            skip = <Py_ssize_t>_be32(p + 1) + 1
            r.pos += 4
        elif c == 0xca or c == 0xce or c == 0xd2:
            skip = 4
        elif c == 0xcb or c == 0xcf or c == 0xd3:
            skip = 8
        elif c == 0xcc or c == 0xd0:
            skip = 1
        elif c == 0xcd or c == 0xd1:
            skip = 2
        elif c == 0xd4:
            skip = 2
        elif c == 0xd5:
            skip = 3
        elif c == 0xd6:
            skip = 5
        elif c == 0xd7:
            skip = 9
        elif c == 0xd8:
            skip = 17
        elif c == 0xdc:
            _need_field(r, 2, field)
            children = _be16(p + 1)
            r.pos += 2
        elif c == 0xdd:
            _need_field(r, 4, field)
            children = _be32(p + 1)
            r.pos += 4
        elif c == 0xde:
            _need_field(r, 2, field)
            children = <uint64_t>_be16(p + 1) * 2
            r.pos += 2
        elif c == 0xdf:
            _need_field(r, 4, field)
            children = <uint64_t>_be32(p + 1) * 2
            r.pos += 4
        else:  # 0xc1, never used by msgpack
            raise _MDE(f"task message field {field!r} contains the invalid byte 0xc1")
        if skip:
            _need_field(r, skip, field)
            r.pos += skip
        # Empty containers count too: msgpack checks its stack before looking at the size.
        if container and depth >= _MAX_DEPTH:
            raise _MDE(f"task message field {field!r} is nested deeper than "
                       f"{_MAX_DEPTH} levels")
        if children:
            if children > <uint64_t>(r.end - r.pos):
                raise _MDE(f"task message is truncated (in field {field!r})")
            stack[depth] = todo
            depth += 1
            if depth > max_depth:
                max_depth = depth
            todo = children


cdef object _read_value(_Reader* r):
    """Read one options value as ``unpackb(raw=False, strict_map_key=True)`` would.

    Only called after ``_skip_object`` has checked lengths and depth. Returns
    ``_FALLBACK`` on an ext type, whose conversion is left to msgpack itself.
    """
    _need_field(r, 1, "options")
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    cdef Py_ssize_t n
    if c <= 0x7f or c >= 0xe0 or 0xcc <= c <= 0xd3:
        return _read_int(r, "options", "int")
    if c <= 0x8f:
        r.pos += 1
        return _read_map(r, c & 0x0f)
    if c <= 0x9f:
        r.pos += 1
        return _read_list(r, c & 0x0f)
    if c <= 0xbf or 0xd9 <= c <= 0xdb:
        return _read_str(r, "options", False)
    if c == 0xc0:
        r.pos += 1
        return None
    if c == 0xc2 or c == 0xc3:
        r.pos += 1
        return c == 0xc3
    if 0xc4 <= c <= 0xc6:
        return _read_bin(r, "options")
    if c == 0xca or c == 0xcb:
        return _read_time(r, "options")
    if c == 0xdc or c == 0xde:
        _need_field(r, 3, "options")
        n = _be16(p + 1)
        r.pos += 3
        return _read_list(r, n) if c == 0xdc else _read_map(r, n)
    if c == 0xdd or c == 0xdf:
        _need_field(r, 5, "options")
        n = _be32(p + 1)
        r.pos += 5
        return _read_list(r, n) if c == 0xdd else _read_map(r, n)
    return _FALLBACK


cdef object _read_list(_Reader* r, Py_ssize_t n):
    cdef list out = []
    cdef Py_ssize_t i
    for i in range(n):
        item = _read_value(r)
        if item is _FALLBACK:
            return item
        out.append(item)
    return out


cdef object _read_map(_Reader* r, Py_ssize_t n):
    cdef dict out = {}
    cdef Py_ssize_t i
    for i in range(n):
        key = _read_value(r)
        if key is _FALLBACK:
            return key
        if type(key) is not str and type(key) is not bytes:
            raise _MDE(f"task message field 'options' has a map key of type {_kind_of(key)} "
                       f"(only str is allowed)")
        value = _read_value(r)
        if value is _FALLBACK:
            return value
        out[key] = value
    return out


cdef dict _read_options(_Reader* r):
    _need_field(r, 1, "options")
    cdef unsigned char c = r.buf[r.pos]
    if c == 0xc0 or c == 0x80:
        r.pos += 1
        return {}
    if not (0x80 <= c <= 0x8f or c == 0xde or c == 0xdf):
        raise _field_error("options", "a map or nil", _kind(c))
    cdef Py_ssize_t start = r.pos
    _skip_object(r, "options")
    # The common case (no ext types) is read here, without msgpack's per-call setup cost.
    cdef _Reader sub
    sub.buf = r.buf
    sub.pos = start
    sub.end = r.pos
    options = _read_value(&sub)
    if options is _FALLBACK:
        raw = PyBytes_FromStringAndSize(<char*>r.buf + start, r.pos - start)
        try:
            options = _unpackb(raw, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:
            raise _MDE(f"task message field 'options' is not valid msgpack: {exc!r}") from exc
    for key in <dict>options:
        if type(key) is not str:
            raise _MDE(f"task message field 'options' keys must be str, got {_kind_of(key)}")
    return <dict>options


cdef TaskMessage _decode_envelope(const unsigned char* buf, Py_ssize_t size):
    cdef _Reader r
    r.buf = buf
    r.pos = 0
    r.end = size
    _need(&r, 1, "task message")
    cdef unsigned char c = buf[0]
    cdef Py_ssize_t count
    if 0x90 <= c <= 0x9f:
        count = c & 0x0f
        r.pos = 1
    elif c == 0xdc:
        _need(&r, 3, "task message")
        count = _be16(buf + 1)
        r.pos = 3
    elif c == 0xdd:
        _need(&r, 5, "task message")
        count = _be32(buf + 1)
        r.pos = 5
    else:
        raise _MDE(f"task message must be an array, got {_kind(c)}")
    if count != _ENVELOPE_SIZE:
        raise _MDE(f"task message must be a {ENVELOPE_SIZE}-element array, "
                   f"got {count} elements")

    version = _read_int(&r, "version", "int")
    if version != 1:  # WIRE_VERSION as a literal: Cython compares it without a global lookup
        raise _MDE(f"unsupported task message version {version} "
                   f"(this engine reads {WIRE_VERSION})")
    cdef TaskMessage msg = TaskMessage.__new__(TaskMessage)
    msg._id = _read_str(&r, "id", False)
    msg._task = _read_repeated_str(&r, "task", False, _TASK_FIELD)
    msg._payload = _read_bin(&r, "payload")
    retries = _read_int(&r, "retries", "a non-negative int")
    if retries < 0:
        raise _field_error("retries", "a non-negative int", str(retries))
    msg._retries = retries
    msg._eta = _read_time(&r, "eta")
    msg._expires = _read_time(&r, "expires")
    msg._queue = _read_repeated_str(&r, "queue", False, _QUEUE_FIELD)
    msg._reply_to = _read_repeated_str(&r, "reply_to", True, _REPLY_FIELD)
    msg._parent_id = _read_str(&r, "parent_id", True)
    msg._root_id = _read_str(&r, "root_id", True)
    _need_field(&r, 1, "ignore_result")
    c = buf[r.pos]
    if c == 0xc3:
        msg._ignore_result = True
    elif c == 0xc2:
        msg._ignore_result = False
    else:
        raise _field_error("ignore_result", "bool", _kind(c))
    r.pos += 1
    msg._options = _read_options(&r)
    if r.pos != r.end:
        raise _MDE(f"task message has {r.end - r.pos} trailing bytes")
    return msg


cdef object _as_buffer(object data, str what):
    # bytes, bytearray and flat byte memoryviews are read in place; any other memoryview
    # is copied, so both twins read exactly the same bytes.
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        try:
            if data.c_contiguous and data.itemsize == 1:
                return data
            return data.tobytes()
        except ValueError as exc:  # released memoryview
            raise _MDE(f"{what} is not readable: {exc}") from exc
    raise _MDE(f"{what} must be bytes-like, got {type(data).__name__}")


cdef int _get_view(object data, Py_buffer* view, str what) except -1:
    try:
        PyObject_GetBuffer(_as_buffer(data, what), view, PyBUF_SIMPLE)
    except BufferError as exc:
        raise _MDE(f"{what} is not readable: {exc}") from exc
    return 0


def decode_message(data):
    """Decode one wire-format v1 message; any problem raises MessageDecodeError.

    Accepts bytes, bytearray or memoryview. The arguments stay packed until
    ``.args``/``.kwargs`` is read; a bad payload raises MessageDecodeError then.
    """
    return _decode_message(data)


cdef TaskMessage _decode_message(data):
    # decode_message() itself, called from C without a Python call.
    cdef Py_buffer view
    if type(data) is bytes:
        return _decode_envelope(<const unsigned char*>PyBytes_AS_STRING(data),
                                PyBytes_GET_SIZE(data))
    _get_view(data, &view, "task message")
    try:
        return _decode_envelope(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _batch_header(_Reader* r) except -1:
    _need(r, 1, "task batch")
    cdef unsigned char c = r.buf[r.pos]
    cdef Py_ssize_t count
    if 0x90 <= c <= 0x9f:
        count = c & 0x0f
        r.pos += 1
    elif c == 0xdc:
        _need(r, 3, "task batch")
        count = _be16(r.buf + r.pos + 1)
        r.pos += 3
    elif c == 0xdd:
        _need(r, 5, "task batch")
        count = _be32(r.buf + r.pos + 1)
        r.pos += 5
    else:
        raise _MDE(f"task batch must be an array, got {_kind(c)}")
    if count > r.end - r.pos:
        raise _MDE("task batch is truncated")
    return count


cdef Py_ssize_t _batch_item(_Reader* r, Py_ssize_t index) except -1:
    """Read the bin header of item ``index``; return the item's length (not consumed)."""
    _need(r, 1, "task batch")
    cdef const unsigned char* p = r.buf + r.pos
    cdef unsigned char c = p[0]
    cdef Py_ssize_t n
    if c == 0xc4:
        _need(r, 2, "task batch")
        n = p[1]
        r.pos += 2
    elif c == 0xc5:
        _need(r, 3, "task batch")
        n = _be16(p + 1)
        r.pos += 3
    elif c == 0xc6:
        _need(r, 5, "task batch")
        n = _be32(p + 1)
        r.pos += 5
    else:
        raise _MDE(f"task batch item {index} must be bin, got {_kind(c)}")
    _need(r, n, "task batch")
    return n


cdef list _read_batch(const unsigned char* buf, Py_ssize_t size, bint decode):
    cdef _Reader r
    r.buf = buf
    r.pos = 0
    r.end = size
    cdef Py_ssize_t count = _batch_header(&r), i, n
    cdef Py_ssize_t first = r.pos
    cdef list out = []
    # Validate the whole batch structure before decoding any item, as the twin does.
    for i in range(count):
        n = _batch_item(&r, i)
        if not decode:
            out.append(PyBytes_FromStringAndSize(<char*>buf + r.pos, n))
        r.pos += n
    if r.pos != r.end:
        raise _MDE(f"task batch has {r.end - r.pos} trailing bytes")
    if decode:
        r.pos = first
        for i in range(count):
            n = _batch_item(&r, i)
            try:
                out.append(_decode_envelope(buf + r.pos, n))
            except MessageDecodeError as exc:
                raise _MDE(f"task batch item {i}: {exc}") from exc
            r.pos += n
    return out


cdef list _batch(object data, bint decode):
    cdef Py_buffer view
    if type(data) is bytes:
        return _read_batch(<const unsigned char*>PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data), decode)
    _get_view(data, &view, "task batch")
    try:
        return _read_batch(<const unsigned char*>view.buf, view.len, decode)
    finally:
        PyBuffer_Release(&view)


def split_batch(data):
    """Return the encoded messages of a batch without decoding them."""
    return _batch(data, False)


def decode_batch(data):
    """Decode a batch; a malformed item makes the whole batch raise MessageDecodeError."""
    return _batch(data, True)


# -- pipe frames ----------------------------------------------------------------------------

cdef enum:
    _PIPE_HEADER_SIZE = 5
    _MAX_PIPE_FRAME = 512 * 1024 * 1024

#: A pipe frame (supervisor <-> child) is ``<u32 length, little-endian><u8 kind><payload>``.
PIPE_HEADER_SIZE = _PIPE_HEADER_SIZE
#: A frame declaring a longer payload means a corrupt stream.
MAX_PIPE_FRAME = _MAX_PIPE_FRAME


cdef unsigned char* _append_frame(bytearray buffer, unsigned char kind, Py_ssize_t size) except NULL:
    """Grow ``buffer`` by a frame of ``size`` payload bytes, write its header; return where the payload goes."""
    if size > _MAX_PIPE_FRAME:
        raise ValueError(f"a pipe frame holds at most {MAX_PIPE_FRAME} bytes, not {size}")
    cdef Py_ssize_t start = PyByteArray_GET_SIZE(buffer)
    PyByteArray_Resize(buffer, start + _PIPE_HEADER_SIZE + size)  # BufferError while viewed
    cdef unsigned char* p = <unsigned char*>PyByteArray_AS_STRING(buffer) + start
    p[0] = size & 0xff
    p[1] = (size >> 8) & 0xff
    p[2] = (size >> 16) & 0xff
    p[3] = (size >> 24) & 0xff
    p[4] = kind
    return p + _PIPE_HEADER_SIZE


def pack_frame(bytearray buffer not None, unsigned char kind, payload):
    """Append one pipe frame of ``kind`` carrying ``payload`` (bytes-like) to ``buffer``."""
    cdef Py_buffer view
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        memcpy(_append_frame(buffer, kind, view.len), view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def split_frames(buffer):
    """The complete ``(kind, payload)`` frames at the start of ``buffer``, and the bytes they take.

    Raises ValueError for a frame longer than :data:`MAX_PIPE_FRAME` (a corrupt stream).
    """
    cdef Py_buffer view
    cdef list out = []
    cdef Py_ssize_t offset = 0, end
    cdef uint32_t length
    cdef const unsigned char* p
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        while view.len - offset >= _PIPE_HEADER_SIZE:
            length = (<uint32_t>p[offset] | (<uint32_t>p[offset + 1] << 8) | (<uint32_t>p[offset + 2] << 16)
                      | (<uint32_t>p[offset + 3] << 24))
            if length > _MAX_PIPE_FRAME:
                raise ValueError(f"corrupt pipe stream: frame of {length} bytes")
            end = offset + _PIPE_HEADER_SIZE + length
            if end > view.len:
                break
            out.append((p[offset + 4],
                        PyBytes_FromStringAndSize(<const char*>p + offset + _PIPE_HEADER_SIZE, length)))
            offset = end
    finally:
        PyBuffer_Release(&view)
    return out, offset


# -- a pool child's run of a plain task -----------------------------------------------------

cdef inline double _monotonic() noexcept nogil:
    # The clock of Python's time.monotonic(), which the child's loop compares run times with.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class PlainRunner:
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
    """

    cdef TaskRegistry registry
    cdef object hostname, writer, store, context_class, is_plain, raised, info_enabled, outside_error
    cdef list running
    cdef dict plain, last_run_times, prerun, postrun, success
    cdef set revoked
    cdef double report_slower_than
    cdef unsigned char done_kind

    def __init__(self, TaskRegistry registry not None, hostname, writer, store, list running not None,
                 context_class, is_plain, raised, info_enabled, outside_error, dict last_run_times not None,
                 set revoked not None, tuple receivers not None, double report_slower_than,
                 unsigned char done_kind):
        self.registry = registry
        self.hostname = hostname
        self.writer = writer
        self.store = store
        self.running = running
        if not isinstance(context_class, type) or (<PyTypeObject*>context_class).tp_new is NULL:
            raise TypeError(f"context_class must be a class that can be instantiated, not {context_class!r}")
        self.context_class = context_class
        self.is_plain = is_plain
        self.raised = raised
        self.info_enabled = info_enabled
        self.outside_error = outside_error
        self.last_run_times = last_run_times
        self.revoked = revoked
        self.prerun, self.postrun, self.success = receivers
        self.report_slower_than = report_slower_than
        self.done_kind = done_kind
        self.plain = {}

    def run(self, payload):
        """Run one task message if it is plain and return its run time (seconds); else None, nothing done."""
        return self._run(payload)

    cdef object _run(self, payload):
        cdef TaskMessage msg
        cdef dict options, fields
        cdef double started, runtime
        cdef bint requeue = False
        if self.prerun or self.postrun or self.success:
            return None
        started = _monotonic()
        try:
            msg = _decode_message(payload)
            msg._decode()
        except MessageDecodeError:
            return None
        name = msg._task
        if msg._expires is not None or (self.revoked and msg._id in self.revoked):
            return None
        task = self.registry._tasks.get(name)
        if task is None:
            return None
        known = self.plain.get(name)
        if known is None or known[0] is not task:  # asked once per task object (re-registered: asked again)
            try:
                known = self.plain[name] = (task, bool(self.is_plain(task)))
            except Exception:  # the general path tells what is wrong with it
                return None
        options = msg._options
        if known[1] is not True or (options and (options.get("soft_time_limit") or options.get("link")
                                                 or options.get("chain"))) or self.info_enabled():
            return None
        # Whether the result is stored: the call's choice, the task's, the sender's settings or ours.
        ignore = options.get("ignore_result") if options else None
        if ignore is None:
            ignore = task.ignore_result
            if ignore is None:
                ignore = msg._ignore_result or task.app.conf.task_ignore_result
        store = None if ignore else self.store
        task_id = msg._id
        state = _SUCCESS
        try:
            if PyByteArray_GET_SIZE(self._buffer()) and self.last_run_times.get(name, self.report_slower_than) \
                    >= self.report_slower_than:
                self.writer.flush()  # it may run long: what finished before it is reported first
            fields = _request_fields(msg, False, self.hostname, None)
            fields["recorder"] = store
            request = _new_instance(self.context_class)
            request.__dict__ = fields
            self.running.append((task, request))
            try:
                try:
                    retval = task.run(*msg._args, **msg._kwargs)
                except Exception as exc:
                    state, retval, _ = self.raised(task, request, store, exc)
                    if state == _REJECTED:
                        requeue = bool(getattr(retval, "requeue", False))
                else:
                    if store is not None:
                        try:
                            store.record(task_id, _SUCCESS, retval)
                        except EncodeError as exc:  # the result cannot travel: the task fails
                            state, retval, _ = self.raised(task, request, store, exc)
            finally:
                self.running.pop()
        except (SystemExit, Exception) as exc:  # sys.exit() in the task, a handler's or the engine's own failure
            state = _FAILURE
            self.outside_error(task_id, exc)
        runtime = _monotonic() - started
        self.last_run_times[name] = runtime
        _pack_done(self._buffer(), self.done_kind, task_id, state, runtime, requeue, msg._retries)
        return runtime

    def run_many(self, list frames not None, Py_ssize_t index, Py_ssize_t done, double read_at,
                 double last_flush, double last_checkpoint, Py_ssize_t max_tasks, unsigned char task_kind,
                 double report_every, Py_ssize_t report_bytes, double log_every, double lookahead):
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
        cdef Py_ssize_t count = len(frames)
        cdef double now
        cdef tuple frame
        while index < count:
            frame = <tuple?>frames[index]
            if <long>frame[0] != task_kind:
                return index, done, last_flush, last_checkpoint, 0
            runtime = self._run(frame[1])
            if runtime is None:
                return index, done, last_flush, last_checkpoint, 0
            index += 1
            done += 1
            now = _py_monotonic()  # the loop's clock: read_at and last_flush come from it
            if <double>runtime > self.report_slower_than or now - last_flush > report_every \
                    or PyByteArray_GET_SIZE(self._buffer()) > report_bytes:
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

    cdef bytearray _buffer(self):
        # Read each time: the writer owns it. Typed bytearray lets None through, which C cannot take.
        cdef bytearray buffer = self.writer.buffer
        if buffer is None:
            raise TypeError("PlainRunner's writer has no buffer")
        return buffer


cdef object _SUCCESS = "SUCCESS"
cdef object _FAILURE = "FAILURE"
cdef object _REJECTED = "REJECTED"


def pack_done(bytearray buffer not None, unsigned char kind, task_id, state, double runtime, bint requeue,
              retries):
    """Append a child's DONE report to ``buffer`` as a pipe frame of ``kind`` (:func:`read_done` reads it).

    The payload is what ``msgpack.packb((task_id, state, runtime, requeue, retries))``
    packs, byte for byte: two strings, a float64, a bool and an int.
    """
    _pack_done(buffer, kind, task_id, state, runtime, requeue, retries)


cdef int _pack_done(bytearray buffer, unsigned char kind, task_id, state, double runtime, bint requeue,
                    retries) except -1:
    cdef Py_ssize_t n_id, n_state
    cdef const char* s_id = PyUnicode_AsUTF8AndSize(task_id, &n_id)
    cdef const char* s_state = PyUnicode_AsUTF8AndSize(state, &n_state)
    cdef uint64_t count = PyLong_AsUnsignedLongLong(retries)
    cdef uint64_t bits
    cdef unsigned char* p = _append_frame(
        buffer, kind, 1 + _str_size(n_id) + _str_size(n_state) + 9 + 1 + _uint_size(count))
    p[0] = 0x95
    p = _put_str(p + 1, s_id, n_id)
    p = _put_str(p, s_state, n_state)
    memcpy(&bits, &runtime, 8)
    p[0] = 0xcb
    p = _put64(p + 1, bits)
    p[0] = 0xc3 if requeue else 0xc2
    _put_uint(p + 1, count)
    return 0


# -- a client's plain call ---------------------------------------------------------------------



cdef extern from "Python.h":
    # What ``type.__dict__[name]`` along the MRO holds (a borrowed reference, NULL when none), read
    # through the type's attribute cache without calling a descriptor: CPython's own lookup, which
    # costs a small part of ``getattr(cls, name)``. It sets no exception.
    PyObject* _PyType_Lookup(PyTypeObject* type, PyObject* name)


cdef extern from *:
    """
    /* A type's version tag while it is valid, else 0. CPython gives a type a new tag whenever it,
       or a class in its MRO, changes (PyType_Modified), and never gives one tag to two types: an
       unchanged tag means every lookup along the MRO still finds what it found. */
    static CYTHON_INLINE unsigned int __pyx_engine_type_tag(PyTypeObject* tp) {
    #if PY_VERSION_HEX >= 0x030D0000
        return tp->tp_version_tag;  /* 3.13: 0 when the type has no valid tag (the flag is gone) */
    #else
        return PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) ? tp->tp_version_tag : 0;
    #endif
    }
    """
    unsigned int _type_tag "__pyx_engine_type_tag" (PyTypeObject* tp)


cdef extern from *:
    """
    /* cls.__new__(cls) through the type's slot: what the attribute lookup and call would find
       (object.__new__, or a class's own __new__ through its slot), without making either. */
    static PyObject* __pyx_engine_new_instance(PyObject* cls) {
        PyObject* none = PyTuple_New(0);
        PyObject* obj;
        if (none == NULL) return NULL;
        obj = ((PyTypeObject*)cls)->tp_new((PyTypeObject*)cls, none, NULL);
        Py_DECREF(none);
        return obj;
    }
    """
    object _new_instance "__pyx_engine_new_instance" (object cls)


cdef extern from "Python.h":
    # Where an object keeps its instance dict (NULL when it has none): CPython's own accessor,
    # which makes the dict of a 3.11 object that keeps its attributes inline, as reading
    # ``obj.__dict__`` would, without an attribute lookup.
    PyObject** _PyObject_GetDictPtr(PyObject* obj)


cdef dict _instance_dict(obj):
    """``obj.__dict__`` (None when it has none), read without an attribute lookup."""
    cdef PyObject** slot = _PyObject_GetDictPtr(<PyObject*>obj)
    if slot is NULL or slot[0] is NULL or not isinstance(<object>slot[0], dict):
        return None
    return <dict>slot[0]


cdef bint _type_keeps(PyTypeObject* cls, dict methods, dict verified) except -1:
    """True when ``cls`` has each of ``methods`` (name -> the original) along its MRO.

    ``verified`` holds the version tag of each class found so: while a class keeps
    that tag, the lookups are not made again.
    """
    cdef unsigned int tag = _type_tag(cls)
    known = verified.get(<object>cls) if tag else None
    if known is not None and <unsigned int>known == tag:
        return True
    for name, method in methods.items():
        if _PyType_Lookup(cls, <PyObject*>name) is not <PyObject*>method:
            return False
    tag = _type_tag(cls)  # the lookups gave it one if it had none
    if tag:
        verified[<object>cls] = tag
    return True


cdef bint _keeps(obj, dict methods, dict verified) except -1:
    """True when ``obj``'s class has each of ``methods`` (name -> the original) and ``obj`` shadows none."""
    if not _type_keeps(Py_TYPE(obj), methods, verified):
        return False
    cdef dict instance = _instance_dict(obj)
    if instance:
        for name in methods:
            if PyDict_Contains(instance, name):  # patched on the object itself
                return False
    return True


# Not tracked by the cyclic collector, as TaskMessage: a client holds thousands; a message's
# fields (queue, id, bytes, the Peer it went to) never refer back to it.
@cython.no_gc
@cython.freelist(64)
cdef class Pending:
    """A task message in a client's outbox, or sent and not yet acknowledged: its queue, id and bytes.

    ``peer`` is the link it was sent on (None while it waits) and ``sent_at`` when
    (``time.monotonic()`` seconds).
    """

    cdef public object queue, id, raw, peer
    cdef public double sent_at

    def __init__(self, queue, task_id, raw):
        self.queue = queue
        self.id = task_id
        self.raw = raw
        self.peer = None
        self.sent_at = 0.0


cdef class Outbox:
    """A client's messages waiting for credit, one FIFO per queue (so a queue without credit costs nothing).

    Not locked: the producer's lock guards it, but for appends to a queue that
    already has its deque (see :func:`queue_pending`): each method runs whole
    under the GIL, without Python code in between.
    """

    #: Queue name -> its waiting Pending messages, oldest first.
    cdef public dict by_queue
    #: Messages waiting in all queues.
    cdef public Py_ssize_t count

    def __init__(self):
        self.by_queue = {}
        self.count = 0

    def __len__(self):
        return self.count

    cpdef bint append(self, Pending pending) except -1:
        """Queue ``pending``; True when its queue was empty (the I/O thread has nothing of it to send yet)."""
        items = self.by_queue.get(pending.queue)
        if items is None:
            items = self.by_queue[pending.queue] = _deque()
        items.append(pending)
        self.count += 1
        return len(items) == 1

    def put_back(self, items):
        """Return messages to the front of their queues, in their order."""
        cdef Pending pending
        items = list(items)
        for pending in reversed(items):
            queue = self.by_queue.get(pending.queue)
            if queue is None:
                queue = self.by_queue[pending.queue] = _deque()
            queue.appendleft(pending)
        self.count += len(items)

    def queues(self):
        """The queues with messages waiting, in the order they first had some."""
        return [queue for queue, items in self.by_queue.items() if items]

    def has(self, queue):
        """True when messages of ``queue`` wait."""
        return bool(self.by_queue.get(queue))

    def take(self, queue, Py_ssize_t most, Py_ssize_t most_bytes):
        """Pop up to ``most`` messages of ``queue`` whose sizes add up to at most ``most_bytes`` (at least one)."""
        cdef list out = []
        cdef Py_ssize_t size = 0
        cdef Pending head
        items = self.by_queue[queue]
        while items and len(out) < most:
            head = items[0]
            size += len(head.raw) + 8
            if out and size > most_bytes:
                break
            out.append(items.popleft())
        self.count -= len(out)
        return out

    def demand(self):
        """Waiting messages per queue."""
        return {queue: len(items) for queue, items in self.by_queue.items() if items}


cdef class PlainSender:
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
      returns, once a producer exists): checked at every call, on their classes
      (looked up again whenever a class in their MRO changed: CPython's type
      version tag says so) and on the objects themselves, so a patched or
      overridden method is called;
    * an argument count the task body takes, as ``Task._send`` checks it;
    * a usable producer of exactly the ``Producer`` class (a child's own producer
      or a test's stand-in is called as such) whose reply address, with an
      rpc:// backend, the app already knows (``Engine.reply_address``).

    Any other call makes :meth:`send` return None having sent nothing: the caller
    goes the general way, which also makes the producer and the reply address.

    The result is made without calling ``result_class``: a copy of the attributes
    its ``__init__`` gave a sample, while the class keeps that ``__init__``.
    """

    cdef dict task_methods, app_methods, producer_methods, result_methods, result_template
    cdef dict task_classes, app_classes, producer_classes, result_classes
    cdef object result_class, before_publish, after_publish, load_transport, producer_class
    cdef object id_key, name_key, app_key

    def __init__(self, dict task_methods not None, result_class, before_publish, after_publish, load_transport):
        self.task_methods = task_methods
        self.result_class = result_class
        self.before_publish = before_publish
        self.after_publish = after_publish
        # Called once a producer exists: (Engine's sending methods by name, the Producer class,
        # Producer's sending methods by name), each as its module defined it.
        self.load_transport = load_transport
        self.app_methods = self.producer_methods = None
        self.producer_class = None
        # The classes found to keep their sending methods, with the version tag they had then.
        self.task_classes, self.app_classes, self.producer_classes, self.result_classes = {}, {}, {}, {}
        self._learn_result(result_class)

    cdef _learn_result(self, result_class):
        # A result is made without a Python call to its __init__: a copy of the attributes a
        # sample got, its id, task name and app filled in. Only while the class keeps the
        # __init__ and __new__ the sample was made with; otherwise the class is called.
        self.result_template = None
        if not isinstance(result_class, type):
            return
        cdef PyObject* init = _PyType_Lookup(<PyTypeObject*>result_class, <PyObject*>"__init__")
        cdef PyObject* new = _PyType_Lookup(<PyTypeObject*>result_class, <PyObject*>"__new__")
        cdef PyObject* setattr = _PyType_Lookup(<PyTypeObject*>result_class, <PyObject*>"__setattr__")
        if init is NULL or new is NULL or <object>new is not object.__dict__["__new__"] \
                or setattr is NULL or <object>setattr is not object.__dict__["__setattr__"]:
            return
        marks = (object(), object(), object())
        fields = _instance_dict(result_class(marks[0], None, marks[1], marks[2], None))
        if fields is None:
            return
        keys = [None, None, None]
        for key, value in fields.items():
            for i in range(3):
                if value is marks[i]:
                    keys[i] = key
                    break
            else:
                if value is not None:  # made of something else than the arguments: call it
                    return
        if None in keys:
            return
        self.id_key, self.name_key, self.app_key = keys
        self.result_methods = {"__init__": <object>init, "__new__": <object>new, "__setattr__": <object>setattr}
        self.result_template = dict.fromkeys(fields)

    def send(self, task, tuple args not None, reply_to=_MISSING):
        """Send ``task(*args)`` if the call is plain and return its AsyncResult; else None, nothing sent.

        ``reply_to`` is the reply address when the caller has it (a group's members
        share one); without it the app's known address is used.
        """
        cdef TaskMessage msg
        cdef dict options, settings, fields
        cdef PyObject* found
        cdef Py_ssize_t count = len(args)
        if self.before_publish.receivers or self.after_publish.receivers:
            return None
        if not _keeps(task, self.task_methods, self.task_classes):
            return None
        app = task.app
        producer = getattr(app, "_producer", None)
        if producer is None:
            return None
        if self.app_methods is None:
            self.app_methods, self.producer_class, self.producer_methods = self.load_transport()
        if type(producer) is not self.producer_class or not _keeps(app, self.app_methods, self.app_classes) \
                or not _keeps(producer, self.producer_methods, self.producer_classes):
            return None
        # Producer.usable(), kept by the producer as checked above: not inherited through a fork, not closed.
        if producer.pid != _process._pid or producer._closing:  # _pid: what process.pid() returns
            return None
        # The app's settings, read from the Settings' own dict (a plain read of each: see Settings).
        settings = _instance_dict(app.conf)
        if settings is None:
            return None
        eager = settings.get("task_always_eager", _MISSING)
        routes = settings.get("task_routes", _MISSING)
        url = settings.get("result_backend", _MISSING)
        default_ignore = settings.get("task_ignore_result", _MISSING)
        default_queue = settings.get("task_default_queue", _MISSING)
        if eager is _MISSING or routes is _MISSING or url is _MISSING or default_ignore is _MISSING \
                or default_queue is _MISSING or eager or routes:
            return None
        if task.typing:  # the count Task._send checks; anything else is left to check_arguments
            # The class's own checker (type(task).__dict__), read without a call.
            found = PyDict_GetItem(<object>Py_TYPE(task).tp_dict, "_arguments_checker")
            checker = <object>found if found is not NULL else None
            if checker is None or not checker.least <= count <= checker.most:
                return None
        if reply_to is _MISSING:
            reply_to = None
            if url and str(url).startswith("rpc"):  # Engine.reply_address's answer, when it holds
                known = app._reply_to
                if known is None or known[0] != url or known[1] is not app._backend or known[2] is not producer:
                    return None
                reply_to = known[3]
        # The message Task.build_message builds for a call without options.
        options = {}
        time_limit = task.time_limit
        if time_limit is not None:
            options["time_limit"] = time_limit
        soft_time_limit = task.soft_time_limit
        if soft_time_limit is not None:
            options["soft_time_limit"] = soft_time_limit
        ignore = task.ignore_result
        if ignore is None:
            ignore = default_ignore
        msg = TaskMessage.__new__(TaskMessage)
        msg._id = _new_task_id()
        msg._task = _check_str(task.name, "task")
        msg._args = args
        msg._kwargs = {}
        msg._payload = None
        msg._retries = 0
        msg._eta = msg._expires = msg._parent_id = msg._root_id = None
        msg._queue = _check_str(task.queue or default_queue, "queue")
        msg._reply_to = _check_opt_str(reply_to, "reply_to")
        msg._ignore_result = bool(ignore)
        msg._options = options
        raw = _encode(msg)
        if PyBytes_GET_SIZE(raw) > producer.max_batch_bytes:
            return None  # the general path refuses it, saying why
        _queue_pending(producer, Pending(msg._queue, msg._id, raw))
        result_class = self.result_class
        if self.result_template is None \
                or not _type_keeps(<PyTypeObject*>result_class, self.result_methods, self.result_classes):
            return result_class(msg._id, None, msg._task, app, None)
        result = _new_instance(result_class)
        fields = self.result_template.copy()
        fields[self.id_key] = msg._id
        fields[self.name_key] = msg._task
        fields[self.app_key] = app
        result.__dict__ = fields
        return result


def queue_pending(producer, Pending pending not None):
    """Queue ``pending`` in ``producer``'s outbox: ``Producer.send``'s step after packing, and a plain call's.

    Under the producer's lock when the outbox and the messages not yet
    acknowledged fill ``producer.max_outbox`` (it waits for room) or the queue
    has no deque yet; otherwise by one append that runs whole under the GIL. The
    producer's I/O thread is woken when the message went into an empty queue.
    """
    _queue_pending(producer, pending)


cdef int _queue_pending(producer, Pending pending) except -1:
    cdef Outbox outbox = <Outbox?>producer._outbox
    cdef bint first_in_queue = False
    if outbox.count + len(producer._unacked) >= producer.max_outbox or outbox.by_queue.get(pending.queue) is None:
        with producer._mutex:
            if outbox.count + len(producer._unacked) >= producer.max_outbox:
                producer._wait_for_room()  # waits on the condition, which releases this same lock
            first_in_queue = outbox.append(pending)
    else:
        # Without the producer's lock: appending to a queue's existing deque runs whole under the
        # GIL (no Python code, no allocation the cyclic collector could run a finalizer in), as do
        # the I/O thread's compiled takes and put-backs, and the I/O thread never counts on the
        # outbox staying as it was between two of its steps (it sends outside the lock anyway).
        # A queue's first message, which makes its deque, takes the lock. (The lock's acquire and
        # release were a large share of a plain call's instructions: bench/RESULTS.md.)
        first_in_queue = outbox.append(pending)
    # Only a message into an empty queue of the outbox wakes the I/O thread: one behind
    # others of its queue goes with them, in the dispatch already due or on the next
    # credit frame (a queue is left non-empty only when its credit ran out). Waking per
    # message costs a pipe write and a GIL hand-over each: a large share of the client's
    # CPU in a send loop (bench/RESULTS.md).
    if first_in_queue:
        producer._wake()
    return 0


# -- the supervisor's side of a task ---------------------------------------------------------

cdef class QueuedTask:
    """A received task message waiting for (or assigned to) a child."""

    #: The task message (a TaskMessage).
    cdef public object message
    #: The message as it came, what a child is handed.
    cdef public object raw
    #: The registered task it names.
    cdef public object task
    #: The client link it came on (None: from this worker's children, or replayed).
    cdef public object peer
    #: How the journal knows this task (released when its final state is out); None without a journal.
    cdef public object journal_ref
    #: When it was received and when it started (``time.monotonic()`` seconds; 0.0: not started).
    cdef public double received, started
    #: ``--fair``: the run time expected when it was handed to a child (counted in ``queued_seconds``).
    cdef public double expected
    #: True while it waits in the timer heap for its kind's rate-limit slot (taken already).
    cdef public bint rate_slot

    def __init__(self, message, raw, task, peer=None, journal_ref=None):
        self.message = message
        self.raw = raw
        self.task = task
        self.peer = peer
        self.journal_ref = journal_ref
        self.received = _py_monotonic()  # Python's clock: what it is compared with (not CLOCK_MONOTONIC everywhere)
        self.started = 0.0
        self.expected = 0.0
        self.rate_slot = False

    @property
    def name(self):
        """The task name."""
        return self.message.task

    def __repr__(self):
        return f"<QueuedTask {self.message.task}[{self.message.id}]>"


def take_plain(list raws not None, Py_ssize_t start, TaskRegistry registry not None, peer, journal_ref,
               list queued not None, list ids not None, dict per_queue not None, remember, watch):
    """The supervisor's receive step for the plain tasks of one frame: ``raws[start:]`` while each is plain.

    A plain task message decodes, names a registered task without a rate limit and
    carries no eta: it is counted in ``per_queue`` (queue -> tasks) and ``ids``, given
    to ``remember(message, peer)`` and ``watch(message)`` when these are not None,
    and appended to ``queued`` as a QueuedTask received now, of ``peer`` and
    ``journal_ref``. Returns the index of the first message it did not take (a
    malformed one, or one the supervisor's ``accept()`` handles): ``len(raws)``
    when it took them all.
    """
    cdef Py_ssize_t i, n = len(raws)
    cdef TaskMessage msg
    cdef QueuedTask entry
    cdef double now = _py_monotonic()  # Python's clock, as QueuedTask's own
    tasks = registry._tasks
    for i in range(start, n):
        raw = raws[i]
        try:
            msg = _decode_message(raw)
        except MessageDecodeError:
            return i
        task = tasks.get(msg._task)
        if task is None or msg._eta is not None or task.rate_limit is not None:
            return i
        queue = msg._queue
        per_queue[queue] = per_queue.get(queue, 0) + 1
        ids.append(msg._id)
        if remember is not None:
            remember(msg, peer)
        if watch is not None:
            watch(msg)
        entry = QueuedTask.__new__(QueuedTask)
        entry.message = msg
        entry.raw = raw
        entry.task = task
        entry.peer = peer
        entry.journal_ref = journal_ref
        entry.received = now
        queued.append(entry)
    return n


def push_named(dict by_name not None, dict seen not None, list entries not None, deque_class):
    """Append each of ``entries`` to its task name's queue in ``by_name`` (made by ``deque_class()``), in order.

    ``seen[name]`` becomes the entry's receive time. The fair scheduler's
    ``push_many`` step.
    """
    cdef QueuedTask entry
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


def hand_out(queue not None, child, Py_ssize_t count, double cost, double step, double budget,
             list out not None):
    """Give ``child`` the next ``count`` entries of ``queue``; return ``budget`` less ``step`` per entry.

    Each entry is expected to run ``cost`` seconds (added to ``child.queued_seconds``),
    goes to ``child.outstanding`` and, as ``(child, entry)``, to ``out``: the fair
    scheduler's step of handing a batch of one kind to a child.
    """
    cdef QueuedTask entry
    cdef Py_ssize_t i
    cdef double queued_seconds = child.queued_seconds
    outstanding = child.outstanding
    try:
        for i in range(count):
            entry = <QueuedTask?>queue[0]  # checked before it leaves the queue
            if entry is None:
                raise TypeError("hand_out hands QueuedTasks, not None")
            queue.popleft()
            entry.expected = cost
            queued_seconds += cost
            outstanding.append(entry)
            out.append((child, entry))
            budget -= step
    finally:
        child.queued_seconds = queued_seconds
    return budget


def write_assigned(list assigned not None, double now, unsigned char kind):
    """Add each assigned task's message to its child's pipe buffer as a frame of ``kind``; return the children.

    ``assigned`` holds ``(child, entry)`` pairs; an entry that is its child's first
    outstanding task starts ``now``. Each child's ``writer.buffer`` (a bytearray)
    gets the frames, in order; the result maps child pid -> child, each child once.
    """
    cdef dict touched = {}
    cdef QueuedTask entry
    cdef bytearray buffer
    for child, item in assigned:
        entry = <QueuedTask?>item
        if entry is None:
            raise TypeError("write_assigned writes QueuedTasks, not None")
        if child.outstanding[0] is entry:
            entry.started = now
        buffer = child.writer.buffer
        if buffer is None:
            raise TypeError("a child's writer has no buffer")
        raw = entry.raw
        if type(raw) is bytes:
            memcpy(_append_frame(buffer, kind, PyBytes_GET_SIZE(raw)), PyBytes_AS_STRING(raw),
                   PyBytes_GET_SIZE(raw))
        else:
            pack_frame(buffer, kind, raw)
        touched[child.pid] = child
    return touched


def count_runs(dict by_state not None, list histogram not None, tuple buckets not None, list run_states not None,
               list runtimes not None):
    """Count each state of ``run_states`` in ``by_state``, and each run time in ``histogram``'s bucket.

    A run time's bucket is ``bisect.bisect_left(buckets, runtime)`` (``buckets``
    sorted; ``histogram`` one longer).
    """
    cdef Py_ssize_t lo, hi, mid, n = len(buckets)
    cdef double runtime
    if len(histogram) <= n:
        raise ValueError(f"a histogram of {len(buckets)} bucket bounds has {n + 1} counts, not {len(histogram)}")
    for state in run_states:
        by_state[state] = by_state.get(state, 0) + 1
    for value in runtimes:
        runtime = value
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if <double>buckets[mid] < runtime:
                lo = mid + 1
            else:
                hi = mid
        histogram[lo] += 1


def fold_runtimes(double average, double overall, long long count, list runtimes not None, double alpha,
                  long long overall_runs):
    """Fold ``runtimes`` into a moving average and a slow overall mean; return ``(average, overall, count)``.

    Each run time moves ``average`` by ``alpha`` of the difference, and ``overall``
    by the difference over the run count (at most ``overall_runs``).
    """
    cdef double runtime
    for value in runtimes:
        runtime = value
        average += alpha * (runtime - average)
        count += 1
        overall += (runtime - overall) / <double>(count if count < overall_runs else overall_runs)
    return average, overall, count


def read_done(payload):
    """A child's DONE report, ``(task_id, state, runtime, requeue, retries)``: what ``msgpack.unpackb`` reads.

    The report :func:`pack_done` packs (two strings, a float64, a bool, a small int)
    is read here directly; anything else, valid or not, goes to ``msgpack.unpackb``
    (which raises for a malformed one).
    """
    if type(payload) is bytes:
        found = _read_done(<const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        if found is not None:
            return found
    return tuple(_unpackb(payload, raw=False))


def read_record(payload):
    """A child's RECORD report, ``(task_id, state, body, traceback, timestamp)``: what ``msgpack.unpackb`` reads.

    The report a child's recorder packs (two strings, the result's bytes, a string or
    nil, a float64) is read here directly; anything else, valid or not, goes to
    ``msgpack.unpackb`` (which raises for a malformed one).
    """
    if type(payload) is bytes:
        found = _read_record(<const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        if found is not None:
            return found
    return tuple(_unpackb(payload, raw=False))


cdef tuple _read_record(const unsigned char* buf, Py_ssize_t size):
    # The layout: 0x95, str, str, bin, str or nil, 0xcb + 8 bytes. None: another.
    cdef _Reader r
    if size < 14 or buf[0] != 0x95:
        return None
    r.buf, r.pos, r.end = buf, 1, size
    try:
        task_id = _read_str(&r, "task_id", False)
        state = _read_repeated_str(&r, "state", False, _STATE_FIELD)
        if r.pos >= r.end or not 0xc4 <= r.buf[r.pos] <= 0xc6:
            return None
        body = _read_bin(&r, "body")
        traceback = _read_str(&r, "traceback", True)
    except MessageDecodeError:
        return None
    if r.end - r.pos != 9 or r.buf[r.pos] != 0xcb:
        return None
    return (task_id, state, body, traceback, _be_float64(r.buf + r.pos + 1))


def finish_done(child, list payloads not None, Py_ssize_t start, Py_ssize_t end, double now,
                dict runs not None, list released not None, list requeued not None):
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
    cdef Py_ssize_t index = start, applied = 0
    cdef QueuedTask entry
    cdef double queued, wait, expected, started, received
    cdef list run
    outstanding = child.outstanding
    queued = child.queued_seconds
    end = min(end, len(payloads))
    try:
        while index < end:
            payload = payloads[index]
            try:
                done = None
                if type(payload) is bytes:
                    done = _read_done(<const unsigned char*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
                if done is None:
                    done = tuple(_unpackb(payload, raw=False))
                task_id, state, runtime, requeue, _ = done
            except Exception:  # the supervisor's own reading says what is wrong with it
                break
            if not outstanding:
                break
            child.last_done = payload  # where this child's report log is read from should it die
            task = outstanding.popleft()
            applied += 1
            index += 1
            if type(task) is QueuedTask:  # always, in a worker: its fields are read directly
                entry = task
                expected, started, received = entry.expected, entry.started, entry.received
                message, journal_ref = entry.message, entry.journal_ref
            else:
                expected, started, received = task.expected, task.started, task.received
                message, journal_ref = task.message, task.journal_ref
            queued = max(0.0, queued - expected) if outstanding else 0.0
            name = (<TaskMessage>message)._task if type(message) is TaskMessage else message.task
            run = runs.get(name)
            if run is None:
                run = runs[name] = [[], [], []]
            run[0].append(state)
            run[1].append(runtime)
            wait = started - received
            run[2].append(wait if wait > 0.0 else 0.0)
            if requeue and state == _REJECTED:
                requeued.append(task)
            elif journal_ref is not None:
                released.append(journal_ref)
            if outstanding:
                head = outstanding[0]
                if type(head) is QueuedTask:
                    (<QueuedTask>head).started = now
                else:
                    head.started = now
    finally:
        child.queued_seconds = queued
    return index, applied


cdef tuple _read_done(const unsigned char* buf, Py_ssize_t size):
    # The fixed layout: 0x95, str, str, 0xcb + 8 bytes, 0xc2/0xc3, a positive fixint. None: another.
    cdef _Reader r
    if size < 14 or buf[0] != 0x95:
        return None
    r.buf, r.pos, r.end = buf, 1, size
    try:
        task_id = _read_str(&r, "task_id", False)
        state = _read_repeated_str(&r, "state", False, _STATE_FIELD)
    except MessageDecodeError:
        return None
    if r.end - r.pos != 11 or r.buf[r.pos] != 0xcb or (r.buf[r.pos + 9] != 0xc2 and r.buf[r.pos + 9] != 0xc3) \
            or r.buf[r.pos + 10] > 0x7f:
        return None
    return (task_id, state, _be_float64(r.buf + r.pos + 1), r.buf[r.pos + 9] == 0xc3, <long>r.buf[r.pos + 10])


# -- registry -------------------------------------------------------------------------------

cdef class TaskRegistry:
    """Task name -> task object; ``lookup`` is the worker's hot path.

    A ``collections.abc.Mapping`` (virtual subclass). Refusing a second, different task
    under a registered name is the app's job, not the registry's.
    """

    def __cinit__(self):
        self._tasks = {}

    def register(self, name, task):
        """Register ``task`` under ``name``, replacing any previous one."""
        if not isinstance(name, str):
            raise TypeError(f"task name must be str, got {type(name).__name__}")
        self._tasks[name] = task

    def unregister(self, name):
        """Remove the task ``name``; NotRegistered if there is none."""
        try:
            del self._tasks[name]
        except KeyError:
            raise NotRegistered(name) from None

    cpdef object lookup(self, object name):
        """Return the task registered as ``name``; NotRegistered if there is none."""
        task = self._tasks.get(name, _MISSING)
        if task is _MISSING:
            raise NotRegistered(name)
        return task

    def __getitem__(self, name):
        return self.lookup(name)

    def get(self, name, default=None):
        """Return the task registered as ``name``, or ``default``."""
        return self._tasks.get(name, default)

    def __contains__(self, name):
        return name in self._tasks

    def __len__(self):
        return len(self._tasks)

    def __iter__(self):
        return iter(self._tasks)

    def keys(self):
        """The registered names."""
        return self._tasks.keys()

    def values(self):
        """The registered tasks."""
        return self._tasks.values()

    def items(self):
        """``(name, task)`` pairs."""
        return self._tasks.items()

    def __repr__(self):
        return f"<TaskRegistry {sorted(self._tasks)!r}>"


Mapping.register(TaskRegistry)


# -- backoff --------------------------------------------------------------------------------

def compute_backoff(retries, double factor=1.0, double maximum=600.0, bint jitter=True,
                    rand=None):
    """Seconds to wait before retry number ``retries``: ``min(maximum, factor * 2**retries)``.

    Negative ``retries`` count as 0; ``factor <= 0`` gives 0.0. With ``jitter`` the delay
    is multiplied by ``rand`` (for tests) or ``random.random()``. Never negative.
    """
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(operator.index(retries), &overflow)
    cdef double delay, r
    if overflow:
        n = 1024 if overflow > 0 else 0
    if not factor > 0.0:
        return 0.0
    if n <= 0:
        delay = factor
    elif n <= 1023:
        delay = factor * ldexp(1.0, <int>n)  # exactly factor * 2.0 ** n
    else:  # 2.0 ** 1024 overflows; the cap applies long before
        delay = maximum
    delay = delay if delay < maximum else maximum
    if jitter:
        if rand is None:
            r = random.random()
        else:
            r = rand
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"rand must be in [0, 1], got {r}")
        delay = delay * r
    return delay if delay > 0.0 else 0.0


# -- state recorder -------------------------------------------------------------------------

@cython.freelist(64)
cdef class StateRecord:
    """The state of one task at one moment (immutable).

    StateRecord(task_id, state, result=None, traceback=None, timestamp=0.0)
    """

    def __init__(self, task_id, state, result=None, traceback=None, double timestamp=0.0):
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be str, got {type(task_id).__name__}")
        if not isinstance(state, str):
            raise TypeError(f"state must be str, got {type(state).__name__}")
        if traceback is not None and not isinstance(traceback, str):
            raise TypeError(f"traceback must be str or None, got {type(traceback).__name__}")
        self.task_id = task_id
        self.state = state
        self.result = result
        self.traceback = traceback
        self.timestamp = timestamp

    def to_dict(self):
        """Return the fields as a plain dict."""
        return {"task_id": self.task_id, "state": self.state, "result": self.result,
                "traceback": self.traceback, "timestamp": self.timestamp}

    def __eq__(self, other):
        if not isinstance(other, StateRecord):
            return NotImplemented
        cdef StateRecord o = <StateRecord>other
        return (self.task_id == o.task_id and self.state == o.state
                and self.timestamp == o.timestamp and self.traceback == o.traceback
                and self.result == o.result)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None

    def __repr__(self):
        return f"<StateRecord {self.task_id} {self.state} at {self.timestamp:.6f}>"


cdef StateRecord _new_record(task_id, state, result, traceback, double timestamp):
    # StateRecord(...) without the Python call, its checks kept.
    if not isinstance(task_id, str):
        raise TypeError(f"task_id must be str, got {type(task_id).__name__}")
    if not isinstance(state, str):
        raise TypeError(f"state must be str, got {type(state).__name__}")
    if traceback is not None and not isinstance(traceback, str):
        raise TypeError(f"traceback must be str or None, got {type(traceback).__name__}")
    cdef StateRecord record = StateRecord.__new__(StateRecord)
    record.task_id = task_id
    record.state = state
    record.result = result
    record.traceback = traceback
    record.timestamp = timestamp
    return record


def records_from_rows(rows, dict found not None):
    """Put a StateRecord per ``(task_id, state, result, traceback, timestamp)`` row of ``rows`` in ``found`` by id.

    A bulk read's loop (``SQLiteBackend.get_many_encoded``): ``rows`` is any
    iterable of such rows, a database cursor included.
    """
    for task_id, state, result, traceback, timestamp in rows:
        found[task_id] = _new_record(task_id, state, result, traceback, timestamp)


def records_from_flat(task_ids, flat, dict found not None):
    """Put a StateRecord per id of ``task_ids`` that has a state in ``flat`` in ``found`` by id.

    ``flat`` holds four values per id, in order: state, result, traceback and
    timestamp, as bytes or None (a Redis reply; no state: nothing stored). The
    state is read as UTF-8, the traceback as UTF-8 with bad bytes replaced, the
    timestamp as a float (0.0 when missing): ``RedisBackend.get_many_encoded``'s loop.
    """
    cdef tuple ids = tuple(task_ids), values = tuple(flat)  # copies: no call below can change their length
    cdef Py_ssize_t index, n = len(ids)
    if len(values) != 4 * n:
        raise ValueError(f"{len(values)} values for {n} ids (4 per id)")
    for index in range(n):
        state = values[4 * index]
        if state is None:
            continue
        traceback = values[4 * index + 2]
        date_done = values[4 * index + 3]
        task_id = ids[index]
        found[task_id] = _new_record(task_id, state.decode(), values[4 * index + 1],
                                     None if traceback is None else traceback.decode("utf-8", "replace"),
                                     float(date_done) if date_done is not None else 0.0)


def decode_results(records not None, load):
    """``records`` (task id -> record) with each bytes-like result decoded: ``Backend.decode_many``'s loop.

    Each record becomes a StateRecord of the same fields (read as attributes
    unless it is one already). A result that is one msgpack scalar (nil, a bool,
    an int, a float, a str or a bin) is read here, as ``msgpack.unpackb`` reads
    it; any other goes to ``load(bytes)``.
    """
    cdef dict out = {}
    cdef StateRecord record
    for task_id, item in records.items():
        if type(item) is StateRecord:
            record = <StateRecord>item
            fields = (record.task_id, record.state, record.result, record.traceback, record.timestamp)
        else:
            fields = (item.task_id, item.state, item.result, item.traceback, item.timestamp)
        result = fields[2]
        if isinstance(result, (bytes, bytearray, memoryview)):
            data = bytes(result)
            result = _scalar_value(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            if result is _MISSING:
                result = load(data)
        out[task_id] = _new_record(fields[0], fields[1], result, fields[3], fields[4])
    return out


cdef object _scalar_value(const unsigned char* p, Py_ssize_t size):
    # One whole msgpack scalar (see _read_scalar); _MISSING for anything else, or more after it.
    cdef Py_ssize_t pos = 0
    value = _read_scalar(p, size, &pos)
    return value if pos == size else _MISSING


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class StateRecorder:
    """Latest state per task id, plus the records changed since the last ``flush``.

    StateRecorder(batch_size=512, max_entries=100_000)

    Precedence: once a task is ready (SUCCESS/FAILURE/REVOKED) only a strictly stronger
    ready state replaces it, so a late STARTED or a duplicate FAILURE after SUCCESS is
    dropped. Before that the latest record wins.

    Memory is bounded by ``max_entries``: past it the least recently flushed entries are
    evicted (pending ones never are). An evicted id loses its precedence memory: a late
    record for it is accepted as if the task were new.
    """

    def __init__(self, Py_ssize_t batch_size=512, Py_ssize_t max_entries=100_000):
        if batch_size < 1 or max_entries < 1:
            raise ValueError("batch_size and max_entries must be >= 1")
        self.batch_size = batch_size
        self.max_entries = max_entries
        self._table = {}
        self._pending = {}
        # An OrderedDict because popping the oldest from a plain dict degrades to O(n).
        self._clean = OrderedDict()

    cpdef bint record(self, object task_id, object state, object result=None,
                      object traceback=None, object timestamp=None) except -1:
        """Record a state; return False if precedence dropped it (see the class docstring)."""
        if not isinstance(state, str) or len(<str>state) == 0:
            raise ValueError(f"state must be a non-empty str, got {state!r}")
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be str, got {type(task_id).__name__}")
        if traceback is not None and not isinstance(traceback, str):
            raise TypeError(f"traceback must be str or None, got {type(traceback).__name__}")
        cdef double ts = _now() if timestamp is None else <double>timestamp
        current = self._table.get(task_id)
        if current is not None and (<StateRecord>current).state in _READY:
            if state not in _READY or (
                    _PRECEDENCE_INDEX.get(state, _CUSTOM_PRECEDENCE)
                    >= _PRECEDENCE_INDEX.get((<StateRecord>current).state, _CUSTOM_PRECEDENCE)):
                return False
        cdef StateRecord rec = StateRecord.__new__(StateRecord)
        rec.task_id = task_id
        rec.state = state
        rec.result = result
        rec.traceback = traceback
        rec.timestamp = ts
        self._table[task_id] = rec
        if task_id not in self._pending:
            self._pending[task_id] = None
            if current is not None:
                del self._clean[task_id]  # not pending yet present: it was clean
            elif len(self._table) > self.max_entries:
                self._evict()
        return True

    cdef int _evict(self) except -1:
        cdef dict table = self._table
        clean = self._clean
        while len(table) > self.max_entries and clean:
            del table[clean.popitem(last=False)[0]]
        return 0

    def get(self, task_id):
        """Return the latest record of ``task_id``, or None."""
        return self._table.get(task_id)

    def state_of(self, task_id):
        """Return the latest state of ``task_id``; ``"PENDING"`` when unknown."""
        rec = self._table.get(task_id)
        return "PENDING" if rec is None else (<StateRecord>rec).state

    def forget(self, task_id):
        """Drop everything known about ``task_id`` (no error if unknown)."""
        self._table.pop(task_id, None)
        self._pending.pop(task_id, None)
        self._clean.pop(task_id, None)

    def flush(self):
        """Return the latest record of every task changed since the last flush.

        Ordered by first change; the pending set is cleared.
        """
        cdef dict table = self._table
        clean = self._clean
        cdef list out = [table[task_id] for task_id in self._pending]
        for task_id in self._pending:
            clean[task_id] = None
        self._pending.clear()
        if len(table) > self.max_entries:
            self._evict()
        return out

    @property
    def pending(self):
        """Number of tasks changed since the last flush."""
        return len(self._pending)

    @property
    def should_flush(self):
        """True when ``pending`` has reached ``batch_size``."""
        return len(self._pending) >= self.batch_size

    def __len__(self):
        return len(self._table)

    def __contains__(self, task_id):
        return task_id in self._table

    def __repr__(self):
        return f"<StateRecorder entries={len(self._table)} pending={len(self._pending)}>"

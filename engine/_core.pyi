"""Type stub of the engine core; ``engine._core`` and ``engine._core_py`` share this API.

See the module docstring of either twin for wire format v1.
"""

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from typing import Any, Final, TypeVar, overload

from engine.task import Task

_T = TypeVar("_T")

IMPLEMENTATION: Final[str]
#: The first element of every encoded task message.
WIRE_VERSION: Final[int]
#: Number of elements in the message envelope array.
ENVELOPE_SIZE: Final[int]
#: Deepest nesting of containers accepted in ``options`` (the map counts as 1).
MAX_OPTIONS_DEPTH: Final[int]

class TaskMessage:
    """One task invocation; decoded messages unpack ``args``/``kwargs`` lazily."""

    id: str
    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int
    eta: float | None
    expires: float | None
    queue: str
    reply_to: str | None
    parent_id: str | None
    root_id: str | None
    ignore_result: bool
    options: dict[str, Any]
    __hash__: None  # type: ignore[assignment]

    def __init__(
        self,
        id: str,
        task: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        retries: int = 0,
        eta: float | None = None,
        expires: float | None = None,
        queue: str = "celery",
        reply_to: str | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        ignore_result: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> None: ...
    @property
    def payload(self) -> bytes:
        """The packed ``[args, kwargs]`` (cached)."""
    def copy(self, **changes: Any) -> TaskMessage:
        """A new message with the given attributes replaced."""
    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict."""
    def __eq__(self, other: object) -> bool: ...

def request_fields(msg: TaskMessage, eager: bool, hostname: str, retry_dispatcher: Any) -> dict[str, Any]:
    """The fields of ``task.request`` for running ``msg`` (``engine.request.Request.context``)."""

def new_task_id() -> str:
    """Return a new unique task id: a time-ordered UUID (version 7, RFC 9562) in its usual text form."""

def encode_message(msg: TaskMessage) -> bytes:
    """Encode one message (wire format v1)."""

def decode_message(data: bytes | bytearray | memoryview) -> TaskMessage:
    """Decode one message; MessageDecodeError on any problem."""

def encode_batch(messages: Iterable[TaskMessage]) -> bytes:
    """Encode messages as a msgpack array of bin."""

def decode_batch(data: bytes | bytearray | memoryview) -> list[TaskMessage]:
    """Decode a batch; MessageDecodeError naming the bad item."""

def split_batch(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The encoded items of a batch, not decoded."""

PIPE_HEADER_SIZE: Final[int]
"""Bytes before a pipe frame's payload: ``<u32 length, little-endian><u8 kind>``."""
MAX_PIPE_FRAME: Final[int]
"""The longest pipe frame payload; a longer one declared means a corrupt stream."""

def pack_frame(buffer: bytearray, kind: int, payload: bytes | bytearray | memoryview) -> None:
    """Append one pipe frame of ``kind`` carrying ``payload`` to ``buffer``."""

def split_frames(buffer: bytes | bytearray | memoryview) -> tuple[list[tuple[int, bytes]], int]:
    """The complete ``(kind, payload)`` pipe frames at the start of ``buffer``, and the bytes they take."""

class PlainRunner:
    """A pool child's whole step for a plain task message: decode, run as the tracer would, report DONE."""

    def __init__(self, registry: TaskRegistry, hostname: str, writer: Any, store: Any,
                 running: list[tuple[Any, Any]], context_class: type, is_plain: Any, raised: Any, info_enabled: Any,
                 outside_error: Any, last_run_times: dict[str, float], revoked: set[str],
                 receivers: tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]], report_slower_than: float,
                 done_kind: int) -> None: ...
    def run(self, payload: bytes) -> float | None:
        """Run one task message if it is plain and return its run time; else None, nothing done."""
    def run_many(self, frames: list[tuple[int, bytes]], index: int, done: int, read_at: float, last_flush: float,
                 last_checkpoint: float, max_tasks: int, task_kind: int, report_every: float, report_bytes: int,
                 log_every: float, lookahead: float) -> tuple[int, int, float, float, int]:
        """Run the plain task frames from ``index`` with the loop's after-task steps; where and why it stopped."""

class Pending:
    """A task message in a client's outbox, or sent and not yet acknowledged."""

    queue: str
    id: str
    raw: bytes
    peer: Any
    sent_at: float
    def __init__(self, queue: str, task_id: str, raw: bytes) -> None: ...

class Outbox:
    """A client's messages waiting for credit, one FIFO per queue."""

    by_queue: dict[str, Any]
    count: int
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def append(self, pending: Pending) -> bool: ...
    def put_back(self, items: Iterable[Pending]) -> None: ...
    def queues(self) -> list[str]: ...
    def has(self, queue: str) -> bool: ...
    def take(self, queue: str, most: int, most_bytes: int) -> list[Pending]: ...
    def demand(self) -> dict[str, int]: ...

class PlainSender:
    """A client's whole send of a plain call: build, encode, queue, return its AsyncResult."""

    def __init__(self, task_methods: dict[str, Any], result_class: Any, before_publish: Any, after_publish: Any,
                 load_transport: Any) -> None: ...
    def send(self, task: Any, args: tuple[Any, ...], reply_to: Any = ...) -> Any:
        """Send ``task(*args)`` if the call is plain and return its AsyncResult; else None, nothing sent."""

class QueuedTask:
    """A received task message waiting for (or assigned to) a child."""

    message: Any
    raw: Any
    task: Any
    peer: Any
    journal_ref: Any
    received: float
    started: float
    expected: float
    rate_slot: bool
    def __init__(self, message: Any, raw: Any, task: Any, peer: Any = None, journal_ref: Any = None) -> None: ...
    @property
    def name(self) -> str:
        """The task name."""

def pack_done(buffer: bytearray, kind: int, task_id: str, state: str, runtime: float, requeue: bool,
              retries: int) -> None:
    """Append a child's DONE report to ``buffer`` as a pipe frame of ``kind``."""

def finish_done(child: Any, payloads: list[bytes], start: int, end: int, now: float,
                runs: dict[str, list[list[Any]]], released: list[Any], requeued: list[Any]) -> tuple[int, int]:
    """Apply a child's DONE reports from ``start`` to ``end`` in order; where it stopped and how many it applied."""

def take_plain(raws: list[bytes], start: int, registry: TaskRegistry, peer: Any, journal_ref: Any,
               queued: list[QueuedTask], ids: list[str], per_queue: dict[str, int], remember: Any,
               watch: Any) -> int:
    """Queue the plain task messages of ``raws[start:]``; the index of the first one not taken."""

def push_named(by_name: dict[str, Any], seen: dict[str, float], entries: list[QueuedTask],
               deque_class: Any) -> None:
    """Append each entry to its task name's queue in ``by_name``; note when its kind was seen."""

def hand_out(queue: Any, child: Any, count: int, cost: float, step: float, budget: float,
             out: list[tuple[Any, QueuedTask]]) -> float:
    """Give ``child`` the next ``count`` entries of ``queue``; ``budget`` less ``step`` per entry."""

def write_assigned(assigned: list[tuple[Any, QueuedTask]], now: float, kind: int) -> dict[int, Any]:
    """Add each assigned task's frame to its child's pipe buffer; the children touched, by pid."""

def count_runs(by_state: dict[str, int], histogram: list[int], buckets: tuple[float, ...], run_states: list[str],
               runtimes: list[float]) -> None:
    """Count states and run-time buckets."""

def fold_runtimes(average: float, overall: float, count: int, runtimes: list[float], alpha: float,
                  overall_runs: int) -> tuple[float, float, int]:
    """Fold run times into a moving average and a slow overall mean."""

def queue_pending(producer: Any, pending: Pending) -> None:
    """Queue ``pending`` in ``producer``'s outbox, waiting for room; wake its I/O thread."""

def read_record(payload: bytes) -> tuple[Any, ...]:
    """A child's RECORD report, ``(task_id, state, body, traceback, timestamp)``."""

def read_done(payload: bytes) -> tuple[Any, ...]:
    """A child's DONE report, ``(task_id, state, runtime, requeue, retries)``."""

class TaskRegistry(Mapping[str, Task]):
    """Task name -> task object."""

    def __init__(self) -> None: ...
    def register(self, name: str, task: Task) -> None:
        """Register or replace ``name``."""
    def unregister(self, name: str) -> None:
        """Remove ``name``; NotRegistered if absent."""
    def lookup(self, name: str) -> Task:
        """The task ``name``; NotRegistered if absent."""
    def __getitem__(self, name: str) -> Task: ...
    @overload
    def get(self, name: str) -> Task | None: ...
    @overload
    def get(self, name: str, default: Task | _T) -> Task | _T: ...
    def __contains__(self, name: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> KeysView[str]: ...
    def values(self) -> ValuesView[Task]: ...
    def items(self) -> ItemsView[str, Task]: ...

def compute_backoff(
    retries: int,
    factor: float = 1.0,
    maximum: float = 600.0,
    jitter: bool = True,
    rand: float | None = None,
) -> float:
    """``min(maximum, factor * 2**retries)``, times ``rand``/``random.random()`` if jitter."""

class StateRecord:
    """The state of one task at one moment (read-only)."""

    @property
    def task_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def result(self) -> Any: ...
    @property
    def traceback(self) -> str | None: ...
    @property
    def timestamp(self) -> float: ...
    __hash__: None  # type: ignore[assignment]
    def __init__(
        self,
        task_id: str,
        state: str,
        result: Any = None,
        traceback: str | None = None,
        timestamp: float = 0.0,
    ) -> None: ...
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
    def __eq__(self, other: object) -> bool: ...

def records_from_rows(rows: Iterable[tuple[Any, ...]], found: dict[str, StateRecord]) -> None:
    """Put a StateRecord per ``(task_id, state, result, traceback, timestamp)`` row in ``found``."""

def records_from_flat(task_ids: Sequence[str], flat: Sequence[Any], found: dict[str, StateRecord]) -> None:
    """Put a StateRecord per id with a state in ``flat`` (4 values per id) in ``found``."""

def decode_results(records: Mapping[str, Any], load: Any) -> dict[str, StateRecord]:
    """``records`` as StateRecords, each bytes-like result decoded (scalars here, the rest by ``load``)."""

class StateRecorder:
    """Latest state per task id with precedence, plus the set changed since the last flush."""

    @property
    def batch_size(self) -> int: ...
    @property
    def max_entries(self) -> int: ...
    def __init__(self, batch_size: int = 512, max_entries: int = 100_000) -> None: ...
    def record(
        self,
        task_id: str,
        state: str,
        result: Any = None,
        traceback: str | None = None,
        timestamp: float | None = None,
    ) -> bool:
        """Record a state; False if precedence dropped it."""
    def get(self, task_id: str) -> StateRecord | None: ...
    def state_of(self, task_id: str) -> str: ...
    def forget(self, task_id: str) -> None: ...
    def flush(self) -> list[StateRecord]:
        """Records changed since the last flush, in first-change order."""
    @property
    def pending(self) -> int: ...
    @property
    def should_flush(self) -> bool: ...
    def __len__(self) -> int: ...
    def __contains__(self, task_id: object) -> bool: ...

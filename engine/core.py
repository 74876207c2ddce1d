"""The engine's core, compiled or pure: import task-message and state-table names from here.

``engine._core`` (Cython) and ``engine._core_py`` (pure Python) are twins with the same
public names, behaviour and wire bytes. This module picks one at import time:

* ``ENGINE_NO_EXTENSIONS`` set to ``1``/``true``/``yes`` (any case) selects the pure twin,
  for debugging or for platforms without a compiler;
* otherwise the compiled core is used. If it was not built, a ``RuntimeWarning`` says so
  and the pure twin is used: everything works, only slower. ``pip install -e .`` builds it.

``HAS_EXTENSION`` tells which one was picked and ``IMPLEMENTATION`` names it
(``"cython"`` or ``"python"``).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

__all__ = (
    "ENVELOPE_SIZE",
    "HAS_EXTENSION",
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


def _extensions_disabled() -> bool:
    return os.environ.get("ENGINE_NO_EXTENSIONS", "").strip().lower() in {"1", "true", "yes"}


if TYPE_CHECKING:
    # Both twins have the API of engine/_core.pyi: the checker reads every name below from it.
    from engine import _core as _impl
elif _extensions_disabled():
    from engine import _core_py as _impl
else:
    try:
        from engine import _core as _impl
    except ImportError as exc:
        warnings.warn(
            f"engine: the compiled core (engine._core) is not built ({exc}); using the slow "
            "pure-Python twin. Run `pip install -e .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )
        from engine import _core_py as _impl

#: True when the compiled core is in use.
HAS_EXTENSION: bool = _impl.IMPLEMENTATION == "cython"
IMPLEMENTATION: str = _impl.IMPLEMENTATION
WIRE_VERSION = _impl.WIRE_VERSION
ENVELOPE_SIZE = _impl.ENVELOPE_SIZE
MAX_OPTIONS_DEPTH = _impl.MAX_OPTIONS_DEPTH
PIPE_HEADER_SIZE = _impl.PIPE_HEADER_SIZE
MAX_PIPE_FRAME = _impl.MAX_PIPE_FRAME
TaskMessage = _impl.TaskMessage
encode_message = _impl.encode_message
decode_message = _impl.decode_message
encode_batch = _impl.encode_batch
decode_batch = _impl.decode_batch
split_batch = _impl.split_batch
pack_frame = _impl.pack_frame
split_frames = _impl.split_frames
new_task_id = _impl.new_task_id
request_fields = _impl.request_fields
Outbox = _impl.Outbox
Pending = _impl.Pending
PlainRunner = _impl.PlainRunner
finish_done = _impl.finish_done
take_plain = _impl.take_plain
push_named = _impl.push_named
hand_out = _impl.hand_out
write_assigned = _impl.write_assigned
count_runs = _impl.count_runs
fold_runtimes = _impl.fold_runtimes
queue_pending = _impl.queue_pending
PlainSender = _impl.PlainSender
QueuedTask = _impl.QueuedTask
pack_done = _impl.pack_done
read_done = _impl.read_done
read_record = _impl.read_record
TaskRegistry = _impl.TaskRegistry
compute_backoff = _impl.compute_backoff
StateRecord = _impl.StateRecord
records_from_rows = _impl.records_from_rows
records_from_flat = _impl.records_from_flat
decode_results = _impl.decode_results
StateRecorder = _impl.StateRecorder

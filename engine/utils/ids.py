"""Task ids: random UUIDs (version 4), made without building a ``uuid.UUID``.

A leaf module (it imports nothing of the engine's), so the task, the canvas
and the tracer can all import it at the top.
"""

from __future__ import annotations

import os

__all__ = ("new_task_id",)


def new_task_id() -> str:
    """Return a new unique task id (a random UUID, version 4, in its usual text form)."""
    # Formatting 16 random bytes directly skips uuid.uuid4()'s object: this runs on every delay().
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

"""Task states and their precedence.

The names and the precedence order are Celery's, so code written against
``celery.states`` reads the same here. A custom state is any upper-case string
(for example ``'PROGRESS'``); it ranks below SUCCESS and FAILURE and above
every other built-in state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeGuard

__all__ = (
    "ALL_STATES",
    "EXCEPTION_STATES",
    "FAILURE",
    "IGNORED",
    "CUSTOM_PRECEDENCE",
    "PENDING",
    "PRECEDENCE",
    "PRECEDENCE_INDEX",
    "PROPAGATE_STATES",
    "READY_STATES",
    "RECEIVED",
    "REJECTED",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "UNREADY_STATES",
    "is_valid_state",
    "precedence",
    "state",
)

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
REJECTED = "REJECTED"
RETRY = "RETRY"
#: Not a stored state: what the tracer reports for a task that raised Ignore.
IGNORED = "IGNORED"

#: A task in one of these states has finished and will not change again.
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
#: States whose result is an exception.
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
#: States whose exception ``AsyncResult.get()`` re-raises.
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED})

#: Strongest first; ``None`` stands for every custom state.
PRECEDENCE = [SUCCESS, FAILURE, None, REVOKED, STARTED, RECEIVED, REJECTED, RETRY, PENDING]
#: State name -> its index in :data:`PRECEDENCE` (the one table; the core and the backends use it).
PRECEDENCE_INDEX: dict[str | None, int] = {name: index for index, name in enumerate(PRECEDENCE)}
#: The precedence index of every custom state.
CUSTOM_PRECEDENCE = PRECEDENCE_INDEX[None]


def precedence(state: str) -> int:
    """Return the precedence index of ``state``: a lower index is a stronger state."""
    return PRECEDENCE_INDEX.get(state, CUSTOM_PRECEDENCE)


def is_valid_state(name: object) -> TypeGuard[str]:
    """Tell whether ``name`` can be used as a state: a non-empty upper-case string."""
    return isinstance(name, str) and bool(name) and name == name.upper() and not name.isspace()


class state(str):
    """A state name that compares by precedence: ``state(SUCCESS) > state(PENDING)``."""

    def __gt__(self, other: str) -> bool:
        return precedence(self) < precedence(other)

    def __ge__(self, other: str) -> bool:
        return precedence(self) <= precedence(other)

    def __lt__(self, other: str) -> bool:
        return precedence(self) > precedence(other)

    def __le__(self, other: str) -> bool:
        return precedence(self) >= precedence(other)

    __hash__ = str.__hash__

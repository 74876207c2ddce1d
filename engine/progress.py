"""Progress of a wait on many results: a progress bar on a terminal, or the caller's callback.

``GroupResult.get(progress=True)`` draws a ``rich`` bar (done/total, rate,
time left) on stderr while the members finish, and nothing when stderr is not
a terminal (a log file or a pipe gets no control codes). A callable instead of
``True`` is called as ``progress(done, total)`` whenever more members finished.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Callable, Union

__all__ = ("ProgressArg", "ResultsProgress")

#: What ``progress=`` accepts: False (nothing), True (a bar on a terminal), or ``callback(done, total)``.
ProgressArg = Union[bool, Callable[[int, int], Any], None]


class ResultsProgress:
    """Counts finished results and shows them as ``progress`` asks (a context manager)."""

    def __init__(self, total: int, progress: ProgressArg, description: str = "results") -> None:
        self.total = total
        self.done = 0
        self._callback = progress if callable(progress) else None
        self._bar: Any = None
        self._bar_task: Any = None
        if progress is True:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TaskProgressColumn,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TaskProgressColumn(), _rate_column(), TimeRemainingColumn(),
                                     console=console, transient=False)
                self._bar_task = self._bar.add_task(description, total=total)

    def advance(self, count: int) -> None:
        """``count`` more results are ready."""
        if count <= 0:
            return
        self.done += count
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=self.done)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def __enter__(self) -> ResultsProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()


def _rate_column() -> Any:
    """A column of results per second (rich has one for bytes only)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("  -/s" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")

    return RateColumn()

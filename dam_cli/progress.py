"""Progress bars on stderr, shown only to people: off with --quiet, --json, or when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol


class Reporter(Protocol):
    def task(self, description: str, total: int) -> contextlib.AbstractContextManager: ...
    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NullReporter:
    """Reports nothing (library use, tests, --quiet)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[_NullTask]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


class RichReporter:
    """Rich progress bars and log lines on stderr."""

    def __init__(self, show_bars: bool | None = None):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.show_bars = sys.stderr.isatty() if show_bars is None else show_bars

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        if not self.show_bars:
            yield _NullTask()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console, transient=True) as prog:
            tid = prog.add_task(description, total=total)

            class _T:
                def advance(self, n: int = 1) -> None:
                    prog.advance(tid, n)

            yield _T()

    def log(self, message: str) -> None:
        self.console.print(message, markup=False)

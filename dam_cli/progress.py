"""Progress on stderr, shown only to people: off with --quiet or --json.

On a terminal, Rich progress bars; with no terminal (a log file, CI), plain-text lines instead: one
when a task starts, then one per tenth of it (at most 11 lines a task). Log lines are printed either
way, escaped, so that text taken from files cannot drive the terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Protocol

from dam_cli.text import safe_text


class Reporter(Protocol):
    def task(self, description: str, total: int) -> contextlib.AbstractContextManager: ...
    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NullReporter:
    """Reports nothing (library use, tests, --quiet); with `notes`, a `note` still goes to stderr (`--json`: no
    progress, but an option that was ignored or a file that was kept is said)."""

    def __init__(self, notes: bool = False):
        self.notes = notes

    def note(self, message: str) -> None:
        if self.notes:
            _err_line(f"note: {safe_text(message)}")

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[_NullTask]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


def _err_line(text: str) -> None:
    """A progress or log line on stderr: best effort, never a reason to stop the work (`2>/dev/full`)."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


class PlainTask:
    """Counts steps and prints `description: done of total (p%), t s` at each tenth of `total`."""

    def __init__(self, description: str, total: int, write=_err_line):
        self.description, self.total, self.write = safe_text(description), max(int(total), 0), write
        self.done, self._tenth, self._t0 = 0, 0, time.perf_counter()
        self.write(f"{self.description}: 0 of {self.total}")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.total <= 0:
            return
        tenth = min(10, self.done * 10 // self.total)
        if tenth > self._tenth:
            self._tenth = tenth
            pct = 100 * min(self.done, self.total) // self.total
            self.write(f"{self.description}: {self.done} of {self.total} ({pct}%), "
                       f"{time.perf_counter() - self._t0:.1f} s")


class RichReporter:
    """Rich progress bars on a terminal, plain-text progress lines otherwise; log lines on stderr."""

    def __init__(self, show_bars: bool | None = None):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.show_bars = sys.stderr.isatty() if show_bars is None else show_bars

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        if not self.show_bars:
            yield PlainTask(description, total)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console, transient=True) as prog:
            tid = prog.add_task(safe_text(description), total=total)

            class _T:
                def advance(self, n: int = 1) -> None:
                    prog.advance(tid, n)

            yield _T()

    def note(self, message: str) -> None:
        self.log(f"note: {message}")

    def log(self, message: str) -> None:
        if self.show_bars:
            self.console.print(safe_text(message), markup=False)
        else:
            _err_line(safe_text(message))


def note(reporter, message: str) -> None:
    """A note (an option ignored, a file kept) through `reporter`: its `note`, which `--json` runs keep on stderr,
    else its `log` (a reporter of the caller's own)."""
    (getattr(reporter, "note", None) or reporter.log)(message)

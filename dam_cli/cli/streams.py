"""The standard streams a `dam` process is given, made safe before any command runs, and what their failures mean.

- A `COLUMNS` that is not a number of at least `MIN_COLUMNS` is dropped (Rich would print nothing at all at width 0,
  error lines included), so the terminal's own width, or 80, applies.
- A closed standard error (`2>&-`) becomes the null device: progress and log lines are best effort and must never
  stop the work. A closed standard output (`>&-`) becomes a stream whose writes fail with EBADF, so a command whose
  output is its result says it could not write it (`output_failure`) instead of succeeding silently.
- A write to a full or closed output (`>/dev/full`) raises an OSError without a file name: `output_failure` turns
  it into one line. A reader that stops early (`| head`) ends the command quietly (`quiet_stdout`), as Rich does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys

MIN_COLUMNS = 20
# errnos of a failed write to an output stream (a path's OSError carries a file name and is answered where it occurs)
STREAM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EBADF, errno.EIO, errno.EPIPE}


class ClosedOutput(io.TextIOBase):
    """Standard output when the process was started without one: every write fails with EBADF."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def prepare_streams() -> None:
    """Make `COLUMNS`, `sys.stderr` and `sys.stdout` safe to use (module doc)."""
    cols = os.environ.get("COLUMNS")
    if cols is not None and not (cols.strip().isdigit() and int(cols) >= MIN_COLUMNS):
        del os.environ["COLUMNS"]
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the process's standard error from now on
    if sys.stdout is None:
        sys.stdout = ClosedOutput()
    for stream in (sys.stdout, sys.stderr):  # a stream that cannot take every character (an ASCII locale, say)
        if not _utf(getattr(stream, "encoding", None) or "utf-8"):  # writes it escaped, never fails on it
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")


def _utf(encoding: str) -> bool:
    import codecs

    try:
        return codecs.lookup(encoding).name.startswith("utf")
    except LookupError:
        return False


def output_failure(e: BaseException) -> str | None:
    """One line for an OSError raised by writing an output stream (no file name, a stream errno), else None."""
    if not isinstance(e, OSError) or getattr(e, "filename", None) is not None or e.errno not in STREAM_ERRNOS:
        return None
    return f"cannot write to standard output ({e.strerror or e}): give it a file or a pipe with room"


def quiet_stdout() -> None:
    """Point standard output at the null device (its reader is gone), so the interpreter's last flush cannot fail."""
    with contextlib.suppress(Exception):
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


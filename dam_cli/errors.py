"""The library's one error type. Its message says what is wrong and how to fix it.

The CLI maps `DamError` to one red line on stderr and its `exit_code`; set `DAM_DEBUG=1` to see
the traceback instead.
"""

from __future__ import annotations

EXIT_FAILURE = 1  # the input or the environment is wrong (bad file, missing model, no disk room)
EXIT_USAGE = 2  # an option value is wrong (same code as Click's own usage errors)
EXIT_INTERNAL = 70  # not a DamError: a bug in dam (EX_SOFTWARE of sysexits.h)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, as shells report it
EXIT_TERMINATED = 143  # SIGTERM (e.g. `kill`, a CI timeout): 128 + 15


class DamError(Exception):
    """A failure the user can fix; `str(err)` is one line naming the problem and the fix."""

    exit_code = EXIT_FAILURE


class DamUsageError(DamError):
    """An option or argument value is invalid."""

    exit_code = EXIT_USAGE


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup runs (atomic temp files discarded).

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks do not swallow it.
    """

"""The `dam` console script: a Ctrl-C while the command's modules still import (the first few tenths of a second,
before `app.main` installs its handlers) ends as an interrupt, one line and exit 130, not Python's traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from dam_cli.cli.app import main as run
    except KeyboardInterrupt:
        from dam_cli.errors import EXIT_INTERRUPTED

        print("interrupted: stopped before the command started; nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    try:
        run()
    finally:
        _ignore_signals()


def _ignore_signals() -> None:
    """Once the command has ended (its outputs written, its exit code set), Ctrl-C and SIGTERM are ignored for the
    interpreter's teardown: the default action would end a finished run silently with 130 or 143, and a script that
    trusts the code would then throw away a good artifact."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass

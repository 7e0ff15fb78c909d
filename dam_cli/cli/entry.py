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
    run()

"""The `dam` command: registers the subcommands, maps `DamError` to one red line and an exit code.

Each subcommand lives in `dam_cli/commands/<name>.py` and exposes `register(app)`. Heavy imports
(torch, transformers) happen inside the commands, so `dam --help` is instant.
"""

from __future__ import annotations

import os
import sys

import typer

from .commands import generate as _generate
from .commands import inspect as _inspect
from .commands import profile as _profile

app = typer.Typer(
    name="dam",
    help="DAM: Dynamic Attention Masks for Hugging Face causal LMs.\n\n"
    "Profile a frozen model's attention once, inspect the per-head masks, then generate with "
    "sparse attention.\n\n"
    "Examples:\n\n"
    "  dam profile --output smollm2.safetensors\n\n"
    "  dam inspect smollm2.safetensors --length 4096\n\n"
    "  dam generate --profile smollm2.safetensors --prompt-file long.txt",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for _mod in (_profile, _inspect, _generate):
    _mod.register(app)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def main() -> None:
    """Console entry point: run the app, turning library errors into one line on stderr."""
    from .errors import EXIT_INTERRUPTED, DamError

    try:
        app(standalone_mode=False)
    except DamError as e:
        if os.environ.get("DAM_DEBUG"):
            raise
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            Text.assemble(("error: ", "bold red"), str(e)))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if os.environ.get("DAM_DEBUG"):
            raise
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and aborts
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    main()

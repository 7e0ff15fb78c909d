"""The `dam` command: registers the subcommands, maps `DamError` to one red line and an exit code.

Each subcommand lives in `dam_cli/commands/<name>.py` and exposes `register(app)`. Heavy imports
(torch, transformers) happen inside the commands, so `dam --help` is instant.
"""

from __future__ import annotations

import contextlib
import sys

import typer

from dam_cli.cli import eval as _eval
from dam_cli.cli import generate as _generate
from dam_cli.cli import inspect as _inspect
from dam_cli.cli import profile as _profile

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
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for _mod in (_profile, _inspect, _generate, _eval):
    _mod.register(app)


def _print_version(value: bool) -> None:
    """Eager: runs while the options are parsed, so `dam --version` needs no command."""
    if value:
        from dam_cli import __version__

        typer.echo(f"dam {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    pass


def _raise_terminated(signum, frame) -> None:
    from dam_cli.errors import Terminated

    raise Terminated()


_SIGINT_SEEN: list[bool] = []  # a Ctrl-C came during the command (whatever a library made of it)


def _raise_interrupt(signum, frame) -> None:
    """Python's own Ctrl-C, remembered: an interrupt that lands inside a library's import can come back as that
    library's ImportError ("Could not import module ..."), which is then the interrupt, not a bug."""
    _SIGINT_SEEN.append(True)
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point: run the app, turning library errors into one line on stderr.

    Exit codes (docs/reliability.md): 0 success, 1 `DamError` (bad input or environment; also a full or
    closed standard output, and quietly a reader that stopped early), 2 usage error (bad option value, Click's
    too, in one line), 70 internal error (a bug), 130 Ctrl-C, 143 SIGTERM.
    Interrupts unwind normally, so any file being written is discarded and the old one stays.
    """
    import signal

    old = {}
    with contextlib.suppress(ValueError):  # ValueError: not the main thread (embedded use)
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C was set otherwise
            old[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    _SIGINT_SEEN.clear()
    try:
        _main()
    finally:
        # The handlers served the command only: a SIGTERM in the interpreter's teardown (atexit callbacks) would
        # print Terminated's traceback there, after the outputs are written, and still exit 0.
        with contextlib.suppress(ValueError):
            for signum, handler in old.items():
                signal.signal(signum, handler)


def _main() -> None:
    """`main` under its SIGTERM and SIGINT handlers."""
    from dam_cli import distributed
    from dam_cli.cli.streams import output_failure, prepare_streams, quiet_stdout
    from dam_cli.errors import (
        EXIT_FAILURE,
        EXIT_INTERNAL,
        EXIT_INTERRUPTED,
        EXIT_TERMINATED,
        DamError,
        Terminated,
        debug_enabled,
        out_of_memory,
        torch_settings_error,
    )
    from dam_cli.text import safe_text

    debug = debug_enabled()
    prepare_streams()
    try:
        rv = app(standalone_mode=False)
        # Without standalone mode Typer returns exit codes instead of exiting; recent Typer turns
        # Ctrl-C into a returned 130 (older Click raised Abort, handled below).
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            if rv == EXIT_INTERRUPTED:
                _interrupted("interrupted")
            sys.exit(rv)
        if distributed.is_launched_rank():  # a torchrun rank that finished: its teardown can abort (see there)
            distributed.exit_without_teardown(0)
    except DamError as e:
        if debug:
            raise
        _exit_with_error(e)
    except KeyboardInterrupt:
        if debug:
            raise
        _interrupted("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        if debug:
            raise
        _interrupted("terminated (SIGTERM)")
        sys.exit(EXIT_TERMINATED)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and aborts
        usage_errors, aborts = _click_exception_types()
        if isinstance(e, usage_errors):
            _exit_with_error(e, _usage_line(e))
        if isinstance(e, BrokenPipeError) and not debug:  # the reader stopped early (`| head`): nothing to say
            quiet_stdout()
            sys.exit(EXIT_FAILURE)
        if isinstance(e, aborts):
            # Click turns Ctrl-C inside a command into Abort (the interrupt is its __context__).
            if debug and isinstance(e.__context__, KeyboardInterrupt):
                raise e.__context__ from None
            _interrupted("interrupted" if isinstance(e.__context__, KeyboardInterrupt) else "aborted")
            sys.exit(EXIT_INTERRUPTED)
        if _SIGINT_SEEN and not debug:  # the interrupt, as a library reported it
            _interrupted("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        if debug:
            raise
        if (oom := out_of_memory(e)) is not None:  # sizes too large for the machine: not a bug
            _exit_with_error(oom)
        if (bad := torch_settings_error(e)) is not None:  # torch refused its environment at import
            _exit_with_error(bad)
        if (why := output_failure(e)) is not None:  # `>/dev/full`, `>&-`: the output has nowhere to go
            quiet_stdout()
            with contextlib.suppress(OSError):
                print(f"error: {why}", file=sys.stderr)
            sys.exit(EXIT_FAILURE)
        # Not a DamError: a bug in dam. Still one line, with the way to the traceback.
        first = safe_text((str(e).strip().splitlines() or [""])[0])
        line = (f"internal error, a bug in dam ({type(e).__name__}: {first}); rerun with DAM_DEBUG=1 for the "
                "traceback and report it")
        print(f"error: {line}", file=sys.stderr)
        _json_error(line, EXIT_INTERNAL)
        sys.exit(EXIT_INTERNAL)


def _exit_with_error(e, message: str | None = None) -> None:
    """One red line for a `DamError` (or a Click error, `message`) on stderr, then exit with its code (never
    returns)."""
    from rich.console import Console
    from rich.text import Text

    from dam_cli.text import safe_text

    # safe_text: a message quoting a file's contents (a model name, a path) cannot drive the terminal
    # or forge a second line.
    line = safe_text(str(e) if message is None else message)
    with contextlib.suppress(OSError):
        Console(stderr=True, highlight=False, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), line))
    if not getattr(e, "json_reported", False):
        _json_error(line, e.exit_code)
    sys.exit(e.exit_code)


def _json_error(line: str, code: int) -> None:
    """Where the command was asked for `--json`, the failure on standard output too, as one JSON object
    (`{"error": ..., "exit_code": ...}`), so a CI job that parses stdout reads why instead of nothing."""
    import json

    args = sys.argv[1:]
    if "--json" not in (args[:args.index("--")] if "--" in args else args):
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(json.dumps({"error": line, "exit_code": code}) + "\n")
        sys.stdout.flush()


def _usage_line(e) -> str:
    """Click's error as one line, with the command's help to look at: `No such option: --lenght Did you mean
    --length? (see `dam inspect --help`)`."""
    names, ctx = [], getattr(e, "ctx", None)
    message = " ".join(e.format_message().split())
    if not message and ctx is not None and getattr(ctx.command, "commands", None):  # `dam` alone: help, no reason
        message = "missing command: choose one of " + ", ".join(sorted(ctx.command.commands))
    while ctx is not None and ctx.parent is not None:  # the subcommands' names; the root is `dam` however started
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return message + f" (see `{' '.join(['dam', *names])} --help`)"


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort types; recent Typer vendors its own copy of Click."""
    usage, aborts = [], []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            import importlib

            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            aborts.append(mod.Abort)
    return tuple(usage), tuple(aborts)


def _interrupted(what: str) -> None:
    line = f"{what}: stopped; any output file being written was discarded"
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr)
    from dam_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

    _json_error(line, EXIT_TERMINATED if what.startswith("terminated") else EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()

"""The library's one error type. Its message says what is wrong and how to fix it.

The CLI maps `DamError` to one red line on stderr and its `exit_code`; set `DAM_DEBUG=1` to see
the traceback instead.
"""

from __future__ import annotations

import os
import re

EXIT_FAILURE = 1  # the input or the environment is wrong (bad file, missing model, no disk room)
EXIT_USAGE = 2  # an option value is wrong (same code as Click's own usage errors)
EXIT_INTERNAL = 70  # not a DamError: a bug in dam (EX_SOFTWARE of sysexits.h)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, as shells report it
EXIT_TERMINATED = 143  # SIGTERM (e.g. `kill`, a CI timeout): 128 + 15


class DamError(Exception):
    """A failure the user can fix; `str(err)` is one line naming the problem and the fix."""

    exit_code = EXIT_FAILURE
    json_reported = False  # the command already printed its `--json` answer, this failure in it (`inspect --check`)


class DamUsageError(DamError):
    """An option or argument value is invalid."""

    exit_code = EXIT_USAGE


def debug_enabled() -> bool:
    """Whether `DAM_DEBUG` asks for tracebacks: set to anything but "", "0", "false", "no" or "off" (so that
    `DAM_DEBUG=0` turns them off, as it reads)."""
    return os.environ.get("DAM_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup runs (atomic temp files discarded).

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks do not swallow it.
    """


def out_of_memory(e: BaseException) -> DamError | None:
    """A `DamError` for running out of memory, or None: torch's `OutOfMemoryError` (a GPU), Python's `MemoryError`
    or torch's CPU allocator's RuntimeError (RAM) is sizes too large for the machine, an expected failure rather
    than a bug."""
    if type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("torch"):
        text = str(e)
        asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text)
        free = re.search(r"of which ([\d.]+ [KMGT]i?B) is free", text)
        detail = f" (asked for {asked.group(1)}{f', {free.group(1)} free' if free else ''})" if asked else ""
        return DamError(f"out of GPU memory{detail}: use shorter prompts or --lengths, fewer prompts at once "
                        "(--batch-size), a smaller model, or a GPU that other processes are not filling")
    cpu_alloc = isinstance(e, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in str(e)
                                                 or "DefaultCPUAllocator: not enough memory" in str(e))
    if isinstance(e, MemoryError) or cpu_alloc:  # torch's CPU allocator raises a RuntimeError
        return DamError("out of memory (RAM): use shorter prompts or --lengths, fewer prompts at once "
                        "(--batch-size), or a machine with more memory")
    return None


def torch_settings_error(e: BaseException) -> DamError | None:
    """A `DamError` for torch refusing its own environment at import (`TORCH_LOGS=nonsense`: a ValueError raised
    in `torch._logging` before any of dam's code runs), or None."""
    logs = os.environ.get("TORCH_LOGS")
    tb = e.__traceback__
    while tb is not None and logs is not None:
        if f"{os.sep}torch{os.sep}_logging{os.sep}" in tb.tb_frame.f_code.co_filename:
            first = (str(e).strip().splitlines() or [""])[0]
            return DamError(f"TORCH_LOGS={logs!r} is not a setting torch accepts ({first[:160]}): unset TORCH_LOGS, "
                            "or give it names torch knows (e.g. TORCH_LOGS=+dynamo)")
        tb = tb.tb_next
    return None


# Prefixes of environment variables that point libraries (torch, Triton, Hugging Face) at their folders.
_FOLDER_VARIABLES = ("TORCH", "TRITON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "XDG_", "TMPDIR", "DAM_")


def blamed_variable(path) -> str | None:
    """`NAME=value` of the environment variable (of a library's folder) that an OSError's `path` comes from: its
    value, or a folder holding the path; None when no such variable holds it."""
    if not isinstance(path, str) or not path:
        return None
    for name, value in sorted(os.environ.items()):
        if not value or not name.upper().startswith(_FOLDER_VARIABLES):
            continue
        if path == value or path.startswith(value.rstrip(os.sep) + os.sep):
            return f"{name}={value}"
    return None


def folder_hint(e: OSError) -> str:
    """" (NAME=value in the environment: ...)" where `blamed_variable` finds the variable an OSError's path comes
    from, else "": the end of a line that would otherwise blame what was being loaded."""
    blamed = blamed_variable(getattr(e, "filename", None))
    return f" ({blamed} in the environment: unset it or point it at a writable folder)" if blamed else ""

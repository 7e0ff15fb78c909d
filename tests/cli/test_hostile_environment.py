"""The process's surroundings: a damaged model cache, the environment variables other libraries read,
and a signal that lands after the command is done.

A cache entry's manifest or headers nested too deeply for the JSON parser, holding a size of 1e400 or a file name
with a NUL byte are "damaged" (rebuilt, or one line naming DAM_CACHE where the cache is read-only), never an
internal error. MPLBACKEND naming a backend matplotlib does not know (a typo, another version's) no longer fails
`--png` after the evaluation; `DAM_DEBUG=0` reads as off; `TORCH_LOGS` set to what torch refuses is named in one
line, and so is a library's folder variable whose path fails (`TORCHINDUCTOR_CACHE_DIR=/dev/null`); a SIGTERM in
the interpreter's teardown (after the outputs are written) prints no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from helpers import DAM_COMMAND, cli_env

from dam_cli.errors import DamError
from dam_cli.progress import NullReporter
from dam_cli.runtime import model_cache

DEEP = b"[" * 200_000 + b"]" * 200_000  # past the JSON parser's recursion limit


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _entry(folder, files: dict[str, bytes]) -> str:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return str(folder)


def _manifest(**extra) -> bytes:
    files = {"config.json": {"size": 2, "mtime_ns": 0, "sha256": ""}, **extra}
    return json.dumps({"format": 1, "files": files}).encode()


# ---- a damaged model cache -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files,reason", [
    ({"config.json": b"{}", "dam-cache.json": DEEP}, "its manifest dam-cache.json is unreadable"),
    ({"config.json": b"{}", "dam-cache.json": _manifest().replace(b'"size": 2', b'"size": 1e400')},
     "its manifest dam-cache.json is unreadable"),
    ({"config.json": b"{}", "dam-cache.json": _manifest(**{"a\u0000b": {"size": 2, "mtime_ns": 0, "sha256": ""}})},
     "its manifest dam-cache.json names a file outside its folder"),
    # entries converted before manifests existed: checked structurally
    ({"config.json": DEEP, "model.safetensors": _safetensors(b"{}")}, "config.json is unreadable"),
    ({"config.json": b"{}", "model.safetensors": _safetensors(b'{"a": ' + DEEP + b"}")},
     "model.safetensors has an unreadable header"),
    ({"config.json": b"{}", "model.safetensors": _safetensors(b'{"a": {"data_offsets": [0, 1e400]}}')},
     "model.safetensors has an unreadable header"),
], ids=["manifest nested too deeply", "manifest size 1e400", "manifest names a file with a NUL",
        "legacy config.json nested too deeply", "legacy header nested too deeply", "legacy data offset 1e400"])
def test_a_damaged_cache_entry_is_damaged_not_an_internal_error(tmp_path, files, reason):
    entry = _entry(tmp_path / "entry", files)
    assert model_cache.entry_problem(entry) == reason


def test_a_damaged_entry_in_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    """The manifest nested too deeply, in a cache that cannot be written: the DAM_CACHE line, as for any damage."""
    entry = _entry(tmp_path / "models" / "smollm2-x", {"config.json": b"{}", "dam-cache.json": DEEP})

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "mkdir", read_only)
    monkeypatch.setenv("DAM_CACHE", str(tmp_path))
    with pytest.raises(DamError) as e:
        model_cache.ensure_entry(entry, lambda tmp, rep: pytest.fail("built"), NullReporter())
    msg = str(e.value)
    assert "\n" not in msg and "is damaged (its manifest dam-cache.json is unreadable)" in msg, msg
    assert "DAM_CACHE=" in msg and "Read-only file system" in msg, msg


# ---- environment variables of other libraries, and DAM_DEBUG ---------------------------------------------------------

@pytest.mark.parametrize("backend", ["nonsense", "module://not_installed"])
def test_png_ignores_an_unknown_mplbackend(tiny_all_allowed_profile, tmp_path, backend):
    """matplotlib's import refuses a backend name it does not know; dam draws with Agg whatever it says (before:
    an internal error, for `dam eval --png` after the whole evaluation)."""
    out = tmp_path / "p.png"
    r = subprocess.run([*DAM_COMMAND, "inspect", tiny_all_allowed_profile, "--png", str(out)], capture_output=True,
                       text=True, env=cli_env(MPLBACKEND=backend), timeout=300)
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("value,traceback", [("0", False), ("false", False), ("", False), ("1", True)])
def test_dam_debug_0_is_off(tmp_path, value, traceback):
    r = subprocess.run([*DAM_COMMAND, "inspect", str(tmp_path / "missing.safetensors")], capture_output=True,
                       text=True, env=cli_env(DAM_DEBUG=value), timeout=300)
    assert r.returncode == 1 and ("Traceback" in r.stderr) == traceback, r.stderr
    if not traceback:
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_torch_logs_setting_torch_refuses_is_one_line(tmp_path):
    """`TORCH_LOGS=nonsense` makes `import torch` raise: that is the environment, named, not a bug of dam."""
    r = subprocess.run([*DAM_COMMAND, "generate", "--prompt", "hi", "-n", "2"], capture_output=True, text=True,
                       env=cli_env(TORCH_LOGS="nonsense"), timeout=300, cwd=tmp_path)  # imports torch first
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: TORCH_LOGS='nonsense' is not a setting torch accepts"), r.stderr
    assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr


def test_a_library_folder_variable_is_named_where_its_path_fails(monkeypatch):
    """An OSError on a path a library took from the environment (`TORCHINDUCTOR_CACHE_DIR=/dev/null`) names the
    variable; other variables and paths are not blamed."""
    from dam_cli.errors import blamed_variable

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/dev/null")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/tmp/triton-here/")
    monkeypatch.setenv("SOMETHING_ELSE", "/srv")
    assert blamed_variable("/dev/null") == "TORCHINDUCTOR_CACHE_DIR=/dev/null"
    assert blamed_variable("/tmp/triton-here/abc/x.json") == "TRITON_CACHE_DIR=/tmp/triton-here/"
    assert blamed_variable("/srv/x") is None and blamed_variable(None) is None and blamed_variable("") is None


# ---- a signal after the work -----------------------------------------------------------------------------------------

SLOW_TEARDOWN = r"""
import atexit, os, sys, time
atexit.register(lambda: (open(os.environ["DAM_TEST_MARKER"], "w").close(), time.sleep(30)))  # runs after main()
from dam_cli.cli.app import main
sys.argv = ["dam", *sys.argv[1:]]
main()
"""


def test_sigterm_in_the_teardown_prints_no_traceback(tmp_path):
    """The SIGTERM handler serves the command only: in the interpreter's teardown (atexit callbacks, after every
    output is written) a SIGTERM ends the process as SIGTERM does (before: Terminated's traceback, exit 0)."""
    marker = tmp_path / "in-teardown"
    p = subprocess.Popen([sys.executable, "-c", SLOW_TEARDOWN, "--version"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli_env(DAM_TEST_MARKER=str(marker)))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), p.stderr.read() if p.poll() is not None else "no teardown within 120 s"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert out.startswith("dam ") and "Traceback" not in err and "Terminated" not in err, err
    assert p.returncode == -signal.SIGTERM, (p.returncode, err)


def test_ctrl_c_that_a_library_turns_into_an_import_error_is_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C landing while numpy or accelerate import came back as transformers' "Could not import module"
    (an internal error, exit 70); the remembered SIGINT makes it the interrupt it was (exit 130)."""
    from dam_cli.cli import app

    def swallowing_import(standalone_mode):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:  # what a library's import machinery does with it
            pass
        raise ModuleNotFoundError("Could not import module 'LlamaConfig'. Are this object's requirements defined?")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own (a background job: ignored)
    try:
        _interrupt_turned_into_an_import_error_exits_130(app, swallowing_import, monkeypatch, capsys)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_turned_into_an_import_error_exits_130(app, swallowing_import, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dam", "profile"])
    monkeypatch.setattr(app, "app", swallowing_import)
    monkeypatch.delenv("DAM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        app.main()
    err = capsys.readouterr().err
    assert e.value.code == 130 and "interrupted" in err and "internal error" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the command
    monkeypatch.setattr(app, "app", lambda standalone_mode: (_ for _ in ()).throw(ModuleNotFoundError("x")))
    with pytest.raises(SystemExit) as e:
        app.main()  # the same error without a Ctrl-C stays what it is
    assert e.value.code == 70 and "internal error" in capsys.readouterr().err


def test_ctrl_c_while_the_command_imports_is_an_interrupt(monkeypatch, capsys):
    """The console script's Ctrl-C before `app.main` runs (while its modules import): exit 130 and one line."""
    import types

    from dam_cli.cli import entry

    class Interrupting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "dam_cli.cli.app", Interrupting("dam_cli.cli.app"))
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted: stopped before the command started; nothing was written\n"


FINISHED_THEN_SIGNALLED = """
import atexit, os, signal, sys, time
from dam_cli.cli import app, entry
app.main = lambda: print("written")  # the command has ended, its output written
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))
entry.main()
"""


def test_a_signal_after_the_command_ended_keeps_its_exit_code():
    """SIGTERM and Ctrl-C in the interpreter's teardown, after the outputs are written: ignored, exit 0 (the default
    action would end a finished run silently with 143 or 130)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", FINISHED_THEN_SIGNALLED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "written\n" and done.stderr == "", done

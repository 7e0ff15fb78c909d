"""The standard streams `dam` is given (`dam_cli.cli.streams`): an absurd terminal width, a closed or full
standard output or error, a reader that stops early, and Click's own usage errors, each answered in one line (or
quietly, for `| head`) with the documented exit code, never as an internal error."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DAM_COMMAND, cli_env, run_cli

PROFILE = str(Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m-instruct-paper.safetensors")


def _shell(command: str, **env: str) -> subprocess.CompletedProcess:
    """`dam ...` run by bash with the redirections in `command` (`DAM` stands for the command itself)."""
    dam = " ".join(shlex.quote(x) for x in DAM_COMMAND)
    return subprocess.run(["bash", "-c", command.replace("DAM", dam)], capture_output=True, text=True,
                          env=cli_env(**env), timeout=300)


@pytest.mark.parametrize("columns", ["0", "1", "abc", "-3"])
def test_a_terminal_width_that_is_no_width_still_shows_every_line(columns):
    """COLUMNS=0 made Rich print nothing at all, error lines included."""
    proc = _shell(f"DAM inspect {shlex.quote(PROFILE)} --layer 99", COLUMNS=columns)
    assert proc.returncode == 2 and "--layer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _shell(f"DAM inspect {shlex.quote(PROFILE)}", COLUMNS=columns)
    assert proc.returncode == 0 and "SmolLM2-135M-Instruct" in proc.stdout


@pytest.mark.parametrize("args", [["inspect", PROFILE], ["inspect", PROFILE, "--json"], ["--version"]])
@pytest.mark.parametrize("where", [">/dev/full", ">&-"])
def test_an_output_with_nowhere_to_go_is_one_line_not_a_bug(args, where):
    if where == ">/dev/full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    proc = _shell(f"DAM {' '.join(shlex.quote(a) for a in args)} {where}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot write to standard output") and len(proc.stderr.splitlines()) == 1
    assert "internal error" not in proc.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly():
    proc = _shell(f"DAM inspect {shlex.quote(PROFILE)} | head -1; echo \"status ${{PIPESTATUS[0]}}\"")
    assert proc.stdout.splitlines()[0].startswith("profile") and proc.stdout.splitlines()[-1] == "status 1"
    assert proc.stderr == ""


def test_a_closed_standard_error_does_not_stop_the_work(tmp_path, tiny_model_dir):
    """Progress and log lines are best effort: `dam profile -q 2>&-` and `2>/dev/full` still write the profile."""
    for i, where in enumerate(["2>&-", "2>/dev/full"]):
        out = tmp_path / f"p{i}.safetensors"
        proc = _shell(f"DAM profile --recipe paper --model {shlex.quote(tiny_model_dir)} --pcl 16 --samples 1 "
                      f"-o {shlex.quote(str(out))} {where}")
        assert proc.returncode == 0 and out.exists(), (where, proc.returncode)


def test_clicks_usage_errors_are_one_line_naming_the_help():
    code, _, err = run_cli("inspect", PROFILE, "--lenght", "5")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No such option: --lenght" in err and "--length" in err and "dam inspect --help" in err
    code, _, err = run_cli("inspect", PROFILE, "--length", "1.5")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--length" in err and "dam inspect --help" in err
    code, _, err = run_cli("inpsect", PROFILE)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "inspect" in err and "`dam --help`" in err


def test_the_process_streams_are_restored_for_an_embedding_caller():
    """`prepare_streams` replaces only what is missing: a caller's own streams stay."""
    from dam_cli.cli.streams import prepare_streams

    before = (sys.stdout, sys.stderr)
    prepare_streams()
    assert (sys.stdout, sys.stderr) == before


def test_check_lines_stay_one_line_whatever_their_length(tmp_path):
    """`dam inspect --check` piped: `ok PATH` is one line even for a path wider than the terminal."""
    import shutil

    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    p = deep / "p.safetensors"
    shutil.copy(PROFILE, p)
    code, out, _ = run_cli("inspect", str(p), "--check", columns=80)
    assert code == 0 and out.splitlines() == [f"ok {p}"]


def test_a_stream_that_takes_only_ascii_gets_other_characters_escaped(monkeypatch):
    """An ASCII-only standard output (PYTHONIOENCODING=ascii, a C locale) writes "日" as an escape instead of
    failing mid-answer with an internal error; a UTF-8 stream is left as it is."""
    import io
    import sys as sys_

    from dam_cli.cli.streams import prepare_streams

    raw_out, raw_err = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="ascii")
    err = io.TextIOWrapper(raw_err, encoding="utf-8")
    monkeypatch.setattr(sys_, "stdout", out)
    monkeypatch.setattr(sys_, "stderr", err)
    prepare_streams()
    out.write("日本 ok\n")
    out.flush()
    err.write("日\n")
    err.flush()
    assert raw_out.getvalue() == b"\\u65e5\\u672c ok\n" and raw_err.getvalue() == "日\n".encode()


def test_an_interrupt_under_json_is_a_json_answer_too(monkeypatch, tmp_path):
    """Ctrl-C during a `--json` run: the line on stderr, and the same as {"error", "exit_code": 130} on stdout (it
    left stdout empty); without --json, stdout stays empty."""
    from helpers import SHIPPED_PROFILE

    from dam_cli.runtime import models

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupt)
    args = ["generate", "--profile", SHIPPED_PROFILE, "--prompt", "the cat", "-n", "1"]
    code, out, err = run_cli(*args, "--json")
    assert code == 130 and err.startswith("interrupted: stopped"), err
    assert json.loads(out) == {"error": err.strip(), "exit_code": 130}
    code, out, err = run_cli(*args)
    assert code == 130 and out == ""

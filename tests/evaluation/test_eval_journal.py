"""`dam eval`'s answer journal: a run cut off mid-way keeps its answers, `--resume` reuses exactly those and
gives the uninterrupted run's result; journals of another run, damaged ones and lost ones are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import cli_env, identity_profile, run_cli_subprocess

from dam_cli.errors import DamError, DamUsageError
from dam_cli.evaluation import run as run_module
from dam_cli.evaluation import suite_run
from dam_cli.evaluation.journal import AnswerJournal, check_journal, interrupted_note, journal_path
from dam_cli.evaluation.run import EvalRunConfig, run_eval
from dam_cli.runtime.models import model_identity

LENGTH = 320
STAMP = {"model": "m", "config": {"sink": 4, "split": "development"}}
ANSWER = suite_run.greedy_answer


def test_answers_round_trip_and_a_cut_last_line_is_made_again(tmp_path):
    path = str(tmp_path / "r.json.partial.jsonl")
    j = AnswerJournal(path, STAMP, resume=False)
    j.put(("suite", "full", 320, "vt", 0, 0), "x = 5")
    j.put(("suite", "dam", 320, "vt", 0, 0), "answer\nwith lines")
    j.close()
    with open(path, "a") as f:
        f.write('{"key": ["suite", "dam", 320, "cwe"')  # a kill mid-write
    again = AnswerJournal(path, STAMP, resume=True)
    assert again.get(("suite", "full", 320, "vt", 0, 0)) == "x = 5"
    assert again.get(["suite", "dam", 320, "vt", 0, 0]) == "answer\nwith lines"
    assert again.get(("suite", "dam", 320, "cwe", 0, 0)) is None and again.reused == 2
    again.put(("suite", "dam", 320, "cwe", 0, 0), "made again")  # after the cut line, which is gone
    again.close()
    third = AnswerJournal(path, STAMP, resume=True)
    assert third.get(("suite", "dam", 320, "cwe", 0, 0)) == "made again" and len(third.answers) == 3
    with pytest.raises(DamUsageError, match="another dam eval is writing"):  # one writer at a time
        AnswerJournal(path, STAMP, resume=True)
    third.close()
    # Without --resume (with --force) the journal starts over.
    fresh = AnswerJournal(path, STAMP, resume=False)
    assert fresh.get(("suite", "full", 320, "vt", 0, 0)) is None
    fresh.remove()
    assert not os.path.exists(path)


def test_a_full_disk_is_the_error_the_run_reports_not_a_failed_close(tmp_path):
    """The write that meets a full disk raises its own line; closing the journal afterwards (the run's cleanup)
    flushes the same bytes again and must not replace that line with another (it said "cannot write to standard
    output")."""
    import errno
    import io

    class Full(io.BytesIO):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.flush()

    j = AnswerJournal(str(tmp_path / "r.json.partial.jsonl"), STAMP, resume=False)
    j._file.close()
    j._file = Full()
    with pytest.raises(DamError, match="no space left"):
        j.put(("full", "passkey", 128, 0), "12345")
    j.close()  # nothing raised over the error above


def test_other_runs_and_damaged_journals_are_refused(tmp_path):
    path = str(tmp_path / "j.jsonl")
    j = AnswerJournal(path, STAMP, resume=False)
    j.put(("suite", "full", 320, "vt", 0, 0), "a")
    j.close()
    other = {"model": "m", "config": {"sink": 8, "split": "development"}}
    with pytest.raises(DamUsageError, match=r"written by a different evaluation \(sink differ\).*--force"):
        AnswerJournal(path, other, resume=True)
    with open(path) as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(DamError, match="damaged at line 2"):
        AnswerJournal(path, STAMP, resume=True)
    with open(path, "w") as f:
        f.write('{"something": "else"}\n')
    with pytest.raises(DamError, match="not a dam eval journal"):
        AnswerJournal(path, STAMP, resume=True)
    with open(path, "wb") as f:
        f.write(b'{"dam_eval_journal": 1}\n\xff\xfe\n')
    with pytest.raises(DamError, match="not UTF-8 text"):
        AnswerJournal(path, STAMP, resume=True)


def test_a_journal_that_is_a_link_is_never_followed(tmp_path):
    """`--force` would truncate a link's target: refused before anything loads and when opened."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = str(tmp_path / "r.json")
    os.symlink(target, journal_path(out))
    for resume, force in ((False, True), (True, False)):
        with pytest.raises(DamUsageError, match="is a symbolic link"):
            check_journal(out, resume, force)
        with pytest.raises(DamUsageError, match="is a symbolic link"):
            AnswerJournal(journal_path(out), STAMP, resume=resume)
    assert target.read_text() == "keep me\n"


def test_check_journal_before_anything_loads(tmp_path):
    out = str(tmp_path / "r.json")
    check_journal(None, False, False)
    check_journal(out, False, False)
    with pytest.raises(DamUsageError, match="--resume continues the run .* give the same --output"):
        check_journal(None, True, False)
    with pytest.raises(DamUsageError, match="no journal .* to go on from"):
        check_journal(out, True, False)
    AnswerJournal(journal_path(out), STAMP, resume=False).close()
    with pytest.raises(DamUsageError, match="unfinished run: add --resume .* or --force"):
        check_journal(out, False, False)
    check_journal(out, True, False)
    check_journal(out, False, True)
    assert interrupted_note(out) is None  # the fingerprint alone: nothing to go on from
    with open(journal_path(out), "wb") as f:
        f.write(b"\xff not a journal\nsecond line\n")
    assert interrupted_note(out) is None  # not ours: no advice about it
    long_name = str(tmp_path / ("a" * 250 + ".json"))  # fits, but its journal's name does not
    with pytest.raises(DamUsageError, match="journal's name .* is too long for the file system"):
        check_journal(long_name, False, False)
    os.unlink(journal_path(out))
    os.mkdir(journal_path(out))
    with pytest.raises(DamUsageError, match="not a regular file"):
        check_journal(out, False, False)


@pytest.fixture
def tiny_profile(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), "tiny")
    path = str(tmp_path / "p.safetensors")
    identity_profile(ident, 64).save(path)
    return path


def _counting(monkeypatch, stop_after: int | None = None) -> list:
    """Count the answers generated (4 tokens at most: CPU time); raise KeyboardInterrupt at call `stop_after`."""
    calls: list = []

    def spy(model, tokenizer, ids, max_new_tokens, device, stop=None, graph=False):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(len(ids))
        return ANSWER(model, tokenizer, ids, min(4, max_new_tokens), device, stop, graph)

    monkeypatch.setattr(suite_run, "greedy_answer", spy)
    return calls


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tiny_profile, tmp_path,
                                                                   monkeypatch):
    def cfg(out, **kw):
        return EvalRunConfig(profile=tiny_profile, model=tiny_model_dir, device="cpu", methods=("full", "dam"),
                             tasks=("vt", "fwe", "suite:passkey"), lengths=(LENGTH,), per_task=2, output=out, **kw)

    whole = str(tmp_path / "whole.json")
    calls = _counting(monkeypatch)
    want = run_eval(cfg(whole))
    assert len(calls) == 12 and want["resumed_answers"] == 0 and not os.path.exists(journal_path(whole))

    out = str(tmp_path / "cut.json")
    _counting(monkeypatch, stop_after=0)  # stopped before its first answer: no journal left to trip the next run
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg(out))
    assert not os.path.exists(journal_path(out))
    _counting(monkeypatch, stop_after=7)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg(out))
    assert not os.path.exists(out)
    assert interrupted_note(out) == (f"7 answer(s) kept in {journal_path(out)}: run the same command with --resume "
                                     "to go on from them")
    with pytest.raises(DamUsageError, match="unfinished run"):  # not lost by a plain rerun
        run_eval(cfg(out))
    with pytest.raises(DamUsageError, match=r"different evaluation \(sink differ\)"):
        run_eval(cfg(out, resume=True, sink=8))

    calls = _counting(monkeypatch)
    got = run_eval(cfg(out, resume=True))
    assert len(calls) == 5 and got["resumed_answers"] == 7
    assert got["suite"] == want["suite"] and got["density"] == want["density"]
    assert not os.path.exists(journal_path(out))
    with open(out) as f:
        assert json.load(f)["suite"] == want["suite"]


def test_a_resume_that_asks_for_other_answers_keeps_the_journal_and_says_so(tiny_model_dir, tiny_profile, tmp_path,
                                                                            monkeypatch):
    """A run resumed with other methods (or tasks, lengths) reuses what matches and keeps the earlier answers it
    did not ask for, saying so, where it once deleted them without a word."""
    from dam_cli.progress import NullReporter

    class Notes(NullReporter):
        def __init__(self):
            self.lines = []

        def log(self, msg):
            self.lines.append(msg)

        note = log  # the journal kept is a note (said under --json too)

    def cfg(out, methods, **kw):
        return EvalRunConfig(profile=tiny_profile, model=tiny_model_dir, device="cpu", methods=methods,
                             tasks=("vt",), lengths=(LENGTH,), per_task=2, output=out, **kw)

    out = str(tmp_path / "cut.json")
    _counting(monkeypatch, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg(out, ("full", "dam")))
    _counting(monkeypatch)
    notes = Notes()
    got = run_eval(cfg(out, ("dam",), resume=True), reporter=notes)
    assert os.path.exists(out) and os.path.exists(journal_path(out)), notes.lines
    assert any("were for methods, tasks or lengths this run did not ask for: it is kept" in m for m in notes.lines)
    assert got["resumed_answers"] == 1  # the one dam answer made before the stop


def test_the_cli_says_how_to_go_on(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from dam_cli.cli.app import app

    out = str(tmp_path / "r.json")

    def cut(cfg, reporter=None):
        j = AnswerJournal(journal_path(cfg.output), STAMP, resume=False)
        j.put(("suite", "full", 320, "vt", 0, 0), "a")
        j.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_eval", cut)
    got = CliRunner().invoke(app, ["eval", "--profile", str(tmp_path / "p"), "--tasks", "vt", "-o", out])
    assert got.exit_code != 0
    assert f"1 answer(s) kept in {journal_path(out)}: run the same command with --resume" in got.output


SLOW_AFTER = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
from dam_cli.evaluation import suite_run
real, marker, made = suite_run.greedy_answer, os.environ["DAM_TEST_MARKER"], []
def answer(*a, **k):
    if len(made) == 3:  # three answers in the journal: wait here for the signal
        open(marker, "w").close()
        time.sleep(120)
    made.append(1)
    return real(*a, **k)
suite_run.greedy_answer = answer
from dam_cli.cli.app import main
sys.argv = ["dam", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_dam_eval_says_how_to_go_on_and_resumes(tiny_model_dir, tiny_profile, tmp_path, sig, code):
    """The real command as its own process, stopped by a signal after three answers: exit 130 / 143, the journal
    keeps the three, stderr says how to go on; `--resume` then finishes with the uninterrupted run's suite."""
    args = ["eval", "--model", tiny_model_dir, "--profile", tiny_profile, "--tasks", "vt,fwe", "--lengths",
            str(LENGTH), "--per-task", "1", "--methods", "full,dam", "--device", "cpu", "--quiet"]
    out, marker = str(tmp_path / "r.json"), tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER, *args, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(DAM_TEST_MARKER=str(marker)))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and not os.path.exists(out)
    assert f"3 answer(s) kept in {journal_path(out)}: run the same command with --resume" in err
    r = run_cli_subprocess(*args, "-o", out, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(journal_path(out))
    whole = str(tmp_path / "whole.json")
    assert run_cli_subprocess(*args, "-o", whole, timeout=300).returncode == 0
    with open(out) as f, open(whole) as g:
        got, want = json.load(f), json.load(g)
    assert got["resumed_answers"] == 3 and want["resumed_answers"] == 0
    assert got["suite"] == want["suite"]

"""`dam profile` and `dam eval` option values, and `dam eval`'s outputs, checked before any loading.

Non-finite recipe values, seeds beyond 64 bits and negative counts are one line naming the flag
(exit 2); `--output` and `--png` are checked like every other output (`check_writable`) before the
evaluation, replaced only with `--force`; `--png` draws only the panels that have data. A damaged journal
(nested too deeply for the JSON parser included) is one line, with no advice to `--resume` from it; a journal
another run is writing is named so before anything loads.
"""

from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
from helpers import run_cli, run_cli_refusing_loads

from dam_cli.errors import DamError, DamUsageError


@pytest.fixture()
def dam(monkeypatch):
    """Run `dam ARGS` in-process: (exit code, stderr); a profile or model load fails the case (the options come
    first)."""
    return run_cli_refusing_loads(monkeypatch, "loaded before the options were checked")


def _usage_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


# ---- dam profile ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--tau", "nan", "--tau must be > 0 and finite"),
    ("--tau", "inf", "--tau must be > 0 and finite (the true mask is then causal), got inf"),
    ("--tau", "-inf", "--tau must be > 0 and finite"),
    ("--lam", "nan", "--lam must be a number from -3 to 3 (the Box-Cox lambda; paper: 0.5), got nan"),
    ("--lam", "inf", "--lam must be a number from -3 to 3"),
    ("--lam", "-inf", "--lam must be a number from -3 to 3"),
    ("--lam", "1e308", "--lam must be a number from -3 to 3"),
    ("--lam", "-5", "--lam must be a number from -3 to 3"),
    ("--mu", "nan", "--mu must be in (0, 1], got nan"),
    ("--mu", "inf", "--mu must be in (0, 1], got inf"),
    ("--pattern-mass", "nan", "--pattern-mass must be in (0, 1], got nan"),
    ("--pattern-mass", "inf", "--pattern-mass must be in (0, 1], got inf"),
    ("--seed", "-1", "--seed must be from 0 to 9,223,372,036,854,775,807 (2^63 - 1), got -1"),
    ("--seed", str(2**63), "--seed must be from 0 to 9,223,372,036,854,775,807 (2^63 - 1), got 9,223,372,036,854,"),
    ("--seed", str(2**70), "--seed must be from 0 to 9,223,372,036,854,775,807 (2^63 - 1), got 1,180,591,"),
])
@pytest.mark.parametrize("recipe", ["paper", "recommended"])
def test_profile_values_out_of_range_are_refused_before_loading(dam, tmp_path, flag, value, needle, recipe):
    code, err = dam("profile", "--quiet", "--recipe", recipe, "--model", "never-loaded", "--output",
                    str(tmp_path / "p.safetensors"), flag, value)
    _usage_line(code, err, needle)
    assert os.listdir(tmp_path) == []


def test_profile_largest_seed_is_accepted(dam, tmp_path):
    code, err = dam("profile", "--model", "never-loaded", "--output", str(tmp_path / "p.safetensors"),
                    "--seed", str(2**63 - 1), "--lam", "-0.5")
    assert "loaded before the options were checked" in err  # every option passed; the refusing loader ran


# ---- dam eval: counts -------------------------------------------------------------------------

EVAL = ["eval", "--profile", "never-read.safetensors", "--model", "never-loaded", "--device", "cpu"]


@pytest.mark.parametrize("flag,value,least,most", [
    ("--sink", "-5", 0, "1,024"), ("--sink", str(2**40), 0, "1,024"),
    ("--samples", "-1", 1, "10,000"), ("--samples", "0", 1, "10,000"), ("-n", "-3", 1, "10,000"),
    ("--samples", str(2**31 - 1), 1, "10,000"),  # once accepted: memory filled for minutes, no progress line
    ("--positions", "-2", 1, "2,147,483,647"), ("--positions", "0", 1, "2,147,483,647"),
    ("--rows", "-7", 1, "2,147,483,647"), ("--rows", "0", 1, "2,147,483,647"),
    ("--sample-start", "-4", 0, "2,147,483,647"),
])
def test_eval_counts_out_of_range_name_the_flag_before_loading(dam, flag, value, least, most):
    code, err = dam(*EVAL, flag, value)
    name = "--samples" if flag == "-n" else flag
    _usage_line(code, err, f"{name} must be from {least} to {most}, got {int(value):,}")
    code, err = dam(*EVAL, "--per-task", value)  # checked before loading too
    _usage_line(code, err, "--per-task must be from 1 to 10,000")


@pytest.mark.parametrize("flag,value", [("--lengths", "64,,128"), ("--lengths", "64,"), ("--depths", "0.1,,0.5"),
                                        ("--methods", "full,,dam")])
def test_an_empty_list_item_is_named_not_skipped(dam, flag, value):
    code, err = dam(*EVAL, flag, value)
    _usage_line(code, err, f"{flag} {value!r} has an empty item: give a comma-separated list like")


def test_eval_dtype_is_checked_before_loading(dam):
    code, err = dam(*EVAL, "--dtype", "float64")
    _usage_line(code, err, "unknown dtype 'float64': use auto, float32, float16 or bfloat16")
    code, err = dam(*EVAL, "--dtype", "bfloat16")  # allowed: on to the (refusing) loader
    assert "loaded before the options were checked" in err


def test_eval_sink_zero_is_a_valid_count(dam):
    code, err = dam(*EVAL, "--sink", "0")
    assert "loaded before the options were checked" in err


# ---- dam eval: --output and --png before the evaluation ---------------------------------------

@pytest.mark.parametrize("flag", ["--output", "--png"])
def test_eval_outputs_are_checked_before_the_evaluation(dam, tmp_path, flag):
    name = "r.json" if flag == "--output" else "r.png"
    code, err = dam(*EVAL, flag, str(tmp_path / "missing" / name))
    _usage_line(code, err, f"the folder of {flag}", "does not exist")
    code, err = dam(*EVAL, flag, str(tmp_path))
    _usage_line(code, err, f"{flag} {tmp_path} is a folder")
    old = tmp_path / name
    old.write_bytes(b"old results")
    code, err = dam(*EVAL, flag, str(old))
    _usage_line(code, err, f"{old} already exists: pass --force to replace it, or choose another {flag}")
    assert old.read_bytes() == b"old results"
    os.mkfifo(tmp_path / "fifo")
    code, err = dam(*EVAL, flag, str(tmp_path / "fifo"), "--force")
    _usage_line(code, err, "is a named pipe (FIFO), not a regular file")
    code, err = dam(*EVAL, flag, str(old), "--force")  # allowed: on to the (refusing) loader
    assert "loaded before the options were checked" in err
    assert sorted(os.listdir(tmp_path)) == ["fifo", name]  # nothing else was left behind


def test_eval_png_and_output_on_one_file_or_nothing_to_plot(dam, tmp_path):
    same = str(tmp_path / "r")
    code, err = dam(*EVAL, "--output", same, "--png", same)
    _usage_line(code, err, "--png and --output name the same file")
    code, err = dam(*EVAL, "--tasks", "recall", "--png", str(tmp_path / "r.png"))
    _usage_line(code, err, "--png plots only alignment, lines, passkey and the suite's tasks, and --tasks has none")
    assert os.listdir(tmp_path) == []
    for tasks in ("suite", "recall,niah_single"):  # the suite is drawn: on to the (refusing) loader
        code, err = dam(*EVAL, "--tasks", tasks, "--png", str(tmp_path / "r.png"))
        assert "loaded before the options were checked" in err
    assert os.listdir(tmp_path) == []


def test_run_eval_checks_its_output_before_loading(tmp_path):
    from dam_cli.evaluation.run import EvalRunConfig, run_eval

    old = tmp_path / "r.json"
    old.write_text("{}")
    with pytest.raises(DamUsageError, match="already exists: pass --force"):
        run_eval(EvalRunConfig(profile=str(tmp_path / "absent.safetensors"), model="never-loaded",
                               output=str(old)))
    assert old.read_text() == "{}"


def test_write_png_with_nothing_to_plot_writes_nothing(tmp_path):
    from dam_cli.cli.eval_png import write_png

    result = {"methods": ["full", "dam"], "lengths": [32], "alignment": {}, "retrieval": {},
              "recall": {"full": {"32": {"mean": 1.0}}}, "config": {"depths": [0.5]}}
    with pytest.raises(DamUsageError, match="nothing to plot"):
        write_png(result, str(tmp_path / "e.png"))
    assert os.listdir(tmp_path) == []


# ---- dam eval: a real run replacing its outputs with --force -----------------------------------

def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_eval_force_replaces_outputs_and_png_of_alignment_only_has_one_panel(tiny_model_dir, tiny_all_allowed_profile,
                                                                             tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    out.write_text("old")
    png.write_bytes(b"old")
    args = ["eval", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--device", "cpu", "--quick",
            "--methods", "full,dam", "--tasks", "alignment", "--lengths", "32", "--positions", "4", "--quiet",
            "--output", str(out), "--png", str(png), "--force"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert not [w for w in caught if "matplotlib" in w.filename or "legend" in str(w.message)], caught
    assert "legend" not in err and "No artists" not in err
    res = json.loads(out.read_text())
    assert res["config"]["tasks"] == ["alignment"] and set(res["alignment"]) == {"full", "dam"}
    assert res["dtype"] == "float32"  # the default on every device
    width, height = _png_size(png)  # one panel (about 4.2 x 3.6 inches at 110 dpi), not an empty second one
    assert 200 < width < 600 and 200 < height < 500, (width, height)
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.png"]


@pytest.mark.parametrize("args, needle", [
    (["--backend", "bogus"], "unknown --backend 'bogus'"),
    (["--backend", "triton", "--device", "cpu"], "--backend triton needs a CUDA GPU"),
])
def test_eval_backend_is_checked_before_anything_loads(dam, args, needle):
    _usage_line(*dam("eval", "-p", "p.safetensors", "--quick", *args), needle)


# ---- dam eval --resume: damaged journals -------------------------------------------------------

JOURNAL_HEAD = b'{"dam_eval_journal": 1, "fingerprint": {}}\n'
AN_ANSWER = b'{"key": ["suite", "full", 320, "vt", 0, 0], "output": "x"}\n'
DEEP = b"[" * 200_000 + b"]" * 200_000  # past the JSON parser's recursion limit


@pytest.mark.parametrize("data, needle", [
    (JOURNAL_HEAD + AN_ANSWER + DEEP + b"\n", "is damaged at line 3"),
    (DEEP + b"\n" + AN_ANSWER, "is damaged at line 1"),
])
def test_a_journal_nested_too_deeply_is_damaged(tmp_path, data, needle):
    """Before: RecursionError, an internal error."""
    from dam_cli.evaluation.journal import AnswerJournal

    path = tmp_path / "r.json.partial.jsonl"
    path.write_bytes(data)
    with pytest.raises(DamError, match=needle + ": delete it, or run with --force instead of --resume"):
        AnswerJournal(str(path), {}, resume=True)
    assert path.read_bytes() == data


@pytest.mark.parametrize("data, note", [
    (JOURNAL_HEAD + AN_ANSWER * 2, "2 answer(s) kept"),
    (JOURNAL_HEAD + AN_ANSWER * 2 + b'{"key": ["suite"', "2 answer(s) kept"),  # a cut last line is made again
    (JOURNAL_HEAD + AN_ANSWER + b"\xff\xfe\n", None),  # what --resume refuses gets no advice to --resume
    (JOURNAL_HEAD + AN_ANSWER + b"[1]\n", None),
    (JOURNAL_HEAD + AN_ANSWER + DEEP + b"\n", None),
    (DEEP + b"\n" + AN_ANSWER, None),
])
def test_the_note_to_resume_only_for_a_journal_resume_reads(tmp_path, data, note):
    from dam_cli.evaluation.journal import interrupted_note

    out = str(tmp_path / "r.json")
    (tmp_path / "r.json.partial.jsonl").write_bytes(data)
    got = interrupted_note(out)
    assert (got is None) if note is None else got.startswith(note), got


def test_resume_from_a_damaged_journal_is_one_line(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    """Before: the note "1 answer(s) kept ...: run the same command with --resume" came first, then the error
    saying that --resume cannot read that journal."""
    out = tmp_path / "r.json"
    journal = tmp_path / "r.json.partial.jsonl"
    journal.write_bytes(JOURNAL_HEAD + AN_ANSWER + b"\xff\xfe\n")
    code, _, err = run_cli("eval", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--device", "cpu",
                           "--quick", "--quiet", "--methods", "full", "--tasks", "passkey", "--lengths", "128",
                           "--output", str(out), "--resume")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: the journal {journal} is not UTF-8 text: delete it"), err
    assert sorted(os.listdir(tmp_path)) == ["r.json.partial.jsonl"]


def test_a_journal_another_run_is_writing_is_named_so_before_loading(tmp_path):
    """Before: "holds the answers of an unfinished run: add --resume ..., or --force", both of which were then
    refused because the run was still going."""
    from dam_cli.evaluation.journal import AnswerJournal, check_journal, journal_path

    out = str(tmp_path / "r.json")
    running = AnswerJournal(journal_path(out), {}, resume=False)
    try:
        for resume, force in ((False, False), (True, False), (False, True)):
            with pytest.raises(DamUsageError, match="another dam eval is writing .*: wait for it, or choose another"):
                check_journal(out, resume, force)
    finally:
        running.close()
    with pytest.raises(DamUsageError, match="holds the answers of an unfinished run: add --resume"):
        check_journal(out, False, False)  # the run stopped: its journal is an unfinished run's
    check_journal(out, True, False)


def test_eval_png_failing_after_the_run_keeps_the_results_and_says_so(tiny_model_dir, tiny_all_allowed_profile,
                                                                      tmp_path, monkeypatch):
    """The picture is written last: a disk that fills there leaves --output written and the table shown, and the one
    line says both (it once failed with the table unprinted and no word of the JSON it had replaced)."""
    import dam_cli.cli.eval_png as eval_png

    def full_disk(result, path, force=False):
        raise DamError(f"cannot write {path}: no space left on the device; free some space or choose another folder")

    monkeypatch.setattr(eval_png, "write_png", full_disk)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code, stdout, err = run_cli("eval", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--device",
                                "cpu", "--quick", "--methods", "full,dam", "--tasks", "alignment", "--lengths", "32",
                                "--positions", "4", "--quiet", "--output", str(out), "--png", str(png))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left" in err and f"{out} was written; only the picture is missing" in err, err
    assert json.loads(out.read_text())["config"]["tasks"] == ["alignment"] and not png.exists()
    assert "full" in stdout and "dam" in stdout  # the table came first


def test_an_options_profile_no_method_reads_is_noted(monkeypatch):
    from helpers import SHIPPED_PROFILE, run_cli_refusing_loads

    run = run_cli_refusing_loads(monkeypatch, "stop after the options")
    _, err = run("eval", "-p", SHIPPED_PROFILE, "--options-profile", SHIPPED_PROFILE, "--tasks", "alignment",
                 "--lengths", "64", "--methods", "full,dam")
    assert err.startswith("note: --options-profile is read by the *-options methods only: ignored with --methods "
                          "full,dam\n"), err
    _, err = run("eval", "-p", SHIPPED_PROFILE, "--options-profile", SHIPPED_PROFILE, "--tasks", "alignment",
                 "--lengths", "64", "--methods", "full,dam-options")
    assert "note:" not in err, err


def test_the_tables_never_cut_a_method_or_a_header_at_80_columns():
    """Four methods and both retrieval tasks at 80 columns (a redirected output's default): every method name and
    header whole (they once read "strea…" for both streaming rows, and "passk…")."""
    import io

    from rich.console import Console

    from dam_cli.cli.eval import table

    methods = ["streaming", "streaming-options", "dam", "dam-options"]
    per = {m: {"128": {"agreement": 0.91, "kl": 0.012, "ppl": 12.3}} for m in methods}
    result = {"model": "m", "profile": {"path": "p.safetensors", "pcl": 128}, "lengths": [128], "methods": methods,
              "alignment": per, "recall": {m: {"128": {"mean": 0.88}} for m in methods},
              "density": {m: {"128": 0.106} for m in methods}, "retrieval": {"lines": {}, "passkey": {}}}
    out = io.StringIO()
    Console(file=out, width=80).print(table(result))
    text = out.getvalue()
    assert "…" not in text and all(f" {m} " in text for m in methods) and "passkey" in text, text


def test_suite_options_with_no_suite_task_are_noted(monkeypatch):
    from helpers import SHIPPED_PROFILE, run_cli_refusing_loads

    run = run_cli_refusing_loads(monkeypatch, "stop after the options")
    _, err = run("eval", "-p", SHIPPED_PROFILE, "--tasks", "passkey", "--lengths", "256", "--split", "heldout-a",
                 "--prompt-form", "completion")
    err = err[err.find("note:"):]  # after the run's first progress line
    assert err.startswith("note: --split, --prompt-form choose the RULER-style suite's prompts, and no suite task is "
                          "asked for (--tasks passkey): ignored\n"), err
    _, err = run("eval", "-p", SHIPPED_PROFILE, "--tasks", "suite:passkey", "--lengths", "256", "--split", "heldout-a")
    assert "note:" not in err, err


def test_a_method_keeps_its_colour_in_every_picture_panel():
    """In `dam eval --png` a method is one colour in the retrieval, alignment and suite panels (orange was `dam` in
    one panel and `full passkey` in another); tasks differ by line style."""
    from dam_cli.cli import eval_png
    from dam_cli.inspection.png import agg_pyplot

    plt = agg_pyplot()
    methods = ["full", "dam", "streaming"]
    result = {"methods": methods, "lengths": [128, 256],
              "alignment": {m: {"128": {"agreement": 0.9}, "256": {"agreement": 0.8}} for m in methods},
              "retrieval": {"lines": {}, "passkey": {}}}
    fig, (a, b) = plt.subplots(1, 2)
    eval_png._retrieval_panel(a, result, ["lines", "passkey"])
    eval_png._alignment_panel(b, result, methods)
    from matplotlib.colors import to_hex

    by_label = {ln.get_label(): to_hex(ln.get_color()) for ax in (a, b) for ln in ax.get_lines()}
    for m in methods:
        assert by_label[f"{m} lines"] == by_label[f"{m} passkey"] == by_label[m], by_label
    assert len({by_label[m] for m in methods}) == 3
    plt.close(fig)

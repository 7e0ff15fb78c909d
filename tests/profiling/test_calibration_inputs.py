"""Hostile calibration paths and text: each is one DamError line, nothing blocks or reads without end.

FIFOs, sockets and devices (and symlinks to them) are never opened; text is read up to a cap;
non-UTF-8 text and pathological JSONL (deep nesting, huge integers, lone surrogates) are refused.
A SIGALRM guard turns a regression that would block on a FIFO into a failure instead of a hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket

import pytest

from dam_cli.errors import DamError
from dam_cli.profiling import calib
from dam_cli.text import human_bytes


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    def fail(signum, frame):
        raise AssertionError(f"blocked for {seconds} s (a FIFO or device was opened)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def documents(paths, text_field="text"):
    with no_hang():
        return list(calib.file_documents([str(p) for p in paths], text_field))


def refused(paths, *needles: str) -> str:
    with pytest.raises(DamError) as e:
        documents(paths)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_special_files_are_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    msg = refused([tmp_path / "pipe.txt"], "named pipe (FIFO)", "not a text file")
    assert "does not exist" not in msg
    _socket(tmp_path / "sock.txt")
    refused([tmp_path / "sock.txt"], "socket")
    refused(["/dev/zero"], "character device")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    refused([tmp_path / "zero.txt"], "character device")
    (tmp_path / "pipe-link.txt").symlink_to(tmp_path / "pipe.txt")
    refused([tmp_path / "pipe-link.txt"], "named pipe")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere")
    refused([tmp_path / "dangling.txt"], "broken symbolic link")
    refused([tmp_path / "missing.txt"], "does not exist")


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink to /dev/zero", "symlink to a fifo"])
def test_special_files_inside_a_folder_are_refused_before_reading(tmp_path, kind):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("the cat " * 10)
    bad = d / "b.txt"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "socket":
        _socket(bad)
    elif kind == "symlink to /dev/zero":
        bad.symlink_to("/dev/zero")
    else:
        os.mkfifo(tmp_path / "outside.fifo")
        bad.symlink_to(tmp_path / "outside.fifo")
    with no_hang():
        with pytest.raises(DamError, match="in folder .* remove it from the folder"):
            calib.calibration_files([str(d)])  # the listing alone refuses: nothing was read yet


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "real.txt").write_text("the cat")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    assert documents([tmp_path / "link.txt"]) == [(str(tmp_path / "link.txt"), "the cat")]


def test_text_is_read_up_to_a_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(calib, "MAX_TEXT_BYTES", 1000)
    (tmp_path / "ok.txt").write_text("x" * 1000)
    assert documents([tmp_path / "ok.txt"])[0][1] == "x" * 1000
    (tmp_path / "big.txt").write_text("x" * 1001)
    refused([tmp_path / "big.txt"], "the text of calibration file", "over the 1000 bytes cap")
    (tmp_path / "lines.jsonl").write_text('{"text": "short"}\n{"text": "' + "y" * 2000 + '"}\n')
    refused([tmp_path / "lines.jsonl"], "line 2 of calibration file", "cap")
    monkeypatch.undo()
    with open(tmp_path / "sparse.txt", "wb") as f:  # 300 MiB that take no disk: refused from its size alone
        f.truncate(300 * 2**20)
    refused([tmp_path / "sparse.txt"], f"over the {human_bytes(calib.MAX_TEXT_BYTES)} cap")


@pytest.mark.parametrize("name,data,needles", [
    ("latin1.txt", "caf\xe9".encode("latin-1"), ("is not UTF-8 text (byte 3)",)),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ("line 2 is not UTF-8 text",)),
    ("nested.jsonl", b"[" * 100_000 + b"\n", ("line 1 is JSON nested too deeply",)),
    ("nested-dict.jsonl", b'{"text": "a", "x": ' + b'{"y": ' * 100_000 + b"\n", ("nested too deeply",)),
    ("digits.jsonl", b'{"text": "a", "id": ' + b"7" * 5000 + b"}\n", ("a number of 5000 digits",)),
    ("surrogate.jsonl", b'{"text": "a \\ud800 b"}\n', ("invalid Unicode",)),
    ("notjson.jsonl", b'{"text": \n', ("line 1 is not JSON",)),
    ("nofield.jsonl", b'{"body": "a"}\n', ("no string field 'text'", "--text-field")),
])
def test_bad_text_is_one_line(tmp_path, name, data, needles):
    (tmp_path / name).write_bytes(data)
    refused([tmp_path / name], *needles)


def test_good_jsonl_still_reads_in_order(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 12345}\n\n{"text": "two"}\n')
    assert documents([tmp_path / "a.jsonl"]) == [(f"{tmp_path}/a.jsonl:1", "one"), (f"{tmp_path}/a.jsonl:3", "two")]


def test_calibration_paths_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    from dam_cli.profiling.run import ProfileConfig, run_profile
    from dam_cli.runtime import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    os.mkfifo(tmp_path / "pipe.txt")
    with no_hang(), pytest.raises(DamError, match="named pipe"):
        run_profile(ProfileConfig(output=str(tmp_path / "p.safetensors"), calib=(str(tmp_path / "pipe.txt"),)))


def test_a_file_named_twice_is_read_once_and_jsonl_is_known_in_any_case(tmp_path):
    """The same file given twice, or also inside a folder given, is one document (once calibrated on it twice,
    silently); `.JSONL` is JSON lines as `.jsonl` is (once read as raw text, braces and all)."""
    d = tmp_path / "cal"
    d.mkdir()
    (d / "a.txt").write_text("river stone garden. " * 10)
    (d / "b.JSONL").write_text('{"content": "harbor copper winter."}\n')
    paths = [str(d / "a.txt"), str(d / "a.txt"), str(tmp_path / "cal" / ".." / "cal" / "a.txt"), str(d)]
    assert calib.calibration_files(paths) == [str(d / "a.txt"), str(d / "b.JSONL")]  # the folder sorts first
    docs = dict(calib.file_documents([str(d / "b.JSONL")], "content"))
    assert docs == {f"{d / 'b.JSONL'}:1": "harbor copper winter."}


def test_the_reading_order_does_not_depend_on_how_paths_are_spelled(tmp_path, monkeypatch):
    """`b.txt a.txt`, `./b.txt a.txt`, an absolute path and a link read the files in one order (the files'
    resolved paths): the same windows, so the same masks (the raw strings once sorted ./b.txt before a.txt)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("river stone garden. " * 10)
    (tmp_path / "b.txt").write_text("harbor copper winter. " * 10)
    (tmp_path / "z-link.txt").symlink_to(tmp_path / "a.txt")
    orders = []
    for paths in (["b.txt", "a.txt"], ["./b.txt", "a.txt"], [str(tmp_path / "b.txt"), "a.txt"],
                  ["b.txt", "z-link.txt"]):
        files = calib.calibration_files(paths)
        orders.append([open(f).read() for f in files])
        assert calib.documents(paths, "text")[1] == ",".join(calib.given_order(paths))
    assert all(o == orders[0] for o in orders) and orders[0][0].startswith("river")
    assert calib.given_order(["./b.txt", "a.txt"]) == ["a.txt", "b.txt"]


def test_whitespace_alone_is_no_calibration_text(tiny_tokenizer):
    """A document of spaces and line breaks only gives no window (it once gave windows of newline tokens where an
    empty file was refused), so such a file meets the "too short" refusal."""
    windows, seen = calib.make_windows(tiny_tokenizer, [("blank.txt", "\n" * 1000 + " \t " * 50)], 8, 4)
    assert windows == [] and seen == 0
    windows, _ = calib.make_windows(tiny_tokenizer, [("blank.txt", "\n\n"), ("a.txt", "the cat sat on the mat " * 8)],
                                    8, 2)
    assert len(windows) == 2


def test_a_text_field_with_no_jsonl_file_is_noted(tmp_path, monkeypatch):
    from helpers import run_cli_refusing_loads

    (tmp_path / "a.txt").write_text("river stone garden. " * 10)
    run = run_cli_refusing_loads(monkeypatch, "stop after the options")
    _, err = run("profile", "--calib", str(tmp_path / "a.txt"), "--text-field", "body", "-o",
                 str(tmp_path / "p.safetensors"))
    assert err.startswith("note: --text-field names a field of JSON records, and no --calib file is JSON "
                          "(.jsonl, .json): --text-field body ignored\n"), err


def test_json_files_are_read_as_records_not_as_text(tmp_path):
    """A .json file is one record or a list of records (a dataset's export), read by its text field; JSON that is
    not records, or not JSON, is one line naming the file and the way out (rename it to calibrate on it as text)."""
    (tmp_path / "list.json").write_bytes(b'\xef\xbb\xbf[{"text": "river stone"}, {"text": "garden path", "id": 2}]')
    (tmp_path / "one.JSON").write_text('{"body": "old oak"}')
    docs = list(calib.file_documents([str(tmp_path / "list.json")]))
    assert docs == [(f"{tmp_path}/list.json:1", "river stone"), (f"{tmp_path}/list.json:2", "garden path")]
    assert list(calib.file_documents([str(tmp_path / "one.JSON")], text_field="body")) == [
        (str(tmp_path / "one.JSON"), "old oak")]
    for name, data, needle in [("bad.json", "{not json", "is not JSON: fix it, or rename it (.txt)"),
                               ("nums.json", "[1, 2]", "record 1 has no string field 'text'"),
                               ("field.json", '[{"text": "a"}, {"text": 3}]', "record 2 has no string field"),
                               ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
                               ("big.json", '{"text": 1' + "0" * 500 + "}", "a number of 501 digits")]:
        (tmp_path / name).write_text(data)
        with pytest.raises(DamError, match=".*".join(map(re.escape, needle.split("|")))) as e:
            list(calib.file_documents([str(tmp_path / name)]))
        assert "\n" not in str(e.value) and name in str(e.value)


def test_ndjson_a_byte_order_mark_and_linked_folders(tmp_path):
    """`.ndjson` is JSON lines as `.jsonl` is; a JSONL file may start with a byte-order mark; a folder linked inside
    a calibration folder is read (once, a link to a parent ends the walk)."""
    d = tmp_path / "cal"
    (d / "real").mkdir(parents=True)
    (d / "real" / "a.txt").write_text("river stone garden.")
    (d / "link").symlink_to(d / "real")
    (d / "loop").symlink_to(d)
    (d / "b.ndjson").write_bytes(b'\xef\xbb\xbf{"text": "harbor copper winter."}\n')
    docs = dict(calib.file_documents([str(d)]))
    assert list(docs.values()).count("river stone garden.") == 1 and "harbor copper winter." in docs.values()
    assert len(docs) == 2


def test_links_to_the_folder_or_above_are_not_walked_and_a_text_file_loses_its_byte_order_mark(tmp_path):
    """A link inside a calibration folder to a folder above it (`..`, `/`) would read the tree it sits in, or the
    whole file system: it is skipped, as a link to the folder itself is. A text file's byte-order mark is no text
    (it glued onto the first word as a token of its own)."""
    up = tmp_path / "up"
    (up / "sub").mkdir(parents=True)
    (up / "outside.txt").write_text("must not be read")
    (up / "sub" / "a.txt").write_bytes(b"\xef\xbb\xbfriver stone garden.")
    (up / "sub" / "parent").symlink_to("..")
    (up / "sub" / "root").symlink_to("/")
    docs = dict(calib.file_documents([str(up / "sub")]))
    assert docs == {str(up / "sub" / "a.txt"): "river stone garden."}


def test_short_first_documents_are_named_as_such(tiny_tokenizer, tmp_path):
    """Records shorter than the PCL, as many as --samples: more text further on would not be read, so the message
    says the documents are short and not joined (it said "add text")."""
    f = tmp_path / "short.jsonl"
    f.write_text("".join('{"text": "the cat is in the house ."}\n' for _ in range(50)))
    with pytest.raises(DamError, match=r"first 4 documents are all shorter than PCL 32 tokens .* not joined"):
        calib.load_calibration(tiny_tokenizer, [str(f)], 32, 4)

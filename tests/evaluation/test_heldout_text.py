"""`dam eval --text FILE`: the held-out text is read as UTF-8 from a regular file, and anything else is one line."""

from __future__ import annotations

import os

import pytest

from dam_cli.errors import DamError
from dam_cli.evaluation.heldout import heldout_tokens


@pytest.mark.parametrize("make, needle", [
    (lambda d: (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and d / "latin1.txt",
     "is not UTF-8 text (byte 3): convert it to UTF-8"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "is a folder, not a text file: give a regular text file"),
    (lambda d: d / "missing.txt", "missing.txt does not exist: check the path"),
    (lambda d: os.mkfifo(d / "fifo") or d / "fifo", "is a named pipe (FIFO), not a text file: give a regular"),
])
def test_a_text_that_cannot_be_read_as_utf8_is_one_line(tmp_path, tiny_tokenizer, make, needle):
    path = make(tmp_path)
    with pytest.raises(DamError) as e:
        heldout_tokens(tiny_tokenizer, 8, str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_utf8_text_file_gives_its_tokens(tmp_path, tiny_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("the café opens at nine. " * 20, encoding="utf-8")
    assert heldout_tokens(tiny_tokenizer, 8, str(f)) == tiny_tokenizer("the café opens at nine. " * 20,
                                                                       add_special_tokens=False).input_ids


def test_a_large_text_is_read_only_as_far_as_the_tokens_needed(tmp_path, tiny_tokenizer, monkeypatch):
    """A file far larger than the tokens asked for gives the same first tokens as the whole file, read in part;
    a multi-byte character at the cut is not taken for bad UTF-8."""
    from dam_cli.evaluation import heldout

    f = tmp_path / "big.txt"
    text = "the café opens at nine, ünd closes late. " * 40_000  # about 1.7 MB
    f.write_text(text, encoding="utf-8")
    read = []
    real = heldout._read_text_file
    monkeypatch.setattr(heldout, "_read_text_file", lambda p, limit: read.append(limit) or real(p, limit))
    want = tiny_tokenizer(text, add_special_tokens=False).input_ids[:300]
    got = heldout_tokens(tiny_tokenizer, 300, str(f))
    assert got == want and max(read) < len(text) // 4
    for cut in range(1 << 16, (1 << 16) + 4):  # every cut through "é" / "ü" near the first limit decodes
        body, whole = real(str(f), cut)
        assert not whole and text.startswith(body) and len(body.encode()) >= cut - 3


def test_a_text_of_few_tokens_per_byte_is_refused_after_a_bounded_read(tiny_tokenizer, tmp_path, monkeypatch):
    """A sparse file of NUL bytes (or one endless word) gives the tokenizer almost nothing: the read doubles only up
    to a cap, then one line says so (it read on to the whole 512 MiB, 6 GB of memory)."""
    from dam_cli.errors import DamError
    from dam_cli.evaluation import heldout

    monkeypatch.setattr(heldout, "MAX_TEXT_READ", 1 << 20)  # the same rule, a smaller cap for the test
    f = tmp_path / "sparse.txt"
    with open(f, "wb") as fh:
        fh.truncate(1 << 24)
    read = []
    real = heldout._read_text_file
    monkeypatch.setattr(heldout, "_read_text_file", lambda p, limit: read.append(limit) or real(p, limit))
    with pytest.raises(DamError, match="sparse.txt gives .* tokens in its first .*, fewer than the 300 asked for: it "
                                       "is not ordinary text"):
        heldout_tokens(tiny_tokenizer, 300, str(f))
    assert max(read) <= 2 << 20


def test_eval_says_a_missing_text_before_any_load(tmp_path, monkeypatch):
    from helpers import SHIPPED_PROFILE, run_cli_refusing_loads

    run = run_cli_refusing_loads(monkeypatch, "loaded before --text was checked")
    code, err = run("eval", "-p", SHIPPED_PROFILE, "--tasks", "alignment", "--lengths", "64", "--methods", "full",
                    "--text", str(tmp_path / "missing.txt"))
    assert code == 1 and err.count("\n") == 1 and "missing.txt does not exist: check the path" in err, err

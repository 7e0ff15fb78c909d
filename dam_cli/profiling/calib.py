"""Calibration text: where it comes from and how it becomes token windows.

Documents are taken in a documented, deterministic order: files in sorted path order (a folder
is walked recursively, sorted by relative path), JSONL files line by line. Each document is
tokenised as plain text with the tokenizer's default special tokens and cut into consecutive
windows of `L` tokens; a shorter last window still counts. The first `n` windows are used.

The built-in default needs no download and is identical on every machine with the same Python:
the English help topics that ship with the standard library (`pydoc_data.topics`), joined in
sorted topic order into one document (so long PCLs get full windows too).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from dam_cli.atomic import special_kind
from dam_cli.errors import DamError
from dam_cli.text import human_bytes, safe_text

DEFAULT_SOURCE = "builtin:pydoc_data.topics"
MAX_TEXT_BYTES = 256 * 2**20  # one calibration file or JSONL line; a calibration set needs far less
MAX_INT_DIGITS = 100  # integers in a JSONL record (ids, counts); a 5000-digit one is not calibration data


@dataclass(frozen=True)
class Calibration:
    """Token windows for profiling and their fingerprint."""

    windows: list[list[int]]  # at most L tokens each, in the documented order
    source: str  # what the text was (paths, or the built-in name)
    token_sha256: str  # sha256 over every window's length and token ids

    @property
    def lengths(self) -> list[int]:
        return [len(w) for w in self.windows]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def describe(self) -> dict:
        return {"source": self.source, "samples": len(self.windows), "tokens": self.tokens,
                "token_sha256": self.token_sha256}


def builtin_documents() -> Iterator[tuple[str, str]]:
    """One document: the standard library's pydoc topics joined in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - every CPython ships it
        raise DamError("this Python has no pydoc_data.topics: pass calibration text with --calib") from None
    yield DEFAULT_SOURCE, "\n\n".join(topics[k].strip() for k in sorted(topics))


def _files_under(path: str) -> list[str]:
    out = []
    top = os.path.realpath(path)
    visited = {top}  # linked folders are followed, each once; a link to the folder or above it (`..`, `/`) is not
    for root, dirs, files in os.walk(path, followlinks=True):
        real = {d: os.path.realpath(os.path.join(root, d)) for d in dirs if not d.startswith(".")}
        dirs[:] = [d for d, r in real.items() if r not in visited and not _contains(r, top)]
        visited.update(real.values())
        for f in files:
            if not f.startswith("."):
                out.append(os.path.join(root, f))
    return sorted(out, key=lambda p: os.path.relpath(p, path))


def _contains(folder: str, path: str) -> bool:
    """Whether resolved `path` is resolved `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _stat_mode(p: str, what: str) -> int:
    """`st_mode` of `p` (following symlinks), or a DamError saying why it cannot be read."""
    try:
        return os.stat(p).st_mode
    except FileNotFoundError:
        if os.path.islink(p):
            raise DamError(f"{what} {safe_text(p)} is a broken symbolic link: fix or remove it") from None
        raise DamError(f"{what} {safe_text(p)} does not exist: give text files, a folder or a JSONL file") from None
    except PermissionError:
        raise DamError(f"cannot read {what} {safe_text(p)}: permission denied") from None
    except OSError as e:
        raise DamError(f"cannot read {what} {safe_text(p)}: {e.strerror or e}") from None


def calibration_files(paths: list[str]) -> list[str]:
    """The regular files the calibration paths name, in the documented order; nothing is opened.

    FIFOs, sockets, devices (and symlinks to them) are refused, given directly or inside a folder.
    """
    files: list[str] = []
    seen: set[str] = set()  # a file named twice (or also inside a folder given) is read once
    for p in given_order(paths):
        mode = _stat_mode(p, "calibration path")
        if stat.S_ISDIR(mode):
            for f in _files_under(p):
                fmode = _stat_mode(f, "calibration file")
                if not stat.S_ISREG(fmode):
                    raise DamError(f"calibration file {safe_text(f)} in folder {safe_text(p)} is a "
                                   f"{special_kind(fmode)}, not a text file: remove it from the folder")
                _add_once(files, seen, f)
        elif stat.S_ISREG(mode):
            _add_once(files, seen, p)
        else:
            raise DamError(f"calibration path {safe_text(p)} is a {special_kind(mode)}, not a text file: "
                           "give text files, a folder or a JSONL file")
    return files


def given_order(paths: list[str]) -> list[str]:
    """The calibration paths as read: `~` expanded, `./` and `a/../` spellings dropped, in the order of the files they
    name (their resolved paths), so `b.txt`, `./b.txt` and a link to it read the same text in the same place."""
    norm = [os.path.normpath(os.path.expanduser(x)) for x in paths]
    return sorted(norm, key=lambda p: (os.path.realpath(p), p))


def _add_once(files: list[str], seen: set[str], f: str) -> None:
    real = os.path.realpath(f)
    if real not in seen:
        seen.add(real)
        files.append(f)


def is_jsonl(f: str) -> bool:
    """Whether a calibration file is read as JSON lines: its name ends in .jsonl or .ndjson, in any case."""
    return f.lower().endswith((".jsonl", ".ndjson"))


def is_json(f: str) -> bool:
    """Whether a calibration file is read as one JSON document (records with a text field): its name ends in .json."""
    return f.lower().endswith(".json")


def _json_records(f: str, data: bytes, text_field: str) -> Iterator[tuple[str, str]]:
    """(name, text) of a .json file: one object with the text field, or a list of them (a dataset's export);
    anything else is one DamError line."""
    where = safe_text(f)
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamError(f"{where} is not UTF-8 text (byte {e.start}): convert the file to UTF-8") from None
    doc = _loads(text, where, "calibration records", "fix the file",
                 "fix it, or rename it (.txt) to calibrate on it as plain text")
    records = doc if isinstance(doc, list) else [doc]
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise DamError(f"{where} record {n} has no string field {safe_text(repr(text_field))}: a .json "
                           "calibration file holds an object or a list of objects with a text field (--text-field "
                           "names it); rename it (.txt) to calibrate on it as plain text")
        yield (f"{f}:{n}" if isinstance(doc, list) else f), _valid_unicode(rec[text_field], f"{where} record {n}")


def open_regular(f: str, what: str = "calibration file"):
    """Open `f` for reading in binary, refusing anything that is not (or no longer) a regular file: a FIFO is
    never waited on (non-blocking open), a folder or device is named. `what` names the file in messages."""
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise DamError(f"cannot read {what} {safe_text(f)}: permission denied; make it readable or give another "
                       "file") from None
    except FileNotFoundError:
        raise DamError(f"{what} {safe_text(f)} does not exist: check the path") from None
    except OSError as e:
        raise DamError(f"cannot read {what} {safe_text(f)}: {e.strerror or e}; check the path") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # a special file, or replaced between the listing and the open
        os.close(fd)
        kind = "folder" if stat.S_ISDIR(mode) else special_kind(mode)
        raise DamError(f"{what} {safe_text(f)} is a {kind}, not a text file: give a regular text file")
    return os.fdopen(fd, "rb")


def _too_big(f: str, where: str) -> DamError:
    return DamError(f"{where} of calibration file {safe_text(f)} is over the {human_bytes(MAX_TEXT_BYTES)} cap "
                    "on one document: split it into smaller files or records")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _HugeNumber(len(text))
    return int(text)


class _HugeNumber(ValueError):
    pass


def _loads(text: str, where: str, what: str, fix: str, not_json_fix: str):
    """`text` parsed as JSON (integers of at most `MAX_INT_DIGITS` digits); a failure is one DamError line about
    `where`: `what` it should have been, `fix` for hostile nesting, `not_json_fix` for text that is not JSON."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except _HugeNumber as e:
        raise DamError(f"{where} holds a number of {e.args[0]} digits (the limit is {MAX_INT_DIGITS}): "
                       f"not {what}") from None
    except RecursionError:
        raise DamError(f"{where} is JSON nested too deeply (hostile or corrupt): {fix}") from None
    except ValueError:
        raise DamError(f"{where} is not JSON: {not_json_fix}") from None


def _jsonl_record(f: str, n: int, raw: bytes, text_field: str) -> str | None:
    """The text field of line `n` of a JSONL file, None for a blank line, or a one-line DamError."""
    where = f"{safe_text(f)} line {n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamError(f"{where} is not UTF-8 text (byte {e.start}): convert the file to UTF-8") from None
    if not line.strip():
        return None
    rec = _loads(line, where, "a calibration record", "fix or remove the line",
                 "fix the line, or pass the file as plain text")
    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
        raise DamError(f"{where} has no string field {safe_text(repr(text_field))}: use --text-field to name it")
    return _valid_unicode(rec[text_field], where)


def _valid_unicode(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as a JSON escape
        raise DamError(f"{where} holds invalid Unicode (an unpaired surrogate): fix the text") from None
    return text


def file_documents(paths: list[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) of the given files and folders: sorted path order, JSONL line by line, a .json file record by
    record (`_json_records`), every other file as plain text.

    Each plain file, and each JSONL line, is read up to `MAX_TEXT_BYTES`; beyond is refused.
    """
    for f in calibration_files(paths):
        with open_regular(f) as fh:
            if is_jsonl(f):
                for n, raw in enumerate(iter(lambda: fh.readline(MAX_TEXT_BYTES + 1), b""), 1):
                    if len(raw) > MAX_TEXT_BYTES:
                        raise _too_big(f, f"line {n}")
                    if n == 1:
                        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (Windows editors write one)
                    text = _jsonl_record(f, n, raw, text_field)
                    if text is not None:
                        yield f"{f}:{n}", text
            else:
                if os.fstat(fh.fileno()).st_size > MAX_TEXT_BYTES:
                    raise _too_big(f, "the text")
                data = fh.read(MAX_TEXT_BYTES + 1)
                if len(data) > MAX_TEXT_BYTES:  # grew while being read
                    raise _too_big(f, "the text")
                if is_json(f):
                    yield from _json_records(f, data, text_field)
                    continue
                try:
                    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")  # a byte-order mark is no text
                except UnicodeDecodeError as e:
                    raise DamError(f"{safe_text(f)} is not UTF-8 text (byte {e.start}): remove it from the "
                                   "calibration set or convert it") from None
                yield f, text


def fingerprint(windows: list[list[int]]) -> str:
    """sha256 over each window's length then its token ids (little-endian int64)."""
    h = hashlib.sha256()
    for w in windows:
        h.update(struct.pack("<q", len(w)))
        h.update(struct.pack(f"<{len(w)}q", *w))
    return h.hexdigest()


def make_windows(tokenizer, documents, L: int, n_samples: int) -> tuple[list[list[int]], int]:
    """Cut documents into consecutive windows of L tokens; the first `n_samples` windows.

    Returns (windows, tokens seen). Tokenisation stops once enough windows exist.
    """
    windows: list[list[int]] = []
    seen = 0
    for _, text in documents:
        if not text or text.isspace():  # nothing but spaces and line breaks: no calibration text
            continue
        ids = _document_ids(tokenizer, text, (n_samples - len(windows)) * L)
        seen += len(ids)
        for s in range(0, len(ids), L):
            windows.append([int(t) for t in ids[s : s + L]])
            if len(windows) >= n_samples:
                return windows, seen
    return windows, seen


PREFIX_MARGIN = 1024  # tokens past the last one used when a long document is tokenized in part


def _document_ids(tokenizer, text: str, needed: int) -> list[int]:
    """A document's token ids, at least the first `needed` as tokenizing it whole gives them. A document far longer
    than that is tokenized in part first (a tokenizer holds about 170 bytes of state per byte of text: a 256 MiB
    file would need some 40 GiB), kept when the part yields `PREFIX_MARGIN` tokens beyond those needed, so that
    the cut, and any token it splits, lies well past them."""
    cut = max(1 << 20, 32 * needed)
    if len(text) > cut:
        ids = tokenizer(text[:cut], add_special_tokens=True)["input_ids"]
        if len(ids) >= needed + PREFIX_MARGIN:
            return ids[:needed]
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def documents(paths: list[str] | None, text_field: str = "text"):
    """(documents, source): the files under `paths`, or the built-in text when none are given."""
    if paths:
        return file_documents(paths, text_field), ",".join(given_order(paths))
    return builtin_documents(), DEFAULT_SOURCE


def load_calibration(tokenizer, paths: list[str] | None, L: int, n_samples: int,
                     text_field: str = "text") -> Calibration:
    """The calibration windows for a profile, or a DamError when the text is empty or too short.

    At least one window must reach the full `L` tokens, so every position below L has data.
    """
    if n_samples < 1:
        raise DamError(f"--samples must be at least 1, got {n_samples}")
    docs, source = documents(paths, text_field)
    windows, seen = make_windows(tokenizer, docs, L, n_samples)
    if not windows:
        raise DamError(f"the calibration text is empty: 0 tokens found in {source}; give text with --calib")
    longest = max(len(w) for w in windows)
    if longest < L:
        if len(windows) >= n_samples:  # the first documents were all short: more text would not be read
            raise DamError(f"the calibration text's first {len(windows)} documents are all shorter than PCL {L} "
                           f"tokens (the longest {longest}; documents, files or JSONL records, are not joined): give "
                           f"documents of at least {L} tokens first, or lower --pcl")
        raise DamError(f"the calibration text is too short: {seen} tokens found, longest window {longest}; "
                       f"PCL {L} needs a document of at least {L} tokens: add text or lower --pcl")
    return Calibration(windows=windows, source=source, token_sha256=fingerprint(windows))

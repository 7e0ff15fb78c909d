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
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from dam_cli.errors import DamError

DEFAULT_SOURCE = "builtin:pydoc_data.topics"


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
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith("."):
                out.append(os.path.join(root, f))
    return sorted(out, key=lambda p: os.path.relpath(p, path))


def file_documents(paths: list[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) of the given files and folders: sorted path order, JSONL line by line."""
    files: list[str] = []
    for p in sorted(os.path.expanduser(x) for x in paths):
        if os.path.isdir(p):
            files.extend(_files_under(p))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DamError(f"calibration path {p} does not exist: give text files, a folder or a JSONL file")
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                if f.endswith(".jsonl"):
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            raise DamError(f"{f} line {n} is not JSON: fix the line, or pass the file as plain text") from None
                        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                            raise DamError(f"{f} line {n} has no string field {text_field!r}: use --text-field to name it")
                        yield f"{f}:{n}", rec[text_field]
                else:
                    yield f, fh.read()
        except UnicodeDecodeError:
            raise DamError(f"{f} is not UTF-8 text: remove it from the calibration set or convert it") from None
        except PermissionError:
            raise DamError(f"cannot read calibration file {f}: permission denied") from None


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
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        seen += len(ids)
        for s in range(0, len(ids), L):
            windows.append([int(t) for t in ids[s : s + L]])
            if len(windows) >= n_samples:
                return windows, seen
    return windows, seen


def documents(paths: list[str] | None, text_field: str = "text"):
    """(documents, source): the files under `paths`, or the built-in text when none are given."""
    if paths:
        return file_documents(paths, text_field), ",".join(sorted(os.path.expanduser(p) for p in paths))
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
        raise DamError(f"the calibration text is too short: {seen} tokens found, longest window {longest}; "
                       f"PCL {L} needs a document of at least {L} tokens: add text or lower --pcl")
    return Calibration(windows=windows, source=source, token_sha256=fingerprint(windows))

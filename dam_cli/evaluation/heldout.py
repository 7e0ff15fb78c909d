"""The held-out text of `dam eval`'s alignment and recall: built in, or read from a file.

The built-in text is the docstrings of a fixed list of standard-library modules and their public
members, disjoint from `dam profile`'s default calibration text (pydoc topics).
"""

from __future__ import annotations

from dam_cli.errors import DamError

HELDOUT_MODULES = ("argparse", "collections", "difflib", "fractions", "functools", "heapq", "inspect",
                   "itertools", "json", "logging", "pathlib", "re", "statistics", "string",
                   "textwrap", "typing", "unittest", "zipfile", "decimal", "email.message",
                   "urllib.parse", "subprocess", "threading", "shutil", "tarfile", "datetime")


def heldout_text() -> str:
    """Built-in held-out text: docstrings of a fixed list of stdlib modules and their public members.

    Disjoint from the profiling default (pydoc topics); same Python version, same text.
    """
    import importlib
    import inspect as _inspect

    parts = []
    for name in HELDOUT_MODULES:
        mod = importlib.import_module(name)
        doc = _inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            d = _inspect.getdoc(obj)
            if d and len(d) > 80:
                parts.append(f"{attr}: {d}")
    return "\n\n".join(parts)


def heldout_tokens(tokenizer, needed: int, text: str | None = None) -> list[int]:
    """At least `needed` token ids of held-out text (a file's text when `text` is a path)."""
    if text is not None:
        ids = _file_tokens(tokenizer, text, needed)
    else:
        ids = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    if len(ids) < needed:
        raise DamError(f"the held-out text has {len(ids)} tokens, fewer than the longest length {needed}: "
                       "pass a longer --text file or shorter --lengths")
    return ids


MAX_TEXT_READ = 1 << 26  # bytes of a --text file read in search of enough tokens (ordinary text: 4 bytes a token)


def _file_tokens(tokenizer, path: str, needed: int) -> list[int]:
    """The token ids of a `--text` file, read only as far as `needed` tokens take (a start of 16 bytes a token,
    doubled while short), so a file of any size costs the memory of what is used."""
    limit, most = max(1 << 16, 16 * needed), max(MAX_TEXT_READ, 256 * needed)
    while True:
        body, whole = _read_text_file(path, limit)
        ids = tokenizer(body, add_special_tokens=False).input_ids
        if whole or len(ids) > needed + 16:  # a margin past the cut: the last word may be split there
            return ids if whole else ids[:needed]
        if limit >= most:  # bytes that make few tokens (NULs, one long run): not prose, and never ending
            from dam_cli.text import human_bytes, safe_text

            raise DamError(f"the held-out text {safe_text(path)} gives {len(ids):,} tokens in its first "
                           f"{human_bytes(limit)}, fewer than the {needed:,} asked for: it is not ordinary text; "
                           "give a text file")
        limit *= 2


def _read_text_file(path: str, limit: int) -> tuple[str, bool]:
    """(text, whole): up to `limit` bytes of a regular file's UTF-8 text (`--text`), cut at a character boundary,
    and whether that is the whole file. A folder, FIFO or device, unreadable or non-UTF-8 bytes: one DamError."""
    from dam_cli.profiling.calib import open_regular
    from dam_cli.text import safe_text

    with open_regular(path, "held-out text") as f:
        raw = f.read(limit + 1)
    whole = len(raw) <= limit
    raw = raw[:limit]
    try:
        return raw.decode("utf-8"), whole
    except UnicodeDecodeError as e:
        if not whole and e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
            return raw[: e.start].decode("utf-8"), False  # a character cut by the limit
        raise DamError(f"held-out text {safe_text(path)} is not UTF-8 text (byte {e.start}): "
                       "convert it to UTF-8") from None

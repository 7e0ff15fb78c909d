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
        body = _read_text_file(text)
    else:
        body = heldout_text()
    ids = tokenizer(body, add_special_tokens=False).input_ids
    if len(ids) < needed:
        raise DamError(f"the held-out text has {len(ids)} tokens, fewer than the longest length {needed}: "
                       "pass a longer --text file or shorter --lengths")
    return ids


def _read_text_file(path: str) -> str:
    """The UTF-8 text of a regular file (`--text`); a folder, FIFO or device, unreadable or non-UTF-8 bytes: one
    DamError line."""
    import os
    import stat

    from dam_cli.text import safe_text

    p = safe_text(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise DamError(f"held-out text {p} is not a regular file: give a UTF-8 text file to --text")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DamError(f"cannot read held-out text {p}: {safe_text(e.strerror or e)}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamError(f"held-out text {p} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None

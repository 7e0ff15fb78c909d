"""`dam eval`'s answer journal: every generated answer kept as it is made, so that a cut-off run can go on.

With `--output OUT`, each answer of the suite and of the retrieval prompts is appended, as soon as it is
generated, to `OUT.partial.jsonl` beside the output (one JSON line; the file's first line is the run's
fingerprint). A run that stops early (Ctrl-C, SIGTERM, a `timeout`, running out of memory) leaves the journal;
the same command with `--resume` reuses every answer in it whose fingerprint matches and generates only the
rest. Greedy answers are deterministic, so the result equals an uninterrupted run's (less the seconds, which
count this run's work). The journal is removed once the output is written.

The fingerprint holds what decides an answer apart from the prompt's own key: the model (its spec and
configuration digest), the profiles' bytes, the device kind, the dtype and the evaluation's settings (not the
lists of methods, lengths and prompts: those are part of each answer's key, so a run can add methods or lengths
to a journal). A journal of another run is refused, as is a damaged line (a last line cut off mid-write by a kill,
without its newline, is dropped). The journal is opened without following a symbolic link and locked while a run
writes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from dam_cli.atomic import name_max, output_error
from dam_cli.errors import DamError, DamUsageError
from dam_cli.text import safe_text

FORMAT = 1
SUFFIX = ".partial.jsonl"
MAX_BYTES = 1 << 30  # a journal larger than this is not one dam eval wrote: refused, not read into memory
# Settings that list what is run rather than how: left out of the fingerprint (each answer's key holds them).
_LISTS = ("methods", "lengths", "tasks", "suite_tasks", "per_task", "depths", "samples", "sample_start",
          "align_positions", "recall_rows")


_LOCKED = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's answers when another run holds the lock


def _in_use(p: str) -> DamUsageError:
    return DamUsageError(f"another dam eval is writing {p}: wait for it, or choose another --output")


def _locked(path: str) -> bool:
    """Whether a run is writing the journal `path` now (it holds `AnswerJournal`'s lock); False where the platform
    has no such locks."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when closed
    except OSError as e:
        return e.errno in _LOCKED
    finally:
        os.close(fd)
    return False


def journal_path(output: str) -> str:
    """The journal beside `output`."""
    return output + SUFFIX


def file_digest(path: str | None) -> str | None:
    """sha256 of a file's bytes (None for no file)."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*, model: str | None, identity: dict, profile: str, options_profile: str | None, device: str,
                dtype: str, config: dict) -> dict:
    """What decides an answer beside its key (see the module's docstring); JSON-serialisable."""
    return {"model": model, "model_config_sha256": identity.get("config_sha256"), "model_name": identity.get("name"),
            "profile_sha256": file_digest(profile), "options_profile_sha256": file_digest(options_profile),
            "device": device.split(":")[0], "dtype": dtype,
            "config": {k: v for k, v in sorted(config.items()) if k not in _LISTS}}


def _canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists), for comparing a fingerprint with a stored one."""
    return json.loads(json.dumps(value))


class NullJournal:
    """No journal (`dam eval` without `--output`, and the library's `evaluate`): nothing kept, nothing reused."""

    reused = 0

    def get(self, key: tuple) -> str | None:
        return None

    def put(self, key: tuple, output: str) -> None:
        pass


class AnswerJournal:
    """The journal of one run: `get(key)` an answer kept by an earlier run, `put(key, output)` a new one."""

    def __init__(self, path: str, stamp: dict, resume: bool):
        self.path = path
        self.stamp = _canonical(stamp)
        self.answers: dict[str, str] = {}
        self.reused = 0
        self._kept: set[str] = set()  # the answers an earlier run left, not yet asked for by this one
        self._file: BinaryIO | None = None
        p = safe_text(path)
        try:  # never through a symbolic link (`--force` would truncate its target), never a second writer
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DamUsageError(f"{p} (--output's journal) is a symbolic link: remove it, or choose another "
                                    "--output") from None
            raise output_error(path, e) from None
        self._file = os.fdopen(fd, "r+b")
        try:
            self._lock(p)
            st = os.fstat(fd)
            size = st.st_size
            if not stat.S_ISREG(st.st_mode):
                raise DamUsageError(f"{p} (--output's journal) is not a regular file: move it away")
            if resume and size > MAX_BYTES:
                raise DamError(f"the journal {p} is {size:,} bytes, more than any evaluation writes "
                               f"({MAX_BYTES:,}): delete it, or run with --force instead of --resume to start over")
            if resume and size:
                try:
                    data = self._file.read()
                    whole = data.rfind(b"\n") + 1  # a last line without its newline was cut off by a kill:
                    if whole < len(data):  # dropped (that answer is made again), so that appends follow a whole line
                        self._file.truncate(whole)
                    text = data[:whole].decode("utf-8")
                except UnicodeDecodeError:
                    raise DamError(f"the journal {p} is not UTF-8 text: delete it, or run with --force instead of "
                                   "--resume to start over") from None
                except OSError as e:
                    raise DamError(f"cannot read the journal {p} ({e.strerror or e}): delete it, or run without "
                                   "--resume") from None
                self._read(text)
                self._kept = set(self.answers)
            if not self.answers:  # a new journal: the fingerprint first
                self._file.seek(0)
                self._file.truncate()
                self._write({"dam_eval_journal": FORMAT, "fingerprint": self.stamp})
            else:
                self._file.seek(0, os.SEEK_END)
        except BaseException:
            self.close()
            raise

    def _lock(self, p: str) -> None:
        """An advisory lock for this run's life (where the platform has one): two runs never write one journal."""
        try:
            import fcntl
        except ImportError:
            return
        assert self._file is not None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _LOCKED:
                raise _in_use(p) from None

    def _read(self, text: str) -> None:
        p = safe_text(self.path)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
                raise DamError(f"the journal {p} is damaged at line {i + 1}: delete it, or run with --force "
                               "instead of --resume to start over") from None
        head = rows[0] if rows else None
        if not isinstance(head, dict) or head.get("dam_eval_journal") != FORMAT:
            raise DamError(f"{p} is not a dam eval journal of this version: delete it, or run with --force instead "
                           "of --resume to start over")
        if head.get("fingerprint") != self.stamp:
            old = head.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(self.stamp) if old.get(k) != self.stamp.get(k))
            if "config" in diff:
                cfg_old, cfg_new = old.get("config") or {}, self.stamp["config"]
                diff.remove("config")
                diff += sorted(k for k in set(cfg_old) | set(cfg_new) if cfg_old.get(k) != cfg_new.get(k))
            raise DamUsageError(f"the journal {p} was written by a different evaluation ({', '.join(diff)} "
                                "differ): run the same command as before with --resume, or use --force to start "
                                "over")
        for row in rows[1:]:
            if not _is_answer(row):
                raise DamError(f"the journal {p} holds a line that is not an answer: delete it, or run with --force "
                               "instead of --resume to start over")
            self.answers[json.dumps(row["key"])] = row["output"]

    def _write(self, row: dict) -> None:
        assert self._file is not None
        try:
            self._file.write((json.dumps(row, sort_keys=True) + "\n").encode("utf-8"))
            self._file.flush()  # in the OS's hands: a killed process loses nothing written
        except OSError as e:
            raise output_error(self.path, e) from None

    def get(self, key: tuple) -> str | None:
        k = json.dumps(_canonical(list(key)))
        out = self.answers.get(k)
        if out is not None:
            self.reused += 1
            self._kept.discard(k)
        return out

    @property
    def unused(self) -> int:
        """Answers an earlier run left that this run never asked for (other methods, tasks or lengths)."""
        return len(self._kept)

    def put(self, key: tuple, output: str) -> None:
        k = _canonical(list(key))
        self.answers[json.dumps(k)] = output
        self._write({"key": k, "output": output})

    def close(self) -> None:
        """Close the file. A failed flush of the last line (a full disk, whose error the failed write raised
        already) is not raised again over that error: `--resume` answers that line anew."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def remove(self) -> None:
        """The output is written: the journal has done its work."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise output_error(self.path, e) from None


def kept_or_made(journal, keys: list[tuple], items: list, active, make: Callable[[Any], str]) -> Iterator[str]:
    """The answer to each of `items` (its key in `keys`) in turn: the one `journal` kept, else `make(item)`, written
    to the journal at once and made inside the context manager `active` (the model on its method), which is
    entered only when some answer is missing."""
    kept = [journal.get(k) for k in keys]
    with active if None in kept else contextlib.nullcontext():
        for item, key, text in zip(items, keys, kept, strict=True):
            if text is None:
                text = make(item)
                journal.put(key, text)
            yield text


def check_journal(output: str | None, resume: bool, force: bool) -> None:
    """Before anything loads: `--resume` needs `--output`; an existing journal is neither lost nor mixed up
    (without `--resume` it is replaced only with `--force`)."""
    if output is None:
        if resume:
            raise DamUsageError("--resume continues the run that wrote --output's journal: give the same --output")
        return
    path = journal_path(output)
    folder, name = os.path.split(os.path.abspath(path))
    if len(os.fsencode(name)) > name_max(folder):
        raise DamUsageError(f"--output {safe_text(output)}: its journal's name ({safe_text(name)}) is too long for "
                            f"the file system; choose an --output name at least {len(SUFFIX)} bytes shorter")
    if os.path.islink(path):
        raise DamUsageError(f"{safe_text(path)} (--output's journal) is a symbolic link: remove it, or choose "
                            "another --output")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise DamUsageError(f"{safe_text(path)} (--output's journal) exists and is not a regular file: move it away")
    if os.path.exists(path) and _locked(path):  # not "an unfinished run": --resume and --force would be refused
        raise _in_use(safe_text(path))
    if resume and not os.path.exists(path):
        raise DamUsageError(f"--resume: there is no journal {safe_text(path)} to go on from; run without --resume")
    if os.path.exists(path) and not resume and not force:
        raise DamUsageError(f"{safe_text(path)} holds the answers of an unfinished run: add --resume to go on from "
                            "them, or --force to start over")


def _is_answer(row: Any) -> bool:
    """Whether a journal line (after the first) is an answer as `put` writes it."""
    return isinstance(row, dict) and isinstance(row.get("key"), list) and isinstance(row.get("output"), str)


def interrupted_note(output: str | None) -> str | None:
    """One line for a run cut off with a journal of answers: how many it keeps and how to go on (None without
    one: no --output, no journal, no answer in it, or a file that `--resume` would refuse: not a journal of this
    version, or damaged)."""
    if output is None:
        return None
    path = journal_path(output)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        # a last line without its newline (cut off by a kill) is dropped by --resume: not counted
        rows = [json.loads(line) for line in data[:data.rfind(b"\n") + 1].decode("utf-8").split("\n")[:-1]]
    except (OSError, ValueError, RecursionError):
        return None
    head, answers = (rows[0] if rows else None), rows[1:]
    if (len(data) > MAX_BYTES or not isinstance(head, dict) or head.get("dam_eval_journal") != FORMAT or not answers
            or not all(_is_answer(row) for row in answers)):
        return None
    return f"{len(answers)} answer(s) kept in {safe_text(path)}: run the same command with --resume to go on from them"

"""Outputs go only to a new path or a regular file; each file-system failure is one clear line.

`dam_cli.atomic` is used by every writer: special files (device nodes, FIFOs, sockets), symbolic
links and folders are refused and left untouched; an existing file is replaced only with force;
read-only folders, full disks, trailing slashes and missing folders each get their own message,
from `check_writable` before any work. Full and read-only disks are real tmpfs mounts where the
machine allows mounting, and injected `OSError`s everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess

import pytest

from dam_cli import atomic
from dam_cli.atomic import atomic_open, atomic_write_bytes, atomic_write_with, check_writable
from dam_cli.errors import DamError, DamUsageError


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _make_special(tmp_path, kind: str):
    """Create a destination of `kind`; return (path, a function giving its identity to compare after)."""
    p = tmp_path / f"out-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "char device":
        try:
            os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
        except PermissionError:
            pytest.skip("mknod needs root (CAP_MKNOD)")
    elif kind == "folder":
        p.mkdir()
        (p / "inside.txt").write_text("kept")
    elif kind == "symlink to a file":
        (tmp_path / "target.txt").write_text("target")
        p.symlink_to(tmp_path / "target.txt")
    elif kind == "symlink to a fifo":
        os.mkfifo(tmp_path / "target.fifo")
        p.symlink_to(tmp_path / "target.fifo")
    elif kind == "dangling symlink":
        p.symlink_to(tmp_path / "nowhere")

    def identity():
        st = os.lstat(p)
        extra = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        target = (tmp_path / "target.txt").read_text() if (tmp_path / "target.txt").exists() else None
        return st.st_mode, st.st_ino, st.st_rdev, extra, target

    return p, identity


SPECIALS = ["fifo", "socket", "char device", "folder", "symlink to a file", "symlink to a fifo", "dangling symlink"]
WORDS = {"fifo": "named pipe", "socket": "socket", "char device": "character device", "folder": "is a folder",
         "symlink to a file": "symbolic link", "symlink to a fifo": "symbolic link",
         "dangling symlink": "symbolic link"}


@pytest.mark.parametrize("kind", SPECIALS)
@pytest.mark.parametrize("force", [False, True])
def test_special_destinations_are_refused_and_untouched(tmp_path, kind, force):
    p, identity = _make_special(tmp_path, kind)
    before, names = identity(), _listing(tmp_path)
    with pytest.raises(DamUsageError, match=WORDS[kind]) as e:
        check_writable(p, force=force)
    assert "\n" not in str(e.value)
    with pytest.raises(DamUsageError, match=WORDS[kind]):
        atomic_write_bytes(p, b"not for you", force=force)
    assert identity() == before and _listing(tmp_path) == names  # nothing replaced, no temporary file left


def test_existing_regular_file_needs_force(tmp_path):
    p = tmp_path / "out.json"
    p.write_bytes(b"precious")
    with pytest.raises(DamUsageError, match="already exists: pass --force"):
        check_writable(p, force=False)
    with pytest.raises(DamUsageError, match="already exists"):
        atomic_write_bytes(p, b"new", force=False)
    assert p.read_bytes() == b"precious"
    check_writable(p, force=True)
    atomic_write_bytes(p, b"new", force=True)
    assert p.read_bytes() == b"new" and _listing(tmp_path) == ["out.json"]
    atomic_write_bytes(tmp_path / "fresh.json", b"x", force=False)  # a new path needs no force
    assert (tmp_path / "fresh.json").read_bytes() == b"x"


def test_without_force_a_file_appearing_during_the_write_is_not_replaced(tmp_path):
    p = tmp_path / "out.bin"
    with pytest.raises(DamUsageError, match="already exists"):
        with atomic_open(p, force=False) as f:
            f.write(b"ours")
            p.write_bytes(b"theirs")  # another process wins the race
    assert p.read_bytes() == b"theirs" and _listing(tmp_path) == ["out.bin"]


def test_a_destination_turned_special_during_the_write_is_not_replaced(tmp_path):
    p = tmp_path / "out.bin"
    with pytest.raises(DamUsageError, match="named pipe"):
        with atomic_open(p, force=True) as f:
            f.write(b"ours")
            os.mkfifo(p)
    assert stat.S_ISFIFO(os.lstat(p).st_mode) and _listing(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("path,words", [
    ("x.safetensors/", "ends with a slash"),
    ("sub/", "sub/ is a folder: give a file path, such as a file inside it"),
    ("no/such/folder/x.safetensors", "does not exist"),
    ("file.txt/x.safetensors", "a part of the path is a file"),
    ("", "is empty"),
])
def test_bad_paths_get_their_own_line(tmp_path, monkeypatch, path, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DamUsageError, match=words):
        check_writable(path, force=True)
    if path:
        with pytest.raises(DamUsageError, match=words):
            atomic_write_bytes(path, b"x")
    assert _listing(tmp_path) == ["file.txt", "sub"]


@pytest.mark.parametrize("where", ["before the write", "after the write"])
def test_without_proc_the_named_temporary_file_is_used(tmp_path, monkeypatch, where):
    """No /proc/self/fd: known at the start, or found missing only when the anonymous file is named."""
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    data = os.urandom(3 << 20)
    if where == "before the write":
        monkeypatch.setattr(atomic, "_PROC_FD", str(tmp_path / "no-proc"))
    seen = []

    def writer(f):
        f.write(data)
        seen.append(_listing(tmp_path))
        if where == "after the write":
            monkeypatch.setattr(atomic, "_PROC_FD", str(tmp_path / "no-proc"))

    atomic_write_with(p, writer, force=True)
    assert p.read_bytes() == data and _listing(tmp_path) == ["out.bin"]
    if where == "before the write":  # a hidden named temporary file held the data while it was written
        assert len(seen[0]) == 2 and seen[0][0].startswith(".out.bin.") and seen[0][0].endswith(".tmp")
    elif hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        assert seen[0] == ["out.bin"]  # anonymous while written, copied into a named file at the end


@pytest.mark.parametrize("proc", ["anonymous then named", "named from the start"])
@pytest.mark.parametrize("name", ["q" * 238 + ".safetensors", "\u00e9" * 120 + ".h5"])
def test_a_name_at_the_file_systems_limit_is_written(tmp_path, monkeypatch, proc, name):
    """An output name a few bytes under the folder's limit (250 bytes, or 243 of two-byte characters) is written: the
    hidden temporary name beside it is cut to fit, where `.NAME.TOKEN.tmp` would exceed the limit and fail only after
    the work."""
    if proc == "named from the start":
        monkeypatch.setattr(atomic, "_PROC_FD", str(tmp_path / "no-proc"))
    p = tmp_path / name
    check_writable(p)
    atomic_write_bytes(p, b"data")
    assert p.read_bytes() == b"data" and _listing(tmp_path) == [name]


def _inject(monkeypatch, name: str, code: int, when=lambda *a, **k: True):
    real = getattr(os, name)

    def fail(*a, **k):
        if when(*a, **k):
            raise OSError(code, os.strerror(code))
        return real(*a, **k)

    monkeypatch.setattr(os, name, fail)


@pytest.mark.parametrize("code,words", [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.EIO, r"Input/output error \(EIO\)"),
])
def test_injected_write_failures_are_one_line_and_keep_the_old_file(tmp_path, monkeypatch, code, words):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    _inject(monkeypatch, "fsync", code)  # where a full disk shows up when the data were only buffered
    with pytest.raises(DamError, match=words) as e:
        atomic_write_bytes(p, b"new" * 1000, force=True)
    assert "\n" not in str(e.value) and str(p) in str(e.value)
    monkeypatch.undo()

    def writer(f):
        raise OSError(code, os.strerror(code))

    with pytest.raises(DamError, match=words):
        atomic_write_with(p, writer, force=True)
    assert p.read_bytes() == b"old" and _listing(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                        (errno.ENOSPC, "no space left")])
def test_check_writable_finds_an_unwritable_folder_before_the_work(tmp_path, monkeypatch, code, words):
    creating = lambda path, flags, *a, **k: bool(flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)))  # noqa: E731
    _inject(monkeypatch, "open", code, creating)
    with pytest.raises(DamError, match=words):
        check_writable(tmp_path / "out.bin")
    monkeypatch.undo()
    assert _listing(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-555 folder anyway")
def test_read_only_folder_by_permissions(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DamError, match="permission denied"):
            check_writable(ro / "out.bin")
    finally:
        ro.chmod(0o755)


@contextlib.contextmanager
def tmpfs(path, options: str):
    """Mount a tiny tmpfs at `path`, or skip when this machine does not allow mounting."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip("mounting a tmpfs is not allowed here (the injected-OSError tests cover these cases)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_real_full_and_read_only_tmpfs(tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        (full / "old.bin").write_bytes(b"old")
        with pytest.raises(DamError, match="no space left"):  # more than the disk holds: fails while writing
            atomic_write_bytes(full / "old.bin", os.urandom(256 << 10), force=True)
        assert (full / "old.bin").read_bytes() == b"old" and _listing(full) == ["old.bin"]
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(DamError, match="no space left"):  # a full disk is found before the work
            check_writable(full / "new.bin")
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        with pytest.raises(DamError, match="read-only file system"):
            check_writable(ro / "new.bin")
        with pytest.raises(DamError, match="read-only file system"):
            atomic_write_bytes(ro / "new.bin", b"x")

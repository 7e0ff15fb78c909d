"""Atomic file output: write a hidden temporary file in the destination folder, then rename.

On Linux the temporary file is anonymous (O_TMPFILE) until it is complete, so even a process
killed with SIGKILL leaves no partial file behind; elsewhere a named temporary file is removed on
any exception, Ctrl-C included. The destination is never half-overwritten.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import BinaryIO

from dam_cli.errors import DamError


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it replaces `path` atomically, else nothing changes."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DamError(f"output folder {folder} does not exist: create it or choose another path")
    fd = None
    named = None
    if hasattr(os, "O_TMPFILE"):
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
    if fd is None:
        named = _tmp_name(path)
        fd = os.open(named, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    f = os.fdopen(fd, "w+b")  # readable too: HDF5 reads back what it writes
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        if named is None:
            # Give the anonymous file a name only now that it is complete, then rename over.
            named = _tmp_name(path)
            dfd = os.open(folder, os.O_RDONLY)
            try:  # a dir fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW) on the /proc link
                os.link(f"/proc/self/fd/{f.fileno()}", named, src_dir_fd=dfd, dst_dir_fd=dfd,
                        follow_symlinks=True)
            finally:
                os.close(dfd)
        f.close()
        os.replace(named, path)
        named = None
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        raise
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                os.unlink(named)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> None:
    """Call `writer(file)` and atomically publish what it wrote at `path`."""
    with atomic_open(path) as f:
        writer(f)

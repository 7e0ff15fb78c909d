"""Atomic file output: write a hidden temporary file in the destination folder, then rename.

On Linux the temporary file is anonymous (O_TMPFILE) until it is complete, so even a process
killed with SIGKILL leaves no partial file behind; where O_TMPFILE or `/proc/self/fd` is missing,
a named temporary file is used instead and removed on any exception, Ctrl-C included. The
destination is never half-overwritten, and only a new path or a regular file is ever replaced:
folders, symbolic links, device nodes, FIFOs and sockets are refused.

`check_writable` is the same test made before the expensive work; commands call it first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO

from dam_cli.errors import DamError, DamUsageError
from dam_cli.text import safe_text

_PROC_FD = "/proc/self/fd"  # names an anonymous O_TMPFILE file for linkat(); absent without /proc
_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe (FIFO)"),
          (stat.S_ISSOCK, "socket"))
# Errors of the destination's file system (not of dam): each gets its own line.
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
              errno.ENAMETOOLONG}


def special_kind(mode: int) -> str:
    """What a non-regular, non-folder `st_mode` is, in words ("named pipe (FIFO)", "character device"...)."""
    return next((k for test, k in _KINDS if test(mode)), "special file")


def _tmp_name(path: str) -> str:
    """A hidden temporary name beside `path`: `.NAME.TOKEN.tmp`, NAME cut (in bytes) so that the whole stays within
    the folder's name limit, where a name near that limit would otherwise fail only after the work."""
    import secrets

    d, base = os.path.split(os.path.abspath(path))
    token = secrets.token_hex(4)
    raw = os.fsencode(base)
    room = name_max(d) - len(f"..{token}.tmp")
    if len(raw) > room:
        base = os.fsdecode(raw[:max(room, 1)])
    return os.path.join(d, f".{base}.{token}.tmp")


def name_max(folder: str) -> int:
    """The longest file name, in bytes, the folder's file system takes (255 where it cannot say)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return 255


def output_error(path: str, err: BaseException) -> DamError:
    """The one-line DamError for an OSError met while writing `path` (no space, read-only, ...)."""
    code = None
    e: BaseException | None = err
    while e is not None and code is None:  # h5py wraps the OSError of the Python file it writes
        code = getattr(e, "errno", None)
        e = e.__cause__ or e.__context__
    folder = safe_text(os.path.dirname(os.path.abspath(path)))
    p = safe_text(path)
    if code == errno.ENOSPC:
        return DamError(f"cannot write {p}: no space left on the device of {folder}; free space or choose another path")
    if code == errno.EDQUOT:
        return DamError(f"cannot write {p}: disk quota exceeded in {folder}; free space or choose another path")
    if code == errno.EROFS:
        return DamError(f"cannot write {p}: {folder} is on a read-only file system; choose a writable folder")
    if code in (errno.EACCES, errno.EPERM):
        return DamError(f"cannot write {p}: permission denied in {folder}; choose a folder you can write to")
    if code == errno.EFBIG:
        return DamError(f"cannot write {p}: the file is too large for the file system of {folder}")
    if code == errno.ENAMETOOLONG:
        return DamUsageError(f"cannot write {p}: the name is too long for the file system; choose a shorter path")
    what = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    name = errno.errorcode.get(code, "") if code else ""
    return DamError(f"cannot write {p}: {safe_text(what)}{f' ({name})' if name else ''}")


def _check_target(path: str, force: bool, option: str) -> None:
    """Refuse a destination that is not a new path or (with `force`) a regular file."""
    p, opt = safe_text(path), f"{option} " if option else ""
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        bare = path.rstrip("/" + (os.altsep or ""))
        if bare and os.path.isdir(bare):  # the folder exists: a file inside it is meant
            raise DamUsageError(f"{opt}{p} is a folder: give a file path, such as a file inside it")
        raise DamUsageError(f"{opt}{p} ends with a slash, so it names a folder: give a file path such as "
                            f"{safe_text(bare)}")
    if top := _kernel_file(path):
        raise DamUsageError(f"{opt}{p} is in the kernel's {top} folder, whose files are not regular files: dam "
                            "writes its outputs to regular files; choose another path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise DamUsageError(f"{opt}{p}: a part of the path is a file, not a folder; choose another path") from None
    except OSError as e:
        raise output_error(path, e) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            link = os.readlink(path)
        except OSError:
            link = ""
        target = f" (to {safe_text(link)})" if link else ""
        if path.startswith("/dev/") or link.startswith(("/proc/", "/dev/")):  # /dev/stdout and kin: not files
            raise DamUsageError(f"{opt}{p} is a symbolic link{target} to a stream, not a file: dam writes its outputs "
                                "to files; give a file path")
        raise DamUsageError(f"{opt}{p} is a symbolic link{target}: dam writes only new or regular files; give the "
                            "real path, or remove the link")
    if stat.S_ISDIR(st.st_mode):
        raise DamUsageError(f"{opt}{p} is a folder: give the path of a file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise DamUsageError(f"{opt}{p} is a {special_kind(st.st_mode)}, not a regular file: dam never replaces "
                            "special files; choose another path")
    if not force:
        hint = f"pass --force to replace it, or choose another {option}" if option else "pass --force to replace it"
        raise DamUsageError(f"{p} already exists: {hint}")


def _kernel_file(path: str) -> str | None:
    """"/proc" or "/sys" where `path` (links resolved) lies in one: files there look regular and are not."""
    real = os.path.realpath(path)
    return next((top for top in ("/proc", "/sys") if real == top or real.startswith(top + "/")), None)


def _folder_of(path: str, option: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = f"the folder of {option}" if option else "output folder"
        raise DamUsageError(f"{what} ({safe_text(folder)}) does not exist: create it first, or choose another path")
    return folder


def check_writable(path: str | os.PathLike, force: bool = False, option: str = "--output",
                   reads: dict | None = None) -> None:
    """Refuse, before any work, an output that `atomic_open` would refuse or fail to write.

    DamUsageError: a folder, symlink, special file, trailing slash, missing folder, an existing file without
    `force`, or (with `force`) a file the same run reads: `reads` maps an option to the path, or paths, it names
    (a folder, a model's: any file directly in it).
    DamError: the folder is read-only, not writable, or its disk is full.
    """
    path = os.fspath(path)
    if not path:
        raise DamUsageError(f"{option} is empty: give a file path")
    if path == "-":  # standard output elsewhere in the shell's tools; here it would be a file named "-"
        raise DamUsageError(f"{option} -: dam writes this output to a file, not to standard output; give a file path")
    for flag, given in (reads or {}).items():
        for other in ([given] if isinstance(given, (str, os.PathLike)) else given or []):
            hits = [f for f in _files_of(os.fspath(other)) if _same_file(path, f)]
            if hits:
                what = (f"{option} and {flag} name the same file" if hits[0] == os.fspath(other) else
                        f"{option} is a file of the folder {flag} reads")
                raise DamUsageError(f"{what} ({safe_text(path)}): the output would replace what this run reads; "
                                    "write it elsewhere")
    _check_target(path, force, option)
    folder = _folder_of(path, option)
    try:  # create (and drop) a temporary file where the output will go: read-only or no permission fail here
        fd, named = _open_temp(path, folder)
        os.close(fd)
        if named:
            os.unlink(named)
    except OSError as e:
        raise output_error(path, e) from None
    if shutil.disk_usage(folder).free == 0:
        raise output_error(path, OSError(errno.ENOSPC, "No space left on device"))


def _files_of(path: str) -> list[str]:
    """`path`, and where it is a folder (a model's), the files directly in it: an output must replace none."""
    try:
        with os.scandir(os.path.expanduser(path)) as entries:
            return [path, *(e.path for e in entries)]
    except (OSError, ValueError):  # not a folder, or unreadable: the path alone
        return [path]


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _open_temp(path: str, folder: str) -> tuple[int, str | None]:
    """(fd, name): an anonymous O_TMPFILE file (name None) when it can be linked later, else a named one."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir(_PROC_FD):
        try:
            return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise  # read-only, no permission, no space: the named route would fail the same way
    named = _tmp_name(path)
    return os.open(named, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), named


def _name_anonymous(f: BinaryIO, path: str, folder: str) -> str:
    """Give the complete anonymous file a hidden name in `folder`; copy it if it cannot be linked."""
    named = _tmp_name(path)
    dfd = os.open(folder, os.O_RDONLY)
    try:  # a dir fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW) on the /proc link
        os.link(f"{_PROC_FD}/{f.fileno()}", named, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
        return named
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
    finally:
        os.close(dfd)
    fd = os.open(named, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # /proc is gone: copy into a named file
    try:
        with os.fdopen(fd, "wb") as out:
            f.seek(0)
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(named)
        raise
    return named


def _publish(named: str, path: str, force: bool) -> None:
    """Rename the complete temporary file onto `path`; without `force`, never over an existing file."""
    _check_target(path, force, "")  # again: the destination may have changed during the work
    if force:
        os.replace(named, path)
        return
    try:
        os.link(named, path)  # fails if `path` appeared meanwhile; the caller removes `named`
    except FileExistsError:
        raise DamUsageError(f"{safe_text(path)} already exists: pass --force to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.replace(named, path)  # a file system without hard links


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, force: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it replaces `path` atomically, else nothing changes.

    Only a new path or a regular file is replaced (an existing one only with `force`); any other
    destination and every file-system failure (no space, read-only...) raise a one-line DamError.
    """
    path = os.fspath(path)
    _check_target(path, force, "")
    folder = _folder_of(path, "")
    try:
        fd, named = _open_temp(path, folder)
    except OSError as e:
        raise output_error(path, e) from None
    f = os.fdopen(fd, "w+b")  # readable too: HDF5 reads back what it writes
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if named is None:  # give the anonymous file a name only now that it is complete
                named = _name_anonymous(f, path, folder)
            f.close()
            _publish(named, path, force)
        except OSError as e:
            if getattr(e, "errno", None) in _IO_ERRNOS:
                raise output_error(path, e) from None
            raise
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        raise
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                os.unlink(named)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> None:
    """Write `data` to `path` atomically (an existing regular file is replaced only with `force`)."""
    with atomic_open(path, force) as f:
        f.write(data)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None], force: bool = False) -> None:
    """Call `writer(file)` and atomically publish what it wrote at `path`."""
    with atomic_open(path, force) as f:
        writer(f)

"""The model cache: converted model folders under `$DAM_CACHE/models`, checked at every load, rebuilt when damaged.

An entry is published by one folder rename, after every file and then a manifest (`dam-cache.json`: each file's
size, mtime and sha256) are written. A load checks every size; it hashes a file only when its mtime changed. A
conversion builds in `.convert-<host>-<pid>-<hex>`; stale ones (pid gone, or an hour old) are removed by the next.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import struct
import time
from collections.abc import Callable

from dam_cli.atomic import atomic_write_bytes
from dam_cli.errors import DamError
from dam_cli.progress import Reporter
from dam_cli.text import safe_text

MANIFEST = "dam-cache.json"
MANIFEST_FORMAT = 1
TEMP_PREFIX = ".convert-"
STALE_AFTER_S = 3600.0
_HEADER_CAP = 100 * 2**20  # a safetensors header larger than this is not one we wrote


def cache_dir() -> str:
    """Where converted models live: `$DAM_CACHE` or `~/.cache/dam`."""
    return os.environ.get("DAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dam")


def models_dir() -> str:
    """The folder holding one sub-folder per converted model."""
    return os.path.join(cache_dir(), "models")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- checking an entry ----------------------------------------------------------------------------------------------

def _manifest_of(folder: str) -> dict:
    """The manifest describing every regular file of `folder` (the manifest itself aside)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        st = os.lstat(path)
        if name != MANIFEST and stat.S_ISREG(st.st_mode):
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return {"format": MANIFEST_FORMAT, "files": files}


def _write_manifest(folder: str, manifest: dict) -> None:
    atomic_write_bytes(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode(),
                       force=True)


def safetensors_problem(path: str) -> str | None:
    """Why `path` is not a complete safetensors file (None when its header parses and its data fill the file)."""
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size < 8:
        return f"{name} is {size} bytes, too short for a safetensors file"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(_HEADER_CAP, size - 8):
            return f"{name} has an unreadable header"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError):
            return f"{name} has an unreadable header"
    if 8 + n + end != size:
        return f"{name} is {size} bytes, its header describes {8 + n + end}"
    return None


def _legacy_problem(folder: str) -> str | None:
    """Why an entry converted before manifests existed is unusable (None: config.json and weights are complete)."""
    try:
        with open(os.path.join(folder, "config.json"), "rb") as f:
            if not isinstance(json.loads(f.read()), dict):
                return "config.json is not a JSON object"
    except (OSError, ValueError, RecursionError):
        return "config.json is unreadable"
    weights = [n for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")]
    if not weights:
        return "it holds no .safetensors weights"
    for name in weights:
        problem = safetensors_problem(os.path.join(folder, name))
        if problem:
            return problem
    return None


def entry_problem(folder: str) -> str | None:
    """Why the cache entry `folder` cannot be loaded ("missing", or what is damaged); None when it is sound.

    Sizes are always checked; a file's sha256 only when its mtime differs from the manifest's. An entry without a
    manifest (converted by an older dam) is checked structurally and, where the cache is writable, given one.
    """
    if not os.path.lexists(folder):
        return "missing"
    if not os.path.isdir(folder):
        return "a file stands where its folder should be"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return "its folder has no config.json"
    mpath = os.path.join(folder, MANIFEST)
    if not os.path.lexists(mpath):
        problem = _legacy_problem(folder)
        if problem is None:
            with contextlib.suppress(OSError, DamError):  # read-only cache: checked again at the next load
                _write_manifest(folder, _manifest_of(folder))
        return problem
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
        files = manifest["files"]
        expected = {name: (int(v["size"]), int(v["mtime_ns"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
        return f"its manifest {MANIFEST} is unreadable"
    if any(os.path.basename(n) != n or n in ("", ".", "..") or "\0" in n for n in expected):
        return f"its manifest {MANIFEST} names a file outside its folder"
    if "config.json" not in expected:
        return f"its manifest {MANIFEST} does not list config.json"
    touched = False
    for name, (size, mtime_ns, sha) in expected.items():
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except OSError:
            return f"{name} is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file"
        if st.st_size != size:
            return f"{name} is {st.st_size} bytes, expected {size}"
        if st.st_mtime_ns != mtime_ns:
            if file_sha256(path) != sha:
                return f"{name} does not match its recorded sha256"
            files[name]["mtime_ns"] = st.st_mtime_ns
            touched = True
    if touched:  # same bytes, new mtime (a copy): record it so the next load skips the hash
        with contextlib.suppress(OSError, DamError):
            _write_manifest(folder, manifest)
    return None


# ---- temporary folders ----------------------------------------------------------------------------------------------

def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name() -> str:
    """A name for a conversion folder that says which host and process made it."""
    return f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def is_stale(path: str, now: float | None = None) -> bool:
    """A conversion folder is stale when its process (on this host) is gone or it is over an hour old."""
    try:
        age = (time.time() if now is None else now) - os.lstat(path).st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    parts = os.path.basename(path)[len(TEMP_PREFIX):].split("-")
    if len(parts) >= 3 and parts[0] == _host_tag() and parts[1].isdigit():
        pid = int(parts[1])
        return pid != os.getpid() and not _pid_alive(pid)
    return False


def clean_stale(folder: str) -> list[str]:
    """Remove the stale `.convert-*` entries of `folder`; return their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(TEMP_PREFIX) and is_stale(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                if not os.path.lexists(path):
                    removed.append(name)
    return removed


def _remove(path: str) -> None:
    """Move `path` aside (one rename, so a kill leaves a stale temp folder) and delete it."""
    if not os.path.lexists(path):
        return
    aside = os.path.join(os.path.dirname(path), temp_name())
    os.rename(path, aside)
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.unlink(aside)


# ---- building an entry ----------------------------------------------------------------------------------------------

def _unwritable(target: str, problem: str, err: OSError) -> DamError:
    folder = safe_text(os.path.dirname(target))
    what = "is not built yet" if problem == "missing" else f"is damaged ({problem})"
    why = err.strerror or type(err).__name__
    root = cache_dir()
    if os.path.isfile(root):  # DAM_CACHE (or ~/.cache/dam) names a file: nothing under it can be a folder
        return DamError(f"the model cache {safe_text(root)} is a file, not a folder, so {safe_text(target)} {what} "
                        "and cannot be built: point DAM_CACHE at a folder (e.g. `DAM_CACHE=/tmp/dam-cache dam ...`)")
    return DamError(f"the model cache entry {safe_text(target)} {what} and cannot be built in {folder} ({why}): "
                    f"make {folder} writable, or run with DAM_CACHE=/a/writable/folder (e.g. `DAM_CACHE=/tmp/dam-cache "
                    f"dam ...`)")


def ensure_entry(target: str, build: Callable[[str, Reporter], None], reporter: Reporter,
                 require: Callable[[], None] = lambda: None, label: str = "model") -> str:
    """Return `target` once it is a sound entry, building it with `build(temp_folder, reporter)` when needed.

    `require()` runs first when a build is needed (it raises when the build cannot work, e.g. packages missing);
    a damaged entry is replaced; a cache that cannot be written gives one DamError naming DAM_CACHE.
    """
    problem = entry_problem(target)
    if problem is None:
        return target
    require()
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, temp_name())
        os.mkdir(tmp)
    except OSError as e:
        raise _unwritable(target, problem, e) from None
    try:
        removed = clean_stale(parent)
        if removed:
            reporter.log(f"removed {len(removed)} unfinished conversion folder(s) left in {parent}")
        if problem == "missing":
            reporter.log(f"first use of {label}: converting it once into {target}")
        else:
            reporter.log(f"the cached {label} in {target} is damaged ({problem}): rebuilding it")
        try:
            build(tmp, reporter)
            _write_manifest(tmp, _manifest_of(tmp))  # last: an entry with a manifest is complete
            _publish(tmp, target)
        except Exception as e:  # noqa: BLE001 - a full or failing disk is named; anything else is raised as it was
            full = _disk_full(e)
            if full is None:
                raise
            raise DamError(f"cannot build the model cache entry {safe_text(target)}: {full} in "
                           f"{safe_text(parent)}; free space there, or run with DAM_CACHE=/a/folder/with/space "
                           "(e.g. `DAM_CACHE=/tmp/dam-cache dam ...`)") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _disk_full(err: BaseException) -> str | None:
    """"no space left on the device" (or the quota's words) where `err` is a write that ran out of room: an
    OSError's errno, or the text of safetensors' own error ("No space left on device (os error 28)"); else None."""
    e: BaseException | None = err
    while e is not None:
        code = getattr(e, "errno", None)
        text = str(e)
        if code == errno.ENOSPC or "No space left on device" in text or "os error 28" in text:
            return "no space left on the device"
        if code == errno.EDQUOT or "Disk quota exceeded" in text or "os error 122" in text:
            return "disk quota exceeded"
        e = e.__cause__ or e.__context__
    return None


def _publish(tmp: str, target: str) -> None:
    """Rename the finished `tmp` onto `target`, replacing a damaged entry; keep a sound one another process made."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if entry_problem(target) is None:  # another process converted it first
            return
    _remove(target)
    os.rename(tmp, target)

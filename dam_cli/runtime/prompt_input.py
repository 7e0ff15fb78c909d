"""A prompt's text for `dam generate`: from --prompt, a prompt file or stdin, read safely.

Regular files only (folders, FIFOs, devices and sockets refused without a blocking read), at most
`MAX_PROMPT_BYTES`, valid UTF-8 (one line naming the first bad byte otherwise), a leading byte-order mark dropped;
`-` and the device names of standard input read stdin. Every refusal is one line: DamError (exit 1) or
DamUsageError (exit 2).
"""

from __future__ import annotations

import os
import stat
import sys
from typing import TYPE_CHECKING

from dam_cli.atomic import special_kind
from dam_cli.errors import DamError, DamUsageError
from dam_cli.text import human_bytes, safe_text

if TYPE_CHECKING:
    from dam_cli.runtime.generate import GenerateConfig

# The most bytes of prompt text read from a file or stdin: about 4 million tokens, beyond the context of any model
# dam runs, yet refused at once, before the model loads and long before tokenising would take minutes and gigabytes.
MAX_PROMPT_BYTES = 16 * 2**20
# The most bytes of a JSON-lines prompt file (many prompts, each within MAX_PROMPT_BYTES): read whole, then parsed.
MAX_BATCH_FILE_BYTES = 256 * 2**20


def read_prompt(cfg: GenerateConfig, stdin=None) -> str:
    """The prompt text from --prompt, --prompt-file (``-`` = stdin) or stdin; never empty, always valid UTF-8.

    Files and stdin are read up to `MAX_PROMPT_BYTES`; folders, FIFOs, devices and sockets are refused
    without being opened for a blocking read. Every refusal is one line: DamError (exit 1) or DamUsageError.
    """
    text = read_input(cfg, stdin)
    if not text.strip():
        raise DamUsageError("the prompt is empty: give some text")
    return text


def read_input(cfg: GenerateConfig, stdin=None, cap: int = MAX_PROMPT_BYTES) -> str:
    """`read_prompt` without the empty-text check: the text of --prompt, --prompt-file or stdin, as it is, of at
    most `cap` bytes (`MAX_BATCH_FILE_BYTES` for a JSON-lines file of many prompts)."""
    stdin = stdin if stdin is not None else sys.stdin
    if cfg.prompt is not None:
        return _checked_text(cfg.prompt, "--prompt")
    if cfg.prompt_file is not None and cfg.prompt_file not in STDIN_NAMES:
        text = _decoded(_read_prompt_file(cfg.prompt_file, cap), f"prompt file {safe_text(cfg.prompt_file)}")
    elif stdin is None or (cfg.prompt_file is None and stdin.isatty()):
        raise DamUsageError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    else:
        text = _read_stdin(stdin, cap)
    return text.removeprefix("\ufeff")  # a byte-order mark (editors on Windows write one) is not the prompt's


STDIN_NAMES = ("-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")  # --prompt-file names of standard input


def _over_cap(what: str, size: str, cap: int = MAX_PROMPT_BYTES) -> DamError:
    if cap != MAX_PROMPT_BYTES:
        return DamError(f"{what} is {size}, over the {human_bytes(cap)} cap on a JSON-lines prompt file: split it "
                        "into several files")
    return DamError(f"{what} is {size}, over the {human_bytes(cap)} cap on a prompt (beyond any model's context): "
                    "shorten it")


def _read_prompt_file(path: str, cap: int = MAX_PROMPT_BYTES) -> bytes:
    """The bytes of a regular prompt file of at most `cap` bytes; special files are never read."""
    p = safe_text(path)
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to /dev/zero is a device
    except FileNotFoundError:
        if os.path.islink(path):
            raise DamError(f"prompt file {p} is a broken symbolic link: fix it or give the text file") from None
        raise DamError(f"prompt file {p} does not exist") from None
    except OSError as e:
        raise DamError(f"cannot read prompt file {p}: {safe_text(e.strerror or e)}") from None
    if stat.S_ISDIR(mode):
        raise DamError(f"prompt file {p} is a folder: give a text file")
    if not stat.S_ISREG(mode):
        raise DamError(f"prompt file {p} is a {special_kind(mode)}, not a text file: give a regular file, "
                       "or pipe the text on stdin with --prompt-file -")
    try:  # O_NONBLOCK: should the path turn into a FIFO meanwhile, the open still returns at once
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise DamError(f"cannot read prompt file {p}: permission denied") from None
    except OSError as e:
        raise DamError(f"cannot read prompt file {p}: {safe_text(e.strerror or e)}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DamError(f"prompt file {p} is a {special_kind(st.st_mode)}, not a text file")
        if st.st_size > cap:
            raise _over_cap(f"prompt file {p}", f"{st.st_size:,} bytes", cap)
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise DamError(f"cannot read prompt file {p}: {safe_text(e.strerror or e)}") from None
    if len(data) > cap:  # the file grew after the check
        raise _over_cap(f"prompt file {p}", f"more than {human_bytes(cap)}", cap)
    return data


def _read_stdin(stdin, cap: int = MAX_PROMPT_BYTES) -> str:
    """At most `cap` bytes of stdin as text: its bytes decoded as UTF-8 where it has a binary layer."""
    raw = getattr(stdin, "buffer", None)
    over = lambda: _over_cap("the prompt on stdin", f"more than {human_bytes(cap)}", cap)  # noqa: E731
    if raw is None:  # a text stream (tests, embedding applications): characters, each at least one byte
        text = stdin.read(cap + 1)
        if len(text) > cap:
            raise over()
        text = _checked_text(text, "the prompt on stdin")
        if len(text.encode("utf-8")) > cap:
            raise over()
        return text
    data = raw.read(cap + 1)
    if len(data) > cap:
        raise over()
    return _decoded(data, "the prompt on stdin")


def _decoded(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or a DamError naming the offset and the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DamError(f"{what} is not UTF-8 text (line {line:,}: byte {e.start:,} is 0x{data[e.start]:02x}): "
                       "convert it to UTF-8") from None


def _checked_text(text: str, what: str) -> str:
    """`text` unchanged if it is valid Unicode; bytes that were not UTF-8 (surrogate escapes of the command
    line) or unpaired surrogates give a DamError naming their byte offset."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        if 0xDC80 <= ord(text[e.start]) <= 0xDCFF:  # escaped bytes of a command line read in a non-UTF-8 locale
            try:  # that are UTF-8 after all: the text the user typed
                return text.encode(sys.getfilesystemencoding(), "surrogateescape").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                pass
        offset = len(text[:e.start].encode("utf-8"))
        bad = text[e.start]
        shown = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise DamError(f"{what} is not UTF-8 text (byte {offset:,} is {shown}): convert it to UTF-8") from None

"""`dam generate` prompt input from hostile sources, and the backend it reports.

Special files (devices, FIFOs, links to them) are refused without a blocking read; files and stdin
are read up to `MAX_PROMPT_BYTES`; bytes that are not UTF-8 give one line with their offset (exit 1).
All of it happens before a profile or model loads. `--json` and the stats line name the kernels that ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time

import pytest
import torch
from helpers import cpu_backend, run_cli, run_cli_refusing_loads

from dam_cli.runtime.generate import MAX_PROMPT_BYTES, backend_that_ran

BASE = ["generate", "--profile", "never-read.safetensors", "--model", "never-loaded", "--device", "cpu"]


@pytest.fixture()
def dam(monkeypatch):
    """Run `dam ARGS` in-process: (exit code, stderr); a profile or model load fails the case (the prompt comes
    first)."""
    return run_cli_refusing_loads(monkeypatch, "loaded before the prompt was checked")


def _one_line(code: int, err: str, want: int = 1) -> None:
    assert code == want, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "internal error" not in err and "loaded before" not in err, err


@contextlib.contextmanager
def _unblocker(fifo: str, after_s: float = 5.0):
    """Should anything open `fifo` for a blocking read, open its write end after `after_s` so the test ends."""
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(after_s):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO when no reader: nothing blocked

    t = threading.Thread(target=unblock, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_device_prompt_files_are_refused_at_once(dam, device, tmp_path):
    if not os.path.exists(device):
        pytest.skip(f"{device} is missing here")
    link = tmp_path / "innocent.txt"
    link.symlink_to(device)
    for path in (device, str(link)):
        t0 = time.perf_counter()
        code, err = dam(*BASE, "--prompt-file", path)
        _one_line(code, err)
        assert f"prompt file {path} is a character device, not a text file" in err
        assert time.perf_counter() - t0 < 10


def test_fifo_prompt_file_is_refused_without_blocking(dam, tmp_path):
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    with _unblocker(str(fifo)):
        t0 = time.perf_counter()
        code, err = dam(*BASE, "--prompt-file", str(fifo))
        elapsed = time.perf_counter() - t0
    _one_line(code, err)
    assert "is a named pipe (FIFO), not a text file" in err
    assert elapsed < 4, f"the FIFO was opened for a blocking read ({elapsed:.1f} s)"


def test_huge_prompt_file_is_refused_quickly_with_the_cap_and_its_size(dam, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # 20 MB, sparse: nothing is written but the size
        f.truncate(20_000_000)
    t0 = time.perf_counter()
    code, err = dam(*BASE, "--prompt-file", str(big))
    _one_line(code, err)
    assert f"prompt file {big} is 20,000,000 bytes, over the 16.0 MiB cap on a prompt" in err
    assert time.perf_counter() - t0 < 5
    with open(big, "wb") as f:  # one byte over: its size in bytes, not "16.0 MiB, over the 16.0 MiB cap"
        f.truncate(16 * 2**20 + 1)
    code, err = dam(*BASE, "--prompt-file", str(big))
    _one_line(code, err)
    assert f"prompt file {big} is 16,777,217 bytes, over the 16.0 MiB cap on a prompt" in err
    exact = tmp_path / "exact.txt"  # the cap itself is allowed: refused only later, by the refusing loader
    with open(exact, "wb") as f:
        f.write(b"a")
        f.truncate(MAX_PROMPT_BYTES)
    code, err = dam(*BASE, "--prompt-file", str(exact))
    assert "loaded before the prompt was checked" in err


@pytest.mark.parametrize("data,offset,byte", [(b"caf\xe9 au lait", 3, "0xe9"), (b"\xff\xfeh\x00i\x00", 0, "0xff"),
                                              ("na\u00efve ".encode() * 10 + b"\xc3(", 70, "0xc3")])
def test_bytes_that_are_not_utf8_name_their_offset(dam, tmp_path, data, offset, byte):
    p = tmp_path / "latin.txt"
    p.write_bytes(data)
    code, err = dam(*BASE, "--prompt-file", str(p))
    _one_line(code, err)
    assert f"prompt file {p} is not UTF-8 text (line 1: byte {offset} is {byte})" in err
    for flag in ([], ["--prompt-file", "-"]):  # stdin, as a real text stream over bytes
        code, err = dam(*BASE, *flag, stdin=io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        _one_line(code, err)
        assert f"the prompt on stdin is not UTF-8 text (line 1: byte {offset} is {byte})" in err


def test_command_line_bytes_that_are_not_utf8(dam):
    arg = os.fsdecode(b"caf\xe9")  # what Python makes of a non-UTF-8 argv byte: a surrogate escape
    code, err = dam(*BASE, "--prompt", arg)
    _one_line(code, err)
    assert "--prompt is not UTF-8 text (byte 3 is 0xe9)" in err


def test_stdin_is_read_with_the_cap(dam):
    flood = io.TextIOWrapper(io.BytesIO(b"a" * (MAX_PROMPT_BYTES + 1)), encoding="utf-8")
    code, err = dam(*BASE, stdin=flood)
    _one_line(code, err)
    assert "the prompt on stdin is more than 16.0 MiB, over the 16.0 MiB cap on a prompt" in err
    assert flood.buffer.tell() == MAX_PROMPT_BYTES + 1  # never read past the cap


def test_prompt_files_that_are_fine_still_read(tmp_path):
    from dam_cli.runtime.generate import GenerateConfig, read_prompt

    p = tmp_path / "ok.txt"
    p.write_text("na\u00efve caf\u00e9 \u2603\n", encoding="utf-8")
    assert read_prompt(GenerateConfig(profile=None, prompt_file=str(p))) == "na\u00efve caf\u00e9 \u2603\n"
    assert read_prompt(GenerateConfig(profile=None, prompt_file="-"), io.StringIO("from stdin")) == "from stdin"



def test_a_byte_order_mark_is_not_part_of_the_prompt(tmp_path):
    """A leading UTF-8 byte-order mark (Windows editors write one) is dropped from a prompt file, stdin and the
    device names of stdin; a file holding only the mark is an empty prompt; a JSON-lines file with one parses."""
    from dam_cli.errors import DamUsageError
    from dam_cli.runtime.generate import GenerateConfig, read_prompt
    from dam_cli.runtime.generate_batch import read_prompt_lines

    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfhello")
    assert read_prompt(GenerateConfig(profile=None, prompt_file=str(p))) == "hello"
    for name in ("-", "/dev/stdin"):
        assert read_prompt(GenerateConfig(profile=None, prompt_file=name), io.StringIO("\ufeffhi")) == "hi"
    only = tmp_path / "only.txt"
    only.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DamUsageError, match="the prompt is empty"):
        read_prompt(GenerateConfig(profile=None, prompt_file=str(only)))
    lines = tmp_path / "p.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert [x.text for x in read_prompt_lines(GenerateConfig(profile=None, prompt_file=str(lines)))] == ["a"]

# ---- the backend that ran ---------------------------------------------------------------------

@pytest.mark.parametrize("asked,device,dtype,head_dim,ran", [
    ("auto", "cpu", torch.float32, 64, None),  # the CPU kernels built here (`cpu_backend`)
    ("gathered", "cpu", torch.float32, 64, "gathered"),
    ("auto", "cpu", torch.float16, 64, "gathered"),  # the compiled kernels take float32 and bfloat16 only
    ("compiled", "cpu", torch.float32, 40, "gathered"),  # a head dim not a multiple of 16
    ("auto", "cuda", torch.bfloat16, 64, "triton"),
    ("auto", "cuda:1", torch.float16, 128, "triton"),
    ("auto", "cuda", torch.bfloat16, 80, "reference"),  # a head dim the kernels lack: auto falls back
    ("auto", "cuda", torch.float64, 64, "reference"),
    ("reference", "cuda", torch.bfloat16, 64, "reference"),
    ("triton", "cuda", torch.bfloat16, 64, "triton"),
])
def test_backend_that_ran_is_never_auto(asked, device, dtype, head_dim, ran):
    assert backend_that_ran(asked, {"head_dim": head_dim}, device, dtype) == (ran or cpu_backend())


def test_a_soft_capped_model_runs_the_gathered_path_on_the_cpu():
    """Gemma 2's soft-capping: the compiled CPU kernels do not take it, so the gathered path runs and is reported."""
    assert backend_that_ran("auto", {"head_dim": 256, "attn_logit_softcapping": 50.0}, "cpu", torch.float32) == (
        "gathered")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto would run Triton")
def test_generate_reports_the_backend_that_ran(tiny_model_dir, tiny_all_allowed_profile):
    args = ["generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile, "--prompt", "the cat sat",
            "--max-new-tokens", "2", "--ignore-eos"]
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["backend"] == cpu_backend() and r["device"] == "cpu" and r["attention"] == "dam"
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert f"attention dam ({cpu_backend()}), cpu" in err and "(auto)" not in err
    code, out, err = run_cli(*args, "--attention", "full", "--json")
    assert code == 0 and json.loads(out)["backend"] is None, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto would run Triton")
@pytest.mark.parametrize("block", ["16", "64"])
def test_the_backend_reported_is_the_one_the_prompt_ran_on(monkeypatch, tiny_model_dir, tiny_all_allowed_profile,
                                                          block):
    """Dynamic blocks of 16 keys are not the compiled kernel's 64: the gathered path runs the prompt, and the report
    says so (it said "compiled")."""
    from dam_kernels import cpu_sparse

    calls = []
    real = cpu_sparse.cpu_sparse_attention
    monkeypatch.setattr(cpu_sparse, "cpu_sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile,
                             "--prompt", "the cat sat on the mat " * 30, "-n", "2", "--ignore-eos", "--dynamic-topk",
                             "2", "--dynamic-block", block, "--json")
    assert code == 0, err
    ran = "compiled" if calls else "gathered"
    assert json.loads(out)["backend"] == ran
    assert ran == ("gathered" if block == "16" else cpu_backend())


def test_a_utf8_command_line_read_in_an_ascii_locale_is_its_text(monkeypatch):
    """In a C locale Python reads argv's bytes as surrogate escapes: UTF-8 bytes there are the text the user typed
    (taken as such); bytes that are not UTF-8 are still refused with their offset."""
    import sys as sys_

    from dam_cli.errors import DamError
    from dam_cli.runtime.prompt_input import _checked_text

    monkeypatch.setattr(sys_, "getfilesystemencoding", lambda: "ascii")
    typed = "日本語 ✓".encode().decode("ascii", "surrogateescape")
    assert _checked_text(typed, "--prompt") == "日本語 ✓"
    with pytest.raises(DamError, match=r"--prompt is not UTF-8 text \(byte 3 is 0xe9\)"):
        _checked_text("caf" + b"\xe9".decode("ascii", "surrogateescape"), "--prompt")

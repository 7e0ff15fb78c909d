"""Reliability: every bad input gets one clear answer, interrupted runs leave nothing half-written.

Each case runs a real command and asserts its answer (exit code, one line on stderr, no traceback,
the words that say what is wrong). The same cases are the rows of the table in
docs/reliability.md: run `DAM_WRITE_RELIABILITY_DOC=1 pytest tests/cli/test_reliability.py` to
rewrite it; a normal run fails if the committed table no longer matches what the commands say.

Most commands run in-process through `dam_cli.cli.app.main` (the real entry point and its error
mapping); the interrupt tests and one determinism check run `dam` as a separate process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SHIPPED_PROFILE, cli_env, file_sha256, join_header, run_cli, run_cli_subprocess, split_header

from dam_cli.artifact.profile import load_profile
from dam_cli.errors import DamError
from dam_cli.text import safe_text

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = Path(SHIPPED_PROFILE)
DOC = REPO / "docs" / "reference" / "reliability.md"
WRITE_DOC = os.environ.get("DAM_WRITE_RELIABILITY_DOC") == "1"
SECTIONS = {  # section -> (title, explanation); rows are appended as the tests run
    "files": ("Profile files", "Each file is given to `dam inspect P --check`, which loads it with the library "
              "loader (`dam_cli.artifact.profile.load_profile`, used by every command). A damaged true mask is "
              "also given to `dam generate`: loading checks the mask against the statistics stored with it."),
    "model": ("A profile of another model", ""),
    "basics": ("The command itself", ""),
    "options": ("Invalid options", "Option values are checked before any model is loaded."),
    "outputs": ("Output paths and file systems", "Outputs are written only to a new path or a regular file "
                "(`dam_cli.atomic`); the paths are checked before the work (`check_writable`). Read-only and "
                "full disks are injected `OSError`s here; tests/cli/test_output_paths.py also uses a real tmpfs "
                "where the machine allows mounting."),
    "captures": ("Hostile captures", "Each capture is a copy of the tiny model's `--save-capture` file, changed "
                 "with h5py and given to `dam profile --from-capture`. A capture is read as a self-contained file; "
                 "every size is checked before anything is allocated."),
    "inputs": ("Prompts and calibration text", "Calibration paths are checked before the model loads."),
    "interrupts": ("Interrupted runs", "`dam profile` runs as its own process; a wrapper slows its file writes "
                   "(or one layer's derivation) so the signal lands mid-write. `O_TMPFILE`: the output is an "
                   "anonymous file until complete; named: the portable fallback, a hidden `.NAME.*.tmp` file."),
    "determinism": ("Determinism", "Profiles are compared by sha256."),
}
ROWS: dict[str, list[tuple[str, str, str, str]]] = {k: [] for k in SECTIONS}
GENERATED: dict[str, int] = {k: 0 for k in SECTIONS}  # cases behind one summary row (fuzzing, truncations)
KNOWN_BUGS: list[str] = []
PLACEHOLDERS: dict[str, str] = {}


def norm(text: str) -> str:
    """Replace run-specific paths so the table is the same on every run."""
    for real, ph in sorted(PLACEHOLDERS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(real, ph)
    return text.replace(str(REPO) + "/", "").replace(str(REPO), ".")


def record(section: str, what: str, cmd: str, code, answer: str) -> None:
    """One row of the table; commands and answers are escaped as dam escapes what it prints."""
    ROWS[section].append((what, safe_text(norm(cmd)), str(code), safe_text(norm(answer))))


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    w = tmp_path_factory.mktemp("rel")
    PLACEHOLDERS[str(w)] = "<tmp>"
    PLACEHOLDERS[str(tiny_model_dir)] = "<tiny-model>"
    return w


def answer_line(err: str) -> str:
    """The line that answers: ours is the last line (progress lines may come first); Click's usage
    errors end with `Error: ...`."""
    lines = [x.strip() for x in err.strip().splitlines() if x.strip()]
    errs = [x for x in lines if x.startswith("Error:")]
    return errs[-1] if errs else (lines[-1] if lines else "")


def assert_one_error_line(err: str) -> None:
    """Exactly one `error:` line, the last: nothing before it but progress lines, nothing forged."""
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.lower().startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one final error line on stderr:\n{err}"


def expect(section: str, what: str, args: list[str], code: int, *needles: str, stdin: str | None = None) -> str:
    """Run, assert the answer (exit code, one line, no traceback, the needles), record the row."""
    got, _out, err = run_cli(*args, stdin=stdin)
    line = answer_line(err)
    record(section, what, "dam " + " ".join(args), got, line)
    assert got == code, (what, got, err)
    assert "Traceback" not in err, err
    if line.startswith("Error:"):  # Click's own usage error: a usage line, a hint, the error
        assert code == 2
    else:
        assert line.startswith("error: "), err
        assert_one_error_line(err)
    for n in needles:
        assert n in line, (n, line)
    return line


# =========================================================================================
# Profile files
# =========================================================================================

def meta_edit(header: dict, key: str, **changes) -> dict:
    h = json.loads(json.dumps(header))
    inner = json.loads(h["__metadata__"][key])
    inner.update(changes)
    h["__metadata__"][key] = json.dumps(inner, sort_keys=True)
    return h


@pytest.fixture(scope="module")
def tiny_profile(work, tiny_model_dir):
    """A real profile of the tiny model, made in-process, plus its capture (base of many cases)."""
    from dam_cli.profiling.run import ProfileConfig, run_profile

    out, cap = work / "tiny.safetensors", work / "tiny-cap.h5"
    run_profile(ProfileConfig(output=str(out), model=tiny_model_dir, pcl=16, samples=2, save_capture=str(cap)))
    return out, cap


def test_bad_profile_files(work, tiny_profile, tiny_model_dir):
    good_path, _ = tiny_profile
    good = good_path.read_bytes()
    header, body = split_header(good)
    start = 8 + struct.unpack("<Q", good[:8])[0]
    d = work / "files"
    d.mkdir()

    def case(what: str, data: bytes | None, *needles: str, name: str = "p.safetensors", code: int = 1) -> str:
        path = d / name
        if data is not None:
            path.write_bytes(data)
        line = expect("files", what, ["inspect", str(path), "--check"], code, *needles)
        if data is not None:
            path.unlink()
        return line

    assert run_cli("inspect", str(good_path), "--check")[0] == 0
    record("files", "a valid profile of the tiny model (the base of the cases below)",
           "dam inspect P --check", 0, "(report on stdout; nothing on stderr)")
    case("missing file", None, "does not exist", "dam profile", name="missing.safetensors")
    (d / "folder.safetensors").mkdir()
    case("a folder instead of a file (unreadable as a profile)", None, "is a folder", name="folder.safetensors")
    os.mkfifo(d / "fifo.safetensors")
    case("a named pipe (reading it would block forever)", None, "not a regular file", name="fifo.safetensors")
    if os.geteuid() == 0:
        record("files", "a file without read permission", "-", "-",
               "not testable here: the tests run as root, which reads it anyway "
               "(the loader maps PermissionError to `cannot read profile P: permission denied`)")
    else:
        (d / "noread.safetensors").write_bytes(good)
        os.chmod(d / "noread.safetensors", 0)
        case("a file without read permission", None, "permission denied", name="noread.safetensors")
    case("zero bytes", b"", "0 bytes, too short")
    case("7 bytes", good[:7], "too short")
    for cut, where in [(12, "inside the header"), (start - 1, "1 byte before the tensor data"),
                       (start + (len(good) - start) // 2, "in the middle of the tensor data"),
                       (len(good) - 1, "1 byte short of the end")]:
        case(f"truncated at byte {cut} of {len(good)} ({where})", good[:cut], "truncated")
    for cut in range(0, len(good), 7):  # many more offsets, asserted but not tabled one by one
        (d / "cut.safetensors").write_bytes(good[:cut])
        with pytest.raises(DamError):
            load_profile(d / "cut.safetensors")
    GENERATED["files"] += len(range(0, len(good), 7))
    record("files", f"truncated at each of {len(range(0, len(good), 7))} offsets 0, 7, 14, ... "
           "(and at every offset in tests/artifact/test_format_fuzz.py)", "load_profile", "DamError", "each refused")
    rnd = random.Random(0)
    case("4 KiB of random bytes", rnd.randbytes(4096), "header length")
    case("random bytes after a plausible length field", struct.pack("<Q", 64) + rnd.randbytes(200), "not JSON")
    nested = b"[" * 100_000
    case("a header of 100,000 nested brackets", struct.pack("<Q", len(nested)) + nested, "nested too deeply")
    case("a length field claiming a 2^63-byte header", struct.pack("<Q", 2**63) + good[8:], "does not fit")
    case("a header that is a JSON list", join_header([], b""), "not a JSON object")

    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 4)}, str(d / "weights.safetensors"))
    case("a valid safetensors file that is not a profile (model weights)", None, "not a DAM profile",
         name="weights.safetensors")
    save_file({"weight": torch.zeros(3, 4)}, str(d / "meta.safetensors"), metadata={"format": "pt"})
    case("a safetensors file with foreign metadata", None, "without DAM metadata", name="meta.safetensors")
    h = json.loads(json.dumps(header))
    from dam_cli.artifact.format import READABLE_SCHEMAS

    newer = max(READABLE_SCHEMAS) + 1
    h["__metadata__"]["dam.schema"] = str(newer)
    case(f"schema version {newer} (a newer dam)", join_header(h, body), f"schema {newer}", "reads schema")
    h["__metadata__"]["dam.schema"] = "one"
    case("schema version that is not a number", join_header(h, body), "dam.schema")
    case("recipe tau NaN", join_header(meta_edit(header, "dam.recipe", tau=float("nan")), body), "dam.recipe holds NaN")
    h = json.loads(json.dumps(header))
    h["__metadata__"]["dam.recipe"] = h["__metadata__"]["dam.recipe"].replace('"tau":0.3', '"tau":1e999')
    assert "1e999" in h["__metadata__"]["dam.recipe"]
    case("recipe tau 1e999 (parses to infinity)", join_header(h, body),
         "dam.recipe holds NaN, Infinity or a number out of range")
    case("model name that is a number", join_header(meta_edit(header, "dam.model", name=5), body), "dam.model.name")
    case("n_heads not a multiple of n_kv_heads", join_header(meta_edit(header, "dam.model", n_kv_heads=3), body),
         "multiple of n_kv_heads")
    case("n_layers 0", join_header(meta_edit(header, "dam.model", n_layers=0), body), "dam.model.n_layers")
    h = json.loads(json.dumps(header))
    h["__metadata__"]["dam.runtime"] = json.dumps({"dynamic": {"topk": 10**30, "block": 64}})
    case("a recommended run-time `dynamic.topk` of 10^30 (overflowed the kernels at the first prompt)",
         join_header(h, body), "dam.runtime.dynamic is invalid", "to 2,147,483,647")
    case("metadata says 3 layers, tensors hold 2 (wrong shapes)",
         join_header(meta_edit(header, "dam.model", n_layers=3), body),
         f"should be U8 {[3, *header['true_mask']['shape'][1:]]}")
    h = json.loads(json.dumps(header))
    h["offsets"]["shape"] = [2, 4, 8, 2]
    case("offsets reshaped to [2, 4, 8, 2] (same bytes, wrong shape)", join_header(h, body),
         "tensor offsets should be BOOL")
    h = json.loads(json.dumps(header))
    h["cols"] = h.pop("columns")
    case("tensor `columns` renamed `cols`", join_header(h, body), "missing ['columns']", "unexpected ['cols']")
    h = json.loads(json.dumps(header))
    h["true_mask"], h["stats.col_score"] = h["stats.col_score"], h["true_mask"]
    case("true_mask and stats.col_score swapped", join_header(h, body), "should be")
    # Same dtype and shape: the file is well-formed, so the loader cannot tell; `--check` compares
    # R and C with the patterns the statistics say reach mu. (The tiny model's R and C are equal.)
    big_header, big_body = split_header(SMOLLM2.read_bytes())
    big_header["offsets"], big_header["columns"] = big_header["columns"], big_header["offsets"]
    case("SmolLM2 profile with offsets and columns swapped (same dtype and shape)", join_header(big_header, big_body),
         "below mu")
    h = json.loads(json.dumps(header))
    h["columns"]["data_offsets"] = h["offsets"]["data_offsets"]
    case("two tensors sharing the same bytes", join_header(h, body), "overlap")
    tm0 = start + header["true_mask"]["data_offsets"][0]
    if header["__metadata__"]["dam.schema"] == "1":
        buf = bytearray(good)
        buf[tm0 + 3 * 2 + 1] |= 0x80  # layer 0 head 0, row 3, key 15 > 3
        case("a true-mask bit above the diagonal (not causal)", bytes(buf), "not causal")
    else:
        record("files", "a true-mask bit above the diagonal (not causal)", "-", "-",
               f"not representable: schema {header['__metadata__']['dam.schema']} stores only the causal triangle")
    buf = bytearray(good)
    buf[start + header["offsets"]["data_offsets"][0]] = 2
    case("a BOOL byte of value 2", bytes(buf), "other than 0 and 1")
    dens = start + header["stats.true_density"]["data_offsets"][0]
    buf = bytearray(good)
    buf[dens:dens + 4] = struct.pack("<f", 1.5)
    case("a true density of 1.5", bytes(buf), "outside [0, 1]")
    # A damaged true mask is well-formed; the statistics stored with it (derived from it when it was written)
    # no longer match it. `--check` lists every mismatch; loading it for use refuses it in one line.
    buf = bytearray(good)
    buf[tm0 + 2] ^= 0x10  # layer 0 head 0, stored bit 20: row 5, key 5 (schema 2)
    what = "one flipped bit in the true mask data (its stored statistics no longer match)"
    case(what, bytes(buf), "stats.true_density of layer 0 head 0 does not match its true mask")
    (d / "damaged.safetensors").write_bytes(bytes(buf))
    expect("files", what, ["generate", "--model", tiny_model_dir, "--profile", str(d / "damaged.safetensors"),
                           "--prompt", "the cat", "--max-new-tokens", "1"], 1,
           "does not match its true mask", "the file is damaged", "re-create it with `dam profile`")
    # Found while writing these tests: the other commands trust a loaded profile's metadata.
    (d / "markup.safetensors").write_bytes(join_header(meta_edit(header, "dam.model", name="tiny [/]"), body))
    got, _, err = run_cli("inspect", str(d / "markup.safetensors"))
    tb = "Traceback" in err or "internal error" in err
    record("files", "a valid profile whose model name is `tiny [/]` (rich markup)", "dam inspect P", got,
           (err.strip().splitlines() or [""])[-1][:160] + (" (a crash: see known issues)" if tb else ""))
    if tb:
        KNOWN_BUGS.append("`dam inspect P` crashes (rich.errors.MarkupError traceback) when the model name or the "
                          "path in a profile holds rich markup such as `[/]`: dam_cli/render.py `header_table` "
                          "passes them to a rich Table unescaped (use rich.markup.escape or Text)")


def test_profile_of_another_model(work, tiny_model_dir):
    assert SMOLLM2.exists()
    expect("model", "the shipped SmolLM2-135M profile used with the tiny Llama",
           ["generate", "--model", tiny_model_dir, "--profile", str(SMOLLM2), "--prompt", "the cat",
            "--max-new-tokens", "1"], 1, "was made for SmolLM2-135M-Instruct", "not for this model", "dam profile")


def test_profile_of_same_shape_but_other_config(work, tiny_model_dir, tiny_profile):
    """Same layer/head shapes, another model config: refused by the fingerprint, both named."""
    from conftest import build_tiny_llama, build_tokenizer

    other = work / "tiny-other-rope"
    m = build_tiny_llama(max_pos=2048)  # same shapes, another config
    m.save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    expect("model", "a tiny-Llama profile used with a model of the same shape but another config (max position)",
           ["generate", "--model", str(other), "--profile", str(tiny_profile[0]), "--prompt", "the cat",
            "--max-new-tokens", "1"], 1, "config fingerprint", "not for this model")


def test_damaged_model_folders(work, tiny_model_dir):
    """Weights cut short, missing a tensor, of another shape, or without tokenizer files: one line each."""
    import shutil

    from safetensors.torch import load_file, save_file

    def folder(name: str, edit=None) -> str:
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(tiny_model_dir, d)
        PLACEHOLDERS[str(d)] = f"<{name}>"
        if edit:
            tensors = load_file(d / "model.safetensors")
            edit(tensors)
            save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return str(d)

    G = ["generate", "--attention", "full", "--prompt", "the cat", "-n", "1", "--model"]
    cut = folder("tiny-cut")
    with open(os.path.join(cut, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(cut, "model.safetensors")) // 2)
    expect("model", "a model folder whose weights file was cut short (a partly copied download)", [*G, cut], 1,
           "cannot load model", "SafetensorError")
    first_k = lambda t: next(k for k in t if k.endswith("k_proj.weight"))  # noqa: E731
    expect("model", "a model folder whose weights lack a tensor its config asks for",
           [*G, folder("tiny-missing", lambda t: t.pop(first_k(t)))], 1, "lacks 1 of the tensors its config asks for")
    expect("model", "a model folder holding a tensor of another shape than its config says",
           [*G, folder("tiny-shape", lambda t: t.update({first_k(t): t[first_k(t)][:4].contiguous()}))], 1,
           "tensors of another shape than its config says", "in config.json")
    notok = folder("tiny-notok")
    for f in os.listdir(notok):
        if f.startswith(("tokenizer", "special_tokens")):
            os.unlink(os.path.join(notok, f))
    expect("model", "a model folder without tokenizer files", [*G, notok], 1, "has no tokenizer files")


# =========================================================================================
# Options of every command
# =========================================================================================

def test_invalid_options_profile(work, tiny_model_dir, tiny_profile):
    out = str(work / "opt.safetensors")
    _, cap = tiny_profile
    P = ["profile", "--output", out]
    expect("options", "`--tau 0`", [*P, "--tau", "0"], 2, "--tau must be > 0")
    expect("options", "`--mu 1.5`", [*P, "--mu", "1.5"], 2, "--mu must be in (0, 1]")
    expect("options", "`--pcl 1`", [*P, "--pcl", "1"], 2, "--pcl must be from 2 to 65536")
    expect("options", "`--samples 0`", [*P, "--samples", "0"], 2, "--samples")
    expect("options", "`--min-support 0`", [*P, "--min-support", "0"], 2, "--min-support")
    expect("options", "`--pcl abc` (not a number)", [*P, "--pcl", "abc"], 2, "Invalid value for '--pcl'")
    expect("options", "an unknown option", [*P, "--frobnicate"], 2, "No such option")
    expect("options", "no --output", ["profile"], 2, "Missing option '--output'")
    expect("options", "`--nproc 0`", [*P, "--nproc", "0"], 2, "--nproc must be from 1")
    expect("options", "`--nproc 2` with `--stream`", [*P, "--nproc", "2", "--stream"], 2, "--stream", "--nproc")
    expect("options", "`--device-map` not a placement", [*P, "--device-map", "everywhere"], 2,
           "unknown --device-map")
    expect("options", "`dam generate --tp` not under torchrun",
           ["generate", "--tp", "--profile", str(SMOLLM2), "--prompt", "hi"], 2, "torchrun")
    expect("options", "`--output` is a folder", ["profile", "--output", str(work)], 2, "is a folder")
    expect("options", "`--output` in a folder that does not exist",
           ["profile", "--output", str(work / "no" / "p.safetensors")], 2, "does not exist")
    Path(out).write_bytes(b"old")
    expect("options", "`--output` exists, no --force", [*P], 2, "already exists", "--force")
    Path(out).unlink()
    expect("options", "`--save-capture` with `--from-capture`",
           [*P, "--save-capture", "a.h5", "--from-capture", "b.h5"],
           2, "cannot be combined")
    expect("options", "`--model` that does not exist", [*P, "--model", str(work / "nope")], 1, "not found")
    expect("options", "`--pcl 4096` above the tiny model's context of 1024",
           [*P, "--model", tiny_model_dir, "--pcl", "4096"], 2, "above the model's context of 1024")
    expect("options", "`--from-capture` that does not exist", [*P, "--from-capture", str(work / "none.h5")], 1,
           "does not exist", "--save-capture")
    expect("options", "`--from-capture` with `--recipe recommended` (needle-chosen heads need the model)",
           [*P, "--from-capture", str(work / "none.h5"), "--recipe", "recommended"], 2,
           "--recipe recommended chooses its retrieval heads with needle prompts", "--retrieval-by mass")
    expect("options", "`--from-capture` with `--retrieval-by needle`",
           [*P, "--from-capture", str(work / "none.h5"), "--retrieval-by", "needle", "--retrieval-heads", "2"], 2,
           "--retrieval-by needle runs the model on needle prompts")
    (work / "notcap.h5").write_bytes(b"not hdf5 at all")
    expect("options", "`--from-capture` that is not HDF5", [*P, "--from-capture", str(work / "notcap.h5")], 1,
           "not a readable HDF5 capture")
    import h5py

    with h5py.File(work / "other.h5", "w") as f:
        f["x"] = [1, 2, 3]
    expect("options", "`--from-capture` an HDF5 file that is not a capture",
           [*P, "--from-capture", str(work / "other.h5")], 1, "not a DAM capture")
    import shutil

    shutil.copy(cap, work / "badcap.h5")
    with h5py.File(work / "badcap.h5", "r+") as f:
        del f["attn_sum/0001"]
        f["attn_sum/0001"] = [[1.0]]
    expect("options", "`--from-capture` a capture whose layer 1 has the wrong shape",
           [*P, "--from-capture", str(work / "badcap.h5"), "--pcl", "16"], 1, "layer 1 is", "capture again")
    assert not Path(out).exists()
    assert not [n for n in os.listdir(work) if n.endswith(".tmp")]


def test_invalid_options_inspect(work, tiny_profile):
    p = str(tiny_profile[0])
    got, _, err = run_cli("inspect")
    record("options", "`dam inspect` with no profile", "dam inspect", got, "(prints its help)")
    assert got in (0, 2) and "Usage" in (err + _) and "Traceback" not in err
    expect("options", "`--length 0`", ["inspect", p, "--length", "0"], 2, "--length must be at least 1")
    expect("options", "`--layer 7` of a 2-layer profile", ["inspect", p, "--layer", "7"], 2, "out of range", "0..1")
    expect("options", "`--head` without `--layer`", ["inspect", p, "--head", "0"], 2, "--head needs --layer")
    expect("options", "`--check` with `--png`", ["inspect", p, "--check", "--png", str(work / "x.png")], 2,
           "--check validates only")
    (work / "old.png").write_bytes(b"old")
    expect("options", "`--png` onto an existing file", ["inspect", p, "--png", str(work / "old.png")], 2,
           "already exists", "--force")
    assert (work / "old.png").read_bytes() == b"old"
    expect("options", "`--png` into a folder that does not exist",
           ["inspect", p, "--png", str(work / "no" / "x.png")], 2, "does not exist")
    expect("options", "`--png \"\"` (an unset shell variable)", ["inspect", p, "--png", ""], 2,
           "empty: give a path")
    expect("options", "an unknown option", ["inspect", p, "--frobnicate"], 2, "No such option")


def test_invalid_options_generate(work, tiny_model_dir, tiny_profile):
    G = ["generate", "--model", tiny_model_dir, "--profile", str(tiny_profile[0]), "--prompt", "the cat"]
    expect("options", "`--attention foo`", [*G, "--attention", "foo"], 2, "unknown --attention")
    expect("options", "`--backend foo`", [*G, "--backend", "foo"], 2, "unknown --backend")
    expect("options", "`--max-new-tokens 0`", [*G, "--max-new-tokens", "0"], 2, "--max-new-tokens")
    expect("options", "`--temperature -1`", [*G, "--temperature", "-1"], 2, "--temperature")
    expect("options", "`--top-p 0` with sampling", [*G, "--temperature", "1", "--top-p", "0"], 2, "--top-p")
    expect("options", "`--top-k -1`", [*G, "--top-k", "-1"], 2, "--top-k")
    expect("options", "`--dynamic-topk 10^20` (overflowed the kernels at the first prompt)",
           [*G, "--dynamic-topk", str(10**20)], 2,
           "--dynamic-topk must be an integer from 0 (the dynamic part off) to 2,147,483,647")
    expect("options", "`--dynamic-tail-topk 10^20`", [*G, "--dynamic-topk", "2", "--dynamic-tail-topk", str(10**20)],
           2, "--dynamic-tail-topk must be an integer from 0 to 2,147,483,647")
    expect("options", "`--top-p 0.5` without `--temperature`", [*G, "--top-p", "0.5"], 2, "only apply when sampling")
    expect("options", "`--prompt` and `--prompt-file` together", [*G, "--prompt-file", "x.txt"], 2, "not both")
    expect("options", "`--attention dam` without `--profile`",
           ["generate", "--model", tiny_model_dir, "--prompt", "x"], 2, "--profile is required")
    expect("options", "a `--profile` that does not exist",
           ["generate", "--model", tiny_model_dir, "--profile", str(work / "none.safetensors"), "--prompt", "x"], 1,
           "does not exist")
    expect("options", "an unknown option", [*G, "--frobnicate"], 2, "No such option")


def test_invalid_options_eval(tiny_model_dir, tiny_profile):
    got, out, err = run_cli("eval", "--help")
    if "not built yet" in out:
        expect("options", "`dam eval` (still a placeholder when this table was made)", ["eval"], 1, "not built yet")
    else:
        E = ["eval", "--model", tiny_model_dir, "--profile", str(tiny_profile[0])]
        expect("options", "`dam eval` without `--profile`", ["eval"], 2, "Missing option '--profile'")
        expect("options", "`--methods foo`", [*E, "--methods", "foo"], 2, "unknown method 'foo'")
        expect("options", "`--tasks foo`", [*E, "--tasks", "foo"], 2, "unknown task 'foo'")
        expect("options", "`--depths 2`", [*E, "--depths", "2"], 2, "outside [0, 1]")
        expect("options", "`--options-profile` of another model (before the model loads)",
               [*E, "--options-profile", str(SMOLLM2), "--methods", "dam-options"], 2, "were made for different models")
        expect("options", "`--sink 5000`", [*E, "--sink", "5000"], 2, "--sink must be from 0 to 1,024")
        expect("options", "`--backend triton` on the CPU", [*E, "--backend", "triton", "--device", "cpu"], 2,
               "--backend triton needs a CUDA GPU")
        expect("options", "`--resume` without `--output`", [*E, "--resume"], 2, "give the same --output")
        journaled = str(tiny_profile[0]) + ".eval.json"
        expect("options", "`--resume` with no journal left by an earlier run", [*E, "-o", journaled, "--resume"], 2,
               "no journal", "to go on from")
        with open(journaled + ".partial.jsonl", "w") as f:
            f.write('{"dam_eval_journal": 1, "fingerprint": {}}\n')
        expect("options", "an unfinished run's journal beside `--output`, without `--resume` or `--force`",
               [*E, "-o", journaled], 2, "unfinished run: add --resume", "or --force")
        os.unlink(journaled + ".partial.jsonl")
    expect("options", "an unknown option", ["eval", "--frobnicate"], 2, "No such option")
    expect("options", "an unknown command", ["frobnicate"], 2, "No such command")


# =========================================================================================
# Prompts and calibration text
# =========================================================================================

def test_prompts_and_calibration(work, tiny_model_dir, tiny_profile):
    G = ["generate", "--model", tiny_model_dir, "--attention", "full"]
    expect("inputs", "a prompt of 1,100 words, beyond the tiny model's context of 1,024 tokens",
           [*G, "--prompt", "the cat " * 550, "--max-new-tokens", "1"], 1, "longer than the model's context")
    expect("inputs", "a prompt that fits, but not with `--max-new-tokens`",
           [*G, "--prompt", "the cat " * 500, "--max-new-tokens", "100"], 1, "--max-new-tokens")
    expect("inputs", "an empty `--prompt`", [*G, "--prompt", ""], 2, "empty")
    expect("inputs", "an empty prompt on stdin", [*G], 2, "", stdin="")
    (work / "missing.txt").unlink(missing_ok=True)
    expect("inputs", "a `--prompt-file` that does not exist", [*G, "--prompt-file", str(work / "missing.txt")], 1,
           "does not exist")
    expect("inputs", "a `--prompt-file` that is a folder", [*G, "--prompt-file", str(work)], 1, "is a folder")
    (work / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    expect("inputs", "a `--prompt-file` that is not UTF-8", [*G, "--prompt-file", str(work / "latin1.txt")], 1,
           "not UTF-8")
    out = str(work / "cal.safetensors")
    P = ["profile", "--recipe", "paper", "--model", tiny_model_dir, "--output", out]
    (work / "empty.txt").write_text("")
    expect("inputs", "an empty calibration file", [*P, "--calib", str(work / "empty.txt")], 1, "empty", "0 tokens")
    (work / "emptydir").mkdir()
    got, _, err = run_cli(*P, "--calib", str(work / "emptydir"))
    record("inputs", "an empty calibration folder", "dam " + " ".join([*P, "--calib", str(work / "emptydir")]),
           got, answer_line(err))
    assert got == 1 and "Traceback" not in err and answer_line(err).startswith("error: ")
    assert_one_error_line(err)
    (work / "blank.jsonl").write_text("\n\n")
    got, _, err = run_cli(*P, "--calib", str(work / "blank.jsonl"))
    record("inputs", "a JSONL calibration file with no records",
           "dam " + " ".join([*P, "--calib", str(work / "blank.jsonl")]),
           got, answer_line(err))
    assert got == 1 and "Traceback" not in err and answer_line(err).startswith("error: ")
    assert_one_error_line(err)
    (work / "short.txt").write_text("the cat is on the tree .")
    expect("inputs", "calibration text shorter than one window",
           [*P, "--calib", str(work / "short.txt"), "--pcl", "64"],
           1, "too short")
    (work / "bad.jsonl").write_text('{"body": "x"}\n')
    expect("inputs", "JSONL without the `text` field", [*P, "--calib", str(work / "bad.jsonl")], 1, "--text-field")
    assert not Path(out).exists()


# =========================================================================================
# Hostile calibration text
# =========================================================================================

def test_hostile_calibration(work, tiny_model_dir, monkeypatch):
    d = work / "calib"
    d.mkdir()
    out = str(work / "cal.safetensors")
    P = ["profile", "--recipe", "paper", "--model", tiny_model_dir, "--output", out, "--pcl", "16"]
    loads = []
    import dam_cli.runtime.models as models

    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    os.mkfifo(d / "pipe.txt")
    expect("inputs", "`--calib` a named pipe (reading it would block forever)", [*P, "--calib", str(d / "pipe.txt")],
           1, "named pipe", "not a text file")
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("the cat " * 20)
    os.mkfifo(d / "folder" / "b.txt")
    expect("inputs", "a named pipe inside a `--calib` folder", [*P, "--calib", str(d / "folder")], 1, "named pipe",
           "remove it from the folder")
    (d / "folder" / "b.txt").unlink()
    (d / "folder" / "zero.txt").symlink_to("/dev/zero")
    expect("inputs", "a symlink to /dev/zero inside a `--calib` folder (endless)", [*P, "--calib", str(d / "folder")],
           1, "character device")
    (d / "folder" / "zero.txt").unlink()
    (d / "dangling.txt").symlink_to(d / "nowhere.txt")
    expect("inputs", "`--calib` a broken symbolic link", [*P, "--calib", str(d / "dangling.txt")], 1,
           "broken symbolic link")
    assert not loads, "the model was loaded before the calibration paths were checked"
    with open(d / "huge.txt", "wb") as f:  # sparse: no disk used
        f.truncate(300 * 2**20)
    expect("inputs", "a 300 MiB calibration file (sparse)", [*P, "--calib", str(d / "huge.txt")], 1,
           "over the 256.0 MiB cap")
    (d / "latin1.jsonl").write_bytes(b'{"text": "the cat"}\n{"text": "caf\xe9"}\n')
    expect("inputs", "a JSONL line that is not UTF-8", [*P, "--calib", str(d / "latin1.jsonl")], 1,
           "line 2 is not UTF-8")
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 40)
    expect("inputs", "a calibration text file that is not UTF-8", [*P, "--calib", str(d / "latin1.txt")], 1,
           "is not UTF-8 text (byte 3)")
    (d / "nested.jsonl").write_text("[" * 100_000 + "\n")
    expect("inputs", "a JSONL line nested 100,000 deep", [*P, "--calib", str(d / "nested.jsonl")], 1,
           "line 1 is JSON nested too deeply")
    (d / "digits.jsonl").write_text('{"text": "the cat", "id": ' + "9" * 5000 + "}\n")
    expect("inputs", "a JSONL record holding a 5000-digit integer", [*P, "--calib", str(d / "digits.jsonl")], 1,
           "a number of 5000 digits")
    (d / "surrogate.jsonl").write_text('{"text": "the cat \\ud800"}\n')
    expect("inputs", "a JSONL text with an unpaired surrogate escape", [*P, "--calib", str(d / "surrogate.jsonl")],
           1, "invalid Unicode")
    import dam_cli.profiling.calib as calib

    monkeypatch.setattr(calib, "MAX_TEXT_BYTES", 2**20)
    (d / "longline.jsonl").write_text('{"text": "' + "the cat " * 200_000 + '"}\n')
    expect("inputs", "a JSONL line of 1.6 MB (the cap lowered to 1 MiB for this test)",
           [*P, "--calib", str(d / "longline.jsonl")], 1, "line 1 of calibration file", "1.0 MiB cap")
    assert not Path(out).exists()


# =========================================================================================
# Output paths and file systems
# =========================================================================================

def test_output_paths(work, tiny_profile, monkeypatch):
    import errno
    import socket

    import dam_cli.atomic as atomic

    d = work / "outputs"
    d.mkdir()
    PLACEHOLDERS[str(tiny_profile[1])] = "cap.h5"
    F = ["profile", "--from-capture", str(tiny_profile[1]), "--force", "--output"]
    os.mkfifo(d / "fifo")
    expect("outputs", "`--output` a named pipe, with --force", [*F, str(d / "fifo")], 2, "named pipe",
           "never replaces special files")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock"))
    s.close()
    expect("outputs", "`--output` a socket, with --force", [*F, str(d / "sock")], 2, "is a socket")
    if os.geteuid() == 0:
        os.mknod(d / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a copy of /dev/null (S_IFCHR)
        expect("outputs", "`--output` a copy of /dev/null made with mknod, with --force", [*F, str(d / "null")], 2,
               "character device")
        assert os.stat(d / "null").st_rdev == os.makedev(1, 3)
    else:
        record("outputs", "`--output` a device node", "-", "-", "not testable here: mknod needs root")
    (d / "target.safetensors").write_bytes(b"target")
    (d / "link.safetensors").symlink_to(d / "target.safetensors")
    expect("outputs", "`--output` a symbolic link, with --force", [*F, str(d / "link.safetensors")], 2,
           "symbolic link")
    assert (d / "target.safetensors").read_bytes() == b"target"
    expect("outputs", "`--output x.safetensors/` (trailing slash)", [*F, str(d / "x.safetensors") + "/"], 2,
           "ends with a slash")
    expect("outputs", "`--output` under a path whose folder is a file",
           [*F, str(d / "target.safetensors" / "p.safetensors")], 2, "a part of the path is a file")
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(d)) and flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    expect("outputs", "`--output` in a read-only folder (injected EROFS)", [*F, str(d / "p.safetensors")], 1,
           "read-only file system")
    expect("outputs", "`--save-capture` in a read-only folder (injected EROFS; before the model loads)",
           ["profile", "--output", str(work / "ro-p.safetensors"), "--save-capture", str(d / "cap.h5")], 1,
           "read-only file system")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil_usage(free=0))
    expect("outputs", "`--output` on a full disk (0 bytes free; found before the work)", [*F, str(d / "p.safetensors")],
           1, "no space left")
    monkeypatch.undo()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    (d / "p.safetensors").write_bytes(b"old")
    expect("outputs", "the disk fills up while the profile is written (injected ENOSPC)",
           [*F, str(d / "p.safetensors")], 1, "no space left")
    monkeypatch.undo()
    assert (d / "p.safetensors").read_bytes() == b"old"
    monkeypatch.setattr(atomic, "_PROC_FD", str(d / "no-proc"))
    got, _, err = run_cli(*F, str(d / "p.safetensors"), "--quiet")
    record("outputs", "no `/proc` (O_TMPFILE cannot be named): the named temporary file is used",
           "dam " + " ".join([*F, str(d / "p.safetensors"), "--quiet"]), got, "(writes the profile)")
    assert got == 0 and err == "" and load_profile(d / "p.safetensors").n_layers == 2
    monkeypatch.undo()
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def shutil_usage(free: int):
    import collections

    return collections.namedtuple("usage", "total used free")(1 << 30, (1 << 30) - free, free)


def test_save_capture_checked_before_the_model_runs(work, tiny_model_dir, monkeypatch):
    import dam_cli.runtime.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    d = work / "save-capture"
    d.mkdir()
    (d / "cap.h5").write_bytes(b"old capture")
    S = ["profile", "--recipe", "paper", "--model", tiny_model_dir, "--output", str(d / "p.safetensors"),
         "--save-capture"]
    expect("outputs", "`--save-capture` onto an existing file, no --force", [*S, str(d / "cap.h5")], 2,
           "already exists", "--force")
    expect("outputs", "`--save-capture` into a folder that does not exist", [*S, str(d / "no" / "cap.h5")], 2,
           "does not exist")
    expect("outputs", "`--save-capture` the same file as `--output`", [*S, str(d / "p.safetensors")], 2,
           "the same file")
    assert (d / "cap.h5").read_bytes() == b"old capture" and sorted(os.listdir(d)) == ["cap.h5"]
    expect("outputs", "`--output` the capture it re-derives, with --force",
           ["profile", "--from-capture", str(d / "cap.h5"), "--output", str(d / "cap.h5"), "--force"], 2,
           "--output and --from-capture name the same file")
    (d / "calib.txt").write_text("calibration text\n")
    expect("outputs", "`--output` its own calibration text, with --force",
           ["profile", "--calib", str(d / "calib.txt"), "--output", str(d / "calib.txt"), "--force"], 2,
           "--output and --calib name the same file")
    assert (d / "cap.h5").read_bytes() == b"old capture" and (d / "calib.txt").read_text() == "calibration text\n"


def test_png_and_terminal_escapes(work, tiny_profile):
    d = work / "png"
    d.mkdir()
    os.mkfifo(d / "fifo.png")
    expect("outputs", "`dam inspect --png` a named pipe, with --force",
           ["inspect", str(tiny_profile[0]), "--png", str(d / "fifo.png"), "--force"], 2, "named pipe")
    evil = str(d / "evil\x1b[2J\x1b]0;title\x07\nerror: forged.h5")
    line = expect("outputs", "a path holding terminal escapes and a newline (printed escaped, on one line)",
                  ["profile", "--from-capture", evil, "--output", str(d / "p.safetensors")], 1, "does not exist",
                  "\\x1b[2J", "\\nerror: forged")
    assert "\x1b" not in line and "\x07" not in line


# =========================================================================================
# Hostile captures (--from-capture)
# =========================================================================================

def _capture_copy(work, cap, name: str, edit) -> Path:
    """A copy of the tiny model's capture, changed by `edit(h5py.File)`."""
    import shutil

    import h5py

    (work / "caps").mkdir(exist_ok=True)
    p = work / "caps" / name
    shutil.copy(cap, p)
    with h5py.File(p, "r+") as f:
        edit(f)
    return p


def _meta_edit(change):
    def edit(f):
        meta = json.loads(f.attrs["dam.meta"])
        change(meta)
        f.attrs["dam.meta"] = json.dumps(meta)
    return edit


def _replace_layer(f, make):
    data = f["attn_sum/0001"][()]
    del f["attn_sum/0001"]
    make(f, data)


def test_hostile_captures(work, tiny_profile, monkeypatch):
    import h5py
    import numpy as np

    _, cap = tiny_profile
    out = work / "hostile.safetensors"
    P = ["profile", "--output", str(out), "--from-capture"]

    def case(what: str, edit, *needles: str, name: str | None = None) -> None:
        p = _capture_copy(work, cap, name or what.split()[0] + ".h5", edit)
        expect("captures", what, [*P, str(p)], 1, *needles)
        assert not out.exists()

    (work / "caps").mkdir(exist_ok=True)
    with h5py.File(work / "caps" / "elsewhere.h5", "w") as f:
        f["x"] = np.zeros((4, 16, 16), np.float32)
    case("layer 1 an external link to another HDF5 file",
         lambda f: _replace_layer(f, lambda f, d: f.__setitem__("attn_sum/0001", h5py.ExternalLink(
             str(work / "caps" / "elsewhere.h5"), "/x"))), "external link", name="extlink.h5")
    case("layer 1 a soft link to layer 0",
         lambda f: _replace_layer(f, lambda f, d: f.__setitem__("attn_sum/0001", h5py.SoftLink("/attn_sum/0000"))),
         "soft link", name="softlink.h5")
    (work / "caps" / "raw.bin").write_bytes(np.full((4, 16, 16), 1 / 16, np.float32).tobytes())
    os.mkfifo(work / "caps" / "raw.fifo")
    for what, src in [("a regular file", work / "caps" / "raw.bin"), ("a FIFO (reading it would hang)",
                                                                       work / "caps" / "raw.fifo"),
                      ("/dev/zero (read as attention)", Path("/dev/zero"))]:
        case(f"layer 1 stored outside the file, in {what}",
             lambda f, src=src: _replace_layer(f, lambda f, d: f["attn_sum"].create_dataset(
                 "0001", shape=d.shape, dtype=np.float32, external=[(str(src), 0, d.nbytes)])),
             "external file", name=f"external-{src.name}.h5")
    layout = h5py.VirtualLayout(shape=(4, 16, 16), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(work / "caps" / "elsewhere.h5"), "x", shape=(4, 16, 16))
    case("layer 1 a virtual dataset mapping another file",
         lambda f: _replace_layer(f, lambda f, d: f["attn_sum"].create_virtual_dataset("0001", layout)),
         "virtual dataset", name="virtual.h5")
    case("model.n_kv_heads 0", _meta_edit(lambda m: m["model"].update(n_kv_heads=0)), "n_kv_heads must be",
         name="kv0.h5")
    case("model.n_kv_heads missing", _meta_edit(lambda m: m["model"].pop("n_kv_heads")), "n_kv_heads must be",
         name="kvmissing.h5")
    case("model.n_kv_heads 3, not dividing 4 heads", _meta_edit(lambda m: m["model"].update(n_kv_heads=3)),
         "not a multiple", name="kv3.h5")
    case("model.name a number", _meta_edit(lambda m: m["model"].update(name=42)), "model.name must be a string",
         name="name42.h5")
    case("model.head_dim a string", _meta_edit(lambda m: m["model"].update(head_dim="16")), "head_dim must be",
         name="headdim.h5")
    case("pcl 10^30", _meta_edit(lambda m: m.update(pcl=10**30)), "an integer of 31 digits", name="pcl1e30.h5")
    case("pcl 100,000 (the layers are 16 x 16)", _meta_edit(lambda m: m.update(pcl=100_000)), "pcl must be",
         name="pcl1e5.h5")
    case("pcl 20 (the layers are 16 x 16)", _meta_edit(lambda m: m.update(pcl=20)), "expected float32 [4, 20, 20]",
         name="pcl20.h5")
    case("pcl above the model's max_position", _meta_edit(lambda m: m["model"].update(max_position=8)),
         "above the model's context of 8", name="maxpos.h5")
    case("a million heads", _meta_edit(lambda m: m["model"].update(n_heads=10**6)), "n_heads must be",
         name="heads.h5")
    case("10^9 layers", _meta_edit(lambda m: m["model"].update(n_layers=10**9)), "n_layers must be",
         name="layers.h5")
    case("3 layers claimed, 2 stored", _meta_edit(lambda m: m["model"].update(n_layers=3)), "missing layer 2 of 3",
         name="layers3.h5")
    case("calibration.samples disagreeing with the lengths", _meta_edit(lambda m: m["calibration"].update(samples=7)),
         "calibration.samples", name="samples.h5")
    case("model.hidden_size edited (the fields no longer hash to config_sha256)",
         _meta_edit(lambda m: m["model"].update(hidden_size=m["model"]["hidden_size"] + 1)),
         "do not hash to its config_sha256", name="hidden.h5")
    case("NaN in the metadata", lambda f: f.attrs.__setitem__("dam.meta", f.attrs["dam.meta"].replace(
        '"rope_theta": ', '"rope_theta": NaN, "x": ')), "NaN is not allowed", name="nan.h5")
    case("metadata nested 100,000 deep", lambda f: f.attrs.__setitem__("dam.meta", "[" * 100_000),
         "not strict JSON", name="nested.h5")
    case("attention sums of 1e38", lambda f: f["attn_sum/0001"].__setitem__((0, 0, 0), 1e38),
         "not a sum of attention probabilities", name="sum1e38.h5")
    case("a negative attention sum", lambda f: f["attn_sum/0001"].__setitem__((0, 5, 2), -0.5),
         "negative or non-finite", name="negative.h5")
    case("lengths claiming 10^7 samples (chunks never written)", lambda f: (f.__delitem__("lengths"), f.create_dataset(
        "lengths", shape=(10**7,), dtype=np.int64, chunks=(4096,), fillvalue=16)), "lengths must be 1 to 1,000,000",
        name="lengths.h5")

    def huge(f):
        for k in list(f["attn_sum"]):
            del f["attn_sum"][k]
        f["attn_sum"].create_dataset("0000", shape=(1, 65536, 65536), dtype=np.float32, chunks=(1, 64, 65536),
                                     compression="lzf")
        del f["lengths"]
        f["lengths"] = np.array([65536])
        meta = json.loads(f.attrs["dam.meta"])
        meta["model"].update(n_layers=1, n_heads=1, n_kv_heads=1, max_position=65536)
        meta["calibration"].update(samples=1, tokens=65536)
        meta["pcl"] = 65536
        f.attrs["dam.meta"] = json.dumps(meta)

    import dam_cli.profiling.run as run

    monkeypatch.setattr(run, "available_memory", lambda: 8 * 2**30)
    p = _capture_copy(work, cap, "huge.h5", huge)
    assert p.stat().st_size < 100_000
    from dam_cli.text import human_bytes

    expect("captures", f"a {p.stat().st_size // 1000} KB capture claiming L = 65,536 (1 layer x 1 head; 8 GiB "
           "available)", [*P, str(p)], 1, f"needs about {human_bytes(run.working_bytes(1, 1, 65536))} of memory",
           "more than the 8.0 GiB available")


HOSTILE_VALUES = [0, -1, 1, 2, 3, 4, 16, 17, 2**31, 10**20, 1.5, 2.0, "16", "", None, True, [], {},
                  "x\x1b[2J\nerror: forged", float("nan"), float("inf"), "DELETE"]
META_KEYS = [("model", k) for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "name", "architecture",
                                    "config_sha256", "max_position", "hidden_size", "rope")] \
    + [("calibration", k) for k in ("samples", "tokens", "source", "token_sha256")] + [(None, "pcl")]


def test_fuzzed_capture_metadata(work, tiny_profile):
    """Random metadata: each run ends in exit 1 with one line, or a profile that `dam inspect --check` accepts."""
    import h5py

    _, cap = tiny_profile
    rnd = random.Random(0)
    d = work / "fuzz"
    d.mkdir()
    p, out = d / "cap.h5", d / "p.safetensors"
    import shutil

    shutil.copy(cap, p)
    with h5py.File(p, "r") as f:
        base = json.loads(f.attrs["dam.meta"])
    counts = {0: 0, 1: 0}
    n_cases = 200
    for _ in range(n_cases):
        meta = json.loads(json.dumps(base))
        for _ in range(rnd.randint(1, 3)):
            section, key = rnd.choice(META_KEYS)
            target = meta if section is None else meta[section]
            value = rnd.choice(HOSTILE_VALUES)
            if value == "DELETE":
                target.pop(key, None)
            else:
                target[key] = value
        with h5py.File(p, "r+") as f:
            f.attrs["dam.meta"] = json.dumps(meta)
        out.unlink(missing_ok=True)
        code, _out, err = run_cli("profile", "--from-capture", str(p), "--output", str(out), "--quiet")
        assert code in (0, 1), (meta, code, err)
        assert "Traceback" not in err and "\x1b" not in err, err
        if code == 1:
            assert_one_error_line(err)
        else:
            got, _o, err2 = run_cli("inspect", str(out), "--check")
            assert got == 0, (meta, err2)
        counts[code] += 1
    assert counts[0] and counts[1]  # both kinds of outcome were exercised
    GENERATED["captures"] += n_cases
    record("captures", f"{n_cases} captures with 1 to 3 metadata fields set to hostile values (0, -1, 2^31, "
           "10^20, NaN, strings, lists, escapes, deleted...)", "dam profile --from-capture C", "1 or 0",
           f"{counts[1]} refused in one line; {counts[0]} made profiles that `dam inspect --check` accepts")


# =========================================================================================
# The command itself
# =========================================================================================

def test_version_and_short_help():
    from dam_cli import __version__

    code, out, err = run_cli("--version")
    record("basics", "`dam --version`", "dam --version", code, out.strip())
    assert code == 0 and out.strip() == f"dam {__version__}" and err == ""
    for args in (["-h"], ["profile", "-h"]):
        code, out, err = run_cli(*args)
        record("basics", f"`dam {' '.join(args)}`", "dam " + " ".join(args), code, "(the same help as --help)")
        assert code == 0 and out == run_cli(*args[:-1], "--help")[1] and "Usage" in out
    code, out, err = run_cli()  # no command: the help, and a reason on stderr (it once printed "error:  (see ...)")
    line = answer_line(err)
    record("basics", "`dam` alone", "dam", code, line)
    assert code == 2 and "Usage" in out and "Traceback" not in err
    assert line.startswith("error: missing command: choose one of eval, generate, inspect, profile"), line


# =========================================================================================
# Interrupted runs: SIGKILL, Ctrl-C, SIGTERM while the output is being written
# =========================================================================================

WRAPPER = r"""
import contextlib, os, signal, sys, time
# A shell's background job starts with SIGINT ignored, and Python then installs no Ctrl-C handler: take it back,
# as an interactive run of dam has it (else a test run from `cmd &` sees SIGINT do nothing).
signal.signal(signal.SIGINT, signal.default_int_handler)
marker = os.environ["DAM_TEST_MARKER"]
if os.environ.get("DAM_TEST_NO_TMPFILE"):
    del os.O_TMPFILE  # force the portable named-temporary-file path
import dam_cli.atomic as A

def mark(what):
    if not os.path.exists(marker):
        with open(marker + ".part", "w") as m:
            m.write(what)
        os.replace(marker + ".part", marker)

if os.environ.get("DAM_TEST_SLOW") == "write":
    real = A.atomic_open
    class Slow:  # writes in 512-byte pieces, 0.1 s apart: the run lasts long enough to be hit
        def __init__(self, f): self.f = f
        def write(self, b):
            mv = memoryview(b)
            for i in range(0, len(mv), 512):
                self.f.write(mv[i:i + 512]); self.f.flush()
                mark("writing")
                time.sleep(0.1)
        def __getattr__(self, n): return getattr(self.f, n)
    @contextlib.contextmanager
    def slow_open(path, force=True):
        with real(path, force) as f:
            yield Slow(f)
    A.atomic_open = slow_open  # before any writer module imports it by name
else:
    import dam_cli.profiling.run as PR  # slow derivation of layer 1, after layer 0 went into the capture file
    real_derive = PR.derive_layer
    def derive(s, cnt, cfg):
        if PR.derive_layer.calls == 1:
            mark("deriving")
            time.sleep(60)
        PR.derive_layer.calls += 1
        return real_derive(s, cnt, cfg)
    PR.derive_layer = derive
    PR.derive_layer.calls = 0
from dam_cli.cli.app import main
sys.argv = ["dam", *sys.argv[1:]]
main()
"""


def open_fds_into(pid: int, folder: Path) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(folder) + "/"):
                out.append(target)
    return out


def interrupt_run(folder: Path, args: list[str], sig: int, slow: str, no_tmpfile: bool = False):
    """Start `dam ARGS` under the wrapper, wait until it is mid-write, send `sig`; return facts."""
    marker = folder.parent / f"{folder.name}.marker"
    marker.unlink(missing_ok=True)
    env = cli_env(DAM_TEST_MARKER=str(marker), DAM_TEST_SLOW=slow)
    if no_tmpfile:
        env["DAM_TEST_NO_TMPFILE"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, f"dam exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "dam never reached the write"
        time.sleep(0.02)
    time.sleep(0.15)
    fds = open_fds_into(proc.pid, folder)  # the half-written output, open at the moment of the signal
    listing = sorted(os.listdir(folder))
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    return proc.returncode, err, fds, listing


@pytest.fixture(scope="module")
def old_outputs(tiny_profile):
    return tiny_profile[0].read_bytes(), tiny_profile[1].read_bytes()


@pytest.mark.parametrize("sig,name", [(signal.SIGKILL, "SIGKILL"), (signal.SIGINT, "SIGINT (Ctrl-C)")])
def test_interrupt_profile_while_writing(work, tiny_model_dir, old_outputs, sig, name):
    folder = work / f"int-{sig}"
    folder.mkdir()
    old = old_outputs[0]
    (folder / "p.safetensors").write_bytes(old)
    code, err, fds, listing = interrupt_run(
        folder, ["profile", "--recipe", "paper", "--model", tiny_model_dir, "--pcl", "16", "--samples", "2", "--output",
                 str(folder / "p.safetensors"), "--force", "--quiet"], sig, "write")
    assert fds and all("(deleted)" in t or "/#" in t for t in fds), fds  # an anonymous O_TMPFILE was open
    assert listing == ["p.safetensors"]
    assert (folder / "p.safetensors").read_bytes() == old
    assert sorted(os.listdir(folder)) == ["p.safetensors"]
    last = answer_line(err)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        last = "(killed: no message)"
    else:
        assert code == 130, err
        assert "Traceback" not in err and "interrupted" in last
    record("interrupts", f"{name} while `dam profile --force` writes the profile (O_TMPFILE)",
           "dam profile --model <tiny-model> --force -o p.safetensors", code,
           f"{last}; old file byte-identical, folder holds only p.safetensors")


def test_ctrl_c_while_writing_the_capture(work, tiny_model_dir, old_outputs):
    folder = work / "int-capture"
    folder.mkdir()
    (folder / "p.safetensors").write_bytes(old_outputs[0])
    (folder / "cap.h5").write_bytes(old_outputs[1])
    code, err, fds, listing = interrupt_run(
        folder, ["profile", "--recipe", "paper", "--model", tiny_model_dir, "--pcl", "16", "--samples", "2", "--output",
                 str(folder / "p.safetensors"), "--save-capture", str(folder / "cap.h5"), "--force", "--quiet"],
        signal.SIGINT, "derive", no_tmpfile=True)
    temps = [n for n in listing if n.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".cap.h5."), listing  # the capture was half-written
    assert code == 130, err
    assert "Traceback" not in err
    assert (folder / "p.safetensors").read_bytes() == old_outputs[0]
    assert (folder / "cap.h5").read_bytes() == old_outputs[1]
    assert sorted(os.listdir(folder)) == ["cap.h5", "p.safetensors"]
    record("interrupts", "SIGINT (Ctrl-C) while `--save-capture` holds layer 0 (named temporary file)",
           "dam profile --model <tiny-model> --save-capture cap.h5 --force", code,
           f"{answer_line(err)}; old profile and capture byte-identical, the .cap.h5.*.tmp file removed")


def test_sigterm_while_writing_from_capture(work, tiny_profile, old_outputs):
    folder = work / "int-term"
    folder.mkdir()
    (folder / "p.safetensors").write_bytes(old_outputs[0])
    code, err, fds, listing = interrupt_run(
        folder, ["profile", "--from-capture", str(tiny_profile[1]), "--tau", "0.5", "--output",
                 str(folder / "p.safetensors"), "--force", "--quiet"], signal.SIGTERM, "write", no_tmpfile=True)
    assert [n for n in listing if n.endswith(".tmp")], listing  # the named temporary file existed
    assert code == 143, err
    assert "Traceback" not in err and "terminated" in answer_line(err)
    assert (folder / "p.safetensors").read_bytes() == old_outputs[0]
    assert sorted(os.listdir(folder)) == ["p.safetensors"]
    record("interrupts", "SIGTERM while `dam profile --from-capture` writes the profile (named temporary file)",
           "dam profile --from-capture cap.h5 --force -o p.safetensors", code,
           f"{answer_line(err)}; old file byte-identical, the .p.safetensors.*.tmp file removed")


# =========================================================================================
# Determinism
# =========================================================================================

def test_determinism_runs_and_capture(work, tiny_model_dir, tiny_profile):
    from dam_cli.profiling.run import ProfileConfig, run_profile

    a, cap = tiny_profile
    b, c = work / "det-b.safetensors", work / "det-c.safetensors"
    # A second, separate process: same bytes.
    r = run_cli_subprocess("profile", "--recipe", "paper", "--model", tiny_model_dir, "--pcl", "16", "--samples", "2",
                           "--output", str(b), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert file_sha256(a) == file_sha256(b)
    record("determinism", "the tiny model profiled twice (in-process, then a new process)",
           "dam profile --model <tiny-model> --pcl 16 --samples 2", 0, "same sha256")
    run_profile(ProfileConfig(output=str(c), from_capture=str(cap), pcl=16))
    assert file_sha256(a) == file_sha256(c)
    record("determinism", "re-derived from its `--save-capture` file", "dam profile --from-capture cap.h5", 0,
           "same sha256 as the fresh run")
    d = work / "det-d.safetensors"
    run_profile(ProfileConfig(output=str(d), from_capture=str(cap), tau=0.5))
    assert file_sha256(d) != file_sha256(a)
    e = work / "det-e.safetensors"
    run_profile(ProfileConfig(output=str(e), from_capture=str(cap), tau=0.5))
    assert file_sha256(d) == file_sha256(e)
    record("determinism", "re-derived twice with `--tau 0.5`", "dam profile --from-capture cap.h5 --tau 0.5", 0,
           "the two agree, and differ from tau 0.3")


def test_internal_errors_one_line_and_debug_traceback(monkeypatch, tiny_profile):
    """A bug (not a DamError) still ends in one line and exit 70; DAM_DEBUG=1 shows the traceback."""
    import dam_cli.inspection.check as lib

    def boom(path):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(lib, "check", boom)
    code, _, err = run_cli("inspect", str(tiny_profile[0]), "--check")
    assert code == 70 and err.count("\n") == 1 and "RuntimeError: boom" in err and "DAM_DEBUG=1" in err, err
    monkeypatch.setenv("DAM_DEBUG", "1")
    from dam_cli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["dam", "inspect", str(tiny_profile[0]), "--check"])
    with pytest.raises(RuntimeError, match="boom"):
        main()
    monkeypatch.undo()  # the real check again, still in debug mode
    monkeypatch.setenv("DAM_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["dam", "inspect", "missing.safetensors", "--check"])
    with pytest.raises(DamError, match="does not exist"), contextlib.redirect_stdout(io.StringIO()):
        main()


# =========================================================================================
# The table
# =========================================================================================

def render_doc() -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["# Reliability: bad inputs and their answers", "",
           "Generated by `tests/cli/test_reliability.py` "
           "(`DAM_WRITE_RELIABILITY_DOC=1 pytest tests/cli/test_reliability.py`);",
           "a normal test run asserts every answer below and fails if this table is stale. The loader is also fuzzed",
           "with over 1,000 mutated profile files in `tests/artifact/test_format_fuzz.py` (each ends in `DamError`",
           "or a valid load); `tests/cli/test_output_paths.py`, `tests/profiling/test_calibration_inputs.py` and",
           "`tests/cli/test_hostile_inputs.py` test the same classes at the library level.", "",
           "Exit codes: `0` success, `1` a failure the user can fix (`DamError`), `2` a wrong option or argument",
           "(`DamUsageError`, and Click's own usage errors), `130` Ctrl-C (SIGINT), `143` SIGTERM; a process killed",
           "with SIGKILL reports `-9` to its parent. `DAM_DEBUG=1` shows the traceback instead of the one line.",
           "A standard output that is full or closed (`>/dev/full`, `>&-`) is `1` with one line; a reader that stops",
           "early (`| head`) ends the command with `1` and nothing said; a closed or full standard error never stops",
           "the work (`tests/cli/test_standard_streams.py`). A command given `--json` that fails also prints",
           "`{\"error\": <the line>, \"exit_code\": <code>}` on standard output (`tests/cli/test_profile_cli.py`).",
           "`<tmp>` is the test's temporary folder, `<tiny-model>` the tiny Llama folder of `tests/conftest.py`.", ""]
    def cases(key: str) -> int:  # a summary row of generated cases counts as each of its cases
        return len(ROWS[key]) + (GENERATED[key] - 1 if GENERATED[key] else 0)

    out += ["## What these tests try", "", "| section | table rows | cases |", "|---|---|---|"]
    out += [f"| {title} | {len(ROWS[key])} | {cases(key)} |" for key, (title, _) in SECTIONS.items()]
    out += [f"| all | {sum(len(r) for r in ROWS.values())} | {sum(cases(k) for k in SECTIONS)} |", ""]
    for key, (title, note) in SECTIONS.items():
        out += [f"## {title}", ""]
        if note:
            out += [note, ""]
        out += ["| bad input | command | exit | answer |", "|---|---|---|---|"]
        for what, cmd, code, ans in ROWS[key]:
            cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
            out.append(f"| {cell(what)} | `{cell(cmd)}` | {code} | {cell(ans)} |")
        out.append("")
    out += ["## Known issues found by these tests", ""]
    out += [f"- {b}" for b in KNOWN_BUGS] or ["- none"]
    return "\n".join(out) + "\n"


def test_zz_reliability_doc():
    """Runs last in this file: writes docs/reliability.md, or checks the committed one is current."""
    missing = [k for k, rows in ROWS.items() if not rows]
    if missing:
        pytest.skip(f"sections not run in this session: {missing}")
    text = render_doc()
    if WRITE_DOC:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists(), "docs/reliability.md is missing: run with DAM_WRITE_RELIABILITY_DOC=1"
    assert DOC.read_text() == text, ("docs/reliability.md is stale: run "
                                     "`DAM_WRITE_RELIABILITY_DOC=1 pytest tests/cli/test_reliability.py`")

"""Hostile and unlucky profile files, and what `dam inspect` prints about any profile.

The loader refuses, before reading or allocating, what the reference safetensors reader refuses
(duplicate keys, shapes that are not integers, reversed, gapped or overlapping offsets, bytes after
the last tensor), headers larger than a profile needs, recipes `dam profile` would refuse, and
numbers too large for a float. `dam inspect --check` reads the true mask a block of rows at a time,
so a small sparse file claiming L = 65,536 costs a few MB; densities at any --length need no
`length`-long array. Everything taken from a file is printed escaped, as plain text; tables fit 80
columns; comparisons and the "heads worth a look" say what they mean.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import (
    assert_inert,
    join_header,
    join_header_text,
    profile_bytes,
    run_cli,
    split_header,
)

from dam_cli import masks
from dam_cli.artifact.format import MAX_HEADER, expected_tensors, read_meta
from dam_cli.artifact.profile import Profile, ProfileMeta, load_profile
from dam_cli.artifact.tensors import tensor_bytes
from dam_cli.errors import DamError, DamUsageError

EVIL = "tiny\x1b[2J\x1b]0;owned\x07 [/] [bold]b[/bold] $x^2$\u202eevil\r\nerror: forged"


def one_line_error(result: tuple[int, str, str], code: int, *needles: str) -> str:
    got, _, err = result
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def small_profile(seed: int = 0, NL: int = 2, H: int = 2, L: int = 12, **overrides) -> Profile:
    g = torch.Generator().manual_seed(seed)
    tm = torch.tril(torch.rand(NL, H, L, L, generator=g) < 0.4)
    R, C = masks.match_patterns(tm, 0.8)
    return Profile.from_masks(tm, R, C, **overrides)


GOOD = profile_bytes(small_profile())


def with_recipe(data: bytes, **changes: str) -> bytes:
    """`data` with recipe values replaced by raw JSON text (so a 400-digit integer stays an integer)."""
    h, body = split_header(data)
    recipe = json.loads(h["__metadata__"]["dam.recipe"])
    recipe.update({k: f"@@{k}" for k in changes})
    inner = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    for k, v in changes.items():
        inner = inner.replace(f'"@@{k}"', v)
    h["__metadata__"]["dam.recipe"] = inner
    return join_header(h, body)


def reference_refuses(path) -> bool:
    """Whether the reference safetensors reader refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001  (any refusal counts)
        return True
    return False


# =========================================================================================
# The file: what the reference reader refuses, header size, recipe ranges, huge numbers
# =========================================================================================

def _dup_metadata(h: dict, body: bytes) -> bytes:
    text = json.dumps(h, sort_keys=True, separators=(",", ":"))
    meta = json.dumps(h["__metadata__"], sort_keys=True, separators=(",", ":"))
    return join_header_text(text.replace('"__metadata__":' + meta, f'"__metadata__":{meta},"__metadata__":{meta}'),
                            body)


def _float_shape(h: dict, body: bytes) -> bytes:
    h["offsets"]["shape"] = [float(x) for x in h["offsets"]["shape"]]
    return join_header(h, body)


def _reversed(h: dict, body: bytes) -> bytes:
    h["columns"]["data_offsets"] = h["columns"]["data_offsets"][::-1]
    return join_header(h, body)


def _negative(h: dict, body: bytes) -> bytes:
    a, b = h["columns"]["data_offsets"]
    h["columns"]["data_offsets"] = [a - b, 0]  # the right span, at a negative start
    return join_header(h, body)


def _gap(h: dict, body: bytes) -> bytes:
    for info in h.values():
        if "data_offsets" in info:
            info["data_offsets"] = [x + 8 for x in info["data_offsets"]]
    return join_header(h, b"\0" * 8 + body)


def _overlap(h: dict, body: bytes) -> bytes:
    h["columns"]["data_offsets"] = h["offsets"]["data_offsets"]
    return join_header(h, body)


@pytest.mark.parametrize("make,needle", [
    (_dup_metadata, 'the key "__metadata__" twice'),
    (_float_shape, "tensor offsets has shape [2.0, 2.0, 12.0]: a shape is a list of integers"),
    (lambda h, body: join_header(h, body + b"\0" * 8),
     "8 bytes follow the last tensor (true_mask): safetensors readers"),
    (_gap, "8 bytes before tensor columns belong to no tensor"),
    (_reversed, "tensor columns ends (at byte 0) before it starts"),
    (_negative, "tensor columns starts at a negative offset (-48)"),
    (_overlap, "tensors columns and offsets overlap"),
])
def test_what_the_reference_reader_refuses_is_refused(tmp_path, make, needle):
    h, body = split_header(GOOD)
    path = tmp_path / "p.safetensors"
    path.write_bytes(make(h, body))
    assert reference_refuses(path)
    with pytest.raises(DamError) as e:
        load_profile(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not re.search(r"spans (\d+) bytes, expected \1\b", str(e.value))  # never a non-reason
    one_line_error(run_cli("inspect", str(path), "--check", columns=150), 1, needle)


def test_duplicate_keys_anywhere_are_refused(tmp_path):
    h, body = split_header(GOOD)
    text = json.dumps(h, sort_keys=True, separators=(",", ":"))
    entry = json.dumps(h["offsets"], sort_keys=True, separators=(",", ":"))
    path = tmp_path / "p.safetensors"
    path.write_bytes(join_header_text(text.replace(f'"offsets":{entry}', f'"offsets":{entry},"offsets":{entry}'), body))
    with pytest.raises(DamError, match='its header has the key "offsets" twice'):
        read_meta(path)
    recipe = h["__metadata__"]["dam.recipe"]
    h["__metadata__"]["dam.recipe"] = recipe[:-1] + ',"tau":0.5}'  # tau twice inside the recipe JSON
    path.write_bytes(join_header(h, body))
    with pytest.raises(DamError, match='dam.recipe has the key "tau" twice'):
        read_meta(path)


def test_a_63_mb_header_is_refused_before_it_is_read(tmp_path):
    n = 63_000_000
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # sparse: the header's bytes are never written, nor read
        f.write(struct.pack("<Q", n) + b"[[],")
        f.truncate(8 + n + 64)
    tracemalloc.start()
    try:
        with pytest.raises(DamError) as e:
            read_meta(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "its header is 63,000,000 bytes, over the 1,000,000 bytes a profile header can need" in str(e.value)
    assert peak < 1_000_000, peak
    one_line_error(run_cli("inspect", str(path), "--check", columns=150), 1, "63,000,000 bytes")


def test_the_largest_sane_header_fits_and_the_writer_refuses_a_larger_one(tmp_path):
    paths = ",".join("/" + "d" * 4000 + f"/calib{i}.jsonl" for i in range(200))  # 200 full-length --calib paths
    p = small_profile()
    p.meta.calibration["source"] = paths
    p.meta.model["rope"] = {"long_factor": [1.0 + i / 7 for i in range(128)], "short_factor": [1.0] * 128}
    p.save(tmp_path / "ok.safetensors")
    assert read_meta(tmp_path / "ok.safetensors").calibration["source"] == paths
    p.meta.calibration["source"] = paths * 2
    with pytest.raises(DamError, match=f"its header is .* bytes, over the {MAX_HEADER:,}-byte limit"):
        p.save(tmp_path / "big.safetensors")
    assert not (tmp_path / "big.safetensors").exists()


@pytest.mark.parametrize("changes,needle", [
    ({"tau": "0"}, "dam.recipe.tau must be a number > 0 (as dam profile --tau), got 0"),
    ({"tau": "-0.3"}, "dam.recipe.tau must be a number > 0"),
    ({"eps": "-1"}, "dam.recipe.eps must be a number in (0, 1)"),
    ({"eps": "0"}, "dam.recipe.eps must be a number in (0, 1)"),
    ({"mu": "1.5"}, "dam.recipe.mu must be a number in (0, 1] (as dam profile --mu), got 1.5"),
    ({"mu": "0"}, "dam.recipe.mu must be a number in (0, 1]"),
    ({"lam": '"0.5"'}, 'dam.recipe.lam must be a finite number, got "0.5"'),  # a string, shown quoted
    ({"pattern_mass": "0"}, "dam.recipe.pattern_mass must be a number in (0, 1]"),
    ({"pcl": "70000"}, "dam.recipe.pcl must be an integer from 1 to 65536"),
    ({"min_support": "0"}, "dam.recipe.min_support must be a positive integer, got 0"),
    ({"seed": str(2**70)}, "dam.recipe.seed must be an integer from -9223372036854775808 to"),
    ({"tau": "1" + "0" * 400}, "dam.recipe.tau must be a number > 0 (as dam profile --tau), got 1000"),
    ({"pattern_mass": "9" * 400}, "dam.recipe.pattern_mass must be a number in (0, 1]"),
])
def test_recipes_dam_profile_would_refuse_are_refused(tmp_path, changes, needle):
    path = tmp_path / "p.safetensors"
    path.write_bytes(with_recipe(GOOD, **changes))
    with pytest.raises(DamError) as e:
        read_meta(path)
    assert needle in str(e.value) and len(str(e.value)) < 300, str(e.value)


@pytest.mark.parametrize("key", ["tau", "pattern_mass"])
def test_a_400_digit_number_is_one_line_in_check_and_compare(tmp_path, key):
    bad, good = tmp_path / "bad.safetensors", tmp_path / "good.safetensors"
    bad.write_bytes(with_recipe(GOOD, **{key: "7" * 400}))
    good.write_bytes(GOOD)
    one_line_error(run_cli("inspect", str(bad), "--check", columns=150), 1, f"dam.recipe.{key} must be a number")
    one_line_error(run_cli("inspect", str(good), str(bad), columns=150), 1, f"dam.recipe.{key} must be a number")
    one_line_error(run_cli("inspect", str(bad), columns=150), 1, f"dam.recipe.{key}")


def with_model(data: bytes, **changes) -> bytes:
    h, body = split_header(data)
    model = json.loads(h["__metadata__"]["dam.model"])
    model.update(changes)
    h["__metadata__"]["dam.model"] = json.dumps(model, sort_keys=True, separators=(",", ":"))
    return join_header(h, body)


def test_retrieval_heads_that_disagree_with_the_recipe_are_refused(tmp_path):
    """A `full_heads` bit flipped (one head more on full attention than the recipe says), or a recipe count changed
    without the tensor: refused by the loader and by `inspect --check`, in one line. A recipe count above the model's
    heads marks every head (`dam profile` clamps it), so only the clamped count must match."""
    full = torch.zeros(2, 2, dtype=torch.bool)
    full[0, 1] = True
    good = profile_bytes(small_profile(full_heads=full))
    h, body = split_header(good)
    begin, end = h["full_heads"]["data_offsets"]
    flipped = bytearray(body)
    flipped[begin] = 1  # layer 0, head 0 joins head 1
    cases = {"flipped": join_header(h, bytes(flipped)), "recount": with_recipe(good, retrieval_heads="3")}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(DamError, match="full_heads marks (2|1) heads but dam.recipe.retrieval_heads says (1|3)"):
            load_profile(path)
        one_line_error(run_cli("inspect", str(path), "--check", columns=150), 1, "full_heads marks",
                       "re-create it with `dam profile`")
    every = torch.ones(2, 2, dtype=torch.bool)
    path = tmp_path / "every.safetensors"
    path.write_bytes(with_recipe(profile_bytes(small_profile(full_heads=every)), retrieval_heads="16"))
    assert int(load_profile(path).full_heads.sum()) == 4


def test_a_pcl_above_the_models_context_and_an_absurd_head_dim_are_refused(tmp_path):
    for changes, needle in (({"max_position": 8}, "dam.recipe.pcl 12 is above dam.model.max_position 8"),
                            ({"head_dim": 10**9}, "dam.model.head_dim must be an integer from 1 to 65536")):
        path = tmp_path / "p.safetensors"
        path.write_bytes(with_model(GOOD, **changes))
        one_line_error(run_cli("inspect", str(path), "--check", columns=150), 1, needle)
    path.write_bytes(with_model(GOOD, max_position=0))  # 0: the model's context is unknown
    code, out, _ = run_cli("inspect", str(path), "--length", "4096", columns=150)
    assert code == 0 and "beyond the model's context" not in out


def test_save_refuses_a_file_that_appears_while_it_encodes(tmp_path, monkeypatch):
    """`save_profile` hands `force` to the atomic writer: a file made meanwhile is kept, never replaced."""
    from dam_cli.artifact import format as fmt

    path = tmp_path / "p.safetensors"
    real = fmt.encode_profile

    def racing(p):
        path.write_bytes(b"someone else's file")
        return real(p)

    monkeypatch.setattr(fmt, "encode_profile", racing)
    with pytest.raises(DamUsageError, match="already exists: pass --force"):
        small_profile().save(path)
    assert path.read_bytes() == b"someone else's file"
    small_profile().save(path, force=True)
    assert path.read_bytes() == GOOD
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(DamUsageError, match="named pipe"):
        small_profile().save(fifo, force=True)


# =========================================================================================
# dam inspect: sizes before allocation
# =========================================================================================

def write_sparse(path, NL: int, H: int, L: int) -> None:
    """A valid all-zero profile of any size that takes a few KB on disk (the data is a hole)."""
    meta = ProfileMeta(model={"name": "sparse", "architecture": "llama", "n_layers": NL, "n_heads": H,
                              "n_kv_heads": H, "head_dim": 64},
                       recipe={"pcl": L, "tau": 0.3, "lam": 0.5, "mu": 0.8, "eps": 1e-10}, calibration={})
    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    header: dict = {"__metadata__": {"dam.format": "dam-profile", "dam.schema": "2", "dam.tool_version": "test",
                                     "dam.model": dump(meta.model), "dam.recipe": dump(meta.recipe),
                                     "dam.calibration": "{}"}}
    off = 0
    for name, (dt, shape) in sorted(expected_tensors(meta).items()):
        n = tensor_bytes(dt, shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    data = join_header(header, b"")
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(len(data) + off)


def test_check_of_a_sparse_file_claiming_a_huge_pcl_stays_small(tmp_path):
    """L = 32,768 and 65,536, 1 layer x 1 head: 67 MB and 268 MB of true mask, read a block at a time."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (VmHWM: the peak RSS of this process image alone)")
    code = ("import re, sys, time; from dam_cli.inspection.check import check; t = time.time(); "
            "r = [check(p) for p in sys.argv[1:]]; "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print(all(x.valid for x in r), hwm, time.time() - t)")
    paths = []
    for L in (32768, 65536):
        write_sparse(tmp_path / f"L{L}.safetensors", 1, 1, L)
        assert os.path.getsize(tmp_path / f"L{L}.safetensors") > L * L // 16  # the size it claims
        paths.append(str(tmp_path / f"L{L}.safetensors"))
    res = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    valid, peak_kib, seconds = res.stdout.split()
    assert valid == "True"
    assert int(peak_kib) < 200 * 1024, f"peak RSS {int(peak_kib) // 1024} MB"  # was 3.3 GB at L = 32,768


def test_loading_more_than_the_memory_available_is_refused_first(tmp_path, monkeypatch):
    from dam_cli.artifact import tensors

    write_sparse(tmp_path / "p.safetensors", 1, 2, 4096)
    monkeypatch.setattr(tensors, "available_memory", lambda: 5_000_000)
    tracemalloc.start()
    try:
        result = run_cli("inspect", str(tmp_path / "p.safetensors"), columns=150)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 2 heads: 2 x 1,049,088 bytes of triangle, 2 x 2 MiB of rows, 2 x 4096 x 10 + 16 bytes beside: 6,374,416
    one_line_error(result, 1, "needs about 6.1 MiB of memory to load it (1 layers x 2 heads, PCL 4096), more "
                   "than the 4.8 MiB available")
    assert peak < 2_000_000, peak
    assert run_cli("inspect", str(tmp_path / "p.safetensors"), "--check", columns=150)[0] == 0  # blocks of rows fit


def _counts_beyond(S: int) -> list[int]:
    """Allowed pairs of the four heads of `KINDS` below at length S > 15 (see tests/inspection/test_inspect.py)."""
    return [8 + 2 * (S - 8), 15 + 4 * (S - 8) - 1, 15 + 4 * (S - 8) - 1, 11 + 3 * (S - 8)]


def _hand_profile(**overrides) -> Profile:
    i = torch.arange(8)
    eye = i[:, None] == i[None, :]
    heads = [eye, eye | (i[None, :] == 0), ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) <= 1),
             eye | ((i[None, :] == 4) & (i[:, None] >= 4))]
    tm = torch.stack(heads).reshape(2, 2, 8, 8)
    R, C = masks.match_patterns(tm, 0.8)
    return Profile.from_masks(tm, R, C, **overrides)


def test_any_length_costs_the_same_memory(tmp_path):
    from dam_cli.inspection.summary import summarize

    _hand_profile().save(tmp_path / "a.safetensors")
    for S in (10**7, 2**40):
        tracemalloc.start()
        try:
            s = summarize(tmp_path / "a.safetensors", S)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 5_000_000, (S, peak)  # was 320 MB at 10^7: one int64 per row and head
        assert [h.density_length for h in s.heads] == [c / (S * (S + 1) / 2) for c in _counts_beyond(S)]
    one_line_error(run_cli("inspect", str(tmp_path / "a.safetensors"), "--length", str(2**40 + 1), columns=150), 2,
                   "--length must be at most 1,099,511,627,776", "got 1,099,511,627,777")


def test_a_head_picture_at_any_length_reads_only_reachable_keys(tmp_path):
    """Rows beyond L reach keys below L and from i - L + 1 on: the picture asks for those windows only."""
    from dam_cli.inspection.pictures import head_picture, pool

    p = _hand_profile()
    for layer, head, S, grid in ((0, 1, 100, 16), (1, 0, 37, 64), (1, 1, 333, 10)):
        pic = head_picture(p, layer, head, S, grid, rows_per_cell=10**6)  # every row: exact
        full = masks.stage2_mask(p.layer_true_mask(layer)[head], p.offsets[layer, head], p.columns[layer, head], S)
        assert np.allclose(pic.stage2, pool(full.numpy(), grid), rtol=0, atol=1e-12), (layer, head, S)
    t0 = time.monotonic()
    pic = head_picture(p, 0, 0, 10**9, 4)  # diagonal-only: keys 7 (column) and i (guard)
    assert time.monotonic() - t0 < 30
    size = 10**9 // 4
    assert pic.stage2[3, 3] == pytest.approx(1 / size) and pic.stage2[3, 0] == pytest.approx(1 / size)
    assert pic.stage2[3, 1] == 0
    assert pic.stage2[0, 0] == pytest.approx(1.875 / size)  # sampled rows 0 (key 0 only) and 7 more (keys 7, i)


def test_png_destination_is_checked_before_the_work(tmp_path, monkeypatch):
    from dam_cli.inspection import summary

    _hand_profile().save(tmp_path / "a.safetensors")
    monkeypatch.setattr(summary, "summarize", lambda *a, **k: pytest.fail("summarised before --png was checked"))
    os.mkfifo(tmp_path / "out.png")
    for force in ([], ["--force"]):
        one_line_error(run_cli("inspect", str(tmp_path / "a.safetensors"), "--png", str(tmp_path / "out.png"),
                               *force, columns=150), 2, "--png", "named pipe (FIFO), not a regular file")
    (tmp_path / "dir.png").mkdir()
    one_line_error(run_cli("inspect", str(tmp_path / "a.safetensors"), "--png", str(tmp_path / "dir.png"),
                           columns=150), 2, "is a folder")
    if os.path.exists("/proc/version"):  # files there look regular and are not; new names there cannot be made
        for target, force in (("/proc/version", ["--force"]), ("/proc/dam-new.png", [])):
            one_line_error(run_cli("inspect", str(tmp_path / "a.safetensors"), "--png", target, *force,
                                   columns=150), 2, "in the kernel's /proc folder", "choose another path")


# =========================================================================================
# dam inspect: text from files, and what it says
# =========================================================================================

@pytest.fixture()
def evil_profiles(tmp_path):
    """A profile whose model name, recipe and calibration strings hold escapes and Rich markup, in a folder
    whose name holds them too; and the same profile with one more recipe key (for `inspect A B`)."""
    folder = tmp_path / "d[red]\x1b[31m"
    folder.mkdir()
    a, b = folder / "a[bold].safetensors", folder / "b.safetensors"
    _hand_profile(name=EVIL, variant=EVIL).save(a)
    p = _hand_profile(name=EVIL, variant=EVIL, min_support=2)
    p.meta.calibration["source"] = EVIL
    p.save(b)
    return a, b


@pytest.mark.parametrize("args", [[], ["--layer", "0", "--head", "1"], ["--check"], ["B"], ["--layer", "1"]])
def test_text_from_the_file_is_printed_escaped_and_never_as_markup(evil_profiles, args):
    a, b = evil_profiles
    args = [str(b) if x == "B" else x for x in args]
    code, out, err = run_cli("inspect", str(a), *args, columns=150)
    assert code == 0, err
    assert_inert(out + err)
    assert "error: forged" not in [line.strip() for line in (out + err).splitlines()]
    if "--check" not in args:  # shown as written (lines may wrap), not read as markup
        assert "[/][bold]b[/bold]$x^2$" in "".join(out.split())
    assert "a[bold].safetensors" in out


def test_png_title_escapes_the_model_name(evil_profiles, tmp_path):
    a, _ = evil_profiles
    code, _, err = run_cli("inspect", str(a), "--png", str(tmp_path / "p.png"), columns=150)
    assert code == 0, err
    assert_inert(err)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_invalid_file_messages_are_escaped_on_stdout_and_stderr(tmp_path):
    h, body = split_header(GOOD)
    text = json.dumps(h, sort_keys=True, separators=(",", ":"))
    key = json.dumps(EVIL)
    path = tmp_path / "p.safetensors"
    path.write_bytes(join_header_text(text[:-1] + f",{key}:1,{key}:2}}", body))
    code, out, err = run_cli("inspect", str(path), "--check", columns=150)
    assert code == 1 and "twice" in out and "twice" in err
    assert_inert(out + err)


def test_comparing_a_profile_with_itself_says_it_is_identical(evil_profiles):
    a, _ = evil_profiles
    code, out, _ = run_cli("inspect", str(a), str(a), columns=150)
    assert code == 0
    assert "all 4 heads are identical (M, R and C): the two profiles mask the same pairs" in out
    assert "recipe changes: none" in out
    assert "agree least" not in out and "differ" not in out and "None" not in out


def test_comparison_says_none_and_same_never_python_none(evil_profiles):
    a, b = evil_profiles
    code, out, _ = run_cli("inspect", str(a), str(b), "--layer", "0", columns=150)
    assert code == 0
    assert "recipe changes: min_support none -> 2" in out
    assert "None" not in out and "+[" not in out and "-[" not in out
    assert "offsets same; columns same" in out or "gained" in out
    code, out, _ = run_cli("inspect", str(a), str(b), columns=150)
    assert "None" not in out and "agree least" not in out


def test_the_ascii_legend_lists_every_character_the_picture_uses():
    from dam_cli.inspection.render import _legend, picture_lines

    legend = _legend(colour=False).plain
    listed = set(re.findall(r'"(.)"', legend))
    assert listed == set(" .:-=+*#%@")
    cells = np.concatenate([[0.0], np.logspace(-4, 0, 255)])[None, :]  # one cell row: no two-row averages
    used = set(picture_lines(cells, colour=False).plain)
    assert used == listed
    rng = np.random.default_rng(0)
    assert set(picture_lines(rng.random((16, 16)) ** 4, colour=False).plain) - {"\n"} <= listed
    for k in range(1, 10):  # each character's stated lower bound is where it starts
        low = 10 ** ((k - 1) / 3 - 3)
        from dam_cli.inspection.render import ascii_shade

        assert ascii_shade(low * 1.001) == " .:-=+*#%@"[k] and ascii_shade(low * 0.999) == " .:-=+*#%@"[k - 1 or 1]


@pytest.mark.parametrize("args", [[], ["--layer", "5"], ["B"]])
def test_tables_fit_80_columns_without_breaking_a_value(args):
    import glob

    from helpers import REPO_ROOT

    shipped = sorted(glob.glob(os.path.join(REPO_ROOT, "profiles", "*.safetensors")))
    full = [p for p in shipped if read_meta(p).recipe.get("retrieval_heads")]  # the widest table: a FULL column
    if not full or len(shipped) < 2:
        pytest.skip("the shipped profiles (one with retrieval heads) are missing")
    needle = full[0]
    same_model = [p for p in shipped if p != needle and read_meta(p).model.get("config_sha256")
                  == read_meta(needle).model.get("config_sha256")]  # a profile of the same model to compare with
    if not same_model:
        pytest.skip("no second shipped profile of the same model")
    faithful = same_model[0]
    code, out, err = run_cli("inspect", needle, *[faithful if x == "B" else x for x in args], columns=80)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(x.rstrip()) for x in lines) <= 80
    rows = [x.split() for x in lines if re.match(r"^ +\d+ +[-+]?\d", x)]
    assert len(rows) >= 30 and all(len(r) == len(rows[0]) for r in rows[:30])  # one line per layer, no wrap
    if not args:
        assert "max position 8192" in out and "dam-options-dy…" not in out
    if "--layer" in args:
        heads = [x for x in lines if re.match(r"^ +\d │ ", x)]
        assert len(heads) == 9 and all(x.count("│") == 7 for x in heads)


@pytest.mark.parametrize("value, needle", [
    (None, "dam.format missing"),
    ("something-else", "its dam.format is 'something-else', not 'dam-profile'"),
])
def test_a_foreign_or_missing_format_is_named(tmp_path, value, needle):
    h, body = split_header(GOOD)
    if value is None:
        del h["__metadata__"]["dam.format"]
    else:
        h["__metadata__"]["dam.format"] = value
    path = tmp_path / "p.safetensors"
    path.write_bytes(join_header(h, body))
    with pytest.raises(DamError) as e:
        read_meta(path)
    assert needle in str(e.value) and "\n" not in str(e.value)

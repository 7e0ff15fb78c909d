"""Property-based fuzzing of the profile loader with hypothesis: mutated real profile files.

Every case writes a mutated file and loads it; the only allowed outcomes are a `DamError` with a
one-line message, or a load whose result is self-consistent (shapes agree with the metadata, the
true mask is causal). Any other exception fails, and so does a case that runs past `HANG_S` (an
interval timer raises inside the loader). Over 1,000 cases in all, in well under a minute.

Mutations: byte flips anywhere, truncation at any offset, edits of the header JSON (values
replaced, keys deleted or added, tensor entries swapped), edits of the JSON inside the
`dam.model` / `dam.recipe` / `dam.calibration` metadata strings, and edits of the 8-byte length
field. Small profiles are mutated whole; the shipped SmolLM2 profile only in its header.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import tempfile

import pytest
import torch
from helpers import SHIPPED_PROFILE as SMOLLM2_PROFILE  # noqa: E402
from helpers import join_header, profile_bytes, random_profile, split_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dam_cli.artifact.format import causal_pairs
from dam_cli.artifact.profile import ProfileMeta, load_profile, read_meta
from dam_cli.errors import DamError

HANG_S = 10.0  # no single load may take this long: a hang is a failure, not a slow pass
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = {"flip": 300, "truncate": 100, "header": 250, "meta": 250, "length": 80, "splice": 60,
         "shipped_header": 120}  # 1,160 hypothesis cases, plus the exhaustive truncation sweep below
STATS = {"valid": 0, "error": 0}


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S):
    def on_alarm(signum, frame):
        raise Hang(f"the loader ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def small_profile_bytes(seed: int = 0, NL: int = 2, H: int = 2, L: int = 12) -> bytes:
    """A real profile as file bytes (L = 12: each head's 78 stored mask bits leave 2 padding bits)."""
    return profile_bytes(random_profile(NL, H, L, p_m=0.4, p_r=0.3, p_c=0.2, seed=seed))


SMALL = small_profile_bytes()
WORKDIR = tempfile.mkdtemp(prefix="dam-fuzz-")


def check_outcome(data: bytes, name: str = "case.safetensors", full: bool = True) -> str:
    """Write `data`, load it; return "valid" or "error", or fail the test on anything else."""
    path = os.path.join(WORKDIR, name)
    with open(path, "wb") as f:
        f.write(data)
    outcome = "valid"
    with no_hang():
        try:
            meta = read_meta(path)
            assert isinstance(meta, ProfileMeta)
            if full:
                p = load_profile(path)
                NL, H, L = p.meta.n_layers, p.meta.n_heads, p.meta.pcl
                assert p.offsets.shape == p.columns.shape == (NL, H, L)
                assert p.offsets.dtype == p.columns.dtype == torch.bool
                assert p.true_mask_packed.shape == (NL, H, L, (L + 7) // 8)
                assert not torch.triu(p.true_mask, diagonal=1).any(), "a non-causal true mask was accepted"
                for t in p.stats.values():
                    assert t.dtype == torch.float32
                # What consumers do with a loaded profile must work: strict JSON (`--json`),
                # the Stage-2 mask and densities beyond the PCL.
                json.dumps(p.meta.to_dict(), allow_nan=False)
                assert p.mask(NL - 1, L + 3).shape == (H, L + 3, L + 3)
                d = p.density(L + 3)
                assert bool(((d >= 0) & (d <= 1)).all())
            else:
                json.dumps(meta.to_dict(), allow_nan=False)
        except DamError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
            outcome = "error"
    STATS[outcome] += 1
    return outcome


# ---- JSON value generator for header edits ------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([2**31, 2**63, 2**64 + 1, -2**63, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) | st.just(1e308)
           | st.sampled_from(["BOOL", "U8", "F32", "I64", "F16", "dam-profile", "1", "2", "[/]", "{}"]))
json_values = st.recursive(scalars,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)


def paths_of(obj, prefix=()):
    """Every path (tuple of keys/indices) into a JSON structure, the root excluded."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths_of(v, prefix + (k,)))
    return out


def edit_json(data, obj):
    """Apply one drawn edit to a JSON structure in place: replace, delete, add, or swap two entries."""
    paths = paths_of(obj)
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "swap"]))
    if op == "add" or not paths:
        target = obj
        if paths:
            p = data.draw(st.sampled_from(paths))
            parent = obj
            for k in p[:-1]:
                parent = parent[k]
            target = parent if isinstance(parent, dict) else obj
        target[data.draw(st.text(max_size=8))] = data.draw(json_values)
        return
    p = data.draw(st.sampled_from(paths))
    parent = obj
    for k in p[:-1]:
        parent = parent[k]
    if op == "replace":
        parent[p[-1]] = data.draw(json_values)
    elif op == "delete":
        del parent[p[-1]]
    else:  # swap with a sibling: swapped tensors, swapped shapes, swapped offsets
        sibs = list(parent.keys()) if isinstance(parent, dict) else list(range(len(parent)))
        other = data.draw(st.sampled_from(sibs))
        parent[p[-1]], parent[other] = parent[other], parent[p[-1]]


# ---- the properties -----------------------------------------------------------------------

def test_unmutated_profiles_load():
    assert check_outcome(SMALL) == "valid"
    assert check_outcome(small_profile_bytes(seed=1, NL=1, H=3, L=8)) == "valid"


@settings(FUZZ, max_examples=CASES["flip"])
@given(st.data())
def test_byte_flips(data):
    buf = bytearray(SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    check_outcome(bytes(buf))


@settings(FUZZ, max_examples=CASES["truncate"])
@given(st.integers(0, len(SMALL) - 1), st.binary(max_size=8))
def test_truncation_and_garbage_tail(cut, tail):
    check_outcome(SMALL[:cut] + tail)


def test_truncation_at_every_offset():
    """Exhaustive: every prefix of a real profile is refused with a DamError."""
    for cut in range(len(SMALL)):
        assert check_outcome(SMALL[:cut]) == "error", cut


@settings(FUZZ, max_examples=CASES["header"])
@given(st.data())
def test_header_json_edits(data):
    header, body = split_header(SMALL)
    for _ in range(data.draw(st.integers(1, 2))):
        edit_json(data, header)
    check_outcome(join_header(header, body, pad=data.draw(st.booleans())))


@settings(FUZZ, max_examples=CASES["meta"])
@given(st.data())
def test_metadata_json_edits(data):
    header, body = split_header(SMALL)
    md = header["__metadata__"]
    key = data.draw(st.sampled_from(["dam.model", "dam.recipe", "dam.calibration", "dam.schema", "dam.format"]))
    if key in ("dam.schema", "dam.format"):
        md[key] = data.draw(st.sampled_from(["0", "2", "-1", "1.0", " 1", "9" * 5000, "", "dam-profile", "x"])
                            | st.text(max_size=5))
    else:
        inner = json.loads(md[key])
        edit_json(data, inner)
        md[key] = json.dumps(inner) if data.draw(st.integers(0, 9)) else json.dumps(inner)[:-1]  # sometimes cut
    check_outcome(join_header(header, body))


@settings(FUZZ, max_examples=CASES["length"])
@given(st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64)))
def test_length_field_edits(value):
    (n,) = struct.unpack("<Q", SMALL[:8])
    new = value if value > 64 or value < -64 else n + value  # small values: near the true length
    new = max(0, min(new, 2**64 - 1))
    check_outcome(struct.pack("<Q", new) + SMALL[8:])


@settings(FUZZ, max_examples=CASES["splice"])
@given(st.data())
def test_data_insertions_and_deletions(data):
    buf = bytearray(SMALL)
    i = data.draw(st.integers(0, len(buf)))
    if data.draw(st.booleans()):
        buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        del buf[i:i + data.draw(st.integers(1, 16))]
    check_outcome(bytes(buf))


# ---- the shipped SmolLM2 profile: header mutations, header-only reads -------------------------

def shipped_header() -> tuple[bytes, int]:
    with open(SMOLLM2_PROFILE, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n), os.path.getsize(SMOLLM2_PROFILE)


@pytest.mark.skipif(not os.path.exists(SMOLLM2_PROFILE), reason="shipped profile missing")
@settings(FUZZ, max_examples=CASES["shipped_header"])
@given(st.data())
def test_shipped_profile_header_mutations(data):
    raw, _ = shipped_header()
    if data.draw(st.booleans()):  # raw byte flips in the header text
        buf = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
        raw = bytes(buf)
    else:  # structured edits
        header = json.loads(raw)
        edit_json(data, header)
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # Header only: read_meta must answer without touching the (absent) tensor data.
    check_outcome(struct.pack("<Q", len(raw)) + raw, name="shipped.safetensors", full=False)


@pytest.mark.skipif(not os.path.exists(SMOLLM2_PROFILE), reason="shipped profile missing")
def test_shipped_profile_a_few_full_loads(tmp_path):
    with open(SMOLLM2_PROFILE, "rb") as f:
        whole = f.read()
    header, body = split_header(whole)
    assert check_outcome(whole, "full.safetensors") == "valid"
    # Swapped tensor entries (offsets <-> columns: same shape, so this loads, but the masks swap).
    h = json.loads(json.dumps(header))
    h["offsets"], h["columns"] = h["columns"], h["offsets"]
    assert check_outcome(join_header(h, body), "full.safetensors") == "valid"
    p = load_profile(os.path.join(WORKDIR, "full.safetensors"))
    q = load_profile(SMOLLM2_PROFILE)
    assert torch.equal(p.offsets, q.columns) and torch.equal(p.columns, q.offsets)
    # Swapped true_mask <-> stats.diag_score descriptors: wrong dtype and shape, refused.
    h = json.loads(json.dumps(header))
    h["true_mask"], h["stats.diag_score"] = h["stats.diag_score"], h["true_mask"]
    assert check_outcome(join_header(h, body), "full.safetensors") == "error"
    # One stored bit flipped in the middle of the data: refused, since the statistics no longer match the mask;
    # what they name is the changed causal pair (layer 0 head 5, diagonal row - key, column key).
    start = 8 + struct.unpack("<Q", whole[:8])[0] + header["true_mask"]["data_offsets"][0]
    buf = bytearray(whole)
    row, key, L = 100, 40, 512
    bit = row * (row + 1) // 2 + key  # row-major lower triangle: rows 0..99 hold 100 * 101 / 2 pairs
    buf[start + 5 * ((causal_pairs(L) + 7) // 8) + bit // 8] ^= 1 << (bit % 8)  # layer 0, head 5
    assert check_outcome(bytes(buf), "full.safetensors") == "error"
    from dam_cli.inspection.check import check

    assert [e for e in check(os.path.join(WORKDIR, "full.safetensors")).errors if e.startswith("stats.")] == [
        "stats.true_density of layer 0 head 5 does not match its true mask",
        f"stats.diag_score of layer 0 head 5 at {row - key} does not match its true mask",
        f"stats.col_score of layer 0 head 5 at {key} does not match its true mask"]
    # Cut in the middle of the tensor data.
    assert check_outcome(whole[: len(whole) // 2], "full.safetensors") == "error"


def test_zz_both_outcomes_were_reached():
    """The fuzzing is not vacuous: both outcomes occur, and errors dominate as they should."""
    assert STATS["valid"] >= 20 and STATS["error"] >= 500, STATS

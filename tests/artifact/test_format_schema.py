"""Schema 2 of the profile file (the true mask as its causal lower triangle) and reading schema 1.

Schema-1 files are made by `encode_schema1`, a test-only writer of the old layout written apart
from `dam_cli.artifact.format` (before the shipped profiles were re-encoded it reproduced them byte
for byte). Random profiles cover PCLs whose triangle does and does not fill its last byte.
"""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import torch
from helpers import SHIPPED_PROFILE, header_and_offset, profile_bytes, random_masks
from hypothesis import given, settings
from hypothesis import strategies as st

from dam_cli import masks
from dam_cli.artifact.format import READABLE_SCHEMAS, SCHEMA_VERSION, causal_pairs
from dam_cli.artifact.profile import Profile, load_profile, read_meta
from dam_cli.errors import DamError


def encode_schema1(p: Profile) -> bytes:
    """The whole file in the schema-1 layout: true mask row by row `[N_L, H, L, ceil(L/8)]`."""
    tensors = {"true_mask": p.true_mask_packed.numpy(), "offsets": p.offsets.numpy(), "columns": p.columns.numpy(),
               **{k: v.float().numpy() for k, v in p.stats.items()}}
    if p.meta.recipe.get("retrieval_heads", 0):
        tensors["full_heads"] = p.full.numpy()
    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    header: dict = {"__metadata__": {"dam.calibration": dump(p.meta.calibration), "dam.format": "dam-profile",
                                     "dam.model": dump(p.meta.model), "dam.recipe": dump(p.meta.recipe),
                                     "dam.schema": "1", "dam.tool_version": p.meta.tool_version}}
    names = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}
    offset, body = 0, b""
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {"dtype": names[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset, body = offset + len(data), body + data
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def sample_profile(seed: int, NL: int = 2, H: int = 3, L: int = 12, needle: bool = False) -> Profile:
    """Random (true masks 0.4, offsets 0.3, columns 0.2); with `needle`, one retrieval head chosen by needle score
    (the scores drawn after the masks, from the same generator)."""
    g = torch.Generator().manual_seed(seed)
    tm, off, col = random_masks(NL, H, L, p_m=0.4, p_r=0.3, p_c=0.2, generator=g)
    if not needle:
        return Profile.from_masks(tm, off, col)
    full = torch.zeros(NL, H, dtype=torch.bool)
    full[NL - 1, 0] = True
    p = Profile.from_masks(tm, off, col, full_heads=full, retrieval_by="needle", retrieval_heads=1)
    p.stats["stats.needle_score"] = torch.rand(NL, H, generator=g)
    return p


def assert_same_profile(a: Profile, b: Profile) -> None:
    """Every tensor and every metadata field equal (the schema apart: it says which file it came from)."""
    assert torch.equal(a.true_mask_packed, b.true_mask_packed) and torch.equal(a.true_mask, b.true_mask)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.columns, b.columns) and torch.equal(a.full, b.full)
    assert a.stats.keys() == b.stats.keys()
    for k in a.stats:  # mass kept is NaN when unknown: NaN in the same places, equal elsewhere
        x, y = a.stats[k].float(), b.stats[k].float()
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()), k
    da, db = a.meta.to_dict(), b.meta.to_dict()
    da.pop("schema"), db.pop("schema")
    assert da == db


# Triangles of 1, 28, 36, 78, 120, 136 and 561 bits: with and without padding in the last byte.
PCLS = (1, 7, 8, 12, 15, 16, 33)


@pytest.mark.parametrize("L", PCLS)
@pytest.mark.parametrize("needle", [False, True])
def test_schema2_round_trip(tmp_path, L, needle):
    p = sample_profile(L, L=L, needle=needle)
    path = tmp_path / "p.safetensors"
    p.save(path)
    header, _ = header_and_offset(path.read_bytes())
    assert header["__metadata__"]["dam.schema"] == str(SCHEMA_VERSION) == "2"
    assert header["true_mask"] == {**header["true_mask"], "dtype": "U8", "shape": [2, 3, (L * (L + 1) // 2 + 7) // 8]}
    q = load_profile(path)
    assert q.meta.schema == 2 and q.true_mask_packed.shape == (2, 3, L, (L + 7) // 8)
    assert_same_profile(p, q)


@pytest.mark.parametrize("L", PCLS)
def test_schema2_bits_are_the_row_major_lower_triangle(tmp_path, L):
    """What docs/reference/profile-format.md tells other readers: any safetensors reader plus numpy."""
    from safetensors.numpy import load_file

    p = sample_profile(100 + L, L=L)
    p.save(tmp_path / "p.safetensors")
    t = load_file(str(tmp_path / "p.safetensors"))
    bits = np.unpackbits(t["true_mask"], axis=-1, count=L * (L + 1) // 2, bitorder="little").astype(bool)
    rows, cols = np.tril_indices(L)
    assert np.array_equal(bits, p.true_mask.numpy()[..., rows, cols])
    M = np.zeros((2, 3, L, L), dtype=bool)  # the documented way back to the square mask
    M[..., rows, cols] = bits
    assert np.array_equal(M, p.true_mask.numpy())


@pytest.mark.parametrize("L", PCLS)
@pytest.mark.parametrize("needle", [False, True])
def test_schema1_file_loads_to_the_same_profile(tmp_path, L, needle):
    p = sample_profile(200 + L, L=L, needle=needle)
    old = tmp_path / "old.safetensors"
    old.write_bytes(encode_schema1(p))
    assert read_meta(old).schema == 1
    q = load_profile(old)
    assert q.meta.schema == 1
    assert_same_profile(p, q)
    # Re-encoding a schema-1 file gives exactly the file the writer makes from the original profile.
    q.save(tmp_path / "new.safetensors")
    assert (tmp_path / "new.safetensors").read_bytes() == profile_bytes(p)
    assert load_profile(tmp_path / "new.safetensors").meta.schema == 2


def test_bytes_are_deterministic(tmp_path):
    a, b = sample_profile(7, L=33, needle=True), sample_profile(7, L=33, needle=True)  # built twice, same inputs
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() == profile_bytes(a)
    load_profile(tmp_path / "a.safetensors").save(tmp_path / "c.safetensors")  # load and save again
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert sample_profile(8, L=33, needle=True).true_mask.ne(a.true_mask).any()  # other inputs, other masks


@pytest.mark.parametrize("L", [7, 8, 12, 33])  # 28, 36, 78, 561 bits: 4, 4, 2, 7 padding bits per head
def test_schema2_padding_bits_refused(tmp_path, L):
    data = profile_bytes(sample_profile(300 + L, L=L))
    header, start = header_and_offset(data)
    per_head = (causal_pairs(L) + 7) // 8
    used = causal_pairs(L) % 8
    assert used and header["true_mask"]["shape"][-1] == per_head
    for head in range(6):  # every head's last byte, and its highest padding bit
        buf = bytearray(data)
        buf[start + header["true_mask"]["data_offsets"][0] + head * per_head + per_head - 1] |= 0x80
        (tmp_path / "p.safetensors").write_bytes(bytes(buf))
        with pytest.raises(DamError, match="padding bits of the packed true mask are set"):
            load_profile(tmp_path / "p.safetensors")
    buf = bytearray(data)  # the lowest padding bit too
    buf[start + header["true_mask"]["data_offsets"][0] + per_head - 1] |= 1 << used
    (tmp_path / "p.safetensors").write_bytes(bytes(buf))
    with pytest.raises(DamError, match="padding bits"):
        load_profile(tmp_path / "p.safetensors")


@pytest.mark.parametrize("L", [1, 12, 33])
def test_each_stored_bit_is_one_causal_pair(tmp_path, L):
    """Flipping stored bit k changes exactly the pair k of the row-major lower triangle, in that head only.

    The loader refuses such a file (its statistics no longer match the mask), so the changed pair is read
    off what the integrity check names: one head, the diagonal `row - key` and the column `key`."""
    from dam_cli.inspection.check import check

    p = sample_profile(400 + L, L=L)
    data = profile_bytes(p)
    header, start = header_and_offset(data)
    per_head = (causal_pairs(L) + 7) // 8
    rows, cols = np.tril_indices(L)
    for layer, head, k in [(0, 0, 0), (1, 2, causal_pairs(L) - 1), (1, 0, causal_pairs(L) // 2)]:
        buf = bytearray(data)
        buf[start + header["true_mask"]["data_offsets"][0] + (layer * 3 + head) * per_head + k // 8] ^= 1 << (k % 8)
        (tmp_path / "p.safetensors").write_bytes(bytes(buf))
        r, c = int(rows[k]), int(cols[k])
        want = [f"stats.true_density of layer {layer} head {head} does not match its true mask",
                f"stats.diag_score of layer {layer} head {head} at {r - c} does not match its true mask",
                f"stats.col_score of layer {layer} head {head} at {c} does not match its true mask"]
        assert [e for e in check(tmp_path / "p.safetensors").errors if e.startswith("stats.")] == want
        with pytest.raises(DamError, match=re.escape(f"{want[0]} (and 2 more mismatches), so the file is damaged")):
            load_profile(tmp_path / "p.safetensors")


def test_schema1_defects_still_refused(tmp_path):
    p = sample_profile(500, L=12)
    data = encode_schema1(p)
    header, start = header_and_offset(data)
    t0 = start + header["true_mask"]["data_offsets"][0]
    buf = bytearray(data)
    buf[t0 + 3 * 2 + 1] |= 0x80  # layer 0 head 0, row 3, key 15: a padding bit (L = 12)
    (tmp_path / "p.safetensors").write_bytes(bytes(buf))
    with pytest.raises(DamError, match="padding bits"):
        load_profile(tmp_path / "p.safetensors")
    buf = bytearray(data)
    buf[t0 + 3 * 2 + 1] |= 0x01  # row 3, key 8 > 3
    (tmp_path / "p.safetensors").write_bytes(bytes(buf))
    with pytest.raises(DamError, match="layer 0 is not causal"):
        load_profile(tmp_path / "p.safetensors")
    buf = bytearray(data)
    buf[t0 + (3 * 12 + 5) * 2] ^= 0x04  # layer 1 head 0, row 5, key 2: a causal pair, but not the one stored
    (tmp_path / "p.safetensors").write_bytes(bytes(buf))
    with pytest.raises(DamError, match=re.escape("stats.true_density of layer 1 head 0 does not match its true mask "
                                                 "(and 2 more mismatches), so the file is damaged")):
        load_profile(tmp_path / "p.safetensors")


@pytest.mark.parametrize("block_cells", [1, 1 << 22], ids=["16-row blocks", "default blocks"])
def test_check_refuses_schema1_defects_like_the_loader(tmp_path, monkeypatch, block_cells):
    """`--check` reads the mask a block of rows at a time: the same defects, in any layer, the same words."""
    from dam_cli.artifact import triangle
    from dam_cli.inspection.check import check

    monkeypatch.setattr(triangle, "BLOCK_CELLS", block_cells)
    p = sample_profile(9, L=12)
    R, C = masks.match_patterns(p.true_mask, 0.8)
    p = Profile.from_masks(p.true_mask, R, C)
    data = encode_schema1(p)
    header, start = header_and_offset(data)
    t0 = start + header["true_mask"]["data_offsets"][0]
    assert _check_bytes(check, tmp_path, data).valid
    for offset, bit, why in ((3 * 12 * 2 + 3 * 2 + 1, 0x80, "padding bits"),  # layer 1 head 0 row 3, key 15
                             (3 * 12 * 2 + 3 * 2 + 1, 0x01, "the true mask of layer 1 is not causal")):  # key 8
        buf = bytearray(data)
        buf[t0 + offset] |= bit
        with pytest.raises(DamError, match=why):
            load_profile(_write(tmp_path, bytes(buf)))
        r = _check_bytes(check, tmp_path, bytes(buf))
        assert not r.valid and len(r.errors) == 1 and why in r.errors[0]


def _write(tmp_path, data: bytes):
    path = tmp_path / "s1.safetensors"
    path.write_bytes(data)
    return path


def _check_bytes(check, tmp_path, data: bytes):
    return check(_write(tmp_path, data))


def test_layout_must_match_the_schema(tmp_path):
    """A schema-2 body under a schema-1 header (and the reverse) is refused by its exact size."""
    p = sample_profile(600, L=12)
    for data, schema, shape in [(profile_bytes(p), "1", [2, 3, 12, 2]), (encode_schema1(p), "2", [2, 3, 10])]:
        header, start = header_and_offset(data)
        header["__metadata__"]["dam.schema"] = schema
        raw = json.dumps(header).encode()
        (tmp_path / "p.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[start:])
        with pytest.raises(DamError, match=re.escape(f"tensor true_mask should be U8 {shape}")):
            load_profile(tmp_path / "p.safetensors")


@pytest.mark.parametrize("schema", ["0", "3", "-1", "20"])
def test_other_schemas_refused_first(tmp_path, schema):
    """The schema is checked before anything else: even a broken body is reported as a schema mismatch."""
    header, start = header_and_offset(profile_bytes(sample_profile(700)))
    header["__metadata__"]["dam.schema"] = schema
    header["__metadata__"]["dam.model"] = "{}"  # would fail later checks
    raw = json.dumps(header).encode()
    (tmp_path / "p.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert READABLE_SCHEMAS == (1, 2)
    with pytest.raises(DamError, match=f"has profile schema {int(schema)}, but this dam .* reads schemas 1 and 2"):
        read_meta(tmp_path / "p.safetensors")


def test_saving_a_non_causal_mask_is_refused(tmp_path):
    tm = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    tm[0, 0, 2, 5] = True  # key 5 after query 2: schema 2 has no bit for it
    p = Profile.from_masks(tm, torch.zeros(1, 1, 8, dtype=torch.bool), torch.zeros(1, 1, 8, dtype=torch.bool))
    with pytest.raises(DamError, match="layer 0 is not causal"):
        p.save(tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.skipif(not os.path.exists(SHIPPED_PROFILE), reason="shipped profile missing")
def test_shipped_profile_is_schema2_and_survives_the_old_layout(tmp_path):
    p = load_profile(SHIPPED_PROFILE)
    assert p.meta.schema == 2
    (tmp_path / "old.safetensors").write_bytes(encode_schema1(p))
    q = load_profile(tmp_path / "old.safetensors")
    assert_same_profile(p, q)
    q.save(tmp_path / "again.safetensors")
    with open(SHIPPED_PROFILE, "rb") as f:
        assert (tmp_path / "again.safetensors").read_bytes() == f.read()


# ---- schema-1 files under mutation: only a one-line DamError or a causal, consistent profile ----

SMALL_V1 = encode_schema1(sample_profile(800, L=12))


def outcome(tmp_path_factory, data: bytes) -> str:
    path = tmp_path_factory.getbasetemp() / "fuzz-v1.safetensors"
    path.write_bytes(data)
    try:
        p = load_profile(path)
    except DamError as e:
        assert str(e) and "\n" not in str(e)
        return "error"
    L = p.pcl
    assert p.true_mask_packed.shape == (p.n_layers, p.n_heads, L, (L + 7) // 8)
    assert not torch.triu(p.true_mask, diagonal=1).any()
    return "valid"


@settings(deadline=None, database=None, derandomize=True, max_examples=200)
@given(st.data())
def test_schema1_byte_flips(tmp_path_factory, data):
    buf = bytearray(SMALL_V1)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    outcome(tmp_path_factory, bytes(buf))


def test_schema1_truncation_at_every_offset(tmp_path_factory):
    assert outcome(tmp_path_factory, SMALL_V1) == "valid"
    for cut in range(len(SMALL_V1)):
        assert outcome(tmp_path_factory, SMALL_V1[:cut]) == "error", cut

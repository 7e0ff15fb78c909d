"""The true mask a block of rows at a time: conversions, causality and `--check` agree with whole-mask math.

`dam_cli.artifact.triangle` never builds an `L x L` array; `BLOCK_CELLS` is shrunk here so that
even tiny masks span many blocks (and blocks end mid-byte of the triangle's padding). `check()`
reads the true mask from the file block by block (`StoredMask`) and must refuse the same defects
as `load_profile`, with the same words.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import header_and_offset, profile_bytes

from dam_cli import masks
from dam_cli.artifact import triangle
from dam_cli.artifact.profile import Profile, default_stats, load_profile
from dam_cli.errors import DamError
from dam_cli.inspection.check import causal_diagonal_counts, check

PCLS = [1, 2, 15, 16, 17, 33, 100]


@pytest.fixture(params=[16, 1 << 22], ids=["16-row blocks", "default blocks"])
def block_cells(request, monkeypatch):
    """Blocks of 16 rows whatever L (the smallest), or the default size."""
    if request.param == 16:
        monkeypatch.setattr(triangle, "BLOCK_CELLS", 1)  # row_blocks rounds up to 16 rows
    return request.param


def random_masks(seed: int, NL: int, H: int, L: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.tril(torch.rand(NL, H, L, L, generator=g) < 0.4).numpy()


@pytest.mark.parametrize("L", PCLS)
def test_triangle_round_trip_matches_numpy_tril_indices(block_cells, L):
    m = random_masks(L, 2, 3, L)
    rows = np.packbits(m, axis=-1, bitorder="little")
    tri = triangle.rows_to_triangle(rows, L)
    r, c = np.tril_indices(L)
    assert np.array_equal(tri, np.packbits(m[..., r, c], axis=-1, bitorder="little"))  # the documented layout
    assert np.array_equal(triangle.triangle_to_rows(tri, L), rows)
    blocks = list(triangle.row_blocks(L, 3))
    assert blocks[0][0] == 0 and blocks[-1][1] == L and all(a % 16 == 0 for a, _ in blocks)
    assert all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("L", PCLS)
def test_noncausal_layer_finds_the_first_bit_above_the_diagonal(block_cells, L):
    m = random_masks(L + 1, 3, 2, L)
    rows = np.packbits(m, axis=-1, bitorder="little")
    assert triangle.noncausal_layer(rows, L) is None
    if L > 1:
        m[2, 1, L - 2, L - 1] = True  # one key after its query, in the last layer's last block
        assert triangle.noncausal_layer(np.packbits(m, axis=-1, bitorder="little"), L) == 2


@pytest.mark.parametrize("L", PCLS)
def test_diagonal_counts_summed_over_blocks_agree_with_the_math_module(L):
    m = random_masks(L + 2, 2, 2, L)
    want = masks.diagonal_counts(torch.from_numpy(m)).numpy()
    got = sum(causal_diagonal_counts(m[..., i0:i1, :], i0) for i0, i1 in triangle.row_blocks(L, 10**9))
    assert np.array_equal(got, want)
    assert np.array_equal(causal_diagonal_counts(m), want)


def _profile(seed: int, L: int, stats_off: float = 0.0) -> Profile:
    tm = torch.from_numpy(random_masks(seed, 2, 3, L))
    R, C = masks.match_patterns(tm, 0.8)
    stats = default_stats(tm, R, C)
    c = stats["stats.col_score"]
    c[..., 1] = torch.where(c[..., 1] >= stats_off, c[..., 1] - stats_off, c[..., 1] + stats_off)  # still in [0, 1]
    return Profile.from_masks(tm, R, C, stats=stats)


@pytest.mark.parametrize("L", [12, 33, 100])
def test_check_reads_blocks_and_finds_what_whole_masks_find(tmp_path, block_cells, L):
    _profile(L, L).save(tmp_path / "ok.safetensors")
    assert check(tmp_path / "ok.safetensors").valid
    _profile(L, L, stats_off=1e-3).save(tmp_path / "bad.safetensors")
    r = check(tmp_path / "bad.safetensors")
    assert r.errors[0] == "stats.col_score of layer 0 head 0 at 1 does not match its true mask"
    assert len(r.errors) == 2  # one per layer


@pytest.mark.parametrize("L", [12, 33])
def test_check_refuses_a_set_padding_bit_in_any_head_like_the_loader(tmp_path, block_cells, L):
    data = profile_bytes(_profile(7, L))
    header, start = header_and_offset(data)
    per_head = (triangle.causal_pairs(L) + 7) // 8
    for head in (0, 4):  # layer 0 head 0, layer 1 head 1
        buf = bytearray(data)
        buf[start + header["true_mask"]["data_offsets"][0] + (head + 1) * per_head - 1] |= 0x80
        (tmp_path / "p.safetensors").write_bytes(bytes(buf))
        with pytest.raises(DamError, match="padding bits of the packed true mask are set"):
            load_profile(tmp_path / "p.safetensors")
        r = check(tmp_path / "p.safetensors")
        assert not r.valid and r.errors == [f"{tmp_path / 'p.safetensors'} is not a valid DAM profile: padding "
                                             "bits of the packed true mask are set"]

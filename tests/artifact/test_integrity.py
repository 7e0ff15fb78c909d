"""A damaged profile is refused at load: the statistics stored beside the true mask are its integrity check.

The format carries no digest; `stats.true_density`, `stats.diag_score` and `stats.col_score` are derived from
the true mask when a profile is written, so `load_profile` (every command, `enable_dam`'s callers) recounts
them from the mask it reads and refuses a file where they differ, with the same words `dam inspect --check`
uses (`dam_cli.artifact.integrity`, shared by both). Intact profiles, the shipped ones included, load as before.
"""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from helpers import RECOMMENDED_PROFILE, SHIPPED_PROFILE, header_and_offset, profile_bytes, random_profile, run_cli

from dam_cli.artifact.format import causal_pairs
from dam_cli.artifact.integrity import MaskCounts, stats_mismatches
from dam_cli.artifact.profile import load_arrays, load_profile
from dam_cli.errors import DamError
from dam_cli.inspection.check import check

NL, H, L = 2, 3, 12  # 78 stored bits per head, 10 bytes: the last one holds 2 padding bits
DAMAGED = "so the file is damaged: restore a good copy or re-create it with `dam profile`"


@pytest.fixture(scope="module")
def good() -> bytes:
    return profile_bytes(random_profile(NL, H, L, p_m=0.4, seed=3))


def mask_start(data: bytes) -> int:
    header, start = header_and_offset(data)
    return start + header["true_mask"]["data_offsets"][0]


def flipped(data: bytes, offset: int, bits: int) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= bits
    return bytes(buf)


def test_an_intact_profile_loads(tmp_path, good):
    (tmp_path / "p.safetensors").write_bytes(good)
    p = load_profile(tmp_path / "p.safetensors")
    assert p.true_mask.shape == (NL, H, L, L)
    assert not [e for e in check(tmp_path / "p.safetensors").errors if e.startswith("stats.")]  # (R, C are random)


@pytest.mark.parametrize("path", [SHIPPED_PROFILE, RECOMMENDED_PROFILE], ids=["paper", "recommended"])
def test_shipped_profiles_load_and_pass_the_integrity_check(path):
    a = load_arrays(path)
    assert stats_mismatches(a.stats, MaskCounts.of_rows(a.true_mask_packed, a.pcl)) == []
    load_profile(path)


def test_a_flipped_true_mask_byte_is_refused_naming_the_problem(tmp_path, good):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(flipped(good, mask_start(good) + 2, 0x10))  # layer 0 head 0, stored bit 20: row 5, key 5
    with pytest.raises(DamError) as e:
        load_profile(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad} is not a valid DAM profile: ")
    assert "stats.true_density of layer 0 head 0 does not match its true mask (and 2 more mismatches)" in msg
    assert DAMAGED in msg and "`dam inspect --check` lists every mismatch" in msg
    with pytest.raises(DamError, match=re.escape(msg)):
        load_arrays(bad)  # `dam inspect P` and `dam inspect A B` read the whole mask too
    # `--check` lists every mismatch with the same words (one shared function): row 5, key 5 is diagonal 0.
    assert [x for x in check(bad).errors if x.startswith("stats.")] == [
        "stats.true_density of layer 0 head 0 does not match its true mask",
        "stats.diag_score of layer 0 head 0 at 0 does not match its true mask",
        "stats.col_score of layer 0 head 0 at 5 does not match its true mask"]


def test_every_single_bit_flip_of_the_true_mask_is_refused(tmp_path, good):
    """Exhaustive over the stored mask: each flipped causal bit is refused by the integrity check, each flipped
    padding bit by the padding check; no flip loads."""
    start, per_head = mask_start(good), (causal_pairs(L) + 7) // 8
    path = tmp_path / "p.safetensors"
    seen = {"integrity": 0, "padding": 0}
    for byte in range(NL * H * per_head):
        for bit in range(8):
            path.write_bytes(flipped(good, start + byte, 1 << bit))
            with pytest.raises(DamError) as e:
                load_profile(path)
            padding = (byte % per_head) * 8 + bit >= causal_pairs(L)
            assert ("padding bits" if padding else DAMAGED) in str(e.value), (byte, bit)
            seen["padding" if padding else "integrity"] += 1
    assert seen == {"integrity": NL * H * causal_pairs(L), "padding": NL * H * (per_head * 8 - causal_pairs(L))}


def test_damaged_statistics_are_refused_too(tmp_path, good):
    header, start = header_and_offset(good)
    at = start + header["stats.diag_score"]["data_offsets"][0] + 4 * (L + 3)  # layer 0 head 1, diagonal 3
    buf = bytearray(good)
    (score,) = struct.unpack("<f", buf[at:at + 4])
    buf[at:at + 4] = struct.pack("<f", 1 - score if score != 0.5 else 0.25)  # still in [0, 1]: passes the range check
    (tmp_path / "p.safetensors").write_bytes(bytes(buf))
    with pytest.raises(DamError, match=re.escape("stats.diag_score of layer 0 head 1 at 3 does not match its true "
                                                 f"mask, {DAMAGED}")):
        load_profile(tmp_path / "p.safetensors")


def test_counts_agree_with_the_math_module():
    """`MaskCounts` summed over row blocks equals the counts of the whole mask, and intact statistics match them."""
    import torch

    from dam_cli import masks

    p = random_profile(NL, H, 100, p_m=0.4, seed=5)
    counts = MaskCounts.of_rows(p.true_mask_packed.numpy(), 100)
    assert np.array_equal(counts.diag, masks.diagonal_counts(p.true_mask).numpy())
    assert np.array_equal(counts.col, p.true_mask.sum(-2).numpy())
    assert np.array_equal(counts.total, torch.tril(p.true_mask).sum((-1, -2)).numpy())
    assert stats_mismatches({k: v.numpy() for k, v in p.stats.items()}, counts) == []


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_the_cli_refuses_a_damaged_profile_in_one_line(tmp_path, good, tiny_model_dir, command):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(flipped(good, mask_start(good) + 2, 0x10))
    args = ["--model", tiny_model_dir, "--profile", str(bad)]
    args += ["--prompt", "the cat", "--max-new-tokens", "1"] if command == "generate" else ["--lengths", "16"]
    code, out, err = run_cli(command, *args)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1, err
    assert "does not match its true mask" in lines[-1] and DAMAGED in lines[-1], err

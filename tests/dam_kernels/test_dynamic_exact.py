"""The dynamic part's exact-mass tail rule (`DynamicSelection.tail_mass`): the call's last query block
chooses earlier key blocks by its rows' exact softmax mass. Hand-worked cases, a float64 oracle, prefill
against decode, a NaN-padded static cache, reference and Triton against a dense masked softmax, the CLI.
CPU: Triton in the interpreter."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import (  # noqa: E402
    DynamicSelection,
    dynamic_rows,
    select_blocks,
    select_blocks_one,
    tail_block_mass,
)
from helpers import dense_masked_softmax, random_profile, random_qkv, require_kernel_device, run_cli  # noqa: E402

from dam_cli.runtime.attention import sparse_attention  # noqa: E402

DEVICE = require_kernel_device()  # TRITON_INTERPRET=0 on a GPU machine: the same tests, compiled


def _oracle(q, k, first, block, gamma, cap, scale):
    """The rule written out in float64 and Python loops: bool [B, H, nK] for rows q [B, H, r, D] at
    positions first.., keys k [B, H_kv, Sk, D]."""
    B, H, r, D = q.shape
    Sk = k.shape[2]
    G = H // k.shape[1]
    nK = -(-Sk // block)
    qb = (first + r - 1) // block
    out = torch.zeros(B, H, nK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            mass = [0.0] * nK
            for i in range(r):
                s = (k[b, h // G, : first + i + 1].double() @ q[b, h, i].double()).cpu() * scale
                p = torch.softmax(s, 0)
                for j, pj in enumerate(p.tolist()):
                    mass[j // block] += pj / r
            total = sum(mass[: qb + 1])
            kept, n = mass[qb], 0
            for kb in sorted(range(qb), key=lambda x: (-mass[x], x)):
                if kept >= gamma * total or n == cap or mass[kb] == 0:
                    break
                out[b, h, kb], kept, n = True, kept + mass[kb], n + 1
    return out


def _needle_case():
    """One head, D = 2, blocks of 4, 12 positions: block 0 holds four keys (1, 0), block 1 one needle key
    (8, 0) among three (-4, 0), block 2 (the query block, rows 8..11 all (1, 0)) keys (0, 0)."""
    q = torch.zeros(1, 1, 12, 2)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 12, 2)
    k[0, 0, 0:4, 0] = 1
    k[0, 0, 4:8, 0] = torch.tensor([8.0, -4, -4, -4])
    return q.to(DEVICE), k.to(DEVICE)


def test_hand_worked_needle_block_wins_on_mass_where_the_mean_loses():
    q, k = _needle_case()
    # Pooled: block 0's mean key (1, 0) scores 1, block 1's (-1, 0) scores -1: the mean picks block 0.
    assert select_blocks(q, k, 0, 1, 4)[0, 0, 2].tolist() == [True, False, False]
    # Exact, by hand: row 8 + i sees 4 keys of score 1, e^8 + 3 e^-4 from block 1 and i + 1 keys of score 0.
    want = [0.0, 0.0, 0.0]
    for i in range(4):
        z = 4 * math.e + math.exp(8) + 3 * math.exp(-4) + (i + 1)
        for kb, m in enumerate((4 * math.e, math.exp(8) + 3 * math.exp(-4), i + 1)):
            want[kb] += m / z / 4
    mass = tail_block_mass(q[:, :, 8:], k, 8, 4, scale=1.0)
    torch.testing.assert_close(mass[0, 0].double().cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    exact = select_blocks(q, k, 0, 1, 4, tail_mass=0.9, scale=1.0)
    assert exact[0, 0, 2].tolist() == [False, True, False]  # the needle block: own + block 1 > 0.9
    assert torch.equal(exact[:, :, :2], select_blocks(q, k, 0, 1, 4)[:, :, :2])  # other blocks: pooled rule
    # Both blocks when gamma exceeds what own + needle hold; the cap limits that to one.
    assert want[1] + want[2] < 0.999
    assert select_blocks(q, k, 0, 1, 4, tail_topk=2, tail_mass=0.999, scale=1.0)[0, 0, 2].tolist() == [True, True,
                                                                                                        False]
    assert select_blocks(q, k, 0, 1, 4, tail_topk=1, tail_mass=0.999, scale=1.0)[0, 0, 2].tolist() == [False, True,
                                                                                                        False]


@pytest.mark.parametrize("gamma, cap", [(1.0, 99), (0.9, 99), (0.6, 2), (1.0, 2), (0.3, 5), (1.0, 0)])
def test_selection_equals_the_float64_oracle(gamma, cap):
    B, H, H_kv, S, start, blk = 2, 4, 2, 70, 37, 16
    q, k, _ = random_qkv(B, H, H_kv, S, start, seed=3, device=DEVICE)
    q = q * 2  # sharper attention: masses that differ between blocks
    got = select_blocks(q, k, start, 1, blk, tail_topk=cap, tail_mass=gamma)[:, :, (S - 1) // blk]
    r0 = (S - 1) // blk * blk - start
    want = _oracle(q[:, :, r0:], k, start + r0, blk, gamma, cap, 16**-0.5)
    assert torch.equal(got.cpu(), want)
    n = got.sum(-1)
    if gamma == 1.0:  # every earlier block (all have mass here), up to the cap
        assert (n == min(cap, (S - 1) // blk)).all()
    assert (n <= cap).all()


def test_gamma_one_skips_only_blocks_without_mass():
    # Block 1's keys score -1000 against the row: exp underflows to exactly 0, so it holds no mass.
    D, blk = 2, 16
    q = torch.tensor([[[[1.0, 0.0]]]], device=DEVICE)
    k = torch.randn(1, 1, 64, D, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    k[:, :, 16:32] = torch.tensor([-1000.0, 0.0], device=DEVICE)
    mass = tail_block_mass(q, k, 63, blk)
    assert mass[0, 0, 1] == 0 and (mass[0, 0, [0, 2]] > 0).all()
    assert select_blocks_one(q, k, 63, 99, blk, tail_mass=1.0)[0, 0].tolist() == [True, False, True, False]


def test_own_block_mass_counts_as_kept():
    # Decode row 4 (block 1, blocks of 4) sees key 4 (score 0) and keys 0..3 of score s with 4 e^s = 2/3:
    # its own block holds 0.6 of the mass, block 0 the other 0.4.
    s = math.log(1 / 6)
    q = torch.tensor([[[[1.0, 0.0]]]], device=DEVICE)
    k = torch.tensor([[[[s, 0.0]] * 4 + [[0.0, 0.0]]]], device=DEVICE)
    torch.testing.assert_close(tail_block_mass(q, k, 4, 4, scale=1.0)[0, 0].cpu(), torch.tensor([0.4, 0.6]))
    assert not select_blocks_one(q, k, 4, 9, 4, tail_mass=0.55, scale=1.0).any()  # own 0.6 >= 0.55
    assert select_blocks_one(q, k, 4, 9, 4, tail_mass=0.65, scale=1.0)[0, 0].tolist() == [True, False]
    # A row that attends only to itself (earlier keys far below) selects nothing, even at gamma = 1.
    far = torch.tensor([[[[-1000.0, 0.0]] * 4 + [[0.0, 0.0]]]], device=DEVICE)
    assert not select_blocks_one(q, far, 4, 9, 4, tail_mass=1.0, scale=1.0).any()


@pytest.mark.parametrize("S, start", [(65, 0), (70, 0), (70, 37), (64, 20)])
def test_prefill_tail_block_equals_decode_rows(S, start):
    B, H, H_kv, blk, gamma, cap = 2, 6, 2, 16, 0.8, 3
    q, k, _ = random_qkv(B, H, H_kv, S, start, seed=5, device=DEVICE)
    qt = (S - 1) // blk
    r0 = max(0, qt * blk - start)
    pre = select_blocks(q, k, start, 2, blk, tail_topk=cap, tail_mass=gamma)[:, :, qt]
    dec = select_blocks_one(q[:, :, r0:], k, start + r0, cap, blk, tail_mass=gamma)
    assert torch.equal(pre, dec) and pre.any()
    if S - qt * blk == 1:  # one row in the tail block: a decode step
        assert torch.equal(dec, select_blocks_one(q[:, :, -1:], k, S - 1, cap, blk, tail_mass=gamma))


@pytest.mark.parametrize("n", [17, 40, 64, 100])
def test_static_cache_nan_padding_is_masked(n):
    B, H, H_kv, D, blk, slots = 1, 4, 2, 16, 16, 128
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, H, 1, D, generator=g).to(DEVICE)
    k = torch.randn(B, H_kv, n, D, generator=g).to(DEVICE)
    pad = torch.full((B, H_kv, slots, D), float("nan"), device=DEVICE)
    pad[:, :, :n] = k
    valid = torch.tensor([n], device=DEVICE)
    got = select_blocks_one(q, pad, 0, 3, blk, valid_len=valid, tail_mass=0.7)
    want = select_blocks_one(q, k, n - 1, 3, blk, tail_mass=0.7)
    assert got.shape[-1] == slots // blk and not got[..., want.shape[-1]:].any()
    assert torch.equal(got[..., : want.shape[-1]], want)
    mass = tail_block_mass(q, pad, valid.reshape(()) - 1, blk)
    assert not mass.isnan().any()
    torch.testing.assert_close(mass[..., : want.shape[-1]], tail_block_mass(q, k, n - 1, blk))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("start", [0, 37, 69])
def test_sparse_attention_equals_dense_softmax_with_the_exact_tail(backend, start):
    prof = random_profile(seed=4)
    B, H, H_kv, S, blk = 2, 4, 2, 70, 16
    q, k, v = random_qkv(B, H, H_kv, S, start, seed=8, device=DEVICE)
    dyn = DynamicSelection(1, blk, tail_topk=2, tail_mass=0.6)
    out = sparse_attention(q, k, v, prof, 0, start=start, backend=backend, dynamic=dyn)
    chosen = select_blocks(q, k, start, 1, blk, tail_topk=2, tail_mass=0.6)
    pooled = select_blocks(q, k, start, 1, blk, tail_topk=2)
    assert not torch.equal(chosen, pooled)  # the exact rule changes this case's tail
    rows = torch.arange(start, S)
    allowed = prof.mask_rows(0, rows, S).to(DEVICE) | dynamic_rows(chosen, rows, S, blk)
    torch.testing.assert_close(out.double(), dense_masked_softmax(q, k, v, allowed, scale=16**-0.5), atol=2e-5,
                               rtol=1e-4)
    if backend == "triton":
        ref = sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=dyn)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_static_cache_decode_step_with_the_exact_tail(backend):
    # One decode row over a static cache (valid_len; on CUDA the device-position path, which skips the fused
    # selection for the exact rule) with kept block sums: the same as the dense softmax with its selection.
    from dam_kernels.dynamic import block_summary

    prof = random_profile(seed=2)
    B, H, H_kv, D, blk, slots, n = 1, 4, 2, 16, 64, 256, 150
    q, k, v = random_qkv(B, H, H_kv, n, n - 1, seed=6, device=DEVICE)
    kp = torch.zeros(B, H_kv, slots, D, device=DEVICE)
    vp = torch.zeros_like(kp)
    kp[:, :, :n], vp[:, :, :n] = k, v
    dyn = DynamicSelection(1, blk, tail_topk=1, tail_mass=0.5)
    out = sparse_attention(q, kp, vp, prof, 0, backend=backend, dynamic=dyn, valid_len=torch.tensor([n], device=DEVICE),
                           block_sums=block_summary(kp, blk))
    qb = (n - 1) // blk
    chosen = torch.zeros(B, H, qb + 1, qb + 1, dtype=torch.bool, device=DEVICE)
    chosen[:, :, qb] = select_blocks_one(q, k, n - 1, 1, blk, tail_mass=0.5)
    assert chosen.any()
    rows = torch.tensor([n - 1])
    allowed = prof.mask_rows(0, rows, n).to(DEVICE) | dynamic_rows(chosen, rows, n, blk)
    torch.testing.assert_close(out.double(), dense_masked_softmax(q, k, v, allowed, scale=D**-0.5), atol=2e-5,
                               rtol=1e-4)


def test_density_probe_counts_the_exact_tail_selection():
    # The eval's probe counts the pairs of the selection sparse_attention makes, the exact tail included.
    from dam_kernels.dynamic import static_block_counts, union_pair_counts

    from dam_cli.evaluation.probes import _DensityProbe

    prof = random_profile(seed=4)
    B, H, H_kv, S, blk = 1, 4, 2, 70, 16
    q, k, _ = random_qkv(B, H, H_kv, S, 0, seed=8, device=DEVICE)
    static = static_block_counts(lambda rows, n: prof.mask_rows(0, rows, n), S, blk)

    class Ctx:
        def static_block_counts(self, profile, layer, length, window=None):
            assert window is None  # a layer without a sliding window
            return static

    dyn = DynamicSelection(1, blk, tail_topk=2, tail_mass=0.6)
    probe = _DensityProbe(Ctx(), prof, dyn, S, scale=0.3)
    probe.count(0, q, k)
    chosen = select_blocks(q, k, 0, 1, blk, tail_topk=2, tail_mass=0.6, scale=0.3)
    assert not torch.equal(chosen, select_blocks(q, k, 0, 1, blk, tail_topk=2))
    assert torch.equal(probe.pairs[0], union_pair_counts(chosen.cpu(), static, S, blk)[0])


@pytest.mark.parametrize("fields, flag, api", [
    (dict(topk=2, tail_mass=1.5), "--dynamic-tail-mass must be a number in \\(0, 1\\]",
     "DynamicSelection.tail_mass must be a number in \\(0, 1\\]"),
    (dict(topk=2, tail_mass=0), "--dynamic-tail-mass must be", "DynamicSelection.tail_mass must be"),
    (dict(topk=2, tail_mass=float("nan")), "--dynamic-tail-mass must be", "DynamicSelection.tail_mass must be"),
    (dict(topk=2, tail_mass=True), "--dynamic-tail-mass must be", "DynamicSelection.tail_mass must be"),
    (dict(topk=0, tail_mass=0.9), "--dynamic-tail-mass needs --dynamic-topk > 0",
     "DynamicSelection.tail_mass needs DynamicSelection.topk > 0"),
    (dict(topk=2, score="antisum", tail_mass=1.0, mass=0), "--dynamic-mass must be a number in \\(0, 1\\]",
     "DynamicSelection.mass must be a number in \\(0, 1\\]"),
    (dict(topk=2, score="mean", tail_mass=1.0, mass=0.9), "--dynamic-mass applies to the mass scores",
     "DynamicSelection.mass applies to the mass scores"),
])
def test_bad_tail_mass_is_refused_naming_the_flag_or_the_field(fields, flag, api):
    class Usage(Exception):
        pass

    with pytest.raises(Usage, match=f"^{flag}"):
        DynamicSelection(**fields).validate(cli=True, error=Usage)
    with pytest.raises(ValueError, match=f"^{api}"):
        DynamicSelection(**fields).validate()


def test_tail_mass_is_reported_when_set():
    sel = DynamicSelection(2, 64, tail_topk=32, tail_mass=0.95).validate()
    assert sel.as_dict() == {"topk": 2, "block": 64, "tail_topk": 32, "score": "mean", "tail_mass": 0.95}
    assert "tail_mass" not in DynamicSelection(2, 64).as_dict()
    assert DynamicSelection(2, 64, tail_mass=1).validate().tail_mass == 1
    both = DynamicSelection(2, 64, score="antisum", tail_mass=1.0, mass=0.9).validate()
    assert both.as_dict()["mass"] == 0.9 and both.prompt_mass == 0.9
    assert DynamicSelection(2, 64, score="antisum", tail_mass=0.9).prompt_mass == 0.9


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_refuses_a_bad_tail_mass_before_loading(command):
    first = ["--profile", "missing.safetensors"] if command == "eval" else []  # eval needs one; never read here
    code, _, err = run_cli(command, *first, "--dynamic-topk", "4", "--dynamic-tail-mass", "1.5")
    assert code == 2, err
    assert "--dynamic-tail-mass must be a number in (0, 1]" in err and "got 1.5" in err


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_refuses_a_bad_prompt_mass_before_loading(command):
    first = ["--profile", "missing.safetensors"] if command == "eval" else []  # eval needs one; never read here
    code, _, err = run_cli(command, *first, "--dynamic-topk", "4", "--dynamic-mass", "1.5")
    assert code == 2 and "--dynamic-mass must be a number in (0, 1]" in err and "got 1.5" in err, err
    code, _, err = run_cli(command, *first, "--dynamic-topk", "4", "--dynamic-score", "mean", "--dynamic-mass", "0.5")
    assert code == 2 and "--dynamic-mass applies to the mass scores" in err, err

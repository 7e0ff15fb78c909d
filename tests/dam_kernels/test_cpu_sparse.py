"""The compiled CPU kernel (`dam_kernels.cpu_sparse`) against the exact reference (`reference_attention`), built
as in `test_gathered.py`: static masks (rows below and beyond L, columns, bit 63 in use), the dynamic selection,
retrieval heads, grouped-query heads, a start inside a block, lengths not a multiple of the block, head dims
16 to 256, float32 with a tight tolerance. Skipped where the machine has no C compiler (`load()` is None)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from dam_kernels import cpu_sparse
from dam_kernels.dynamic import dynamic_rows, select_blocks
from dam_kernels.layout import device_masks
from dam_kernels.reference import reference_attention
from helpers import ANTISUM_SHAPES, dense_masked_softmax, random_profile, random_qkv

ATOL = 1e-5  # float32, as the Triton kernels' tests: the kernel's error against a float64 oracle is at most
# twice the float32 reference's plus this (scores in log2 units and the kernel's exp2, within 2e-7 of the true one,
# round otherwise than the reference's softmax)

needs_compiler = pytest.mark.skipif(cpu_sparse.load() is None, reason="no C compiler: the compiled kernel is off")


def _reference(prof, q, k, v, start, chosen=None, full=None, window=None):
    def rows_fn(rows, n, k0=0):
        cells = prof.mask_rows(0, rows, n, k0)
        return cells if chosen is None else cells | dynamic_rows(chosen, rows, k0 + n, 64)[..., k0:]

    out = reference_attention(q, k, v, rows_fn, start=start, window=window)
    if full is not None and full.any():  # retrieval heads: every causal key (in the window)
        from dam_cli.runtime.full_heads import full_heads_overlay

        full_heads_overlay(out, q, k, v, [int(h) for h in full.nonzero()], start, None, window=window)
    return out


def _err(a, b) -> float:
    assert a.shape == b.shape and not a.isnan().any()
    return (a.double() - b.double()).abs().max().item()


def _check(got, prof, q, k, v, start, chosen=None, full=None, window=None):
    """`got` against the float64 oracle of the same mask, within twice the float32 reference's error + ATOL."""
    rows = torch.arange(start, start + q.shape[2])
    allowed = prof.mask_rows(0, rows, k.shape[2])
    if chosen is not None:
        allowed = allowed | dynamic_rows(chosen, rows, k.shape[2], 64)
    if full is not None:
        allowed = allowed | (full[:, None, None] & (torch.arange(k.shape[2])[None, :] <= rows[:, None]))
    if window is not None:
        allowed = allowed & (rows[:, None] - torch.arange(k.shape[2])[None, :] < window)
    oracle = dense_masked_softmax(q, k, v, allowed)
    ref_err = _err(_reference(prof, q, k, v, start, chosen, full, window), oracle)
    assert got.dtype == torch.float32 and _err(got, oracle) <= 2 * ref_err + ATOL, (_err(got, oracle), ref_err)


@needs_compiler
@pytest.mark.parametrize("L, S, start, H, H_kv, D", [
    (16, 100, 0, 4, 2, 16),  # beyond the profiled length, S not a multiple of the block
    (16, 100, 37, 4, 2, 16),  # start inside a block
    (40, 300, 0, 4, 1, 32),  # four query heads on one kv head
    (40, 300, 130, 4, 4, 64),
    (300, 200, 0, 3, 1, 64),  # shorter than the profiled length
    (130, 400, 11, 3, 1, 48),  # L past two words (bit 63 in use), not a multiple of 64; D not a multiple of 64
    (70, 260, 5, 2, 1, 256),  # Gemma 3's head dim
    (64, 129, 128, 2, 2, 96),  # one row past a block
])
def test_static_mask_equals_the_reference(L, S, start, H, H_kv, D):
    prof = random_profile(1, H, L, p_m=0.3, p_r=0.1, p_c=0.05, seed=S + start)
    q, k, v = random_qkv(1, H, H_kv, S, start, D=D, seed=1, amp=2.0)
    _check(cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start), prof, q, k, v, start)


@needs_compiler
@pytest.mark.parametrize("L, S, start, topk, tail, full", [
    (40, 300, 0, 2, None, None),
    (40, 300, 37, 2, 0.8, None),  # the exact-mass rule on the tail block
    (16, 500, 0, 3, 0.9, [1]),  # a retrieval head too
    (64, 640, 200, 4, 0.9, [0, 3]),
])
def test_dynamic_selection_and_retrieval_heads_equal_the_reference(L, S, start, topk, tail, full):
    H, H_kv = 4, 2
    prof = random_profile(1, H, L, p_m=0.2, p_r=0.05, p_c=0.02, seed=S)
    q, k, v = random_qkv(1, H, H_kv, S, start, D=32, seed=2, amp=2.0)
    chosen = select_blocks(q, k, start, topk, 64, tail_topk=topk + 1, tail_mass=tail)
    heads = None
    if full is not None:
        heads = torch.zeros(H, dtype=torch.bool)
        heads[full] = True
    got = cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start, chosen=chosen,
                                          full_heads=heads)
    _check(got, prof, q, k, v, start, chosen, heads)
    static_only = cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start)
    assert _err(static_only, got) > 1e-3  # the case bites: the selection changes the answer


@needs_compiler
def test_threads_change_nothing_and_the_output_is_the_models_layout():
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=3)
    q, k, v = random_qkv(1, 4, 2, 700, 0, D=64, seed=3, amp=2.0)
    masks = device_masks(prof, 0, "cpu")
    one = cpu_sparse.cpu_sparse_attention(q, k, v, masks, threads=1)
    two = cpu_sparse.cpu_sparse_attention(q, k, v, masks, threads=2)
    assert torch.equal(one, two)  # items are independent: the same bits on any number of threads
    assert one.transpose(1, 2).is_contiguous()  # [1, Sq, H, D] underneath


def test_supports_only_what_the_kernel_computes():
    q = torch.zeros(1, 2, 10, 64)
    assert cpu_sparse.supports(q) and cpu_sparse.supports(q, dyn_block=64)
    assert not cpu_sparse.supports(q, dyn_block=32)
    assert not cpu_sparse.supports(q, softcap=3.0) and not cpu_sparse.supports(q, key_start=4)
    assert not cpu_sparse.supports(q.half()) and not cpu_sparse.supports(torch.zeros(2, 2, 10, 64))
    assert not cpu_sparse.supports(torch.zeros(1, 2, 10, 40)) and not cpu_sparse.supports(torch.zeros(1, 2, 10, 512))


def test_no_compiler_or_a_failed_build_means_no_kernel_said_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu_sparse, "_STATE", {})
    monkeypatch.setattr(cpu_sparse, "_compiler", lambda: None)
    assert cpu_sparse.load() is None and cpu_sparse.load() is None
    assert capsys.readouterr().err.count("no C compiler") == 1
    with pytest.raises(RuntimeError, match="not available"):
        cpu_sparse.cpu_sparse_attention(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16),
                                        None)

    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(cpu_sparse, "_STATE", {})
    monkeypatch.setattr(cpu_sparse, "_compiler", lambda: str(broken))
    monkeypatch.setenv("DAM_CACHE", str(tmp_path / "cache"))
    assert cpu_sparse.load() is None
    err = capsys.readouterr().err
    assert "internal compiler error" in err and "PyTorch path" in err and err.count("\n") == 1
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written is left

    full = tmp_path / "cc-full"  # the linker out of room: a multi-line error, said as one reason
    full.write_text("#!/bin/sh\necho '/usr/bin/ld: final link failed: No space left on device' >&2\n"
                    "echo 'collect2: error: ld returned 1 exit status' >&2\nexit 1\n")
    full.chmod(0o755)
    monkeypatch.setattr(cpu_sparse, "_STATE", {})
    monkeypatch.setattr(cpu_sparse, "_compiler", lambda: str(full))
    assert cpu_sparse.load() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device" in err and "collect2" not in err


@needs_compiler
def test_the_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("DAM_CACHE", str(tmp_path))
    cc = cpu_sparse._compiler()
    lib = cpu_sparse._build(cc)
    assert lib.parent == tmp_path / "cpu-kernels" and lib.exists()
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    assert cpu_sparse._build(cc) == lib
    assert all("--version" in c for c in calls)  # asked for its version, never compiled again
    cut = tmp_path / "other" / "cpu-kernels" / lib.name  # a cached library cut short (in a cache this process has
    cut.parent.mkdir(parents=True)                       # not loaded from): removed and built again
    cut.write_bytes(b"x")
    monkeypatch.setenv("DAM_CACHE", str(tmp_path / "other"))
    assert cpu_sparse._build(cc) == cut and cut.stat().st_size > 1000
    assert any("-o" in c for c in calls)


def test_the_temporary_fallback_folder_is_private(monkeypatch, tmp_path):
    """The fallback in the temporary folder loads a library from there: a folder others may write to is not used
    (a new private one is), a folder this user owns and only it writes to is."""
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"dam-cpu-kernels-{os.getuid()}"
    assert cpu_sparse._private_temp_folder() == shared  # not there yet: made by the build
    shared.mkdir()
    shared.chmod(0o777)
    other = cpu_sparse._private_temp_folder()
    assert other != shared and other.parent == tmp_path and (other.stat().st_mode & 0o077) == 0
    shared.chmod(0o755)
    assert cpu_sparse._private_temp_folder() == shared


@needs_compiler
def test_auto_runs_the_compiled_kernels_and_gathered_runs_none(monkeypatch):
    """`sparse_attention` on the CPU: backend auto (and "compiled") runs the compiled kernel for a prefill call and
    the compiled one-block kernel (`cpu_decode`) for a decode step, retrieval heads inside both; "gathered" never
    runs a compiled kernel. All equal the reference up to float rounding."""
    import dam_kernels.gathered as gathered
    from dam_kernels import cpu_decode
    from dam_kernels.selection import DynamicSelection

    from dam_cli.runtime import attention

    seen = []
    real_c, real_d = cpu_sparse.cpu_sparse_attention, cpu_decode.cpu_decode_attention
    real_g = gathered.gathered_attention
    monkeypatch.setattr(cpu_sparse, "cpu_sparse_attention", lambda *a, **kw: seen.append("c") or real_c(*a, **kw))
    monkeypatch.setattr(cpu_decode, "cpu_decode_attention", lambda *a, **kw: seen.append("d") or real_d(*a, **kw))
    monkeypatch.setattr(gathered, "gathered_attention", lambda *a, **kw: seen.append("g") or real_g(*a, **kw))
    full = torch.tensor([[False, True, False, False]])
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=9, full_heads=full)
    dyn = DynamicSelection(2, 64, 4, score="antisum", tail_mass=0.9)
    for start, Sq, path in ((0, 300, "c"), (299, 1, "d")):
        q, k, v = random_qkv(1, 4, 2, start + Sq, start, D=32, seed=6, amp=2.0)
        want = attention.sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=dyn)
        for backend in ("auto", "compiled", "gathered"):
            seen.clear()
            got = attention.sparse_attention(q, k, v, prof, 0, start=start, backend=backend, dynamic=dyn)
            assert seen == ["g" if backend == "gathered" else path]
            assert _err(got, want) <= 2e-5


@needs_compiler
@pytest.mark.parametrize("kind", ["guard only", "all allowed"])
def test_blocks_of_few_pairs_and_whole_blocks_both_equal_the_reference(kind):
    """A profile of the diagonal guard alone (every block a few pairs: the pair-by-pair path) and one that allows
    every causal pair (whole blocks: the tile path), beyond the profiled length too."""
    from helpers import all_allowed_profile, guard_only_profile

    prof = guard_only_profile(1, 3, 40) if kind == "guard only" else all_allowed_profile(1, 3, 40)
    q, k, v = random_qkv(1, 3, 1, 330, 70, D=32, seed=4, amp=2.0)
    _check(cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=70), prof, q, k, v, 70)


@needs_compiler
@pytest.mark.parametrize("S, start, stride, block, D, H, H_kv", ANTISUM_SHAPES)
def test_compiled_estimate_equals_the_reference(S, start, stride, block, D, H, H_kv):
    """`cpu_sparse.antisum_block_mass` (`cpu_antisum.c`) against the PyTorch estimate: two batch rows, a start
    inside a block, grouped heads, strides 2 to 16, head dims 16 to 256."""
    from dam_kernels.block_mass import antisum_block_mass

    q, k, _ = random_qkv(2, H, H_kv, S, start, D, seed=S + start, amp=1.5)
    got = cpu_sparse.antisum_block_mass(q, k, start, block, stride)
    want = antisum_block_mass(q, k, start, block, stride)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@needs_compiler
def test_the_cpu_selection_takes_the_compiled_estimate_and_chooses_as_the_torch_one(monkeypatch):
    from dam_kernels import block_mass

    q, k, _ = random_qkv(1, 6, 2, 1500, 0, 64, seed=5, amp=1.5)
    calls = []
    real = cpu_sparse.antisum_block_mass
    monkeypatch.setattr(cpu_sparse, "antisum_block_mass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = block_mass.antisum_select(q, k, 0, 64, 0.9, 8, tail_mass=0.9, tail_cap=8)
    assert calls == [1]
    monkeypatch.setattr(cpu_sparse, "_STATE", {"lib": None, "why": "test", "antisum": None})
    want = block_mass.antisum_select(q, k, 0, 64, 0.9, 8, tail_mass=0.9, tail_cap=8)
    assert calls == [1] and (got == want).float().mean().item() > 0.999  # only near-equal masses may order otherwise


@needs_compiler
@pytest.mark.parametrize("window, start, S, dynamic", [(50, 0, 300, False), (17, 120, 300, False), (200, 0, 700, True),
                                                       (512, 37, 1100, True), (64, 0, 400, True)])
def test_a_sliding_window_cuts_every_row_as_the_reference(window, start, S, dynamic):
    """A sliding-window layer (Gemma 2 / 3, Mistral): the static mask, the selection (chosen inside the window) and a
    retrieval head, all cut to each row's window."""
    H, H_kv = 4, 2
    prof = random_profile(1, H, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=S + window)
    q, k, v = random_qkv(1, H, H_kv, S, start, D=32, seed=window, amp=2.0)
    chosen = select_blocks(q, k, start, 3, 64, tail_topk=4, tail_mass=0.9, window=window) if dynamic else None
    heads = torch.tensor([False, False, True, False])
    got = cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start, chosen=chosen,
                                          full_heads=heads, window=window)
    _check(got, prof, q, k, v, start, chosen, heads, window)
    unwindowed = cpu_sparse.cpu_sparse_attention(q, k, v, device_masks(prof, 0, "cpu"), start=start, chosen=chosen,
                                                 full_heads=heads)
    assert _err(unwindowed, got) > 1e-3  # the case bites


def test_no_writable_folder_for_the_build_means_no_kernel(monkeypatch, tmp_path, capsys):
    """The cache folder and the temporary folder both unusable (here: paths under a regular file): no kernel, one
    line naming the cache folder, and the PyTorch path."""
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(cpu_sparse, "_STATE", {})
    monkeypatch.setenv("DAM_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    if cpu_sparse._compiler() is None:
        pytest.skip("no C compiler: the build is never tried")
    assert cpu_sparse.load() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no writable folder" in err and str(blocker / "cache") in err


def test_enable_dam_builds_the_compiled_kernel_only_for_backends_that_run_it(monkeypatch):
    """`prepare_gathered` (what `enable_dam` makes before any prompt on the CPU) loads the compiled kernel for
    backends "auto" and "compiled", never for "gathered"."""
    from dam_cli.runtime.attention import prepare_gathered

    calls = []
    monkeypatch.setattr(cpu_sparse, "load", lambda: calls.append(1))
    prof = random_profile(2, 4, 40, seed=1)
    prepare_gathered(prof, None, compiled=False)
    assert calls == []
    prepare_gathered(prof, None)
    assert calls == [1]


@needs_compiler
def test_bfloat16_inputs_are_widened_and_the_output_is_bfloat16():
    """A model run in bfloat16 on the CPU: q, k and v widened exactly to float32, the output back in bfloat16, equal
    to the float32 call on the same values rounded once."""
    from helpers import check_against_oracle

    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=11)
    q, k, v = random_qkv(1, 4, 2, 300, 0, D=64, seed=11, amp=2.0, dtype=torch.bfloat16)
    masks = device_masks(prof, 0, "cpu")
    got = cpu_sparse.cpu_sparse_attention(q, k, v, masks)
    assert got.dtype == torch.bfloat16 and got.transpose(1, 2).is_contiguous()
    assert torch.equal(got, cpu_sparse.cpu_sparse_attention(q.float(), k.float(), v.float(), masks).to(torch.bfloat16))
    check_against_oracle(got, q, k, v, prof, 0, label="bfloat16")


@needs_compiler
@pytest.mark.parametrize("S, start", [(300, 0), (40, 0), (300, 299), (204, 200)])  # the prompt kernel, decode's
def test_a_nan_query_row_gives_a_nan_row_as_the_reference(S, start):
    """A NaN in a query row makes every score of that row NaN: the reference's output row is NaN, and the compiled
    kernels' too (they once gave zeros: a NaN never wins a maximum, and a NaN sum failed the `l > 0` test)."""
    from dam_cli.runtime.attention import sparse_attention

    prof = random_profile(heads=4, L=64, seed=S)
    q, k, v = random_qkv(1, 4, 2, S, start, 32, seed=S)
    r = min(3, S - start - 1)
    q[0, 1, r, 5] = float("nan")
    ref = sparse_attention(q, k, v, prof, 0, start=start, backend="reference")
    got = sparse_attention(q, k, v, prof, 0, start=start, backend="compiled")
    assert ref[0, 1, r].isnan().all() and got[0, 1, r].isnan().all()
    ok = ~ref.isnan()
    assert not got[ok].isnan().any() and _err(got[ok], ref[ok]) < 1e-5

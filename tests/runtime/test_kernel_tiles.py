"""The prefill tiles `sparse_attention` picks for the static path (the kernels' own per-head-dim choice on a GPU),
and the pipeline stages that fit a GPU's shared memory."""

import torch
from dam_kernels.prefill import prefill_blocks, prefill_fits, stages_that_fit

from dam_cli.runtime import attention


def test_static_path_tiles_follow_the_head_dim():
    cuda = torch.device("cuda")
    assert attention._blocks(64, cuda) == (128, 64)
    assert attention._blocks(128, cuda) == (128, 64)
    # At head dim 256 the 128-row tile asked for 263,256 bytes of shared memory, above the H200's 232,448
    # (OutOfResources in `dam eval` on Gemma 3, docs/results/long-context.md); 64-row tiles are what the kernel
    # tests ran compiled.
    assert attention._blocks(256, cuda) == (64, 64)
    for d in attention.TRITON_HEAD_DIMS:
        assert attention._blocks(d, cuda) == prefill_blocks(d)


def test_interpreter_tiles_stay_small():
    assert attention._blocks(256, torch.device("cpu")) == (16, 16)


H200_SMEM = 232_448  # bytes of shared memory one program may use on an H100 / H200


def test_head_dim_256_tiles_run_with_one_stage():
    # Two stages of 64 x 256 bf16 K and V tiles in both key loops asked for 263,256 bytes (OutOfResources in
    # `dam eval` on Gemma 3 on the H200, with 64 x 64 tiles): 4 x 2 x 64 x 256 x 2 = 262,144 of them.
    assert stages_that_fit(2, 64, 256, 2, H200_SMEM) == 1
    assert stages_that_fit(2, 32, 256, 2, H200_SMEM) == 2


def test_measured_configurations_keep_their_stages():
    # 128 x 64 tiles at head dims 64 and 128 in bf16 ran with 3 stages in every H200 sweep.
    assert stages_that_fit(3, 64, 128, 2, H200_SMEM) == 3
    assert stages_that_fit(3, 64, 64, 2, H200_SMEM) == 3
    assert stages_that_fit(2, 64, 128, 2, H200_SMEM) == 2
    assert stages_that_fit(1, 64, 256, 4, H200_SMEM) == 1  # never below one stage


def test_float32_at_head_dim_256_does_not_fit_an_h200():
    # One stage of 64 x 256 float32 K and V tiles in both loops is 262,144 bytes: the Triton backend refuses it
    # (backend 'auto' then runs the reference) instead of failing in the compiler.
    assert not prefill_fits(256, 4, H200_SMEM)
    assert prefill_fits(256, 2, H200_SMEM)
    assert prefill_fits(128, 4, H200_SMEM) and prefill_fits(96, 4, H200_SMEM)

"""The prefill tiles `sparse_attention` picks for the static path: the kernels' own per-head-dim choice on a GPU."""

import torch
from dam_kernels.prefill import prefill_blocks

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

"""Run-to-run reproducible float32 arithmetic on the CPU: what `dam profile` needs for byte-identical profiles.

Two things, both about Intel MKL, which does PyTorch's float32 matrix products on the CPU:

- Its Conditional Numerical Reproducibility mode (`MKL_CBWR`): by default MKL may pick code paths (and so
  summation orders) by memory alignment and by how it shares work between threads at run time. `AUTO` keeps the
  fastest code path this CPU has, `STRICT` makes products independent of the thread count too. MKL reads it at its
  first call, so it is set before any product runs; a value the user set is left alone.
- Its first call in a process. About one `dam profile` run in twenty gave other last bits in the first product it
  ran (the rotary embedding's `inv_freq @ positions` of the first calibration window), and with them one mask bit
  of the profile; every later call, and every run whose first product was another one, agreed. One small product
  of each kind first (`settle_cpu_numerics`), results discarded, and 120 runs in a row agreed.

On this project's CPUs neither changed a result of a settled run nor cost measurable time
(docs/reference/spec-decisions.md, "Reproducibility").
"""

from __future__ import annotations

import os

CBWR = "AUTO,STRICT"
_SETTLED: list[bool] = []


def pin_cpu_numerics() -> str:
    """Ask MKL for reproducible results (unless `MKL_CBWR` is already set); return the mode in force."""
    return os.environ.setdefault("MKL_CBWR", CBWR)


def settle_cpu_numerics() -> None:
    """`pin_cpu_numerics`, then, once per process, a plain and a batched float32 product whose results are
    dropped, so that no computation of ours is MKL's first call. Imports torch."""
    pin_cpu_numerics()
    if _SETTLED:
        return
    import torch

    with torch.no_grad():
        torch.bmm(torch.ones(1, 32, 1), torch.ones(1, 1, 48))
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    _SETTLED.append(True)

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
- Its vector math (VML), which PyTorch's elementwise `cos`, `sin`, `exp`, `tanh`, `erf`, ... call in chunks of 2,048
  elements over the threads. The first such call of a process that runs on two threads gave, in about one process
  in six on this project's 2-core machine, other last bits for every element of the second thread's chunk (the
  rotary embedding's `cos` of the first calibration window: all 30 layers' attention then moved by up to 3e-4 and
  one profile in ten or so had a mask bit flipped); the second call agreed, and so did every call of a process
  whose first one had run on one thread. So each of these functions runs once on a few elements (one thread),
  then once over a chunk for every thread, before anything of ours.

On this project's CPUs neither changed a result of a settled run nor cost measurable time
(docs/reference/spec-decisions.md, "Reproducibility").
"""

from __future__ import annotations

import os

CBWR = "AUTO,STRICT"
VML_CHUNK = 2048  # PyTorch's elementwise calls into MKL's vector math go to the threads in chunks of this many
_SETTLED: list[bool] = []


def vml_functions() -> tuple:
    """The elementwise torch functions that reach MKL's vector math on the CPU (float32), settled one by one."""
    import torch

    return (torch.cos, torch.sin, torch.exp, torch.log, torch.tanh, torch.erf, torch.sqrt, torch.expm1,
            torch.log1p, torch.tan, torch.atan)


def pin_cpu_numerics() -> str:
    """Ask MKL for reproducible results (unless `MKL_CBWR` is already set); return the mode in force."""
    return os.environ.setdefault("MKL_CBWR", CBWR)


def settle_cpu_numerics() -> None:
    """`pin_cpu_numerics`, then, once per process, a plain and a batched float32 product and each of
    `vml_functions` on one thread and then on every thread, results dropped, so that no computation of ours is
    MKL's first call of its kind. Imports torch."""
    pin_cpu_numerics()
    if _SETTLED:
        return
    import torch

    with torch.no_grad():
        torch.bmm(torch.ones(1, 32, 1), torch.ones(1, 1, 48))
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))
        one_chunk = torch.linspace(0.1, 1.0, 16)
        every_thread = torch.linspace(0.1, 1.0, max(torch.get_num_threads(), 2) * VML_CHUNK)
        functions = vml_functions()
        for x in (one_chunk, every_thread):
            for fn in functions:
                fn(x)
    _SETTLED.append(True)

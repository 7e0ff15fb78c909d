"""Run-to-run reproducible float32 arithmetic on the CPU: the one switch `dam profile` needs for byte-identical
profiles.

PyTorch's CPU build does its float32 matrix products in Intel MKL, whose default mode may pick code paths (and
so summation orders) by memory alignment and by how it shares work between threads at run time. Its Conditional
Numerical Reproducibility mode (`MKL_CBWR`) fixes both: `AUTO` keeps the fastest code path this CPU has, `STRICT`
makes the products independent of the thread count too. On this project's CPUs it changed no result and cost
nothing measurable (docs/reference/spec-decisions.md, "Reproducibility"). MKL reads the setting at its first call, so it
must be set before any product runs in the process; a value the user set is left alone.
"""

from __future__ import annotations

import os

CBWR = "AUTO,STRICT"


def pin_cpu_numerics() -> str:
    """Ask MKL for reproducible results (unless `MKL_CBWR` is already set); return the mode in force."""
    return os.environ.setdefault("MKL_CBWR", CBWR)

"""Import `dam_cli` and `dam_kernels` from this checkout when they are not installed (e.g. on the GPU machine).

Links in a temporary folder go on `sys.path`, never the repository root: its `kernels/` folder would hide the
PyPI package `kernels`, which transformers >= 5.25 imports. Used by the benchmark scripts beside this file.
"""

from __future__ import annotations

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout() -> None:
    try:
        import dam_kernels  # noqa: F401

        import dam_cli  # noqa: F401
    except ImportError:
        shim = os.path.join(tempfile.gettempdir(), f"dam-bench-shim-{os.getuid()}")
        os.makedirs(shim, exist_ok=True)
        for name, target in (("dam_cli", "dam_cli"), ("dam_kernels", "kernels")):
            link = os.path.join(shim, name)
            if not os.path.islink(link):
                os.symlink(os.path.join(REPO, target), link)
        sys.path.insert(0, shim)

"""The kernel package stands alone: importing every `dam_kernels` module and building a layout
loads nothing from `dam_cli`, and `dam_cli.masks.stage2_rows` is the kernels' one implementation, not a copy."""

from __future__ import annotations

import os
import subprocess
import sys

MODULES = ("decode", "dynamic", "layout", "prefill", "reference", "select", "selection", "stage2")


def test_importing_the_kernels_loads_nothing_from_dam_cli():
    code = ("import sys\n"
            + "".join(f"import dam_kernels.{m}\n" for m in MODULES)
            # A layout whose blocks overhang L = 10 reads Stage-2 rows beyond L (once a lazy dam_cli import).
            + "import torch\n"
            + "tm = torch.ones(2, 10, 10, dtype=torch.bool).tril()\n"
            + "pat = torch.ones(2, 10, dtype=torch.bool)\n"
            + "dam_kernels.layout.build_layout(tm, pat, pat, 40, 16, 16)\n"
            + "bad = sorted(m for m in sys.modules if m == 'dam_cli' or m.startswith('dam_cli.'))\n"
            + "assert not bad, bad\n"
            + "print('ok')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_masks_reexports_the_kernels_stage2_rows():
    from dam_kernels.stage2 import stage2_rows

    from dam_cli import masks

    assert masks.stage2_rows is stage2_rows

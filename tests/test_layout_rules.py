"""The house rules the restructure set, checked so they stay: no module under dam_cli/ or kernels/ is over 450
lines, and the kernel package imports nothing from dam_cli (it installs as `dam_kernels`, standalone)."""

from __future__ import annotations

import ast
import pathlib

from helpers import REPO_ROOT

ROOT = pathlib.Path(REPO_ROOT)
MAX_LINES = 450


def _modules(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules("dam_cli") + _modules("kernels")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_kernels_import_nothing_from_dam_cli():
    found = []
    for p in _modules("kernels"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{p.name}: {n}" for n in names if n == "dam_cli" or n.startswith("dam_cli.")]
    assert not found, found


def test_the_kernels_folder_does_not_shadow_the_pypi_package():
    """`kernels/` has no `__init__.py` (it installs as the namespace package `dam_kernels`): as a regular package it
    would shadow the PyPI `kernels` that transformers probes for, and any Python started in the repository root
    (`python -c ...`, a notebook, `python -m ...`) would fail inside `import transformers`."""
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = "import transformers.activations, dam_kernels.gathered; print('imported')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]

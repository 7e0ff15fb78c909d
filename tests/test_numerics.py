"""dam_cli.numerics: MKL's reproducible mode is asked for unless the user chose one, and a `dam` process has it."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import cli_env

from dam_cli.numerics import CBWR, pin_cpu_numerics


def test_sets_the_reproducible_mode_when_unset(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert pin_cpu_numerics() == CBWR == "AUTO,STRICT"
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"


def test_keeps_a_mode_the_user_set(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert pin_cpu_numerics() == "COMPATIBLE"


def test_the_cli_sets_it_before_any_command_runs():
    env = {k: v for k, v in cli_env().items() if k != "MKL_CBWR"}
    code = ("import os, sys; from dam_cli.cli import app; sys.argv = ['dam', '--version']\n"
            "try:\n    app.main()\nexcept SystemExit:\n    pass\nprint(os.environ.get('MKL_CBWR'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "AUTO,STRICT"


def test_settling_sets_the_mode_and_runs_once(monkeypatch):
    import torch

    import dam_cli.numerics as numerics

    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setattr(numerics, "_SETTLED", [])
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    numerics.settle_cpu_numerics()
    numerics.settle_cpu_numerics()
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    assert calls == [1]  # the dropped first product, once per process


def test_loading_a_model_settles_first(monkeypatch, tiny_model_dir):
    import dam_cli.numerics as numerics
    from dam_cli.runtime.models import load_model

    monkeypatch.setattr(numerics, "_SETTLED", [])
    load_model(str(tiny_model_dir))
    assert numerics._SETTLED == [True]

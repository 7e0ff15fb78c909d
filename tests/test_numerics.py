"""dam_cli.numerics: MKL's reproducible mode unless the user chose one, and its first call spent before a model's."""

from __future__ import annotations

import os

from dam_cli.numerics import CBWR, pin_cpu_numerics


def test_sets_the_reproducible_mode_when_unset(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert pin_cpu_numerics() == CBWR == "AUTO,STRICT"
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"


def test_keeps_a_mode_the_user_set(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert pin_cpu_numerics() == "COMPATIBLE"


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

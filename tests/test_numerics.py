"""dam_cli.numerics: MKL's reproducible mode unless the user chose one, and its first call spent before a model's."""

from __future__ import annotations

import importlib.util
import os

import pytest

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


@pytest.mark.slow
def test_first_vector_math_call_of_a_settled_process_matches_the_next():
    """In about one fresh process in six, the first `cos` over two threads gave other bits in the second thread's
    chunk (benchmarks/numerics_stress.py: 13 of 80 unsettled, 0 of 80 settled); 12 settled processes must all
    agree (an unsettled run passes this with probability about (5/6)^12, 11%)."""
    spec = importlib.util.spec_from_file_location("numerics_stress", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "numerics_stress.py"))
    stress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stress)
    assert [stress.first_call_differs(settle=True) for _ in range(12)] == [(0, -1, -1)] * 12


def test_settling_runs_each_vector_function_on_one_thread_then_on_every_thread(monkeypatch):
    import torch

    import dam_cli.numerics as numerics

    sizes: dict[str, list[int]] = {}
    fakes = []
    for fn in numerics.vml_functions():
        fakes.append(lambda x, name=fn.__name__: sizes.setdefault(name, []).append(x.numel()))
    monkeypatch.setattr(numerics, "vml_functions", lambda: tuple(fakes))
    monkeypatch.setattr(numerics, "_SETTLED", [])
    numerics.settle_cpu_numerics()
    assert {"cos", "sin", "exp", "tanh", "erf"} <= set(sizes)
    for name, seen in sizes.items():
        assert len(seen) == 2, name
        assert seen[0] < numerics.VML_CHUNK  # one chunk: the main thread alone
        assert seen[1] >= torch.get_num_threads() * numerics.VML_CHUNK  # a chunk for every thread

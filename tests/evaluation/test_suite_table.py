"""`benchmarks/suite_table.py`: the kept share of full attention's answers, per family and overall, across files
whose methods are renamed, on hand-made `dam eval -o` results."""

from __future__ import annotations

import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = importlib.util.spec_from_file_location("suite_table", os.path.join(HERE, "..", "..", "benchmarks",
                                                                         "suite_table.py"))
suite_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(suite_table)


def _result(path, L, scores: dict, density: dict):
    """scores: {(task, seed): {method: score}}."""
    prompts = [{"length": L, "task": t, "seed": s, "outputs": {m: {"score": v, "output": ""} for m, v in per.items()}}
               for (t, s), per in scores.items()]
    dens = {m: {str(L): d} for m, d in density.items()}
    path.write_text(json.dumps({"suite": {"prompts": prompts}, "density": dens}))
    return str(path)


def test_kept_counts_only_what_full_attention_found(tmp_path):
    a = _result(tmp_path / "a.json", 2048, {
        ("niah_single", 1): {"full": 1.0, "dam-options-dynamic": 1.0},
        ("niah_multikey", 1): {"full": 1.0, "dam-options-dynamic": 0.0},
        ("passkey", 1): {"full": 0.0, "dam-options-dynamic": 1.0},  # found by DAM alone: no credit in kept
        ("niah_multivalue", 1): {"full": 0.5, "dam-options-dynamic": 1.0},  # capped at full's 0.5
    }, {"full": 1.0, "dam-options-dynamic": 0.25})
    b = _result(tmp_path / "b.json", 2048, {
        ("niah_single", 1): {"dam-options-dynamic": 0.0}, ("niah_multikey", 1): {"dam-options-dynamic": 1.0},
        ("passkey", 1): {"dam-options-dynamic": 0.0}, ("niah_multivalue", 1): {"dam-options-dynamic": 0.5},
    }, {"dam-options-dynamic": 0.5})
    text = suite_table.table([a, b + ":dam-options-dynamic=previous"])
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    # kept: (1 + 0 + 0 + 0.5) / 2.5 = 60% for the new one; (0 + 1 + 0 + 0.5) / 2.5 = 60% for the renamed one
    assert lines["dam-options-dynamic"].endswith("| 0.750 | 60% (1.50 of 2.50) |"), text
    assert lines["previous"].endswith("| 0.375 | 60% (1.50 of 2.50) |"), text
    assert "| 25.0% |" in lines["dam-options-dynamic"] and "| 50.0% |" in lines["previous"]
    assert "dam-options-dynamic: niah 60%" in text and "previous: niah 60%" in text
    assert lines["full"].endswith("| 100% (2.50 of 2.50) |")

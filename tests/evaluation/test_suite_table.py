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


def test_family_ratios_count_only_families_where_full_attention_scores_enough():
    pairs = {"niah": [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)],  # full 0.75, method 0.75: 100%
             "fwe": [(0.5, 1.0), (0.5, 1.0)],  # full 1.0, method 0.5: 50%
             "cwe": [(1.0, 0.0), (0.0, 0.5)]}  # full 0.25 < 0.3: not counted, whatever the method scores
    assert suite_table.family_ratios(pairs) == {"niah": 1.0, "fwe": 0.5}
    # answers full attention misses count in the ratio (not in the kept share)
    assert suite_table.family_ratios({"niah": [(1.0, 0.0), (1.0, 1.0)]}) == {"niah": 2.0}
    assert suite_table.kept_share([(1.0, 0.0), (1.0, 1.0)]) == 1.0


def test_the_bootstrap_interval_holds_the_kept_share_and_is_reproducible():
    pairs = [(1.0, 1.0)] * 30 + [(0.0, 1.0)] * 10 + [(1.0, 0.0)] * 8
    lo, hi = suite_table.kept_interval(pairs)
    assert lo < suite_table.kept_share(pairs) == 0.75 < hi
    assert (lo, hi) == suite_table.kept_interval(pairs)  # seeded: the same interval every time
    assert 0.6 < lo and hi < 0.9  # 40 counted prompts: about +-0.11 at 90%
    wide = suite_table.kept_interval(pairs[:4] + pairs[30:32])  # 4 of 6 counted prompts kept
    assert wide[1] - wide[0] > hi - lo
    assert suite_table.kept_interval([(1.0, 1.0)] * 5) == (1.0, 1.0)  # nothing lost: no spread
    assert suite_table.kept_interval([(1.0, 0.0)] * 3) is None  # full attention found nothing


def test_the_table_prints_both_readings_of_the_target(tmp_path):
    a = _result(tmp_path / "a.json", 4096, {
        ("fwe", 1): {"full": 1.0, "dam-options-dynamic": 0.0},
        ("fwe", 2): {"full": 1.0, "dam-options-dynamic": 1.0},
        ("passkey", 1): {"full": 1.0, "dam-options-dynamic": 1.0},
    }, {"full": 1.0, "dam-options-dynamic": 0.25})
    text = suite_table.table([a])
    assert "families where full scores at least 30%: dam-options-dynamic: fwe 50%, passkey 100%" in text, text
    assert "90% bootstrap interval over these prompts: dam-options-dynamic: " in text

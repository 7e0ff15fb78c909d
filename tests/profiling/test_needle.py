"""Needle-scored retrieval heads (issue 8, `--retrieval-by needle`): prompts, scores, choice, file."""

from __future__ import annotations

import pytest
import torch

from dam_cli.artifact.profile import load_profile
from dam_cli.errors import DamError, DamUsageError
from dam_cli.profiling.needle import choose_top, needle_prompts, needle_scores
from dam_cli.profiling.run import ProfileConfig, run_profile

TEXT = "the cat of the house is on the tree . what is the value ? the dog and the river . " * 40


def docs():
    yield "doc", TEXT


def test_needle_scores_hand_worked():
    # Head 0 has q = 0: uniform causal attention, so row r puts 1/(r+1) on each key; the needle
    # is key 1 and the rows 2 and 3: (1/3 + 1/4) / 2 = 7/24. Head 1 (same kv head) points its
    # query at key 1 only: its score is ~1. Head 2 reads the second kv head, whose key 1 is far
    # below the others: ~0. Head 3 (second kv head, q = 0) is uniform again: 7/24.
    n, D = 4, 2
    k = torch.zeros(2, n, D)
    k[0, 1] = torch.tensor([1.0, 0.0])
    k[1, :, 1] = 1.0
    k[1, 1, 1] = -1.0
    q = torch.zeros(4, n, D)
    q[1, :, 0] = 50.0
    q[2, :, 1] = 50.0
    s = needle_scores(q, k, 1.0, needle=[1], rows=[2, 3])
    assert s[0].item() == pytest.approx(7 / 24, abs=1e-6)
    assert s[1].item() == pytest.approx(1.0, abs=1e-6)
    assert s[2].item() == pytest.approx(0.0, abs=1e-6)
    assert s[3].item() == pytest.approx(7 / 24, abs=1e-6)


def test_needle_scores_are_causal():
    # A needle after the scored row gets nothing, however the query points at it.
    q = torch.zeros(1, 5, 1)
    q[0, :, 0] = 30.0
    k = torch.zeros(1, 5, 1)
    k[0, 4, 0] = 1.0
    assert needle_scores(q, k, 1.0, needle=[4], rows=[2]).item() == 0.0


def test_choose_top_highest_first_ties_by_index():
    s = torch.tensor([[0.1, 0.7, 0.7], [0.7, 0.0, 0.2]])
    assert choose_top(s, 2).tolist() == [[False, True, True], [False, False, False]]
    assert choose_top(s, 3).tolist() == [[False, True, True], [True, False, False]]
    assert choose_top(s, 99).all()


def test_prompts_place_the_code_and_score_the_answer(tiny_tokenizer):
    ps = needle_prompts(tiny_tokenizer, docs(), 200, 4)
    assert len(ps) == 4
    for i, p in enumerate(ps):
        assert len(p.ids) <= 200
        code = [p.ids[j] for j in p.needle]
        # The rows predict exactly the code's tokens, at the prompt's end.
        assert [p.ids[r + 1] for r in p.rows] == code and p.rows[-1] == len(p.ids) - 2
        assert all(j < p.rows[0] for j in p.needle)
        # Needles go deeper with the index: at (i + 0.5) / n of the haystack.
        assert abs(p.needle[0] / p.rows[0] - (i + 0.5) / 4) < 0.1
    assert ps == needle_prompts(tiny_tokenizer, docs(), 200, 4)  # fixed seeds: same prompts


def test_prompts_refuse_too_short(tiny_tokenizer):
    with pytest.raises(DamError, match="needle-length"):
        needle_prompts(tiny_tokenizer, docs(), 40, 2)
    with pytest.raises(DamError, match="calibration text"):
        needle_prompts(tiny_tokenizer, iter([("d", "the cat")]), 200, 2)


def test_profile_needle_end_to_end(tmp_path, tiny_model_dir):
    doc = tmp_path / "c.txt"
    doc.write_text(TEXT)
    common = dict(model=tiny_model_dir, calib=(str(doc),), samples=2, pcl=24, device="cpu",
                  retrieval_heads=3, retrieval_by="needle", needle_length=96, needle_samples=2)
    a = run_profile(ProfileConfig(output=str(tmp_path / "a.st"), **common)).profile
    score = a.stats["stats.needle_score"]
    assert score.shape == (a.n_layers, a.n_heads) and (score >= 0).all() and (score <= 1).all()
    assert torch.equal(a.full, choose_top(score, 3)) and a.full.sum() == 3
    r = a.meta.recipe
    assert (r["retrieval_by"], r["needle_length"], r["needle_samples"]) == ("needle", 96, 2)
    back = load_profile(tmp_path / "a.st")
    assert torch.equal(back.stats["stats.needle_score"], score.float()) and torch.equal(back.full, a.full)
    # Reproducible: the same inputs give the same bytes.
    run_profile(ProfileConfig(output=str(tmp_path / "b.st"), **common))
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()
    # The mass rule stores no needle scores.
    m = run_profile(ProfileConfig(output=str(tmp_path / "m.st"), **{**common, "retrieval_by": "mass"})).profile
    assert "stats.needle_score" not in m.stats and "retrieval_by" not in m.meta.recipe


def test_the_default_recipe_at_a_small_pcl_passes_its_own_check(tmp_path, tiny_model_dir):
    """Patterns chosen by mass have min_support cells, as `dam inspect --check` expects of the recipe (a PCL of 96
    with min_support 64 left late diagonals of fewer cells, which the check refused)."""
    from dam_cli.inspection.check import check

    doc = tmp_path / "c.txt"
    doc.write_text(TEXT)
    run_profile(ProfileConfig(output=str(tmp_path / "d.st"), model=tiny_model_dir, calib=(str(doc),), samples=2,
                              pcl=96, device="cpu", pattern_mass=0.9, min_support=64, needle_length=192,
                              needle_samples=1, retrieval_heads=1, retrieval_by="needle"))
    got = check(tmp_path / "d.st")
    assert got.valid, got.errors
    p = load_profile(tmp_path / "d.st")
    assert not p.offsets[..., 96 - 63:].any() and not p.columns[..., 96 - 63:].any()


@pytest.mark.parametrize("kw, msg", [
    (dict(retrieval_by="needle"), "--retrieval-heads"),
    (dict(retrieval_by="needles", retrieval_heads=2), "mass or needle"),
    (dict(retrieval_by="needle", retrieval_heads=2, from_capture="c.h5"), "from-capture"),
    (dict(retrieval_by="needle", retrieval_heads=2, needle_samples=0), "needle-samples"),
])
def test_bad_needle_options(tmp_path, kw, msg):
    with pytest.raises(DamUsageError, match=msg):
        run_profile(ProfileConfig(output=str(tmp_path / "x.st"), **kw))


def test_needle_length_past_the_context_is_capped_with_a_note(tmp_path, tiny_model_dir):
    """--needle-length beyond the model's context runs prompts of the context's length and says so (it once capped
    silently: a run that looked stuck with -q)."""
    from dam_cli.progress import NullReporter

    class Notes(NullReporter):
        def __init__(self):
            self.lines = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    doc = tmp_path / "c.txt"
    doc.write_text(TEXT * 8)
    notes = Notes()
    cfg = ProfileConfig(output=str(tmp_path / "a.st"), model=tiny_model_dir, calib=(str(doc),), samples=2, pcl=24,
                        device="cpu", retrieval_heads=3, retrieval_by="needle", needle_length=5000, needle_samples=1)
    a = run_profile(cfg, notes).profile
    assert a.meta.recipe["needle_length"] == 1024  # the tiny model's context
    assert any("--needle-length 5,000 is beyond the model's context: needle prompts of 1,024 tokens" in m
               for m in notes.lines), notes.lines

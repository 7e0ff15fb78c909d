"""`dam profile` through the CLI: real model end to end, determinism, capture re-derivation, bad input."""

from __future__ import annotations

import json
import os

import pytest
from helpers import file_difference
from helpers import file_sha256 as sha
from helpers import run_cli_subprocess as dam

from dam_cli.artifact.profile import load_profile


@pytest.mark.slow
def test_smollm2_profile_end_to_end_deterministic_and_rederivable(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    cap = tmp_path / "cap.h5"
    common = ["--recipe", "paper", "--pcl", "48", "--samples", "3"]
    r = dam("profile", *common, "--output", str(a), "--save-capture", str(cap), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["shape"] == {"layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64}
    assert doc["recipe"]["pcl"] == 48 and doc["calibration"]["samples"] == 3
    assert len(doc["layers"]) == 30
    # Two runs, one sha256.
    r = dam("profile", *common, "--output", str(b), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert sha(a) == sha(b), file_difference(a, b) + _third_run(common, tmp_path, a, b)
    # Re-derivation from the capture equals the fresh run, byte for byte.
    r = dam("profile", "--from-capture", str(cap), "--output", str(c), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sha(a) == sha(c), file_difference(a, c)
    # Other options re-derive without the model, and change the masks as they should.
    d = tmp_path / "d.safetensors"
    r = dam("profile", "--from-capture", str(cap), "--tau", "0.6", "--output", str(d), "--quiet")
    assert r.returncode == 0, r.stderr
    pa, pd = load_profile(a), load_profile(d)
    assert pd.meta.recipe["tau"] == 0.6
    assert pd.true_mask.sum() < pa.true_mask.sum()
    assert not (pd.true_mask & ~pa.true_mask).any()  # a higher tau only removes pairs
    assert pa.meta.model["name"] == "SmolLM2-135M-Instruct"
    assert len(pa.meta.model["config_sha256"]) == 64


def _third_run(common, tmp_path, a, b) -> str:
    """On a mismatch: whether a third run with the first run's options matches the first or the second."""
    e = tmp_path / "e.safetensors"
    r = dam("profile", *common, "--output", str(e), "--save-capture", str(tmp_path / "cap2.h5"), "--quiet")
    if r.returncode:
        return f"; a third run failed: {r.stderr[-300:]}"
    match = {sha(a): "the first", sha(b): "the second"}.get(sha(e), "neither")
    return f"; a third run with the first run's options matches {match}"


def _one_line_error(r, code, *needles):
    """One `error:` line, the last on stderr (progress lines may come before it), with the needles."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_bad_options_one_line_nothing_written(tmp_path):
    out = tmp_path / "p.safetensors"
    _one_line_error(dam("profile", "--tau", "0", "--output", str(out)), 2, "--tau must be > 0")
    _one_line_error(dam("profile", "--mu", "1.5", "--output", str(out)), 2, "--mu must be in (0, 1]")
    _one_line_error(dam("profile", "--mu", "0", "--output", str(out)), 2, "--mu")
    _one_line_error(dam("profile", "--samples", "0", "--output", str(out)), 2, "--samples")
    _one_line_error(dam("profile", "--samples", "99999999999", "--output", str(out)), 2,
                    "--samples must be from 1 to 100,000")
    assert not out.exists()
    out.write_bytes(b"precious")
    _one_line_error(dam("profile", "--output", str(out)), 2, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    _one_line_error(dam("profile", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x.st")), 1,
                    "not found")
    assert not (tmp_path / "x.st").exists()
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary files left behind


def test_bad_calibration_and_pcl(tmp_path, tiny_model_dir):
    out = tmp_path / "p.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(dam("profile", "--model", tiny_model_dir, "--calib", str(empty), "--output", str(out)), 1,
                    "empty", "0 tokens")
    short = tmp_path / "short.txt"
    short.write_text("the cat is on the tree .")
    _one_line_error(dam("profile", "--model", tiny_model_dir, "--calib", str(short), "--pcl", "64",
                        "--output", str(out)), 1, "too short", "7 tokens")
    _one_line_error(dam("profile", "--model", tiny_model_dir, "--pcl", "4096", "--output", str(out)), 2,
                    "above the model's context of 1024")
    _one_line_error(dam("profile", "--model", tiny_model_dir, "--calib", str(tmp_path / "missing.txt"),
                        "--output", str(out)), 1, "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    _one_line_error(dam("profile", "--model", tiny_model_dir, "--calib", str(bad), "--output", str(out)), 1,
                    "no string field 'text'", "--text-field")
    assert not out.exists()


def test_json_failures_say_why_on_stdout_too(tmp_path, tiny_model_dir):
    # A CI job that parses stdout of `--json` reads the failure as one JSON object; without --json stdout stays
    # empty; a usage error and a bad input alike, with their exit codes.
    out = tmp_path / "p.safetensors"
    r = dam("profile", "--model", tiny_model_dir, "--calib", str(tmp_path / "missing.txt"), "--output", str(out),
            "--json")
    _one_line_error(r, 1, "does not exist")
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "does not exist" in doc["error"] and doc["error"] in r.stderr
    r = dam("profile", "--tau", "0", "--output", str(out), "--json")
    _one_line_error(r, 2, "--tau must be > 0")
    assert json.loads(r.stdout) == {"error": r.stderr.strip().removeprefix("error: "), "exit_code": 2}
    r = dam("profile", "--tau", "0", "--output", str(out))
    assert r.returncode == 2 and r.stdout == ""
    r = dam("inspect", str(tmp_path / "none.safetensors"), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["exit_code"] == 1
    assert not out.exists()


def test_jsonl_and_folder_calibration_order(tmp_path, tiny_model_dir):
    # A folder of two files and a JSONL give windows in sorted path order, JSONL in line order.
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("dog " * 30)
    (folder / "a.jsonl").write_text(json.dumps({"text": "cat " * 30}) + "\n"
                                    + json.dumps({"text": "tree " * 30}) + "\n")
    from dam_cli.profiling.calib import file_documents

    names = [n for n, _ in file_documents([str(folder)])]
    assert names == [f"{folder}/a.jsonl:1", f"{folder}/a.jsonl:2", f"{folder}/b.txt"]
    out = tmp_path / "p.safetensors"
    r = dam("profile", "--recipe", "paper", "--model", tiny_model_dir, "--calib", str(folder), "--pcl", "16",
            "--samples", "5",
            "--output", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["calibration"]["samples"] == 5


def test_the_model_folder_spelled_two_ways_gives_one_profile(tmp_path, tiny_model_dir):
    # `--model .` from inside the folder and `--model /abs/folder/` name the model by the folder's own name: the
    # same bytes (the name is in the profile; "." once was).
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["profile", "--recipe", "paper", "--pcl", "16", "--samples", "2", "--quiet"]
    r = dam(*common, "--model", ".", "--output", str(a), cwd=tiny_model_dir)
    assert r.returncode == 0, r.stderr
    r = dam(*common, "--model", tiny_model_dir + "/", "--output", str(b))
    assert r.returncode == 0, r.stderr
    assert load_profile(a).meta.model["name"] == os.path.basename(tiny_model_dir)
    assert sha(a) == sha(b), file_difference(a, b)


def test_gguf_without_loader_packages(monkeypatch):
    import importlib.util

    from dam_cli.errors import DamError
    from dam_cli.runtime import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(DamError, match="pip install gguf"):
        models._require_gguf_support()


@pytest.mark.slow
def test_the_shipped_paper_profile_is_what_its_command_writes(tmp_path):
    """profiles/README.md: `dam profile --recipe paper` writes the shipped faithful profile. Masks, offsets,
    columns and metadata must match on any machine; the float32 statistics may differ in their last bits on a CPU
    whose products round otherwise (spec-decisions.md, Reproducibility), so the bytes themselves are not compared."""
    import torch
    from helpers import SHIPPED_PROFILE

    out = tmp_path / "paper.safetensors"
    r = dam("profile", "--recipe", "paper", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    mine, shipped = load_profile(out), load_profile(SHIPPED_PROFILE)
    assert torch.equal(mine.true_mask_packed, shipped.true_mask_packed)
    assert torch.equal(mine.offsets, shipped.offsets) and torch.equal(mine.columns, shipped.columns)
    assert (mine.meta.recipe, mine.meta.calibration, mine.meta.model, mine.meta.runtime) == (
        shipped.meta.recipe, shipped.meta.calibration, shipped.meta.model, shipped.meta.runtime)
    for k, v in shipped.stats.items():
        torch.testing.assert_close(mine.stats[k], v, rtol=1e-5, atol=1e-6)

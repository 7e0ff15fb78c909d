"""An output never replaces a file the same run reads, even with --force: `dam profile` (--from-capture, --calib,
--model), `dam eval` (--profile, --options-profile, --text, for --output and --png) and `dam inspect --png` refuse
it in one line (exit 2) before any work, and the input is left byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from helpers import run_cli, run_cli_refusing_loads

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "profiles", "smollm2-135m-instruct.safetensors")


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and lines and needle in lines[-1] and lines[-1].startswith("error:"), err
    assert not [x for x in lines if x.startswith("error:")][1:], err


@pytest.mark.parametrize("make_args, flag", [
    (lambda f: ["profile", "--from-capture", f, "-o", f, "--force"], "--from-capture"),
    (lambda f: ["profile", "--calib", f, "-o", f, "--force"], "--calib"),
    (lambda f: ["eval", "-p", f, "-o", f, "--force", "--quick"], "--profile"),
    (lambda f: ["eval", "-p", "other.safetensors", "--text", f, "-o", f, "--force", "--quick"], "--text"),
    (lambda f: ["eval", "-p", "other.safetensors", "--options-profile", f, "--png", f, "--force", "--quick"],
     "--options-profile"),
])
def test_an_output_naming_an_input_is_refused_before_any_work(monkeypatch, tmp_path, make_args, flag):
    run = run_cli_refusing_loads(monkeypatch, "loaded something for an output that names an input")
    f = tmp_path / "input.bin"
    f.write_text("calibration text or a profile: must survive\n")
    before = digest(f)
    code, err = run(*make_args(str(f)))
    one_line(code, err, f"name the same file ({f})")
    assert flag in err and digest(f) == before


def test_a_link_to_the_input_is_the_same_file(monkeypatch, tmp_path):
    run = run_cli_refusing_loads(monkeypatch, "loaded a profile for an output that is its input")
    f = tmp_path / "p.safetensors"
    f.write_bytes(b"profile bytes")
    os.link(f, tmp_path / "hard.safetensors")
    code, err = run("eval", "-p", str(f), "-o", str(tmp_path / "hard.safetensors"), "--force", "--quick")
    one_line(code, err, "--output and --profile name the same file")
    assert f.read_bytes() == b"profile bytes"


@pytest.mark.parametrize("command", ["profile", "eval"])
def test_an_output_over_a_file_of_the_model_folder_is_refused(monkeypatch, tmp_path, command):
    """`--model DIR` reads every file in DIR: an output named as one of them (its weights, its config) would be
    written over the model, with --force too."""
    run = run_cli_refusing_loads(monkeypatch, "loaded the model whose weights the output would replace")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights: must survive")
    args = (["profile", "--recipe", "paper"] if command == "profile" else ["eval", "-p", "other.safetensors"])
    code, err = run(*args, "--model", str(model), "-o", str(model / "model.safetensors"), "--force")
    one_line(code, err, f"--output is a file of the folder --model reads ({model / 'model.safetensors'})")
    assert (model / "model.safetensors").read_bytes() == b"weights: must survive"
    code, err = run(*args, "--model", str(model) + "/", "-o", str(model / "." / "config.json"), "--force")
    one_line(code, err, "--output is a file of the folder --model reads")


def test_inspect_png_over_its_own_profile_is_refused(tmp_path):
    p = tmp_path / "p.safetensors"
    shutil.copy(SHIPPED, p)
    before = digest(p)
    code, out, err = run_cli("inspect", str(p), "--png", str(p), "--force")
    one_line(code, err, "--png and the profile name the same file")
    assert digest(p) == before

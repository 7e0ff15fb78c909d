"""Text from files is escaped before it is printed; progress shows without a terminal; messages say what happened.

Covers `dam_cli.text.safe_text` and its use in the error line, the summary table and progress lines;
plain-text progress when stderr is not a terminal (from the first line, before torch is imported);
`--pcl ... ignored` only when --pcl was given; capture-room messages that never say "0.0 GiB".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from helpers import DAM_COMMAND, assert_inert, cli_env, run_cli, run_cli_refusing_loads

from dam_cli.progress import PlainTask, RichReporter
from dam_cli.text import human_bytes, safe_text

EVIL = "tiny\x1b[2J\x1b]0;owned\x07\x9b31m\u202eevil\r\nerror: forged\x00"


@pytest.mark.parametrize("s", [EVIL, "".join(map(chr, range(0x00, 0xA0))), "\u2028\u2029\u2066x\u2069",
                               "line one\nline two", "tab\there"])
def test_safe_text_leaves_nothing_that_acts_on_a_terminal(s):
    out = safe_text(s)
    assert "\n" not in out
    assert_inert(out)


def test_safe_text_keeps_ordinary_text_and_shows_what_it_escaped():
    assert safe_text("SmolLM2-135M-Instruct é 漢字 [/] 100%") == "SmolLM2-135M-Instruct é 漢字 [/] 100%"
    assert safe_text("a\x1b[2Jb\nc\u202ed\x00") == "a\\x1b[2Jb\\nc\\u202ed\\x00"
    assert safe_text(42) == "42"


@pytest.mark.parametrize("n,text", [(0, "0 bytes"), (812, "812 bytes"), (3 * 2**20 + 2**19, "3.5 MiB"),
                                    (12 * 2**30, "12.0 GiB"), (1536, "1.5 KiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.fixture(scope="module")
def capture(tmp_path_factory, tiny_model_dir):
    from dam_cli.profiling.run import ProfileConfig, run_profile

    d = tmp_path_factory.mktemp("hostile-inputs")
    run_profile(ProfileConfig(output=str(d / "p.safetensors"), model=tiny_model_dir, pcl=16, samples=2,
                              save_capture=str(d / "cap.h5")))
    return d / "cap.h5"


def test_a_model_name_with_escapes_is_printed_escaped(tmp_path, capture):
    import h5py

    evil = tmp_path / "evil.h5"
    shutil.copy(capture, evil)
    with h5py.File(evil, "r+") as f:
        meta = json.loads(f.attrs["dam.meta"])
        meta["model"]["name"] = EVIL
        f.attrs["dam.meta"] = json.dumps(meta)
    code, out, err = run_cli("profile", "--from-capture", str(evil), "--output", str(tmp_path / "p.safetensors"))
    assert code == 0, err
    assert_inert(out + err)
    assert safe_text(EVIL).replace(" ", "") in "".join(out.split())  # the table's title (wrapped) shows it escaped
    assert "error: forged" not in [line.strip() for line in (out + err).splitlines()]


def test_an_internal_error_line_is_escaped(monkeypatch, tmp_path):
    import dam_cli.profiling.run as run

    def boom(cfg, reporter=None):
        raise RuntimeError(EVIL)

    monkeypatch.setattr(run, "run_profile", boom)
    code, _, err = run_cli("profile", "--output", str(tmp_path / "p.safetensors"), "--quiet")
    assert code == 70 and err.count("\n") == 1 and "internal error" in err
    assert_inert(err.rstrip("\n"))


@pytest.mark.parametrize("total,lines", [(30, 11), (3, 4), (10, 11), (1000, 11), (0, 1)])
def test_plain_progress_is_one_line_per_tenth(total, lines):
    out: list[str] = []
    task = PlainTask("deriving masks per layer", total, out.append)
    for _ in range(total):
        task.advance()
    assert len(out) == lines
    assert out[0] == f"deriving masks per layer: 0 of {total}"
    if total:
        assert out[-1].startswith(f"deriving masks per layer: {total} of {total} (100%), ")


def test_progress_without_a_terminal_is_plain_text(capsys):
    rep = RichReporter()  # capsys: stderr is not a terminal
    assert not rep.show_bars
    with rep.task("capturing samples", 2) as t:
        t.advance()
        t.advance()
    rep.log(f"loaded {EVIL}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "capturing samples: 0 of 2"
    assert lines[1].startswith("capturing samples: 1 of 2 (50%), ")
    assert lines[2].startswith("capturing samples: 2 of 2 (100%), ")
    assert lines[3] == f"loaded {safe_text(EVIL)}" and len(lines) == 4
    assert_inert("".join(lines))


def test_dam_profile_without_a_terminal_talks_from_its_first_line(tmp_path, tiny_model_dir):
    """The first line comes before torch is imported; then one line per tenth of each task."""
    t0 = time.monotonic()
    proc = subprocess.Popen([*DAM_COMMAND, "profile", "--recipe", "paper", "--model", tiny_model_dir, "--pcl", "16",
                             "--samples", "2", "--output", str(tmp_path / "p.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    first = proc.stderr.readline()
    first_after = time.monotonic() - t0
    rest, _ = proc.communicate(timeout=300)[::-1]
    assert proc.returncode == 0, rest
    assert first.startswith(f"dam profile: {tiny_model_dir} -> ") and "importing torch" in first
    lines = [first.strip(), *rest.splitlines()]
    load = next(i for i, x in enumerate(lines) if x.startswith("loading "))
    assert load == 1 and lines[load + 1].startswith("loaded ")
    assert sum(x.startswith("deriving masks per layer: ") for x in lines) == 3  # 0 of 2, 1 of 2, 2 of 2
    total = time.monotonic() - t0
    assert first_after < total / 2, (first_after, total)  # well before the work, not at the end


def test_pcl_ignored_is_said_only_when_pcl_was_given(tmp_path, capture):
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out))
    assert code == 0 and "--pcl" not in err and "capture's PCL" not in err, err
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--force", "--pcl", "32")
    assert code == 0 and "using the capture's PCL 16 (--pcl 32 ignored)" in err, err
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--force", "--pcl", "16")
    assert code == 0 and "capture's PCL" not in err, err


def test_an_ignored_option_is_noted_under_json_but_not_under_quiet(tmp_path, capture):
    """`--json` hides progress, not what the run did differently from what was asked (the note was dropped with the
    progress); stdout stays one JSON document; `-q` is errors only."""
    out = tmp_path / "p.safetensors"
    code, stdout, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--pcl", "32",
                                "--json")
    assert code == 0 and json.loads(stdout)["output"] == str(out)
    assert err == "note: using the capture's PCL 16 (--pcl 32 ignored)\n", err
    code, stdout, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--force", "--pcl",
                                "32", "-q")
    assert code == 0 and stdout == "" and err == "", err


def test_capture_room_messages_never_say_zero_gib(tmp_path, monkeypatch):
    from dam_cli.errors import DamError
    from dam_cli.profiling import capture_file

    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # what a read-only mount answers, even to root
    with pytest.raises(DamError, match="is not writable") as e:
        capture_file.check_room(str(tmp_path / "cap.h5"), 2, 4, 16)
    assert "GiB" not in str(e.value)
    monkeypatch.undo()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DamError, match="needs about 980.8 KiB but .* has 1000 bytes free"):
        capture_file.check_room(str(tmp_path / "cap.h5"), 2, 4, 16)


def test_read_only_capture_folder_on_a_real_mount(tmp_path, tiny_model_dir):
    from dam_cli.errors import DamError
    from dam_cli.profiling.run import ProfileConfig, run_profile

    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], capture_output=True)
    if r.returncode:
        pytest.skip("mounting a tmpfs is not allowed here (test_capture_room_messages_never_say_zero_gib injects it)")
    try:
        with pytest.raises(DamError, match="read-only file system") as e:
            run_profile(ProfileConfig(output=str(tmp_path / "p.safetensors"), model=tiny_model_dir,
                                      save_capture=str(ro / "cap.h5")))
        assert "GiB" not in str(e.value)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("exc, needle", [
    (lambda: __import__("torch").cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 256.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which "
        "151.19 MiB is free. Process 1407 has 4.94 GiB memory in use."),
     "out of GPU memory (asked for 256.00 MiB, 151.19 MiB free): use shorter prompts"),
    (lambda: MemoryError(), "out of memory (RAM): use shorter prompts"),
    (lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                          "you tried to allocate 42811392 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory (RAM): use shorter prompts"),  # torch's CPU allocator
])
def test_running_out_of_memory_is_one_line_not_an_internal_error(monkeypatch, tmp_path, exc, needle):
    """Sizes too large for the machine (here raised where the profile would be made) exit 1 with what ran out
    and how to ask for less, not as a bug."""
    import dam_cli.profiling.run as run

    def boom(cfg, reporter=None):
        raise exc()

    monkeypatch.setattr(run, "run_profile", boom)
    code, _, err = run_cli("profile", "--output", str(tmp_path / "p.safetensors"), "--quiet")
    assert code == 1 and err.count("\n") == 1 and needle in err and "internal error" not in err, err


def test_model_and_calib_ignored_with_a_capture_are_said(tmp_path, capture):
    out, text = tmp_path / "p.safetensors", tmp_path / "c.txt"
    text.write_text("some calibration text. " * 50)
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out))
    assert code == 0 and "using the capture's model" not in err, err
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--force",
                           "--model", "some-model", "--calib", str(text))
    assert code == 0 and "calibration sums (--model, --calib ignored)" in err, err
    code, _, err = run_cli("profile", "--from-capture", str(capture), "--output", str(out), "--force",
                           "--samples", "4", "--device", "cpu")
    assert code == 0 and "calibration sums (--samples 4, --device cpu ignored)" in err, err


def test_a_bad_profile_option_is_the_only_line_on_stderr(tmp_path):
    """Options and paths are checked before the first progress line (and before torch is imported)."""
    for args, needle in ((["--lam", "9"], "error: --lam must be a number from -3 to 3"),
                         (["--calib", str(tmp_path / "missing.txt")], "error: calibration path")):
        code, out, err = run_cli("profile", "--output", str(tmp_path / "p.safetensors"), *args)
        assert code in (1, 2) and out == "" and err.count("\n") == 1 and err.startswith(needle), err


def test_the_profile_options_import_no_torch_and_keep_the_specs_epsilon():
    import subprocess
    import sys

    from dam_cli import masks
    from dam_cli.profiling.config import ProfileConfig

    assert ProfileConfig(output="p.safetensors").eps == masks.EPS
    code = "import sys, dam_cli.profiling.config, dam_cli.profiling.recipes; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_item_given_twice_in_an_eval_list_runs_once():
    from dam_cli.cli.eval import _split

    assert _split("16,16,32", int, "--lengths") == (16, 32)
    assert _split("full,full,dam", str, "--methods") == ("full", "dam")


@pytest.mark.parametrize("args", [["inspect", "{p}", "--png", "-"], ["profile", "-o", "-"],
                                  ["inspect", "{p}", "--png", "/dev/stdout"]])
def test_standard_output_is_not_a_file_to_write(tmp_path, tiny_all_allowed_profile, args):
    """`-` is not standard output for a file-writing option (it would be a file named "-"), and /dev/stdout is a
    link to a stream: both one line, nothing written."""
    args = [a.format(p=tiny_all_allowed_profile) for a in args]
    code, _, err = run_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("not to standard output" in err) or ("to a stream, not a file" in err)
    assert not os.path.exists("-")


def test_more_retrieval_heads_than_the_model_has_are_refused_when_given(tmp_path, tiny_model_dir):
    """Given by the user, a count above the model's heads is refused after the model loads (every head would be
    dense); the recommended recipe's own 16 on this 8-head model is not the user's doing and still runs."""
    out = tmp_path / "rh.safetensors"
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "--pcl", "16", "--samples", "1",
                           "--retrieval-by", "mass", "--retrieval-heads", "100000", "-o", str(out))
    assert code == 2 and "--retrieval-heads 100000 is more than the model's 8 heads" in err and not out.exists()
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "--pcl", "16", "--samples", "1", "-q",
                           "--retrieval-by", "mass", "-o", str(out))
    assert code == 0 and out.exists(), err


@pytest.mark.parametrize("args", [
    ["inspect", ""], ["inspect", "{p}", ""], ["inspect", "{p}", "--png", ""], ["inspect", "{p}", "--png="],
    ["profile", "-o", ""], ["profile", "-o", "{o}", "--model", ""], ["profile", "-o", "{o}", "--calib", "a",
                                                                       "--calib", ""],
    ["profile", "-o", "{o}", "--save-capture", ""], ["profile", "-o", "{o}", "--from-capture", ""],
    ["generate", "-p", ""], ["generate", "-p", "{p}", "--prompt-file", ""], ["generate", "--model", "", "-p", "{p}"],
    ["eval", "-p", ""], ["eval", "-p", "{p}", "-o", ""], ["eval", "-p", "{p}", "--png", ""],
    ["eval", "-p", "{p}", "--options-profile", ""], ["eval", "-p", "{p}", "--text", ""]])
def test_an_empty_path_is_refused_before_anything_loads(tmp_path, monkeypatch, tiny_all_allowed_profile, args):
    """A file option given as "" (an unset shell variable) is one line, exit 2, before any model or profile loads:
    it used to read as not given (`--save-capture ""` profiled without saving, `eval -o ""` ran and wrote nothing,
    `--model ""` loaded the embedded model) or as the current folder (`inspect --png ""`)."""
    run = run_cli_refusing_loads(monkeypatch, "loaded despite an empty path")
    out = tmp_path / "o.safetensors"
    code, err = run(*[a.format(p=tiny_all_allowed_profile, o=out) for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "empty: give a path" in err, err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_damaged_weights_file_is_one_line(tiny_model_dir, tmp_path):
    """A safetensors file cut short (a partly copied download): one line naming it, for the whole-model load and
    for streaming (was "internal error": safetensors' own exception type)."""
    bad = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = str(tmp_path / "p.safetensors")
    for extra, needle in (([], f"cannot load model from {bad}: SafetensorError"),
                          (["--stream"], f"cannot read the weights file {weights}")):
        code, _, err = run_cli("profile", "--model", str(bad), "--recipe", "paper", "--pcl", "16", "--samples", "1",
                               "-o", out, *extra)
        assert code == 1 and needle in err and "internal error" not in err, err
    code, _, err = run_cli("generate", "--model", str(bad), "--attention", "full", "--prompt", "the cat", "-n", "1")
    assert code == 1 and "SafetensorError" in err and "internal error" not in err, err
    assert not os.path.exists(out)


def test_weights_that_hold_nan_are_named_not_an_assertion(tiny_model_dir, tmp_path):
    """NaN in a projection's weights makes the captured attention NaN: one line before any mask is derived (was an
    AssertionError inside the true-mask rule, "internal error")."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("profile", "--model", str(bad), "--recipe", "paper", "--pcl", "16", "--samples", "1",
                           "-o", str(tmp_path / "p.safetensors"))
    assert code == 1 and "attention in layer 0 holds NaN or Inf" in err and "internal error" not in err, err


def test_alibi_models_are_refused_in_one_line(tmp_path):
    """Falcon with ALiBi adds position biases dam's attention and its capture do not apply: one line for profile
    and generate (was an AttributeError inside transformers' Falcon, "internal error")."""
    import torch
    from conftest import build_tokenizer
    from transformers import FalconConfig, FalconForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                       new_decoder_architecture=False, multi_query=False, max_position_embeddings=256)
    FalconForCausalLM(cfg).save_pretrained(tmp_path / "falcon")
    tok.save_pretrained(tmp_path / "falcon")
    needle = "FalconForCausalLM adds ALiBi position biases"
    code, _, err = run_cli("profile", "--model", str(tmp_path / "falcon"), "--recipe", "paper", "--pcl", "16",
                           "--samples", "1", "-o", str(tmp_path / "p.safetensors"))
    assert code == 1 and needle in err and "internal error" not in err, err
    code, _, err = run_cli("generate", "--model", str(tmp_path / "falcon"), "--attention", "full", "--prompt", "a",
                           "-n", "1")
    assert code == 1 and needle in err, err


def test_weights_missing_a_tensor_are_refused_not_filled_with_random_numbers(tiny_model_dir, tmp_path):
    """A checkpoint without a tensor its config asks for (or a config of more layers than the weights): one line
    naming one of them (transformers filled them with random numbers and dam profiled those, exit 0)."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("k_proj.weight"))
    del tensors[key]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("profile", "--model", str(bad), "--recipe", "paper", "--pcl", "16", "--samples", "1",
                           "-o", str(tmp_path / "p.safetensors"))
    assert code == 1 and f"lacks 1 of the tensors its config asks for (e.g. {key})" in err, err
    assert not (tmp_path / "p.safetensors").exists()


def test_quiet_profiling_passes_its_silent_reporter_to_the_model_load(monkeypatch, tmp_path):
    """`-q` is errors only: the model load (and a first use's conversion into the cache, which it reports) gets the
    command's silent reporter, not a fresh one printing to stderr."""
    import dam_cli.runtime.models as models
    from dam_cli.errors import DamError
    from dam_cli.progress import NullReporter

    seen = {}

    def load(*a, **kw):
        seen.update(kw)
        raise DamError("stop here")

    monkeypatch.setattr(models, "load_model", load)  # imported by name inside the profile's source step
    code, out, err = run_cli("profile", "--recipe", "paper", "-q", "-o", str(tmp_path / "p.safetensors"))
    assert code == 1 and isinstance(seen.get("reporter"), NullReporter) and err.strip() == "error: stop here", err


def test_weights_of_another_shape_and_a_missing_tokenizer_are_named(tiny_model_dir, tmp_path):
    """A tensor whose shape differs from config.json's names the tensor and both shapes (transformers' own error
    pointed to a report its quiet logger never showed); a folder without tokenizer files says to copy them."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "shape"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key][: tensors[key].shape[0] // 2].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("generate", "--model", str(bad), "--attention", "full", "--prompt", "the cat", "-n", "1")
    assert code == 1 and "tensors of another shape than its config says (e.g. " + key in err, err
    assert "in the weights" in err and "in config.json" in err, err
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, notok)
    for f in os.listdir(notok):
        if f.startswith(("tokenizer", "special_tokens")):
            os.unlink(notok / f)
    code, _, err = run_cli("generate", "--model", str(notok), "--attention", "full", "--prompt", "the cat", "-n", "1")
    assert code == 1 and "has no tokenizer files transformers can read" in err, err


@pytest.mark.parametrize("keep", [8, 4096, -1])  # in the header, in the metadata, one byte short of the tensor data
def test_a_gguf_file_cut_short_is_one_line_saying_so(tmp_path, keep):
    """The GGUF reader raises a struct or numpy error on a cut file (it was "internal error", exit 70)."""
    from dam_cli.runtime.models import embedded_gguf_path

    data = open(embedded_gguf_path(), "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    code, _, err = run_cli("generate", "--attention", "full", "--prompt", "the", "-n", "1", "--model", str(cut))
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert f"{cut} is not a whole GGUF file" in lines[0] and "damaged or cut short" in lines[0]

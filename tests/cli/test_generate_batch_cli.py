"""`dam generate` over JSON-lines prompts (a --prompt-file named *.jsonl, or --jsonl): one JSON line per prompt,
each the same as that prompt's own `dam generate --json`, totals on stderr; bad lines refused by line number
before any model work. In-process CLI on the tiny model folder (SmolLM2: tests/runtime/test_batches.py)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import run_cli, run_cli_refusing_loads

BASE = ["--device", "cpu", "--max-new-tokens", "5", "--ignore-eos"]
PROMPTS = ["the cat is on the", "the dog", "what is the secret key of the house ? the answer is", "a tree"]
RESULT_KEYS = {"id", "text", "prompt_tokens", "new_tokens", "finish_reason"}


def write_jsonl(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def single(model_dir: str, profile: str, prompt: str, *extra: str) -> dict:
    code, out, err = run_cli("generate", "--model", model_dir, "--profile", profile, "--prompt", prompt, *BASE,
                             "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def batch(model_dir: str, profile: str, *args: str, stdin=None) -> tuple[list[dict], str]:
    code, out, err = run_cli("generate", "--model", model_dir, "--profile", profile, *BASE, *args, stdin=stdin)
    assert code == 0, err
    return [json.loads(x) for x in out.splitlines()], err


@pytest.mark.parametrize("attention", ["dam", "full"])
def test_each_prompt_gets_what_it_gets_alone(tiny_model_dir, tiny_all_allowed_profile, tmp_path, attention):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0], "id": "first"}, "", {"prompt": PROMPTS[1]},
                                           {"prompt": PROMPTS[2], "id": 7}, "   ", {"prompt": PROMPTS[3]}])
    rows, err = batch(tiny_model_dir, tiny_all_allowed_profile, "--prompt-file", f, "--batch-size", "3",
                      "--attention", attention)
    assert [r["id"] for r in rows] == ["first", 3, 7, 6]  # in file order; no id: the line number
    for r, prompt in zip(rows, PROMPTS):
        assert set(r) == RESULT_KEYS
        want = single(tiny_model_dir, tiny_all_allowed_profile, prompt, "--attention", attention)
        assert (r["text"], r["prompt_tokens"], r["new_tokens"], r["finish_reason"]) == \
            (want["text"], want["prompt_tokens"], want["new_tokens"], want["finish_reason"])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "4 prompts in 2 batches of up to 3" in lines[0] and "throughput" in lines[0] and "tokens/s" in lines[0]
    assert "20 new tokens" in lines[0] and f"attention {attention}" in lines[0]


def test_json_flag_stdin_and_batch_size_give_the_same_lines(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    text = "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    f = tmp_path / "prompts.jsonl"
    f.write_text(text)
    plain, _ = batch(tiny_model_dir, tiny_all_allowed_profile, "--prompt-file", str(f))
    as_json, _ = batch(tiny_model_dir, tiny_all_allowed_profile, "--prompt-file", str(f), "--json", "--batch-size", "1")
    from_stdin, _ = batch(tiny_model_dir, tiny_all_allowed_profile, "--jsonl", "--batch-size", "2", stdin=text)
    other_name = tmp_path / "prompts.txt"
    other_name.write_text(text)
    flagged, _ = batch(tiny_model_dir, tiny_all_allowed_profile, "--prompt-file", str(other_name), "--jsonl")
    assert len(plain) == 4 and plain == as_json == from_stdin == flagged


def test_sampling_is_reproducible_with_a_seed(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    args = ["--prompt-file", f, "--temperature", "1.5", "--batch-size", "2"]
    a, _ = batch(tiny_model_dir, tiny_all_allowed_profile, *args, "--seed", "3")
    b, _ = batch(tiny_model_dir, tiny_all_allowed_profile, *args, "--seed", "3")
    c, _ = batch(tiny_model_dir, tiny_all_allowed_profile, *args, "--seed", "4")
    greedy, _ = batch(tiny_model_dir, tiny_all_allowed_profile, "--prompt-file", f)
    assert a == b
    assert [r["text"] for r in a] != [r["text"] for r in c]
    assert [r["text"] for r in a] != [r["text"] for r in greedy]


def test_chat_prompts_equal_single_chat_runs(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat"  # the tiny model's weights, its tokenizer with a chat template
    chat_dir.mkdir()
    for name in os.listdir(tiny_model_dir):
        if "token" not in name:
            os.symlink(os.path.join(tiny_model_dir, name), chat_dir / name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} : {% endfor %}"
    tok.save_pretrained(chat_dir)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    rows, _ = batch(str(chat_dir), tiny_all_allowed_profile, "--prompt-file", f, "--chat")
    for r, prompt in zip(rows, PROMPTS):
        want = single(str(chat_dir), tiny_all_allowed_profile, prompt, "--chat")
        assert r["prompt_tokens"] == want["prompt_tokens"] > len(prompt.split()) and r["text"] == want["text"]


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "a"}', '{"prompt": "b"'], "line 2: not valid JSON (Expecting ',' delimiter at column 15)"),
    (['{"prompt": "a}'], "line 1: not valid JSON (Unterminated string starting at column 12)"),
    (['["the cat"]'], "line 1: a JSON array, not an object"),
    (['{"prompt": "a"}', "", '{"promt": "b"}'], 'line 3: unknown key "promt"'),
    (['{"id": "x"}'], 'line 1: no "prompt" string'),
    (['{"prompt": 3}'], 'line 1: no "prompt" string'),
    (['{"prompt": "  "}'], "line 1: the prompt is empty"),
    (['{"prompt": "a", "id": [1]}'], 'line 1: "id" must be a string or an integer'),
    (['{"prompt": "a", "id": true}'], 'line 1: "id" must be a string or an integer'),
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], 'line 2: id "x" is already the id of line 1'),
    (['{"prompt": "a", "id": "2"}', '{"prompt": "b"}'], "line 2: id 2 is already the id of line 1"),
    (['{"prompt": "a", "prompt": "b"}'], 'line 1: key "prompt" given twice'),
    (['{"prompt": "\\ud800"}'], "line 1: the prompt holds an unpaired surrogate"),
    (['{"prompt": "a", "id": "\\ud800"}'], 'line 1: the "id" holds an unpaired surrogate'),
    (["[" * 100_000 + "]" * 100_000], "line 1: JSON nested too deeply"),
    (['{"prompt": "a", "id": ' + "9" * 5000 + "}"], "line 1: a number too long to read"),
    (["", "  "], "holds no prompts"),
])
def test_bad_lines_are_refused_by_line_number_before_any_model_work(monkeypatch, tmp_path, lines, needle):
    run = run_cli_refusing_loads(monkeypatch, "loaded a model for a bad prompt file")
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    code, err = run("generate", "--profile", "p.safetensors", "--prompt-file", f, "--device", "cpu")
    err_lines = err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and err_lines[0].startswith("error:"), err
    assert needle in err_lines[0] and "bad.jsonl" in err_lines[0], err


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "the cat", "--batch-size", "4"], "--batch-size applies to JSON-lines prompts"),
    (["--prompt", "the cat", "--jsonl"], "--jsonl reads JSON lines from --prompt-file"),
    (["--prompt-file", "p.jsonl", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_batch_options_are_usage_errors(monkeypatch, args, needle):
    run = run_cli_refusing_loads(monkeypatch, "loaded a model for bad options")
    code, err = run("generate", "--profile", "p.safetensors", "--device", "cpu", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_prompt_too_long_for_the_model_is_named_by_line(tiny_model_dir, tiny_all_allowed_profile, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat"}, {"prompt": "the cat " * 600}])
    code, out, err = run_cli("generate", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile,
                             "--prompt-file", f, *BASE)
    assert code == 1 and out == "" and err.strip().startswith(f"error: prompt file {f} line 2: the prompt is 1,200 "
                                                              "tokens"), err


def test_lines_end_at_newlines_only_and_json_strings_keep_other_line_breaks():
    """U+0085, U+2028 and U+2029 are valid raw inside a JSON string (Python writes them so with
    ensure_ascii=False): they stay in the prompt, where str.splitlines would have cut the line."""
    from dam_cli.runtime.generate_batch import parse_prompt_lines

    texts = ["Price\u0085list", "a\u2028b", "c\u2029d"]
    for sep in ("\n", "\r\n", "\r"):
        got = parse_prompt_lines(sep.join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts), "t")
        assert [p.text for p in got] == texts and [p.line for p in got] == [1, 2, 3]


def test_a_batch_file_may_exceed_one_prompts_cap_and_a_line_may_not(monkeypatch, tmp_path):
    """The 16 MiB cap is a prompt's: a JSON-lines file of many prompts may hold more (up to its own cap), and a
    line over the prompt's cap is named by its number."""
    from dam_cli.errors import DamError, DamUsageError
    from dam_cli.runtime import generate_batch, prompt_input
    from dam_cli.runtime.generate import GenerateConfig

    monkeypatch.setattr(prompt_input, "MAX_PROMPT_BYTES", 1000)
    monkeypatch.setattr(generate_batch, "MAX_PROMPT_BYTES", 1000)
    monkeypatch.setattr(generate_batch, "MAX_BATCH_FILE_BYTES", 5000)
    f = write_jsonl(tmp_path / "many.jsonl", [json.dumps({"prompt": "x" * 300}) for _ in range(10)])  # 3.2 KB
    cfg = GenerateConfig(profile="p.safetensors", prompt_file=f)
    assert len(generate_batch.read_prompt_lines(cfg)) == 10
    write_jsonl(tmp_path / "many.jsonl", [json.dumps({"prompt": "x" * 300}), json.dumps({"prompt": "y" * 1500})])
    with pytest.raises(DamUsageError, match=r"many.jsonl line 2: the prompt is over the 1000 bytes cap on a prompt"):
        generate_batch.read_prompt_lines(cfg)
    write_jsonl(tmp_path / "many.jsonl", [json.dumps({"prompt": "x" * 300}) for _ in range(20)])  # 6.4 KB
    with pytest.raises(DamError, match=r"over the 4.9 KiB cap on a JSON-lines prompt file: split it"):
        generate_batch.read_prompt_lines(cfg)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    from dam_cli.errors import DamError
    from dam_cli.runtime.generate import GenerateConfig
    from dam_cli.runtime.generate_batch import read_prompt_lines

    (tmp_path / "l.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DamError, match=r"not UTF-8 text \(line 2: byte 31 is 0xe9\)"):
        read_prompt_lines(GenerateConfig(profile="p.safetensors", prompt_file=str(tmp_path / "l.jsonl")))


def test_cuda_graph_batches_must_be_of_one_length():
    from dam_cli.errors import DamUsageError
    from dam_cli.runtime.generate_batch import batches_of, check_graph_batches, parse_prompt_lines

    prompts = parse_prompt_lines("\n".join(json.dumps({"prompt": p}) for p in "abcde"), "test")
    assert [list(b) for b in batches_of(5, 2)] == [[0, 1], [2, 3], [4]]
    check_graph_batches(prompts, [4, 4, 7, 7, 3], batches_of(5, 2))  # each batch of one length: fine
    with pytest.raises(DamUsageError, match="lines 3-4 encode to 5 to 7 tokens.*--batch-size 1"):
        check_graph_batches(prompts, [4, 4, 7, 5, 3], batches_of(5, 2))


def test_json_lines_escape_a_path_that_was_not_utf8_and_keep_text_readable():
    from dam_cli.cli.generate import json_line

    line = json_line({"profile": "v\udcff.safetensors", "text": "café 東京"})
    assert line.endswith("\n") and line.count("\n") == 1
    assert "café 東京" in line and "\\udcff" in line
    line.encode("utf-8")  # no raw byte: valid UTF-8 text
    assert json.loads(line) == {"profile": "v\udcff.safetensors", "text": "café 東京"}

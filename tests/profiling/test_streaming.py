"""Streamed profiling (`--stream`): the profile of a whole-model load, with one decoder layer's weights in memory.

Tiny random models are saved as sharded safetensors folders and as a GGUF (written here with the gguf package's
writer, q/k permuted as llama.cpp stores them, Q8_0 matrices), then profiled both ways; the files must be equal.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama
from helpers import run_cli

from dam_cli.errors import DamError
from dam_cli.profiling import streaming
from dam_cli.profiling.run import ProfileConfig, run_profile

TEXT = ("the cat of the house is on the tree . what is the value of the key ? the dog was by the river "
        "and the code is a secret number . where is the mountain ? which line has the answer ? ") * 80
NEEDLE_RECIPE = dict(pattern_mass=0.9, min_support=4, retrieval_heads=2, retrieval_by="needle", needle_samples=2,
                     needle_length=160)


class Recorder:
    """A reporter keeping its log lines."""

    def __init__(self):
        self.lines: list[str] = []

    def task(self, description, total):
        from dam_cli.progress import NullReporter

        return NullReporter().task(description, total)

    def log(self, message):
        self.lines.append(message)


def _tiny_qwen2(seed: int = 0, vocab: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def calib(tmp_path) -> str:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def _sharded_folder(tmp_path, family: str, tokenizer) -> str:
    model = build_tiny_llama(layers=3, max_pos=512) if family == "llama" else _tiny_qwen2(vocab=len(tokenizer))
    folder = str(tmp_path / family)
    model.save_pretrained(folder, max_shard_size="20KB")
    tokenizer.save_pretrained(folder)
    assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 3  # layers span several shards
    return folder


def _profile(model: str, calib: str, out, stream: bool, reporter=None, **options) -> bytes:
    cfg = ProfileConfig(output=str(out), model=model, calib=(calib,), samples=3, pcl=48, stream=stream, force=True,
                        **options)
    run_profile(cfg, reporter)
    with open(out, "rb") as f:
        return f.read()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_profile_equals_whole_model_safetensors(tmp_path, calib, family, tiny_tokenizer):
    folder = _sharded_folder(tmp_path, family, tiny_tokenizer)
    whole = _profile(folder, calib, tmp_path / "whole.safetensors", False, **NEEDLE_RECIPE)
    streamed = _profile(folder, calib, tmp_path / "streamed.safetensors", True, **NEEDLE_RECIPE)
    assert streamed == whole  # same identity, fingerprint, masks, needle scores and retrieval heads, byte for byte


# ---- GGUF -----------------------------------------------------------------------------------------------------------

def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: token i spells byte i."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of q/k rows (rotary halves to interleaved pairs), which a reader must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 32):
    """A random Llama as a llama-architecture GGUF: Q8_0 matrices, F32 vectors and embeddings, byte tokens."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden = heads * head_dim
    cfg = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([*_byte_tokens(), "th", "<s>", "</s>"])
    w.add_token_merges(["t h"])
    w.add_token_types([1] * 257 + [3, 3])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for name, t in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        g = f"{names.get_name(base)}.{suffix}"
        a = t.numpy().astype(np.float32)
        if ".attn_q." in g or ".attn_k." in g:
            a = _llama_cpp_permute(a, heads if ".attn_q." in g else kv_heads)
        if a.ndim == 2 and "token_embd" not in g:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> str:
    return write_tiny_gguf(str(tmp_path / "tiny-llama.gguf"))


def test_gguf_layer_tensors_are_those_transformers_loads(tiny_gguf):
    from transformers import AutoModelForCausalLM

    from dam_cli.profiling.layer_weights import GGUFWeights

    folder, name = os.path.split(tiny_gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    weights = GGUFWeights(tiny_gguf, 3)
    layer = [n for n in loaded if n.startswith("model.layers.1.")]
    assert any("q_proj" in n for n in layer) and any("k_proj" in n for n in layer)  # the permuted ones
    for n, t in weights.tensors(layer).items():
        assert torch.equal(t, loaded[n]), n
    rows = [5, 0, 258, 101]
    assert torch.equal(weights.rows("model.embed_tokens.weight", rows), loaded["model.embed_tokens.weight"][rows])


def test_streamed_profile_equals_whole_model_gguf(tmp_path, calib, tiny_gguf):
    whole = _profile(tiny_gguf, calib, tmp_path / "whole.safetensors", False, **NEEDLE_RECIPE)
    streamed = _profile(tiny_gguf, calib, tmp_path / "streamed.safetensors", True, **NEEDLE_RECIPE)
    assert streamed == whole


def test_incomplete_gguf_is_refused(tmp_path, tiny_gguf):
    cut = str(tmp_path / "cut.gguf")
    shutil.copyfile(tiny_gguf, cut)
    os.truncate(cut, os.path.getsize(cut) - 4096)  # the last tensors' bytes are missing
    with pytest.raises(DamError, match="incomplete|damaged"):
        streaming.open_streamed(cut, None)


# ---- memory and progress --------------------------------------------------------------------------------------------

def test_one_decoder_layer_is_resident_at_a_time(tmp_path, tiny_tokenizer):
    folder = _sharded_folder(tmp_path, "qwen2", tiny_tokenizer)
    sm = streaming.open_streamed(folder, None)
    per_layer = sum(p.numel() for p in streaming.decoder_layers(sm.model)[0].parameters())
    assert streaming.resident_parameters(sm.model) == 0  # built without weights
    windows = [tiny_tokenizer(TEXT)["input_ids"][i * 40: (i + 1) * 40] for i in range(2)]
    seen = []
    for layer, sums in streaming.stream_layer_sums(sm, windows, [], 40, "cpu", Recorder()):
        seen.append(layer)
        assert sums.shape == (4, 40, 40)
        assert streaming.resident_parameters(sm.model) == 0  # the layer was dropped before its sums came out
    assert seen == [0, 1, 2]
    assert sm.resident_peak == per_layer  # never more than one layer's weights
    assert all(p.is_meta for p in sm.model.parameters())


def test_streams_by_itself_when_the_weights_do_not_fit(tmp_path, calib, tiny_tokenizer, monkeypatch):
    folder = _sharded_folder(tmp_path, "llama", tiny_tokenizer)
    whole = _profile(folder, calib, tmp_path / "whole.safetensors", False)
    import dam_cli.memory

    fp32 = streaming.open_streamed(folder, None).weights.fp32_bytes()
    monkeypatch.setattr(dam_cli.memory, "available_memory", lambda: fp32 - 1)  # one byte short
    rec = Recorder()
    auto = _profile(folder, calib, tmp_path / "auto.safetensors", False, reporter=rec)
    assert auto == whole
    assert any("more than the" in line and "one decoder layer at a time" in line for line in rec.lines)
    assert [line.split(" streamed")[0] for line in rec.lines if " streamed in " in line] == \
        ["layer 1 of 3", "layer 2 of 3", "layer 3 of 3"]  # progress: layers done


def test_cli_stream_on_a_tiny_model(tmp_path, calib, tiny_tokenizer):
    folder = _sharded_folder(tmp_path, "qwen2", tiny_tokenizer)
    args = ["profile", "--model", folder, "--calib", calib, "--pcl", "32", "-n", "2", "--recipe", "paper"]
    code, _, err = run_cli(*args, "--stream", "-o", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    assert "layer 3 of 3 streamed" in err
    code, _, err = run_cli(*args, "-o", str(tmp_path / "w.safetensors"))
    assert code == 0, err
    assert "streamed" not in err
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()


def test_cli_stream_with_from_capture_is_refused(tmp_path):
    code, _, err = run_cli("profile", "--stream", "--from-capture", str(tmp_path / "c.h5"),
                           "-o", str(tmp_path / "p.safetensors"))
    assert code == 2
    assert "--stream" in err and "--from-capture" in err

"""Shared fixtures: a tiny random Llama with grouped-query heads and a locally built tokenizer.

No downloads: the model is built from a config in code, the tokenizer from a word list.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: CPU interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The repository's top-level `kernels/` folder (imported as `dam_kernels`) would shadow the PyPI package
# `kernels`, which transformers >= 5.25 imports, whenever the working directory is on sys.path
# (`python -m pytest`, `python -c`). Keep it off, here and in every child process.
os.environ.setdefault("PYTHONSAFEPATH", "1")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO]

import pytest  # noqa: E402

WORDS = ("the a of to and in is it that for on with as was by at be this from or an are "
         "cat dog house tree river mountain code number line value key secret pass answer "
         "what which where when who how why . , ? ! : ; 0 1 2 3 4 5 6 7 8 9").split()


def build_tokenizer():
    """A word-level tokenizer over WORDS plus special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def build_tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                     max_pos: int = 1024, vocab: int | None = None):
    """A random LlamaForCausalLM small enough for CPU tests (GQA: heads / kv_heads > 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or (len(WORDS) + 3), hidden_size=heads * head_dim, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama and tokenizer saved as a Hugging Face folder (for `--model PATH`)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_all_allowed_profile(tiny_model_dir, tmp_path_factory):
    """An all-allowed profile (L=16, every offset and column) made for `tiny_model_dir`, as a file path."""
    from helpers import MODEL_FIELDS_WITH_CONTEXT, all_allowed_profile
    from transformers import AutoConfig

    from dam_cli.runtime.models import model_identity

    ident = model_identity(AutoConfig.from_pretrained(tiny_model_dir), os.path.basename(tiny_model_dir))
    path = tmp_path_factory.mktemp("tiny-profile") / "tiny.safetensors"
    all_allowed_profile(model=ident, L=16, fields=MODEL_FIELDS_WITH_CONTEXT).save(path)
    return str(path)

"""The reserved KV cache layer (`dam_cli.runtime.reserved_cache`): the same keys and values as transformers'
`DynamicLayer` through updates, crops, resets, batch selections and runs past the reserve, written in place while
the reserve lasts; and `decode_loop` on the CPU (which uses it) the same logits as over a plain `DynamicCache`."""

from __future__ import annotations

import torch
from conftest import build_tiny_llama
from transformers.cache_utils import DynamicLayer

from dam_cli.runtime.decode import decode_loop, new_cache
from dam_cli.runtime.reserved_cache import ReservedLayer


def _states(n: int, seed: int, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, n, 8, generator=g), torch.randn(B, 3, n, 8, generator=g)


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_updates_crops_and_selections_match_the_dynamic_layer():
    plain, reserved = DynamicLayer(), ReservedLayer(capacity=12)
    steps = [("update", 5), ("update", 1), ("update", 1), ("crop", -2), ("update", 3), ("select", [1, 0]),
             ("update", 1), ("repeat", 2), ("update", 2), ("update", 9), ("reset", 0), ("update", 4)]
    for i, (what, n) in enumerate(steps):
        if what == "update":
            B = plain.keys.shape[0] if plain.is_initialized and plain.get_seq_length() else 2
            k, v = _states(n, i, B)
            got = reserved.update(k, v)
            want = plain.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif what == "crop":
            plain.crop(n), reserved.crop(n)
        elif what == "select":
            plain.batch_select_indices(torch.tensor(n)), reserved.batch_select_indices(torch.tensor(n))
        elif what == "repeat":
            plain.batch_repeat_interleave(n), reserved.batch_repeat_interleave(n)
        else:
            plain.reset(), reserved.reset()
        if plain.is_initialized:
            _same(plain, reserved)


def test_steps_within_the_reserve_write_in_place():
    layer = ReservedLayer(capacity=10)
    k, v = _states(6, 0)
    layer.update(k, v)
    ptr = layer.keys.data_ptr()
    for i in range(4):
        layer.update(*_states(1, i + 1))
        assert layer.keys.data_ptr() == ptr and layer.get_seq_length() == 7 + i
    layer.update(*_states(1, 9))  # one past the reserve: new buffers, the keys kept
    assert layer.keys.data_ptr() != ptr and layer.get_seq_length() == 11
    assert torch.equal(layer.keys[..., :6, :], k)


def test_decode_loop_on_the_cpu_reserves_and_gives_the_same_logits():
    model = build_tiny_llama(seed=3)
    ids = torch.randint(3, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(5))
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "reserved": []}

    def picker(name):
        def pick(logits):
            seen[name].append(logits.clone())
            return logits.argmax(-1)
        return pick

    cache = new_cache(model, 11 + 6)
    assert any(isinstance(layer, ReservedLayer) for layer in cache.layers)
    assert not any(isinstance(layer, ReservedLayer) for layer in new_cache(model).layers)
    a = decode_loop(model, ids, max_new_tokens=6, pick=picker("reserved"))
    b = decode_loop(model, ids, max_new_tokens=6, pick=picker("plain"), cache=new_cache(model))
    assert a.tokens == b.tokens and len(a.tokens) == 6
    for x, y in zip(seen["reserved"], seen["plain"]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)

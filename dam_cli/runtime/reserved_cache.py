"""A dynamic KV cache layer that writes each step's keys into buffers reserved for the whole generation.

transformers' `DynamicLayer` concatenates: every decode step allocates the whole cache anew and copies it, per
layer, keys and values. On the project's 2-core CPU that copy dominated a decode step of SmolLM2 at 2K tokens
(about half of its samples in a `py-spy` profile of `dam generate`, full attention and DAM alike). `ReservedLayer`
is the same layer (same reads, crops, batch selections) whose keys and values are views of the first positions of
buffers made once for the prompt plus the new tokens; a step writes only its own positions. Where the buffers
are no longer what the layer holds (a crop past them, a reset, a batch selection, a longer run than reserved)
it copies what the layer holds into new buffers once and goes on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """`DynamicLayer` over buffers of `capacity` positions (module doc)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _holds(self, n0: int, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the layer's keys and values are still the first `n0` positions of the buffers, in the shape,
        dtype and device of the new states."""
        if self._buffers is None:
            return False
        kb, vb = self._buffers
        if kb.shape[:-2] != k.shape[:-2] or kb.shape[-1] != k.shape[-1] or vb.shape[-1] != v.shape[-1]:
            return False
        if kb.dtype != k.dtype or vb.dtype != v.dtype or kb.device != k.device:
            return False
        return n0 == 0 or (self.keys.data_ptr() == kb.data_ptr() and self.values.data_ptr() == vb.data_ptr()
                           and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n0 = self.get_seq_length()
        n1 = n0 + key_states.shape[-2]
        if not self._holds(n0, key_states, value_states) or n1 > self._buffers[0].shape[-2]:
            size = self.capacity if n1 <= self.capacity else 2 * n1
            kb = key_states.new_empty(*key_states.shape[:-2], size, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:-2], size, value_states.shape[-1])
            if n0:
                kb[..., :n0, :] = self.keys
                vb[..., :n0, :] = self.values
            self._buffers = (kb, vb)
        kb, vb = self._buffers
        kb[..., n0:n1, :] = key_states
        vb[..., n0:n1, :] = value_states
        self.keys, self.values = kb[..., :n1, :], vb[..., :n1, :]
        return self.keys, self.values


def reserve(cache, capacity: int):
    """`cache` (a transformers `DynamicCache`) with each plain `DynamicLayer` replaced by a `ReservedLayer` of
    `capacity` positions; other layer kinds stay. Returns the cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache

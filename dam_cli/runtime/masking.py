"""The mask side of dam attention: what `dam_mask` (the `AttentionMaskInterface` function of `dam`
and `dam_dense`) accepts, and what one attention call asks for (window, soft-cap, positions).

transformers builds each layer's mask through the registered mask function; `dam_mask` builds none.
A plain causal mask becomes None and transformers' sliding-window causal mask a `WindowMask`, which
reaches the attention function as its `attention_mask`; everything else is refused with the feature
named. `call_of` then reads the window from it, so a layer gets exactly the window the model's own
eager and SDPA attention would apply, even where the model passes no `sliding_window` keyword.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dam_cli.errors import DamError


@dataclass(frozen=True)
class WindowMask:
    """What `dam_mask` returns for a sliding-window layer instead of a mask: its window W (row `i`
    sees key `j` iff `i - j < W` and `j <= i`) and the first query's position as transformers' mask
    builder counted it (None when that was a tensor), which locates a cache that dropped keys."""

    window: int
    q_offset: int | None = None


@dataclass(frozen=True)
class LayerCall:
    """One layer's attention call as the model asked for it: its window, soft-cap and query position."""

    window: int | None
    softcap: float | None
    q_offset: int | None


def call_of(module, attention_mask, kwargs: dict, impl: str) -> LayerCall:
    """The window and soft-cap of this call; refuses what the attention functions cannot apply.

    The window comes from the mask builder (through `WindowMask`), which is what the model's own eager
    and SDPA attention apply; the call's `sliding_window` keyword, when given, must agree with it.
    """
    name = type(module).__name__
    if kwargs.get("s_aux") is not None:
        raise DamError(f"{name} uses attention sinks (s_aux), which {impl} attention does not support: "
                       "use --attention sdpa for this model")
    if getattr(module, "is_causal", True) is False:
        raise DamError(f"{name} is not causal attention: DAM masks apply to causal decoders only")
    if attention_mask is not None and not isinstance(attention_mask, WindowMask):
        # Our mask function returns None or a WindowMask; anything else is a mask built elsewhere (a
        # custom 4-D mask passed by the caller) that the kernels would ignore.
        raise DamError(f"{impl} attention got an explicit attention mask it cannot apply: pass no 4-D mask "
                       "(for padding, left-pad the batch and pass the 2-D attention mask)")
    window = attention_mask.window if attention_mask is not None else None
    asked = kwargs.get("sliding_window")
    if asked is not None and int(asked) != window:
        raise DamError(f"{name} (layer {module.layer_idx}) asks for a sliding window of {int(asked)} but its "
                       f"attention mask has {window or 'none'}: {impl} attention cannot tell which one the model means")
    softcap = kwargs.get("softcap")
    return LayerCall(window=window, softcap=float(softcap) if softcap is not None else None,
                     q_offset=attention_mask.q_offset if attention_mask is not None else None)


def positions(call: LayerCall, Sq: int, Sk: int, kwargs: dict) -> tuple[int, int]:
    """(start, key_start): the first query row's position and the first held key's position.

    Keys cover `key_start .. start+Sq-1`; only a sliding-window layer of transformers' own caches
    drops keys (`DynamicCache(config)`), and then the query position comes from the mask builder
    (or `position_ids`); every other cache holds keys from position 0.
    """
    if call.window is None:
        return Sk - Sq, 0
    start = call.q_offset
    pos = kwargs.get("position_ids")
    if start is None and isinstance(pos, torch.Tensor) and pos.numel():
        start = int(pos.reshape(-1)[0])  # host read: only when the mask builder's offset was not an int
    if start is None:
        start = Sk - Sq
    if start + Sq < Sk:
        raise DamError(f"the cache holds {Sk} keys for {Sq} query rows at position {start}: more keys than "
                       "positions; pass position_ids that match the cache")
    return start, start + Sq - Sk


def sliding_window_of(mask_function) -> int | None:
    """W when `mask_function` is exactly transformers' sliding-window causal mask function,
    `and_masks(sliding_window_overlay(W), causal_mask_function)` (5.17 and 5.25 build it alike);
    None for anything else, so an unknown combination is never taken for a window."""
    from transformers.masking_utils import causal_mask_function

    if _qualname(mask_function) != "and_masks.<locals>.and_mask":
        return None
    fns = _closure(mask_function).get("mask_functions")
    if not isinstance(fns, tuple) or len(fns) != 2 or fns[1] is not causal_mask_function:
        return None
    if _qualname(fns[0]) != "sliding_window_overlay.<locals>.inner_mask":
        return None
    w = _closure(fns[0]).get("sliding_window")
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


def _qualname(fn) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__name__))


def _closure(fn) -> dict:
    """The free variables of a nested function, by name (empty for anything else)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out = {}
    for name, cell in zip(code.co_freevars, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


# (part of a nested function's name, the feature it stands for), for the refusal's message
_MASK_FEATURES = (("padding", "padded batches"), ("packed", "packed sequences"),
                  ("remap_positions", "packed sequences"), ("chunk", "chunked attention"),
                  ("bidirectional", "bidirectional (non-causal) attention"), ("blockwise", "multimodal tokens"),
                  ("token_type", "multimodal tokens"), ("or_masks", "keys beyond the causal ones (an extended mask)"))


def _mask_features(mask_function) -> list[str]:
    """The features a composed mask function asks for, by the names of the functions it nests."""
    seen, found, todo = set(), [], [mask_function]
    while todo and len(seen) < 64:
        fn = todo.pop()
        if id(fn) in seen or not callable(fn):
            continue
        seen.add(id(fn))
        name = _qualname(fn)
        found += [what for key, what in _MASK_FEATURES if key in name and what not in found]
        for x in _closure(fn).values():
            todo += list(x) if isinstance(x, (tuple, list)) else [x]
    return found or [f"a mask function {_qualname(mask_function)}"]


def dam_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, **kwargs):
    """AttentionMaskInterface function for `dam` and `dam_dense`: builds no mask.

    Plain causal: None (the attention functions apply causality and DAM's mask themselves).
    transformers' sliding-window causal mask: a `WindowMask` with its window. A padding mask with
    any zero, or any other mask function, is refused with the feature named: ignoring it would be wrong.
    """
    from transformers.masking_utils import causal_mask_function

    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise DamError("padded batches are not supported by dam attention: generate one sequence per call, "
                       "or batch only sequences of equal length without padding")
    if mask_function is None or mask_function is causal_mask_function:
        return None
    window = sliding_window_of(mask_function)
    local = kwargs.get("local_size")
    if window is not None and (local is None or int(local) == window):
        return WindowMask(window, q_offset if isinstance(q_offset, int) and not isinstance(q_offset, bool) else None)
    raise DamError(f"this model asks for an attention mask with {', '.join(_mask_features(mask_function))}, which "
                   "dam attention does not support: use --attention sdpa for this model")

"""The `dam` attention for transformers, through its registries (never by patching forwards).

Two implementations are registered with `AttentionInterface` and, with the same mask function,
with `AttentionMaskInterface`:

- `dam`: DAM sparse attention. Each call reads its layer's masks by `module.layer_idx` and runs
  `sparse_attention(q, k, v, profile, layer, start=Sk-Sq)`: prefill (many query rows) and decode
  (a few rows over the cached keys) take the same call, and `sparse_attention` picks the kernel.
- `dam_dense`: plain dense SDPA (`is_causal` in prefill, no mask in decode), the fair "full
  attention" peer of `dam` in comparisons and benchmarks.

A tensor-parallel model's attention calls see this rank's heads only, and `enable_dam` keeps the profile's
slice of those heads; a model spread over devices (`device_map`) runs each layer where its q is (the kernels'
masks and layouts are cached per device).

Both read keys and values as the cache holds them, `[B, H_kv, Sk, D]`: grouped-query heads are
never repeated in memory. The registered mask function builds no `S x S` mask at all (the kernels
apply the causal DAM mask themselves): a plain causal mask becomes None, a sliding-window one
(Mistral, Qwen2, Phi-3, Gemma 2 and 3) a `WindowMask` naming the window, which both attention
functions apply with the soft-capping of the call (Gemma 2), exactly as the model's own attention.
A left-padded batch (a 2-D attention mask of leading zeros) becomes a `PaddedMask`: each row then runs
on its own real tokens, positions counted from its first one, exactly as it would alone. Other masks
(right or inner padding, packed sequences, chunked, bidirectional, multimodal overlays) are refused.

Public API (docs/reference/api.md): `enable_dam`, `disable_dam`, `enable_dense`, `dam_attention`.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from dam_kernels.selection import DynamicSelection

from dam_cli.errors import DamError
from dam_cli.runtime.attention import BACKENDS, active_dynamic, triton_runs_on_cpu
from dam_cli.runtime.dense import dense_attention, masked_dense_attention, rows_causal_mask
from dam_cli.runtime.masking import WindowMask, call_of, dam_mask, positions  # noqa: F401  (re-exported)
from dam_cli.runtime.padding import PaddedMask, batch_mask, each_row, left_pads  # noqa: F401  (re-exported)

DAM_IMPL = "dam"
DENSE_IMPL = "dam_dense"


@dataclass
class StaticKV:
    """Set on a model while a static-cache loop (`dam_cli.runtime.decode`) drives it.

    The cache then hands the attention functions whole buffers of `max_cache_len` slots.
    `host_len`, when known on the host (prefill), is the number of filled slots after this
    forward's append; otherwise (decode steps, captured in a CUDA graph) `valid_len`, a
    one-element int64 tensor on the model's device that the loop updates before each step.
    """

    valid_len: torch.Tensor
    host_len: int | None = None
    # layer -> key-block sums of its static cache, for the dynamic part's selection: made at the
    # first device-position step (eager), then updated in place by each (captured) step.
    block_sums: dict = field(default_factory=dict)


@dataclass
class _State:
    """What one model needs at attention time; shared by all its attention modules."""

    impl: str  # DAM_IMPL or DENSE_IMPL
    previous: str  # the implementation to restore on disable
    profile: Any = None  # Profile, for DAM_IMPL
    backend: str = "auto"  # sparse_attention backend, for DAM_IMPL
    dynamic: DynamicSelection | None = None  # the dynamic part (beyond the paper), validated; None: off
    seen: set[int] = field(default_factory=set)  # layers that went through the registry
    static: StaticKV | None = None  # set while a static-cache loop runs (graph_decode)


# Attention module -> its model's state. Weak keys: a model dropped by the user is not kept alive.
_MODULE_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Model -> (state, its attention modules), for disable and checks.
_MODEL_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------
# The registered functions
# ----------------------------------------------------------------------------------------------

def _state_of(module) -> _State:
    state = _MODULE_STATE.get(module)
    if state is None:
        raise DamError(f"{type(module).__name__} runs the dam attention but was never set up: "
                       "call dam_cli.enable_dam(model, profile) (or enable_dense) instead of setting "
                       "the implementation by name")
    return state


def dam_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function `dam`: DAM sparse attention of one layer.

    query `[B, H, Sq, D]`, key/value `[B, H_kv, Sk, D]` (the whole cache); the queries are the
    last `Sq` positions, so `start = Sk - Sq` (a cache that dropped keys of a sliding-window layer:
    `key_start > 0`). Windows and soft-capping apply as the model asks; a left-padded batch runs row by
    row (`each_row`). Returns (`[B, Sq, H, D]`, None).
    """
    from dam_cli.runtime.attention import sparse_attention

    B, H, Sq, D = query.shape
    state = _state_of(module)
    pads, attention_mask = unpadded(attention_mask, state.static)
    call = call_of(module, attention_mask, kwargs, DAM_IMPL)
    ws = dict(window=call.window, softcap=call.softcap)
    layer = int(module.layer_idx)
    state.seen.add(layer)
    st = state.static
    dyn = state.dynamic
    if st is not None and st.host_len is None:  # a static cache whose fill level lives on the device
        sums = None
        # block sums feed the pooled decode selection only (the exact-mass rule reads the keys)
        if dyn is not None and dyn.tail_mass is None and Sq == 1 and key.is_cuda and key.shape[2] % dyn.block == 0:
            from dam_kernels.dynamic import block_summary, update_block_summary

            if layer in st.block_sums:
                sums = st.block_sums[layer]
                update_block_summary(sums, key, st.valid_len, dyn.block, dyn.score)
            else:  # the eager step before the capture: every block once
                sums = st.block_sums[layer] = block_summary(key, dyn.block, dyn.score)
        out = sparse_attention(query, key, value, state.profile, layer, backend=state.backend, scale=scaling,
                               dynamic=dyn, valid_len=st.valid_len, block_sums=sums, **ws)
        return out.transpose(1, 2), None
    if st is not None:  # our static cache holds every position from slot 0
        key, value = key[:, :, : st.host_len], value[:, :, : st.host_len]
        start, key_start = st.host_len - Sq, 0
    else:
        start, key_start = positions(call, Sq, key.shape[2], kwargs if pads is None else {})

    def attend(q, k, v, start: int, key_start: int) -> torch.Tensor:
        return sparse_attention(q, k, v, state.profile, layer, start=start, backend=state.backend, scale=scaling,
                                dynamic=dyn, key_start=key_start, **ws)

    out = attend(query, key, value, start, key_start) if pads is None else each_row(
        attend, query, key, value, pads, start, key_start)
    return out.transpose(1, 2), None


def dense_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function `dam_dense`: the model's full attention, with grouped-query heads.

    Plain causal layers run SDPA with no mask built: `is_causal` over a fresh cache (flash / cuDNN
    kernels), no mask for one query row, a bottom-right causal bool mask for a chunk over a longer
    cache. A sliding window becomes part of that bool mask; soft-capping runs in float32 matmuls.
    """
    B, H, Sq, D = query.shape
    state = _state_of(module)
    pads, attention_mask = unpadded(attention_mask, state.static)
    call = call_of(module, attention_mask, kwargs, DENSE_IMPL)
    state.seen.add(int(module.layer_idx))
    st = state.static
    if st is not None and st.host_len is None:
        return _dense_static_decode(query, key, value, st.valid_len, scaling, window=call.window,
                                    softcap=call.softcap).transpose(1, 2), None
    if st is not None:
        key, value = key[:, :, : st.host_len], value[:, :, : st.host_len]
        start, key_start = st.host_len - Sq, 0
    else:
        start, key_start = positions(call, Sq, key.shape[2], kwargs if pads is None else {})

    def attend(q, k, v, start: int, key_start: int) -> torch.Tensor:
        return dense_attention(q, k, v, start=start, scale=scaling, window=call.window, softcap=call.softcap,
                               key_start=key_start)

    out = attend(query, key, value, start, key_start) if pads is None else each_row(
        attend, query, key, value, pads, start, key_start)
    return out.transpose(1, 2), None


def _dense_static_decode(query, key, value, valid_len: torch.Tensor, scale: float | None, *,
                         window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Dense attention of the last `Sq` filled slots of a static cache over every filled slot
    (within `window` when set, scores soft-capped by `softcap` when set).

    The fill level stays on the device (CUDA-graph decode): every slot is scored and the unfilled
    ones are masked out (`masked_dense_attention`: two batched matmuls and a float32 softmax).
    """
    Sq, Sk = query.shape[2], key.shape[2]
    allowed = rows_causal_mask(valid_len.reshape(()) - Sq, Sq, Sk, query.device, window=window)
    return masked_dense_attention(query, key, value, allowed, scale, softcap)


def unpadded(attention_mask, static: StaticKV | None) -> tuple[tuple[int, ...] | None, Any]:
    """(the rows' pad counts or None, the layer's own mask) of what an attention function received."""
    if not isinstance(attention_mask, PaddedMask):
        return None, attention_mask
    if static is not None:
        raise DamError("padded batches do not decode over a static cache (--cuda-graph): drop --cuda-graph, or "
                       "batch prompts of equal length")
    return attention_mask.pads, attention_mask.inner


def register() -> None:
    """Register `dam` and `dam_dense` with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DAM_IMPL, dam_attention_forward)
    AttentionInterface.register(DENSE_IMPL, dense_attention_forward)
    AttentionMaskInterface.register(DAM_IMPL, batch_mask)
    AttentionMaskInterface.register(DENSE_IMPL, batch_mask)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def describe_identity(ident: dict) -> str:
    """A model identity (as a profile records it) in one phrase: name, architecture, shape, config fingerprint."""
    sha = str(ident.get("config_sha256") or "none")[:12]
    return (f"{ident.get('name', '?')} ({ident.get('architecture', '?')}, {ident.get('n_layers')} layers x "
            f"{ident.get('n_heads')} heads, {ident.get('n_kv_heads')} kv heads, head dim {ident.get('head_dim')}, "
            f"config {sha})")


def model_identity_of(model) -> dict:
    """The identity of a loaded model, as `dam profile` records it in a profile."""
    from dam_cli.runtime.models import model_identity

    name = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None) or "unnamed"
    return model_identity(model.config, str(name))


def check_profile_matches(profile, identity: dict, *, model_arg: str | None = None,
                          check_fingerprint: bool = True) -> None:
    """Raise DamError unless `profile` was made for a model of this identity.

    Shape fields (layers, heads, kv heads, head dim) must agree, and the config fingerprint too
    unless `check_fingerprint` is False. The message names both identities and the fix.
    """
    pm = profile.meta.model
    fields = ("n_layers", "n_heads", "n_kv_heads", "head_dim")
    bad = [f for f in fields if int(pm.get(f, -1)) != int(identity[f])]
    if not bad and check_fingerprint and pm.get("config_sha256") != identity.get("config_sha256"):
        bad = ["config fingerprint"]
    if not bad and (profile.n_layers != identity["n_layers"] or profile.n_heads != identity["n_heads"]):
        bad = ["mask tensor shapes"]
    if bad:
        where = getattr(profile, "path", None) or "the profile"
        model_opt = f" --model {model_arg}" if model_arg else ""
        raise DamError(f"{where} was made for {describe_identity(pm)}, not for this model "
                       f"{describe_identity(identity)} ({', '.join(bad)} differ): make one with "
                       f"`dam profile{model_opt} --output PROFILE`")


def _attention_modules(model) -> list:
    # Every module that knows its layer index: attention modules are among them, and a decoder
    # layer registered too is harmless (lookups go by the module the attention call receives).
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def refuse_alibi(model) -> None:
    """A DamError for a model whose attention adds ALiBi biases (Falcon with `alibi`, MPT-style configs): dam's
    attention and its capture compute softmax(q.k) alone."""
    cfg = model.config
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", None) == "alibi":
        raise DamError(f"{type(model).__name__} adds ALiBi position biases to its attention scores, which dam "
                       "attention does not apply: models with rotary or learned positions only")


def _switch(model, state: _State) -> None:
    register()
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise DamError(f"{type(model).__name__} does not route its attention through transformers' "
                       "AttentionInterface, so dam attention cannot be used with this architecture")
    refuse_alibi(model)
    mods = _attention_modules(model)
    if not mods:
        raise DamError(f"{type(model).__name__} has no attention modules with a layer index: "
                       "this architecture does not go through transformers' AttentionInterface")
    old = _MODEL_STATE.get(model)
    if old is not None:  # re-enabling keeps the original implementation to restore
        state.previous = old[0].previous
    for m in mods:
        _MODULE_STATE[m] = state
    _MODEL_STATE[model] = (state, mods)
    model.set_attn_implementation(state.impl)
    if model.config._attn_implementation != state.impl:
        disable_dam(model)
        raise DamError(f"{type(model).__name__} refused the attention implementation {state.impl!r}: "
                       "this architecture cannot use dam attention")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

FROM_PROFILE = "profile"  # enable_dam's default: the dynamic setting the profile recommends (dam.runtime)


def recommended_dynamic(profile) -> DynamicSelection | None:
    """The dynamic part a profile recommends (`ProfileMeta.runtime["dynamic"]`), or None when it has none."""
    runtime = getattr(profile.meta, "runtime", None) or {}
    dyn = runtime.get("dynamic")
    return DynamicSelection(**dyn) if dyn else None


def enable_dam(model, profile, *, backend: str = "auto", check_fingerprint: bool = True,
               dynamic: DynamicSelection | None | str = FROM_PROFILE):
    """Put `model` on DAM attention with `profile`; returns the model (changed in place). Checks first that the
    profile was made for this model (layers, heads, kv heads, head dim and config fingerprint;
    `check_fingerprint=False` skips only the last). A model whose heads are split over tensor-parallel ranks
    (`from_pretrained(tp_plan="auto")` under torchrun) runs the slice of the profile of this rank's heads
    (`dam_cli.runtime.tensor_parallel`). backend: "auto" (Triton on
    CUDA, the compiled block-sparse kernel on the CPU, the reference elsewhere), "triton", "compiled", "gathered"
    or "reference". `dynamic` (a `DynamicSelection` with `topk` > 0; None: off) adds the dynamic part (beyond
    the paper), checked here with `DynamicSelection.validate`; by default, the setting the profile
    recommends (none: off). Undo with `disable_dam(model)`.
    """
    _require_model(model, "enable_dam")
    profile = _as_profile(profile)
    if isinstance(dynamic, str) and dynamic == FROM_PROFILE:
        dynamic = recommended_dynamic(profile)
    if backend not in BACKENDS:
        raise DamError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not torch.cuda.is_available() and not triton_runs_on_cpu():
        raise DamError("backend 'triton' needs a CUDA GPU and none is visible: use backend='auto' or 'reference'")
    dyn = active_dynamic(dynamic)
    identity = model_identity_of(model)
    check_profile_matches(profile, identity, check_fingerprint=check_fingerprint,
                          model_arg=None if identity["name"] == "unnamed" else identity["name"])
    from dam_cli.runtime.tensor_parallel import local_profile

    # A tensor-parallel model computes only this rank's heads: its attention calls get their slice of the profile.
    local = local_profile(model, profile)
    _switch(model, _State(impl=DAM_IMPL, previous=model.config._attn_implementation,
                          profile=local, backend=backend, dynamic=dyn))
    if backend in ("auto", "gathered", "compiled") and on_cpu(model):  # the CPU paths' tables, before any prompt
        from dam_cli.runtime.attention import prepare_gathered

        prepare_gathered(local, dyn, compiled=backend != "gathered")
    return model


def _require_model(model, caller: str) -> None:
    """A DamError unless `model` is a transformers model (a torch module with a transformers `config`)."""
    from transformers import PretrainedConfig

    if not (isinstance(model, torch.nn.Module) and isinstance(getattr(model, "config", None), PretrainedConfig)):
        raise DamError(f"{caller} takes a loaded transformers model (AutoModelForCausalLM.from_pretrained(...)), "
                       f"got {type(model).__name__}")


def _as_profile(profile):
    """`profile` as a Profile: one already loaded, or a path to a profile file (loaded with `load_profile`)."""
    from dam_cli.artifact.profile import Profile, load_profile

    if isinstance(profile, (str, os.PathLike)):
        return load_profile(os.fspath(profile))
    if not isinstance(profile, Profile):
        raise DamError(f"the profile must be a Profile (dam_cli.load_profile(PATH)) or a path to a profile file, "
                       f"got {type(profile).__name__}")
    return profile


def on_cpu(model) -> bool:
    """Whether `model`'s parameters are on the CPU (its first one's device)."""
    first = next(iter(model.parameters()), None)
    return first is not None and first.device.type == "cpu"


def enable_dense(model):
    """Put `model` on plain dense SDPA registered as `dam_dense` (the fair full-attention peer).

    Same registry path and no mask building as `dam`, so comparisons measure attention only.
    Undo with `disable_dam(model)`.
    """
    _require_model(model, "enable_dense")
    _switch(model, _State(impl=DENSE_IMPL, previous=model.config._attn_implementation))
    return model


def disable_dam(model):
    """Take `model` off `dam` / `dam_dense` and restore the implementation it had before.

    A model that was never enabled is returned unchanged.
    """
    _require_model(model, "disable_dam")
    entry = _MODEL_STATE.pop(model, None)
    if entry is None:
        return model
    state, mods = entry
    for m in mods:
        _MODULE_STATE.pop(m, None)
    model.set_attn_implementation(state.previous)
    return model


@contextlib.contextmanager
def dam_attention(model, profile, *, backend: str = "auto",
                  dynamic: DynamicSelection | None = None) -> Iterator[Any]:
    """Context manager: `enable_dam` on entry, `disable_dam` on exit (even on error)."""
    enable_dam(model, profile, backend=backend, dynamic=dynamic)
    try:
        yield model
    finally:
        disable_dam(model)


def set_static(model, static: StaticKV | None) -> None:
    """Tell a model's `dam` / `dam_dense` attention that its cache is static (None: it is not).

    Used by `dam_cli.runtime.decode`; a model on another implementation is left alone (its own
    attention reads the static cache as transformers does).
    """
    entry = _MODEL_STATE.get(model)
    if entry is not None:
        entry[0].static = static


def dynamic_of(model) -> DynamicSelection | None:
    """The dynamic part a model was enabled with: None when off, or when not on dam attention."""
    entry = _MODEL_STATE.get(model)
    return entry[0].dynamic if entry else None


def layers_seen(model) -> set[int]:
    """Layers whose attention went through `dam`/`dam_dense` since the last `reset_seen`."""
    entry = _MODEL_STATE.get(model)
    return set(entry[0].seen) if entry else set()


def reset_seen(model) -> None:
    """Forget which layers were seen (call before a forward whose routing you want to check)."""
    entry = _MODEL_STATE.get(model)
    if entry:
        entry[0].seen.clear()


def check_routed(model) -> None:
    """After a forward: raise DamError unless every layer's attention went through the registry."""
    entry = _MODEL_STATE.get(model)
    if entry is None:
        return
    n = int(model.config.num_hidden_layers)
    seen = entry[0].seen
    if len(seen) != n:
        raise DamError(f"only {len(seen)} of {n} layers of {type(model).__name__} went through transformers' "
                       "AttentionInterface: this architecture cannot use dam attention")

"""The two attention functions `dam eval` registers with transformers' `AttentionInterface`.

- `FULL_IMPL`: the model's full attention (causal, its sliding windows and soft-capping) through DAM's
  exact reference, optionally recording each layer's q/k rows for attention recall (`recording`,
  `record_full_qk`).
- `PROBE_IMPL`: the `dam` attention unchanged, plus `_DensityProbe`, which counts the causal
  pairs a dynamic method really allows in a prefill (`probing`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from dam_kernels.selection import DynamicSelection

from dam_cli.errors import DamError
from dam_cli.evaluation.methods import dynamic_extra_density

if TYPE_CHECKING:
    from dam_cli.evaluation.methods import _Context

FULL_IMPL = "dam_eval_full"
PROBE_IMPL = "dam_eval_density"

# The q/k record of the full forward: {"rows": query rows, "q": {layer: [H, n, D]}, "k": {layer: [H_kv, S, D]},
# "scale": {layer: float}, "window": {layer: W or None}, "softcap": {layer: float or None}}, or None (no recording).
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dam_eval_record", default=None)


def _full_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: the model's full attention (causal, within its sliding window, scores
    soft-capped as it asks) through DAM's exact reference, optionally recording q/k, window and soft-cap."""
    from dam_kernels.reference import reference_attention

    from dam_cli.runtime.masking import call_of, positions

    B, H, Sq, D = query.shape
    call = call_of(module, attention_mask, kwargs, FULL_IMPL)
    rec = _RECORD.get()
    if rec is not None:
        layer = int(module.layer_idx)
        rows = rec["rows"]
        rec["q"][layer] = query[0, :, rows].detach().float().cpu()  # [H, n_rows, D]
        rec["k"][layer] = key[0].detach().float().cpu()  # [H_kv, Sk, D]
        rec["scale"][layer] = float(scaling if scaling is not None else module.scaling)
        rec["window"][layer], rec["softcap"][layer] = call.window, call.softcap
    start, key_start = positions(call, Sq, key.shape[2], kwargs)

    def causal(r: torch.Tensor, n: int, first: int = 0) -> torch.Tensor:
        return ((first + torch.arange(n))[None, :] <= r[:, None]).expand(H, -1, -1)

    out = reference_attention(query, key, value, causal, start=start, scale=scaling, window=call.window,
                              softcap=call.softcap, key_start=key_start)
    return out.transpose(1, 2), None


def _register_full() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.backend import dam_mask

    AttentionInterface.register(FULL_IMPL, _full_forward)
    AttentionMaskInterface.register(FULL_IMPL, dam_mask)


@contextlib.contextmanager
def full_reference(model) -> Iterator[None]:
    """Run the body with `model` on its full attention through DAM's exact reference; restore it after."""
    from dam_cli.profiling.capture import attention_implementation

    _register_full()
    with attention_implementation(model, FULL_IMPL):
        yield


def new_record(rows: torch.Tensor, device: str) -> dict:
    """An empty q/k record of the full forward for the query rows `rows`."""
    return {"rows": rows.to(device), "q": {}, "k": {}, "scale": {}, "window": {}, "softcap": {}}


@contextlib.contextmanager
def recording(rec: dict) -> Iterator[dict]:
    """Within the body, every `FULL_IMPL` forward fills `rec` (from `new_record`) with its q/k rows."""
    token = _RECORD.set(rec)
    try:
        yield rec
    finally:
        _RECORD.reset(token)


def record_full_qk(model, x: torch.Tensor, rows: torch.Tensor, device: str) -> dict:
    """q/k capture for recall when full runs as SDPA (GPU): one extra forward through the recorder."""
    with recording(new_record(rows, device)) as rec, full_reference(model), torch.no_grad():
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    return rec


@dataclass
class _DensityProbe:
    """Counts, during a prefill of `length` tokens, the causal pairs a dynamic method really allows.

    Per layer: the static Stage-2 mask of `profile` (full heads included) united with the blocks
    `select_blocks` picks from that layer's own q and k, exactly as `sparse_attention` does with
    `dynamic` (`dam_kernels.dynamic.union_pair_counts`; no `S x S` mask is built); in a sliding-window layer only
    the cells inside the window, all the kernels compute there.
    """

    ctx: _Context
    profile: Any
    dynamic: DynamicSelection
    length: int
    pairs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> int64 [H]
    static: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> int64 [H]: its static cells alone
    scale: float | None = None  # the attention scale of the forward being counted (None: D ** -0.5)

    def count(self, layer: int, query: torch.Tensor, key: torch.Tensor, window: int | None = None) -> None:
        from dam_kernels.dynamic import select_blocks
        from dam_kernels.pair_counts import union_pair_counts

        S = key.shape[2]
        if query.shape[0] != 1 or query.shape[2] != S or S != self.length:
            return  # only the one-sequence prefill of the measured length is counted
        d = self.dynamic
        chosen = select_blocks(query, key, 0, d.topk, d.block, tail_topk=d.tail_topk, score=d.score,
                               tail_mass=d.tail_mass, mass=d.mass, scale=self.scale, window=window)
        static = self.ctx.static_block_counts(self.profile, layer, S, window)
        self.static[layer] = static.sum((-1, -2))
        self.pairs[layer] = union_pair_counts(chosen, static, S, d.block, window)[0]

    def summary(self) -> dict:
        n_layers = self.profile.n_layers
        if sorted(self.pairs) != list(range(n_layers)):
            raise DamError(f"the density probe saw layers {sorted(self.pairs)} of {n_layers} in a prefill "
                           f"of {self.length} tokens")
        total = self.length * (self.length + 1) / 2
        per = torch.stack([self.pairs[layer] for layer in range(n_layers)]).double() / total  # [NL, H]
        static = torch.stack([self.static[layer] for layer in range(n_layers)]).double() / total
        d = self.dynamic
        bound = float(static.mean()) + dynamic_extra_density(self.length, d.topk, d.block, d.tail_topk)
        return {"density": float(per.mean()), "min": float(per.min()), "max": float(per.max()),
                "per_layer": per.mean(-1).tolist(), "static": float(static.mean()),
                "upper_bound": min(1.0, bound), "input": "held-out window"}


_PROBE: contextvars.ContextVar[_DensityProbe | None] = contextvars.ContextVar("dam_eval_probe", default=None)


def _density_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: the `dam` attention unchanged, plus the density probe's count."""
    from dam_cli.runtime.backend import dam_attention_forward
    from dam_cli.runtime.masking import call_of

    probe = _PROBE.get()
    if probe is not None:
        probe.scale = scaling  # the forward's own attention scale, for the exact-mass tail rule
        window = call_of(module, attention_mask, kwargs, PROBE_IMPL).window  # the layer's window picks too
        probe.count(int(module.layer_idx), query, key, window)
    return dam_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.backend import dam_mask

    AttentionInterface.register(PROBE_IMPL, _density_forward)
    AttentionMaskInterface.register(PROBE_IMPL, dam_mask)


@contextlib.contextmanager
def probing(model, probe: _DensityProbe) -> Iterator[None]:
    """Run the body with `model` (already on `dam`) through `PROBE_IMPL`, counting into `probe`."""
    from dam_cli.profiling.capture import attention_implementation

    _register_probe()
    token = _PROBE.set(probe)
    try:
        with attention_implementation(model, PROBE_IMPL):
            yield
    finally:
        _PROBE.reset(token)

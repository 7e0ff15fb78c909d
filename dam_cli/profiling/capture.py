"""Measure a frozen model's attention on calibration windows; measures, never decides.

Queries and keys are recorded exactly as the model computes them (after rotary embedding)
through a `dam_capture` attention function registered with transformers' `AttentionInterface`
(the forward itself runs SDPA, unchanged). Attention probabilities are then recomputed in
float32 one layer at a time, so only one layer's `H x L x L` sums are ever in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

CAPTURE_IMPL = "dam_capture"
_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("dam_recorder", default=None)


@dataclass
class _Recorder:
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, n, D] float32
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, n, D] float32
    scaling: dict[int, float] = field(default_factory=dict)


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface function: record q and k of batch row 0, then run plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _RECORDER.get()
    if rec is not None:
        layer = int(module.layer_idx)
        rec.q[layer] = query[0].detach().to(torch.float32).cpu()
        rec.k[layer] = key[0].detach().to(torch.float32).cpu()
        scaling = kwargs.get("scaling")
        rec.scaling[layer] = float(scaling if scaling is not None else module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> None:
    """Register `dam_capture` for attention and for mask creation (SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Temporarily switch a model's attention implementation through the registry."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class Capture:
    """Per-sample queries and keys of every layer, and each layer's softmax scale."""

    q: list[list[torch.Tensor]]  # [layer][sample] -> [H, n, D]
    k: list[list[torch.Tensor]]  # [layer][sample] -> [H_kv, n, D]
    scaling: list[float]  # [layer]


def capture_qk(model, windows: list[list[int]], device: str,
               on_sample: Callable[[int], None] | None = None) -> Capture:
    """Run the model once per window and record post-rotary q and k of every layer."""
    register_capture()
    n_layers = model.config.num_hidden_layers
    qs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    ks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    scaling = [0.0] * n_layers
    with attention_implementation(model, CAPTURE_IMPL), torch.no_grad():
        for idx, w in enumerate(windows):
            rec = _Recorder()
            token = _RECORDER.set(rec)
            try:
                ids = torch.tensor([w], dtype=torch.long, device=device)
                model(input_ids=ids, use_cache=False)
            finally:
                _RECORDER.reset(token)
            if len(rec.q) != n_layers:
                from dam_cli.errors import DamError

                raise DamError(f"only {len(rec.q)} of {n_layers} layers went through transformers' "
                               "AttentionInterface: this architecture cannot be profiled")
            for layer in range(n_layers):
                qs[layer].append(rec.q[layer])
                ks[layer].append(rec.k[layer])
                scaling[layer] = rec.scaling[layer]
            if on_sample:
                on_sample(idx)
    return Capture(q=qs, k=ks, scaling=scaling)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, head: int) -> torch.Tensor:
    """Causal softmax probabilities of one query head, float32 `[n, n]` (zeros above the diagonal).

    q `[H, n, D]`, k `[H_kv, n, D]`; head `h` reads kv head `h // (H / H_kv)`.
    """
    H, n, _ = q.shape
    kv = head // (H // k.shape[0])
    scores = torch.matmul(q[head], k[kv].transpose(0, 1)) * scale
    upper = torch.ones(n, n, dtype=torch.bool).triu_(1)
    scores.masked_fill_(upper, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def layer_attention_sum(qs: list[torch.Tensor], ks: list[torch.Tensor], scale: float, L: int) -> torch.Tensor:
    """Sum over samples of the attention probabilities of one layer: float32 `[H, L, L]`."""
    H = qs[0].shape[0]
    out = torch.zeros(H, L, L, dtype=torch.float32)
    for q, k in zip(qs, ks, strict=True):
        n = q.shape[1]
        for h in range(H):
            out[h, :n, :n] += attention_probs(q, k, scale, h)
    return out

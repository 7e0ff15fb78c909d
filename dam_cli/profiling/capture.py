"""Measure a frozen model's attention on calibration windows; measures, never decides.

Queries and keys are recorded exactly as the model computes them (after rotary embedding)
through a `dam_capture` attention function registered with transformers' `AttentionInterface`,
with each layer's sliding window and logit soft-cap as the model asks for them (the forward
itself runs the model's full attention, windows and soft-capping included). Attention
probabilities are then recomputed in float32 one layer at a time, so only one layer's
`H x L x L` sums are ever in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dam_cli.errors import DamError

CAPTURE_IMPL = "dam_capture"
_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("dam_recorder", default=None)


@dataclass
class _Recorder:
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, n, D] float32
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, n, D] float32
    scaling: dict[int, float] = field(default_factory=dict)
    window: dict[int, int | None] = field(default_factory=dict)  # layer -> sliding window W, None: global
    softcap: dict[int, float | None] = field(default_factory=dict)  # layer -> logit soft-cap, None: none


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: record q, k, window and soft-cap of batch row 0, then run the
    model's full attention (causal, within the window, scores soft-capped) as its eager code does."""
    from dam_cli.runtime.dense import dense_attention
    from dam_cli.runtime.masking import call_of, positions

    call = call_of(module, attention_mask, kwargs, CAPTURE_IMPL)
    rec = _RECORDER.get()
    if rec is not None:
        layer = int(module.layer_idx)
        rec.q[layer] = query[0].detach().to(torch.float32).cpu()
        rec.k[layer] = key[0].detach().to(torch.float32).cpu()
        rec.scaling[layer] = float(scaling if scaling is not None else module.scaling)
        rec.window[layer], rec.softcap[layer] = call.window, call.softcap
    start, key_start = positions(call, query.shape[2], key.shape[2], kwargs)
    out = dense_attention(query, key, value, start=start, scale=scaling, window=call.window, softcap=call.softcap,
                          key_start=key_start)
    return out.transpose(1, 2), None


def register_capture() -> None:
    """Register `dam_capture` for attention and for mask creation (`dam_mask`: no mask, a window named)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.masking import dam_mask

    AttentionInterface.register(CAPTURE_IMPL, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_IMPL, dam_mask)


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
    """Per-sample queries and keys of every layer, and each layer's softmax scale, sliding window
    (None: global attention) and logit soft-cap (None: none); windows and softcaps default to None."""

    q: list[list[torch.Tensor]]  # [layer][sample] -> [H, n, D]
    k: list[list[torch.Tensor]]  # [layer][sample] -> [H_kv, n, D]
    scaling: list[float]  # [layer]
    windows: list[int | None] = field(default_factory=list)  # [layer]
    softcaps: list[float | None] = field(default_factory=list)  # [layer]

    def __post_init__(self) -> None:
        self.windows = list(self.windows) or [None] * len(self.scaling)
        self.softcaps = list(self.softcaps) or [None] * len(self.scaling)


_NO_PROFILE_HINT = ("use --attention sdpa for this model", "dam profile cannot measure this model")


def capture_qk(model, windows: list[list[int]], device: str,
               on_sample: Callable[[int], None] | None = None) -> Capture:
    """Run the model once per window and record post-rotary q and k, window and soft-cap of every layer."""
    from dam_cli.runtime.backend import refuse_alibi

    refuse_alibi(model)
    register_capture()
    n_layers = model.config.num_hidden_layers
    qs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    ks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    scaling = [0.0] * n_layers
    layer_windows: list[int | None] = [None] * n_layers
    softcaps: list[float | None] = [None] * n_layers
    with attention_implementation(model, CAPTURE_IMPL), torch.no_grad():
        for idx, w in enumerate(windows):
            rec = _Recorder()
            token = _RECORDER.set(rec)
            try:
                ids = torch.tensor([w], dtype=torch.long, device=device)
                model(input_ids=ids, use_cache=False)
            except DamError as e:  # a feature the capture cannot measure (the runtime's refusal, named)
                raise DamError(str(e).replace(*_NO_PROFILE_HINT)) from None
            finally:
                _RECORDER.reset(token)
            if len(rec.q) != n_layers:
                raise DamError(f"only {len(rec.q)} of {n_layers} layers went through transformers' "
                               "AttentionInterface: this architecture cannot be profiled")
            for layer in range(n_layers):
                qs[layer].append(rec.q[layer])
                ks[layer].append(rec.k[layer])
                scaling[layer] = rec.scaling[layer]
                layer_windows[layer], softcaps[layer] = rec.window[layer], rec.softcap[layer]
            if on_sample:
                on_sample(idx)
    return Capture(q=qs, k=ks, scaling=scaling, windows=layer_windows, softcaps=softcaps)


def allowed_keys(rows: torch.Tensor, n: int, window: int | None = None) -> torch.Tensor:
    """bool `[len(rows), n]`: row `i` sees key `j` iff `j <= i`, and with `window` W also `i - j < W`."""
    j = torch.arange(n)[None, :]
    i = rows.reshape(-1, 1)
    allowed = j <= i
    return allowed if window is None else allowed & (j > i - window)


def capped_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled scores as the model uses them: `softcap * tanh(s / softcap)` when soft-capped (Gemma 2)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, head: int, *, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Softmax probabilities of one query head, float32 `[n, n]`: zero above the diagonal and, with
    `window` W, where `i - j >= W`; scores soft-capped by `softcap` before the mask.

    q `[H, n, D]`, k `[H_kv, n, D]`; head `h` reads kv head `h // (H / H_kv)`.
    """
    H, n, _ = q.shape
    kv = head // (H // k.shape[0])
    scores = capped_scores(torch.matmul(q[head], k[kv].transpose(0, 1)) * scale, softcap)
    scores = scores.masked_fill(~allowed_keys(torch.arange(n), n, window), float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def layer_attention_sum(qs: list[torch.Tensor], ks: list[torch.Tensor], scale: float, L: int, *,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Sum over samples of the attention probabilities of one layer (its `window` and `softcap`
    applied as in `attention_probs`): float32 `[H, L, L]`."""
    H = qs[0].shape[0]
    out = torch.zeros(H, L, L, dtype=torch.float32)
    for q, k in zip(qs, ks, strict=True):
        n = q.shape[1]
        for h in range(H):
            out[h, :n, :n] += attention_probs(q, k, scale, h, window=window, softcap=softcap)
    return out

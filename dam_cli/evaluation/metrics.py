"""The numbers `dam eval` reports, as pure functions of tensors and of a result dict (no model, no I/O).

`alignment_metrics` compares next-token distributions with full attention's, `attention_recall`
measures the share of full attention's mass (the model's own: windows and soft-cap applied) inside a
mask, `accuracy` reads a retrieval cell.
"""

from __future__ import annotations

import math

import torch

from dam_cli.profiling.capture import allowed_keys, capped_scores


def score_positions(length: int, count: int) -> torch.Tensor:
    """Up to `count` evenly spaced positions in `[0, length - 2]` whose next token is predicted."""
    n = min(count, length - 1)
    return torch.linspace(0, length - 2, n).round().to(torch.int64).unique()


def alignment_metrics(logp_full: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 agreement with full, mean KL(full || method) in nats, and perplexity of the method.

    logp_full, logp: float32 `[P, V]` log-probabilities at the same positions; targets `[P]`.
    """
    agree = (logp_full.argmax(-1) == logp.argmax(-1)).double().mean().item()
    kl = (logp_full.exp() * (logp_full - logp)).sum(-1).double().mean().item()
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1).double().mean().item()
    return {"agreement": agree, "kl": kl, "ppl": math.exp(nll), "positions": int(targets.shape[0])}


def attention_recall(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor, allowed: torch.Tensor, *,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Share of the model's full attention mass inside `allowed`, per head, float64 `[H]`: causal, zero
    where `i - j >= window` (a sliding-window layer), scores soft-capped by `softcap` (as the model asks).

    q `[H, n, D]` (the query rows `rows`), k `[H_kv, S, D]` (keys from position 0), allowed bool `[H, n, S]`.
    Computed as one minus the mass outside, so a mask that drops nothing the model attends to scores exactly 1.
    """
    H, n, D = q.shape
    S = k.shape[1]
    G = H // k.shape[0]
    scores = capped_scores(torch.matmul(q.reshape(k.shape[0], G, n, D), k[:, None].transpose(-1, -2)) * scale,
                           softcap)
    attended = allowed_keys(rows, S, window)  # [n, S]
    scores = scores.reshape(H, n, S).masked_fill(~attended, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    outside = (probs * (attended & ~allowed)).sum(-1)  # [H, n]
    return 1.0 - outside.double().mean(-1)


def accuracy(result: dict, task: str, method: str, length: int) -> float | None:
    """Mean accuracy over depths of one (task, method, length) cell of a result, or None."""
    cells = result.get("retrieval", {}).get(task, {}).get(method, {}).get(str(length))
    if not cells:
        return None
    c = sum(v["correct"] for v in cells.values())
    t = sum(v["total"] for v in cells.values())
    return c / t if t else None

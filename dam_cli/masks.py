"""Pure math of the DAM recipe (../shared/dam-spec.md): no I/O, no globals, torch only.

Stage 1 turns captured attention statistics into a true mask and matched patterns; Stage 2
extends a head's profile `(M, R, C)` to any sequence length. Every function here is exact and
deterministic; tests compare results with `torch.equal` on hand-worked cases. `stage2_rows`
lives in `dam_kernels.stage2` (the kernels import nothing from dam_cli) and is re-exported here.
"""

from __future__ import annotations

import math

import torch
from dam_kernels.stage2 import stage2_rows  # noqa: F401  (the one implementation, re-exported here)

EPS = 1e-10  # the spec's epsilon: floor of the mean attention and the denominator guard


def boxcox(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Box-Cox transform of a positive tensor: `(x^lam - 1) / lam`, or `ln x` when `lam == 0`.

    Works in the dtype of `x`; callers pass float64 so thresholds are decided in double precision.
    """
    if lam == 0:
        return torch.log(x)
    return (torch.pow(x, lam) - 1.0) / lam


def boxcox_floor(lam: float, eps: float = EPS) -> float:
    """The global minimum of the Box-Cox values, `boxcox(eps)`: the upper triangle is always 0.

    Stage 1 shifts by this constant, which lets profiling stream layer by layer (spec step 5).
    """
    return math.log(eps) if lam == 0 else (eps**lam - 1.0) / lam


def position_counts(lengths: list[int], L: int) -> torch.Tensor:
    """`cnt[m]` = number of samples whose length exceeds `m`, for `m` in `[0, L)`: int64 `[L]`.

    The position-wise count of a pair `(i, j)` is `cnt[max(i, j)]` (spec step 3).
    """
    cnt = torch.zeros(L, dtype=torch.int64)
    for n in lengths:
        cnt[: min(n, L)] += 1
    return cnt


def pair_counts(cnt: torch.Tensor) -> torch.Tensor:
    """The `[L, L]` count matrix `C[i, j] = cnt[max(i, j)]`, float64."""
    L = cnt.shape[0]
    idx = torch.arange(L)
    return cnt[torch.maximum(idx[:, None], idx[None, :])].to(torch.float64)


def mean_attention(attn_sum: torch.Tensor, cnt: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Position-wise mean `Abar = S / (C + eps)` in float64 (spec step 3).

    attn_sum: `[..., L, L]` sums of attention probabilities over samples; cnt: `[L]` counts.
    """
    return attn_sum.to(torch.float64) / (pair_counts(cnt) + eps)


def true_mask(mean_attn: torch.Tensor, lam: float, tau: float, eps: float = EPS) -> torch.Tensor:
    """Spec steps 4-6: Box-Cox of `max(Abar, eps)`, shift by the global floor, threshold at tau.

    mean_attn: float `[..., L, L]` (upper triangle 0). Returns bool `[..., L, L]`, causal when tau > 0.
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    x = torch.clamp(mean_attn.to(torch.float64), min=eps)
    b = boxcox(x, lam)
    floor = boxcox_floor(lam, eps)
    L = mean_attn.shape[-1]
    if L >= 2:
        # Step 5 streams with the constant floor; check it is the true minimum of this block.
        bmin = float(b.amin())
        assert abs(bmin - floor) <= 1e-9 * max(1.0, abs(floor)), (bmin, floor)
    return (b - floor) >= tau


def diagonal_counts(mask: torch.Tensor) -> torch.Tensor:
    """Cells set on each diagonal `r = i - j` of a causal `[..., L, L]` bool mask: int64 `[..., L]`.

    Uses the set cells only (masks are sparse), so memory stays O(set cells), not O(L^2) ints.
    """
    L = mask.shape[-1]
    flat = mask.reshape(-1, L, L)
    out = torch.zeros(flat.shape[0], L, dtype=torch.int64)
    for b in range(flat.shape[0]):
        ij = torch.nonzero(flat[b])
        r = ij[:, 0] - ij[:, 1]
        r = r[r >= 0]  # cells above the diagonal belong to no causal pattern
        out[b] = torch.bincount(r, minlength=L)[:L]
    return out.reshape(*mask.shape[:-2], L)


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """Cells set in each causal column `c` (rows `i >= c`) of a `[..., L, L]` bool mask: int64 `[..., L]`."""
    return torch.tril(mask).sum(dim=-2, dtype=torch.int64)


def pattern_sizes(L: int) -> torch.Tensor:
    """Cells in diagonal `r` and in causal column `c` alike: `L - r`, int64 `[L]`."""
    return L - torch.arange(L, dtype=torch.int64)


def pattern_scores(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec step 7: `gamma` of every diagonal and every causal column, float64 `[..., L]` each.

    Computed from diagonal and column sums, O(L^2) per head; never builds the 2L pattern masks.
    """
    L = mask.shape[-1]
    size = pattern_sizes(L).to(torch.float64)
    return diagonal_counts(mask) / size, column_counts(mask) / size


def match_patterns(
    mask: torch.Tensor, mu: float, min_support: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched offsets `R` and columns `C` of a causal mask: bool `[..., L]` each.

    A pattern matches when `gamma >= mu` (spec step 7). `min_support` > 1 is a beyond-paper
    option: patterns with fewer cells than this never match (default 1: the faithful rule).
    """
    if not 0 < mu <= 1:
        raise ValueError("mu must be in (0, 1]")
    L = mask.shape[-1]
    size = pattern_sizes(L)
    dcount, ccount = diagonal_counts(mask), column_counts(mask)
    # Integer form of count / size >= mu, free of division rounding.
    need = size.to(torch.float64) * mu
    offsets = (dcount.to(torch.float64) >= need) & (size >= min_support)
    columns = (ccount.to(torch.float64) >= need) & (size >= min_support)
    return offsets, columns


def derive_head(attn_sum: torch.Tensor, cnt: torch.Tensor, lam: float, tau: float, mu: float,
                eps: float = EPS, min_support: int = 1, mean_attn: torch.Tensor | None = None):
    """Stage 1 for one head from its attention sums `[L, L]` and position counts `[L]`.

    Returns (true mask bool `[L, L]`, offsets bool `[L]`, columns bool `[L]`, mass kept): the
    mass kept is the mean over rows with data of the share of the row's mean attention in M.
    `mean_attn`, when the caller already has `mean_attention(attn_sum, cnt, eps)`, is used as is.
    """
    abar = mean_attention(attn_sum, cnt, eps) if mean_attn is None else mean_attn
    m = true_mask(abar, lam, tau, eps)
    offsets, columns = match_patterns(m, mu, min_support)
    rows = cnt > 0
    row_mass = abar.sum(-1)
    kept = (abar * m).sum(-1) / torch.clamp(row_mass, min=eps)
    mass_kept = float(kept[rows].mean()) if bool(rows.any()) else float("nan")
    return m, offsets, columns, mass_kept


def pattern_cells(L: int, offsets: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cells `(i, j)`, `i, j < L`, that matched patterns and the guard allow: bool `[..., L, L]`.

    This is the rule every row beyond L follows, evaluated inside the captured square.
    """
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    rel = (i - j).clamp(min=0)
    cells = offsets[..., rel] | columns[..., j.expand(L, L)] | (i == j)
    return cells & (j <= i)


def pattern_mass_kept(mean_attn: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Share of a head's mean attention mass inside its patterns (offsets, columns, guard), float64.

    A low share means the head's attention beyond L would mostly be cut: a retrieval-head candidate.
    """
    L = mean_attn.shape[-1]
    a = torch.tril(mean_attn.to(torch.float64))
    cells = pattern_cells(L, offsets, columns)
    return (a * cells).sum((-1, -2)) / a.sum((-1, -2)).clamp(min=EPS)


def select_patterns_by_mass(mean_attn: torch.Tensor, share: float,
                            min_support: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Beyond-paper option: the smallest greedy set of offsets and columns covering `share` of the
    head's mean attention mass (`[L, L]` -> bool `[L]`, bool `[L]`).

    Each step takes the diagonal or column holding the most still-uncovered mass (ties: offsets
    first, then the smaller index), so the result is deterministic. Diffuse heads, which have no
    pair above tau, get the window they need instead of nothing. Patterns of fewer than
    `min_support` cells (offset k and column k hold `L - k`) are never taken, as `match_patterns`
    ignores them.
    """
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1]")
    L = mean_attn.shape[-1]
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    lower = j <= i
    rel = (i - j).clamp(min=0)
    left = torch.where(lower, mean_attn.to(torch.float64), torch.zeros((), dtype=torch.float64))
    total = float(left.sum())
    offsets = torch.zeros(L, dtype=torch.bool)
    columns = torch.zeros(L, dtype=torch.bool)
    too_short = pattern_sizes(L) < min_support  # the same for offsets and columns
    # The guard keeps the diagonal anyway: count it as covered from the start.
    left = left.masked_fill(i == j, 0.0)
    covered = total - float(left.sum())
    flat_rel = rel.reshape(-1)
    while covered < share * total - 1e-12 * total:
        dmass = torch.zeros(L, dtype=torch.float64).index_add_(0, flat_rel, left.reshape(-1)).masked_fill_(too_short, 0)
        cmass = left.sum(0).masked_fill_(too_short, 0)
        rd, rc = int(torch.argmax(dmass)), int(torch.argmax(cmass))
        if float(dmass[rd]) <= 0 and float(cmass[rc]) <= 0:
            break
        if float(dmass[rd]) >= float(cmass[rc]):
            offsets[rd] = True
            covered += float(dmass[rd])
            left = left.masked_fill(rel == rd, 0.0)
        else:
            columns[rc] = True
            covered += float(cmass[rc])
            left[:, rc] = 0.0
    return offsets, columns


def add_local_window(true_mask: torch.Tensor, offsets: torch.Tensor, window: int):
    """The local-window option (beyond the paper): every head also keeps the `window` most recent
    keys of each query, `0 <= i - j < window`, inside `L` (cells of M) and beyond it (offsets
    `0 .. window-1`). Returns new (M `[..., L, L]`, R `[..., L]`); `window` 0 changes nothing.

    Why: a head whose patterns hold few short offsets sees almost none of its own sentence beyond
    `L`, so the tokens of a fact stated there (a passkey, say) lose their local context.
    """
    L = true_mask.shape[-1]
    w = max(0, min(int(window), L))
    off = offsets.clone()
    off[..., :w] = True
    d = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    return true_mask | ((d >= 0) & (d < w)), off


def stage2_mask(
    true_mask: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor, length: int,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full Stage-2 mask of one or more heads for a sequence of `length`: bool `[..., S, S]`."""
    return stage2_rows(true_mask, offsets, columns, torch.arange(length), length, full)


def allowed_per_row(
    true_mask: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor, length: int,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """Allowed keys in each query row of the Stage-2 mask, int64 `[..., length]`, in O(L^2).

    Rows below L count the true mask plus the guard; a row `i >= L` counts
    `|R| + |C| - |{c in C : i - c in R}| + [0 not in R]` (offsets and columns overlap only there).
    """
    L = true_mask.shape[-1]
    lead = true_mask.shape[:-2]
    S = length
    n_in = min(S, L)
    diag = torch.diagonal(true_mask[..., :n_in, :n_in], dim1=-2, dim2=-1)
    lower = torch.tril(torch.ones(n_in, n_in, dtype=torch.bool))
    inside = (true_mask[..., :n_in, :n_in] & lower).sum(-1) + (~diag).to(torch.int64)
    if S <= L:
        return _full_rows(inside, full, S)
    R = offsets.to(torch.int64)
    Cc = columns.to(torch.int64)
    base = R.sum(-1, keepdim=True) + Cc.sum(-1, keepdim=True) + (1 - R[..., :1])  # [..., 1]
    # overlap(i) = sum_c C[c] * R[i - c] for i in [L, 2L): a full correlation of C and R.
    corr = _convolve(Cc, R)  # [..., 2L - 1], index k = c + r
    rows = torch.arange(L, S)
    k = rows.clamp(max=2 * L - 2)
    overlap = torch.where(rows <= 2 * L - 2, corr[..., k], torch.zeros((), dtype=torch.int64))
    beyond = base - overlap
    return _full_rows(torch.cat([inside, beyond.expand(*lead, S - L)], dim=-1), full, S)


def _full_rows(counts: torch.Tensor, full: torch.Tensor | None, S: int) -> torch.Tensor:
    """Rows of heads on full attention allow `i + 1` keys."""
    if full is None:
        return counts
    causal = torch.arange(1, S + 1, dtype=torch.int64)
    return torch.where(full[..., None], causal, counts)


def _convolve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer linear convolution along the last axis: `[..., n] x [..., n] -> [..., 2n-1]`."""
    n = a.shape[-1]
    lead = a.shape[:-1]
    nz = torch.nonzero(b.reshape(-1, n).sum(0) > 0).flatten().tolist()
    if len(nz) <= 64:  # offsets are usually a handful per head: a loop over them is cheapest
        out = torch.zeros(*lead, 2 * n - 1, dtype=torch.int64)
        for r in nz:
            out[..., r : r + n] += a * b[..., r : r + 1]
        return out
    # Many offsets: grouped conv1d, exact for integer sums below 2**24 in float32 (the fast kernels; float64 takes
    # torch's slow path, 80 ms a layer at n = 512) and below 2**53 in float64.
    g = a.reshape(-1, n).shape[0]
    exact32 = int(a.abs().max()) * int(b.abs().max()) * n < 2**24 if a.numel() and b.numel() else True
    dt = torch.float32 if exact32 else torch.float64
    x = a.reshape(1, g, n).to(dt)
    w = b.reshape(g, 1, n).to(dt).flip(-1)
    out = torch.nn.functional.conv1d(x, w, padding=n - 1, groups=g)
    return out.round().to(torch.int64).reshape(*lead, 2 * n - 1)


def density(
    true_mask: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor, length: int,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of the `length (length + 1) / 2` causal pairs that the Stage-2 mask allows, float64."""
    total = length * (length + 1) / 2
    return allowed_per_row(true_mask, offsets, columns, length, full).sum(-1).to(torch.float64) / total

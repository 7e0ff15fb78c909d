"""`dam profile` as a library call: calibration -> capture -> Stage 1 per layer -> Profile.

Streams layer by layer: only one layer's `H x L x L` attention sums are ever held. With
`from_capture`, the model is not run; the saved sums are re-derived with the given options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dam_cli import masks
from dam_cli.artifact.profile import Profile, ProfileMeta, default_stats, pack_bits, save_profile
from dam_cli.errors import DamError
from dam_cli.memory import available_memory
from dam_cli.profiling.config import DEFAULT_PCL, MAX_SEED, ProfileConfig, validate  # noqa: F401 (the library API)
from dam_cli.progress import NullReporter, Reporter
from dam_cli.text import human_bytes


@dataclass
class ProfileResult:
    profile: Profile
    output: str
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def working_bytes(n_layers: int, n_heads: int, L: int) -> int:
    """About the peak memory of deriving a profile: one layer's sums and masks, plus the whole output."""
    layer = n_heads * L * L * (4 + 1 + 1) + 48 * L * L  # sums, true mask, packing; one head's float64 work
    return layer + n_layers * n_heads * (L * ((L + 7) // 8) + 10 * L + 24)


def check_memory(n_layers: int, n_heads: int, L: int, source: str, fix: str = "lower --pcl") -> None:
    """Refuse, before allocating, a derivation that would need more memory than is available."""
    need, have = working_bytes(n_layers, n_heads, L), available_memory()
    if have is not None and need > have:
        raise DamError(f"{source} needs about {human_bytes(need)} of memory to derive masks ({n_layers} layers "
                       f"x {n_heads} heads, PCL {L}), more than the {human_bytes(have)} available: {fix}, "
                       "or use a machine with more memory")


def recipe_of(cfg: ProfileConfig, L: int, needle_length: int = 0) -> dict[str, Any]:
    """The recipe stored in the profile: options that change the masks, plus the seed."""
    r: dict[str, Any] = {"pcl": L, "tau": float(cfg.tau), "lam": float(cfg.lam), "mu": float(cfg.mu),
                         "eps": float(cfg.eps), "seed": int(cfg.seed), "variant": "faithful"}
    if cfg.min_support != 1:
        r["min_support"] = int(cfg.min_support)
        r["variant"] = "options"
    if cfg.pattern_mass is not None:
        r["pattern_mass"] = float(cfg.pattern_mass)
        r["variant"] = "options"
    if cfg.local_window:
        r["local_window"] = int(cfg.local_window)
        r["variant"] = "options"
    if cfg.retrieval_heads:
        r["retrieval_heads"] = int(cfg.retrieval_heads)
        r["variant"] = "options"
        if cfg.retrieval_by == "needle":
            r["retrieval_by"] = "needle"
            r["needle_length"] = int(needle_length)
            r["needle_samples"] = int(cfg.needle_samples)
    return r


def derive_layer(attn_sum: torch.Tensor, cnt: torch.Tensor, cfg: ProfileConfig):
    """Stage 1 for every head of one layer.

    Returns (M [H,L,L], R [H,L], C [H,L], mass kept by M [H], mass kept by the patterns [H]).
    With `pattern_mass`, R and C are chosen by mass instead of by matching, and M also holds
    the pattern cells, so a head follows one rule inside and beyond L. With `local_window` W,
    every head also keeps offsets 0 .. W-1 and the same band of M (`masks.add_local_window`).
    """
    H, L, _ = attn_sum.shape
    tm = torch.zeros(H, L, L, dtype=torch.bool)
    off = torch.zeros(H, L, dtype=torch.bool)
    col = torch.zeros(H, L, dtype=torch.bool)
    kept = torch.zeros(H, dtype=torch.float64)
    pkept = torch.zeros(H, dtype=torch.float64)
    options = cfg.pattern_mass is not None or bool(cfg.retrieval_heads) or bool(cfg.local_window)
    for h in range(H):
        abar = masks.mean_attention(attn_sum[h], cnt, cfg.eps) if options else None  # computed once per head
        tm[h], off[h], col[h], kept[h] = masks.derive_head(attn_sum[h], cnt, cfg.lam, cfg.tau, cfg.mu,
                                                           cfg.eps, cfg.min_support, mean_attn=abar)
        if options:
            if cfg.pattern_mass is not None:
                off[h], col[h] = masks.select_patterns_by_mass(abar, cfg.pattern_mass, cfg.min_support)
                tm[h] |= masks.pattern_cells(L, off[h], col[h])
            if cfg.local_window:
                tm[h], off[h] = masks.add_local_window(tm[h], off[h], cfg.local_window)
            pkept[h] = masks.pattern_mass_kept(abar, off[h], col[h])
    return tm, off, col, kept, pkept


@dataclass
class LayerMasks:
    """What Stage 1 derives for one layer: the packed true masks, offsets, columns and statistics."""

    layer: int
    packed: torch.Tensor  # [H, L, ceil(L/8)] uint8
    offsets: torch.Tensor  # [H, L] bool
    columns: torch.Tensor  # [H, L] bool
    kept: torch.Tensor  # [H] float64: mass kept by M
    pattern_kept: torch.Tensor  # [H] float64: mass kept by the patterns
    true_density: torch.Tensor  # [H]
    diag_score: torch.Tensor  # [H, L]
    col_score: torch.Tensor  # [H, L]
    sums: torch.Tensor | None = None  # [H, L, L]: kept only to send to a capture file on another rank


def derive_layer_masks(layer: int, s: torch.Tensor, cnt: torch.Tensor, cfg: ProfileConfig) -> LayerMasks:
    """Stage 1 of one layer's sums (`derive_layer`), packed with its statistics."""
    if not bool(torch.isfinite(s).all()):
        raise DamError(f"the model's attention in layer {layer} holds NaN or Inf: its weights hold NaN or Inf (a "
                       "damaged checkpoint?), or its dtype overflows; check the weights, or profile in float32")
    tm, off, col, kp, pk = derive_layer(s, cnt, cfg)
    st = default_stats(tm[None], off[None], col[None], kp[None])
    return LayerMasks(layer=layer, packed=pack_bits(tm), offsets=off, columns=col, kept=kp, pattern_kept=pk,
                      true_density=st["stats.true_density"][0], diag_score=st["stats.diag_score"][0],
                      col_score=st["stats.col_score"][0])


def run_profile(cfg: ProfileConfig, reporter: Reporter | None = None, *, ranks=None) -> ProfileResult | None:
    """Make a profile as `cfg` says and save it atomically; return it with a summary.

    With `cfg.nproc` > 1, or under torchrun, the work is shared by several processes
    (`dam_cli.profiling.sharded`) and rank 0 writes the same file one process would; other ranks
    return None. `ranks` is given by `dam_cli.distributed` to each process of such a run.
    """
    from dam_cli import distributed

    validate(cfg)
    if ranks is None and cfg.nproc > 1:
        _check_room_for_ranks(cfg)
        return distributed.launch(cfg.nproc, _run_rank, cfg, main_kwargs={"reporter": reporter})
    if ranks is None and distributed.requested_world() > 1:
        ranks = distributed.from_env()
        try:
            return _run_rank(cfg, reporter if ranks.is_main else None, ranks=ranks)
        finally:
            distributed.leave(ranks)
    return _run_rank(cfg, reporter, ranks=ranks)


def _check_room_for_ranks(cfg: ProfileConfig) -> None:
    """Refuse `--nproc N` on the CPU when N whole-model loads would not fit in memory (each process loads one)."""
    import torch

    on_cpu = cfg.device.lower() == "cpu" or (cfg.device.lower() == "auto" and not torch.cuda.is_available())
    if not on_cpu or cfg.from_capture:
        return
    from dam_cli.profiling.streaming import weights_too_large

    sizes = weights_too_large(cfg.model, NullReporter(), copies=cfg.nproc)
    if sizes is not None:
        raise DamError(f"--nproc {cfg.nproc} loads the model once per process, {human_bytes(sizes[0])} of float32 "
                       f"weights in all, more than the {human_bytes(sizes[1])} of memory available: use fewer "
                       "processes (or --stream in one)")


def _run_rank(cfg: ProfileConfig, reporter: Reporter | None = None, *, ranks=None) -> ProfileResult | None:
    """One process's share of `run_profile` (all of it when `ranks` is None)."""
    import time

    from dam_cli.numerics import settle_cpu_numerics
    from dam_cli.profiling import sharded
    from dam_cli.profiling.sources import profile_sources

    settle_cpu_numerics()  # MKL's reproducible mode, and its first call spent on a product we drop
    main = ranks is None or ranks.is_main
    reporter = reporter if (reporter is not None and main) else NullReporter()
    if ranks is not None and main:
        n = ranks.world
        work = "" if cfg.from_capture else f"captures windows r, r + {n}, ... and "
        reporter.log(f"{n} processes: rank r {work}derives layers r, r + {n}, ...; rank 0 writes the profile")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    src = profile_sources(cfg, reporter, ranks, t0)
    identity, L = src.identity, src.L
    NL, H = int(identity["n_layers"]), int(identity["n_heads"])
    writer = None
    if cfg.save_capture and main:
        from dam_cli.profiling.capture_file import CaptureWriter

        if src.room:
            reporter.log(src.room)
        writer = CaptureWriter(cfg.save_capture, {"model": identity, "calibration": src.calib_info, "pcl": L},
                               src.lengths, L, H, force=cfg.force)
    packed = torch.zeros(NL, H, L, (L + 7) // 8, dtype=torch.uint8)
    offsets = torch.zeros(NL, H, L, dtype=torch.bool)
    columns = torch.zeros(NL, H, L, dtype=torch.bool)
    kept = torch.zeros(NL, H, dtype=torch.float64)
    pattern_kept = torch.zeros(NL, H, dtype=torch.float64)
    true_density = torch.zeros(NL, H, dtype=torch.float32)
    dscore = torch.zeros(NL, H, L, dtype=torch.float32)
    cscore = torch.zeros(NL, H, L, dtype=torch.float32)

    def place(m: LayerMasks) -> None:
        if writer is not None:
            writer.write_layer(m.layer, m.sums)
        packed[m.layer], offsets[m.layer], columns[m.layer] = m.packed, m.offsets, m.columns
        kept[m.layer], pattern_kept[m.layer], true_density[m.layer] = m.kept, m.pattern_kept, m.true_density
        dscore[m.layer], cscore[m.layer] = m.diag_score, m.col_score

    ok = False
    try:
        owned = NL if ranks is None else len(sharded.owned_layers(NL, ranks))
        mine: list[LayerMasks] = []
        with reporter.task("deriving masks per layer" + ("" if ranks is None else " (rank 0's share)"),
                           owned) as task:
            for layer, s in src.layer_sums:
                m = derive_layer_masks(layer, s, cnt=src.cnt, cfg=cfg)
                m.sums = s if cfg.save_capture else None
                del s
                if ranks is None:
                    place(m)
                else:
                    mine.append(m)
                task.advance()
        if ranks is not None:
            for m in sharded.gather_layers(ranks, mine, NL):
                place(m)
        ok = True
    finally:
        if writer is not None:
            writer.close(ok)
        if src.reader is not None:
            src.reader.close()
    if not main:
        return None
    meta = ProfileMeta(model=identity, recipe=recipe_of(cfg, L, src.needle_length), calibration=src.calib_info,
                       runtime=cfg.runtime)
    stats = {"stats.true_density": true_density, "stats.mass_kept": kept.float(),
             "stats.diag_score": dscore, "stats.col_score": cscore}
    full_heads = None
    if cfg.retrieval_heads and src.needle_score is not None:
        from dam_cli.profiling.needle import choose_top

        stats["stats.needle_score"] = src.needle_score.clamp(0, 1)
        full_heads = choose_top(src.needle_score, cfg.retrieval_heads)
    elif cfg.retrieval_heads:
        full_heads = choose_retrieval_heads(pattern_kept, cfg.retrieval_heads)
    prof = Profile(meta=meta, true_mask_packed=packed, offsets=offsets, columns=columns, stats=stats,
                   full_heads=full_heads)
    save_profile(prof, cfg.output, force=cfg.force)
    prof.path = cfg.output
    return ProfileResult(profile=prof, output=cfg.output, seconds=time.perf_counter() - t0,
                         summary=summarise(prof))


def choose_retrieval_heads(pattern_kept: torch.Tensor, budget: int) -> torch.Tensor:
    """The `budget` heads whose patterns keep the least attention mass: bool `[N_L, H]`.

    Ties go to the earlier (layer, head), so the choice is deterministic.
    """
    from dam_cli.profiling.needle import choose_top

    return choose_top(-pattern_kept, budget)


def summarise(p: Profile) -> dict[str, Any]:
    """Per-layer density of the true mask, matched offsets and columns, and the totals."""
    td = p.stats["stats.true_density"].double()
    layers = []
    for layer in range(p.n_layers):
        layers.append({
            "layer": layer,
            "true_density": round(float(td[layer].mean()), 6),
            "offsets_mean": round(float(p.offsets[layer].sum(-1).double().mean()), 4),
            "columns_mean": round(float(p.columns[layer].sum(-1).double().mean()), 4),
            "mass_kept": round(float(p.stats["stats.mass_kept"][layer].double().mean()), 6),
        })
    return {
        "model": p.meta.model.get("name"),
        "shape": {"layers": p.n_layers, "heads": p.n_heads, "kv_heads": p.meta.n_kv_heads,
                  "head_dim": p.meta.head_dim},
        "recipe": p.meta.recipe,
        "calibration": p.meta.calibration,
        "true_density": round(float(td.mean()), 6),
        "offsets_per_head": round(float(p.offsets.sum(-1).double().mean()), 4),
        "columns_per_head": round(float(p.columns.sum(-1).double().mean()), 4),
        "layers": layers,
    }

"""Tensor-parallel DAM: which attention heads this process holds, and the profile of those heads.

transformers' `from_pretrained(..., tp_plan="auto")` under torchrun shards every attention layer over the
ranks of its tensor-parallel mesh (the q/k/v projections by output rows, `o_proj` by input columns): rank
`r` of `N` holds query heads `r*H/N .. (r+1)*H/N - 1` and kv heads `r*Hkv/N .. (r+1)*Hkv/N - 1`, so its
attention function receives q `[B, H/N, S, D]` and k, v `[B, Hkv/N, S, D]`. `enable_dam` checks the
profile against the model's global identity, then keeps the rank's slice of it (`local_profile`): every
kernel and reference call sees the masks of exactly the heads it computes.

The sharding is read off the weights (DTensors with a `Shard` placement on the mesh, public torch API),
with transformers' private `_tp_size` / `_device_mesh` as the fallback. Nothing here touches a forward.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from dam_cli.distributed import group_ready, launched_rank, requested_world
from dam_cli.errors import DamError, DamUsageError

TP_DIM_NAME = "tp"  # the mesh dimension transformers names for tensor parallelism
LAUNCH_HINT = "torchrun --nproc-per-node N \"$(command -v dam)\" generate --tp ..."


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """This process's place among the `size` tensor-parallel ranks that split the attention heads."""

    rank: int
    size: int

    def heads(self, n: int) -> slice:
        """The slice of `n` heads (query or kv) this rank holds: an even, contiguous split."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


# ---- the launcher ---------------------------------------------------------------------------------------------------

def launched_world() -> int:
    """The processes of this run: the initialized process group's size, else torchrun's WORLD_SIZE (0: neither)."""
    if group_ready():
        import torch.distributed as dist

        return dist.get_world_size()
    return requested_world() if os.environ.get("WORLD_SIZE") else 0


def require_launcher(what: str = "--tp", error: type[DamError] = DamUsageError) -> int:
    """The run's process count, or `error` when no launcher (torchrun) started this process."""
    world = launched_world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if world < 1 or (missing and not group_ready()):
        raise error(f"{what} splits the model over the processes torchrun starts, and this process was not started "
                    f"by torchrun (no {'WORLD_SIZE' if world < 1 else ', '.join(missing)}): run `{LAUNCH_HINT}`")
    return world


def tp_load_kwargs(tp_plan: str | None) -> dict[str, Any]:
    """The `from_pretrained` keywords of a tensor-parallel load (`{}` without `tp_plan`).

    `DistributedConfig(tp_plan=...)` where transformers has it (5.x; the bare `tp_plan=` keyword is deprecated
    there), else the keyword itself. Refuses (DamError) when no launcher started this process.
    """
    if tp_plan is None:
        return {}
    require_launcher(f"tp_plan={tp_plan!r}", DamError)
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}


# ---- the model's sharding -------------------------------------------------------------------------------------------

def check_split(n_heads: int, n_kv_heads: int, size: int) -> None:
    """DamError unless `n_heads` query heads and `n_kv_heads` kv heads both split evenly over `size` ranks."""
    if size > 1 and (n_heads % size or n_kv_heads % size):
        fits = [n for n in range(2, math.gcd(n_heads, n_kv_heads) + 1) if math.gcd(n_heads, n_kv_heads) % n == 0]
        fix = (f"run torchrun with --nproc-per-node {' or '.join(map(str, fits))}" if fits
               else "this model cannot be split by heads: run it in one process")
        raise DamError(f"this model's {n_heads} attention heads and {n_kv_heads} kv heads do not split evenly over "
                       f"{size} tensor-parallel ranks: {fix}")


def head_shard(model) -> HeadShard | None:
    """How `model`'s attention heads are split over tensor-parallel ranks; None when each process holds them all.

    Read off the first sharded parameter of an attention module (a DTensor with a `Shard` placement: the mesh
    gives rank and size; DTensors without one: not split); without DTensors, transformers' private `_tp_size`
    and `_device_mesh`.
    """
    distributed = False  # whether the attention weights are DTensors: then they alone tell
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        for param in module.parameters():
            distributed = distributed or getattr(param, "placements", None) is not None
            shard = _shard_of(param)
            if shard is not None:
                return shard if shard.size > 1 else None
    size = 1 if distributed else int(getattr(model, "_tp_size", None) or 1)
    return HeadShard(rank=_fallback_rank(model, size), size=size) if size > 1 else None


def _shard_of(param) -> HeadShard | None:
    """(rank, size) along the tensor-parallel mesh dimension on which a DTensor parameter is sharded, or None."""
    mesh, placements = getattr(param, "device_mesh", None), getattr(param, "placements", None)
    if mesh is None or placements is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    for dim, placement in enumerate(placements):
        tp_dim = names[dim] == TP_DIM_NAME if names else mesh.ndim == 1
        if tp_dim and placement.is_shard():
            return HeadShard(rank=int(mesh.get_local_rank(dim)), size=int(mesh.size(dim)))
    return None


def _fallback_rank(model, size: int) -> int:
    mesh = getattr(model, "_device_mesh", None)
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if TP_DIM_NAME in names:
        return int(mesh[TP_DIM_NAME].get_local_rank())
    return launched_rank() % size


# ---- the profile of this rank's heads -------------------------------------------------------------------------------

def profile_slice(profile, shard: HeadShard):
    """The profile of the heads `shard` holds: masks, offsets, columns, statistics and retrieval heads of query
    heads `shard.heads(H)` only, `meta.model` counting the local heads and kv heads. Same recipe and path."""
    from dam_cli.artifact.profile import Profile

    H, Hkv = profile.n_heads, profile.meta.n_kv_heads
    check_split(H, Hkv, shard.size)
    heads = shard.heads(H)

    def local(t):
        return t[:, heads].clone() if t is not None and t.dim() >= 2 and t.shape[1] == H else t

    model = {**profile.meta.model, "n_heads": H // shard.size, "n_kv_heads": Hkv // shard.size}
    return Profile(meta=dataclasses.replace(profile.meta, model=model),
                   true_mask_packed=local(profile.true_mask_packed), offsets=local(profile.offsets),
                   columns=local(profile.columns), stats={k: local(v) for k, v in profile.stats.items()},
                   path=profile.path, full_heads=local(profile.full_heads))


def local_profile(model, profile):
    """`profile` as this process runs it: the rank's head slice for a head-sharded model, else itself."""
    shard = head_shard(model)
    return profile if shard is None else profile_slice(profile, shard)

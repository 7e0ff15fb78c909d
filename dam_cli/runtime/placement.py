"""Where a generation run's model lives: on one device (`--device`), split by heads over torchrun's processes
(`--tp`), or spread by layers over the devices (`--device-map`): the option checks made before anything loads, the
`load_model` keywords, the device the model's inputs go to once it is placed, and the peak memory of the devices
it is on.

Module-level imports: none beyond dam_cli's errors (the CLI checks options before torch loads).
"""

from __future__ import annotations

from typing import Any

from dam_cli.errors import DamUsageError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies from_pretrained takes


def check_placement(cfg) -> None:
    """Refuse `--tp` / `--device-map` combinations that cannot work (`DamUsageError`, naming the flags).

    `cfg` is a GenerateConfig (or anything with `tp`, `device_map`, `device` and `cuda_graph`).
    """
    tp, device_map = bool(getattr(cfg, "tp", False)), getattr(cfg, "device_map", None)
    if not tp and device_map is None:
        return
    if tp and device_map is not None:
        raise DamUsageError("--tp and --device-map both place the model: give one of them")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise DamUsageError(f"unknown --device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
    flag = "--tp" if tp else f"--device-map {device_map}"
    if (cfg.device or "auto").lower() != "auto":
        raise DamUsageError(f"{flag} places the model itself (each rank on its own GPU, or the CPU without one): "
                            f"drop --device {cfg.device}")
    if cfg.cuda_graph:
        why = "does not run tensor-parallel yet" if tp else "captures one device, and the layers sit on several"
        raise DamUsageError(f"--cuda-graph {why}: drop --cuda-graph or {flag}")
    if tp:
        from dam_cli.runtime.tensor_parallel import require_launcher

        require_launcher("--tp")


def placement_kwargs(cfg) -> dict[str, Any]:
    """The `load_model` keywords that place the model as `cfg` asks (`{}`: on `cfg.device`)."""
    if getattr(cfg, "tp", False):
        return {"tp_plan": "auto"}
    device_map = getattr(cfg, "device_map", None)
    return {"device_map": device_map} if device_map is not None else {}


def input_device(model) -> str:
    """The device a placed model's input ids go to: its input embedding's (the first layer of a split model,
    this rank's device under tensor parallelism)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if weight is not None else model.device
    # "meta": an embedding offloaded to disk, which accelerate's hook brings to its device together with the ids
    return "cpu" if device.type in ("cpu", "meta") else str(device)


def cuda_devices(model) -> list:
    """The CUDA devices holding `model`'s parameters (one for a model on one GPU or a rank's shard; several for a
    model spread by `--device-map`), in index order; none on the CPU."""
    found = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return sorted(found, key=lambda d: d.index or 0)


def reset_peak_memory(model) -> None:
    """Start the peak-memory count of every CUDA device `model` is on (after its work so far has finished)."""
    import torch

    for device in cuda_devices(model):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(model) -> tuple[int, str]:
    """(bytes, what they count): the sum of the CUDA devices' peak allocations since `reset_peak_memory`, or the
    process's peak resident memory for a model on the CPU."""
    devices = cuda_devices(model)
    if devices:
        import torch

        return sum(int(torch.cuda.max_memory_allocated(d)) for d in devices), "cuda max allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu peak rss"

"""What Stage 1 of `dam profile` reads, on this rank: a model's captured attention, or a capture file.

`profile_sources` loads the model (whole, or streamed one layer at a time), captures this rank's
calibration windows, scores heads on needle prompts, and hands `run.py` an iterator of each layer's
attention sums; with `--from-capture` it opens the capture instead. With several ranks, the captured
queries and keys go to each layer's owner first (`sharded.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dam_cli import masks
from dam_cli.errors import DamError, DamUsageError
from dam_cli.profiling.config import DEFAULT_PCL, ProfileConfig
from dam_cli.profiling.run import check_memory
from dam_cli.text import safe_text


@dataclass
class Sources:
    """What the model (or a capture) gives Stage 1 on this rank."""

    identity: dict[str, Any]
    L: int
    calib_info: dict[str, Any]
    cnt: torch.Tensor
    layer_sums: Any  # iterator of (layer, sums [H, L, L]) over the layers this rank derives
    needle_score: torch.Tensor | None = None  # [N_L, H] on rank 0 (None without needle scoring)
    needle_length: int = 0
    room: str | None = None  # the capture file's size estimate, for the log
    lengths: list[int] = field(default_factory=list)
    reader: Any = None  # a CaptureReader to close


def profile_sources(cfg: ProfileConfig, reporter, ranks, t0: float) -> Sources:
    """Load the model and capture (this rank's windows), or open the capture file; score needles."""
    import time

    from dam_cli.profiling import sharded

    if cfg.from_capture:
        from dam_cli.artifact.integrity import identity_matches
        from dam_cli.profiling.capture_file import CaptureReader
        from dam_cli.progress import note

        reader = CaptureReader(cfg.from_capture)
        identity = reader.meta["model"]
        L = int(reader.meta["pcl"])
        check_memory(int(identity["n_layers"]), int(identity["n_heads"]), L,
                     f"the capture {safe_text(cfg.from_capture)}", "capture again with a lower --pcl")
        _check_retrieval_heads(cfg, identity)
        if not identity_matches(identity):  # a profile of it would fail `dam inspect --check`
            raise DamError(f"the capture {safe_text(cfg.from_capture)}: its model's fields do not hash to its "
                           "config_sha256, so the header was edited or damaged; capture again with --save-capture")
        if cfg.pcl is not None and cfg.pcl != L:
            note(reporter, f"using the capture's PCL {L} (--pcl {cfg.pcl} ignored)")
        unused = [f for f, v in (("--model", cfg.model), ("--calib", cfg.calib),
                                 (f"--samples {cfg.samples}", cfg.samples != type(cfg).samples),
                                 (f"--device {cfg.device}", cfg.device.lower() != type(cfg).device)) if v]
        if unused:  # the capture holds one model's sums over its own calibration text; nothing runs on a device
            note(reporter, f"using the capture's model ({safe_text(identity.get('name', '?'))}) and calibration "
                 f"sums ({', '.join(unused)} ignored)")
        only = None if ranks is None else sharded.owned_layers(int(identity["n_layers"]), ranks)
        return Sources(identity=identity, L=L, calib_info=reader.meta["calibration"],
                        cnt=masks.position_counts(reader.lengths, L), layer_sums=reader.layers(only),
                        reader=reader)

    from dam_cli.profiling.calib import load_calibration
    from dam_cli.profiling.capture import capture_qk, layer_attention_sum
    from dam_cli.runtime.models import load_model, resolve_device

    device = resolve_device(cfg.device if ranks is None else ranks.device(cfg.device))
    what = safe_text(cfg.model) if cfg.model else ("the embedded SmolLM2-135M-Instruct (the first run converts "
                                                   "its GGUF once: about 25 s)")
    stream = cfg.stream or (cfg.device_map is None and _too_large_to_load(cfg.model, reporter))
    if stream and ranks is not None:
        raise DamError("the model's float32 weights would not fit in memory, so it must be streamed one layer at "
                       "a time, which one process does: drop --nproc (or torchrun)")
    where = f"spread over the devices ({cfg.device_map})" if cfg.device_map else f"on {device}"
    reporter.log(f"loading {what} {where}" + (" without its weights (streamed)" if stream else ""))
    if stream:
        from dam_cli.profiling.streaming import open_streamed

        lm = open_streamed(cfg.model, reporter)
    else:
        lm = load_model(cfg.model, device=device, dtype=torch.float32, device_map=cfg.device_map, reporter=reporter)
        if cfg.device_map is not None:  # the ids go where the first layer is; each layer runs where it sits
            from dam_cli.runtime.placement import input_device

            device = input_device(lm.model)
    identity = lm.identity
    L = cfg.pcl or DEFAULT_PCL
    if identity["max_position"] and L > identity["max_position"]:
        raise DamUsageError(f"--pcl {L} is above the model's context of {identity['max_position']} tokens: "
                            f"use --pcl {identity['max_position']} or less")
    check_memory(int(identity["n_layers"]), int(identity["n_heads"]), L, f"--pcl {L} with this model")
    _check_retrieval_heads(cfg, identity)
    room = None
    if cfg.save_capture and (ranks is None or ranks.is_main):
        from dam_cli.profiling.capture_file import check_room

        room = check_room(cfg.save_capture, identity["n_layers"], identity["n_heads"], L)  # before the run
    reporter.log(f"loaded {safe_text(identity.get('name'))} ({identity['n_layers']} layers x "
                 f"{identity['n_heads']} heads) in {time.perf_counter() - t0:.1f} s; reading the calibration text")
    calib = load_calibration(lm.tokenizer, list(cfg.calib), L, cfg.samples, cfg.text_field)
    if len(calib.windows) < cfg.samples:
        reporter.log(f"note: the calibration text gave {len(calib.windows)} windows, "
                     f"fewer than --samples {cfg.samples}")
    needle_length = 0
    if cfg.retrieval_by == "needle":
        needle_length = cfg.needle_length or 4 * L
        if identity["max_position"] and needle_length > identity["max_position"]:
            needle_length = identity["max_position"]
            if cfg.needle_length:
                reporter.log(f"note: --needle-length {cfg.needle_length:,} is beyond the model's context: needle "
                             f"prompts of {needle_length:,} tokens")
    src = Sources(identity=identity, L=L, calib_info=calib.describe(), cnt=masks.position_counts(calib.lengths, L),
                   layer_sums=None, needle_length=needle_length, room=room, lengths=list(calib.lengths))
    NL = int(identity["n_layers"])
    if stream:
        from dam_cli.profiling.streaming import needle_prompts_of, stream_layer_sums

        needles = needle_prompts_of(lm.tokenizer, cfg, needle_length) if needle_length else []
        src.needle_score = torch.zeros(NL, int(identity["n_heads"])) if needles else None
        src.layer_sums = stream_layer_sums(lm, calib.windows, needles, L, device, reporter, src.needle_score)
        return src
    mine = list(range(len(calib.windows))) if ranks is None else sharded.owned_windows(len(calib.windows), ranks)
    with reporter.task("capturing samples", len(mine)) as task:
        cap = capture_qk(lm.model, [calib.windows[i] for i in mine], device, on_sample=lambda i: task.advance())
    if needle_length:
        src.needle_score = score_needles(lm, cfg, needle_length, device, reporter, ranks)
    del lm
    if ranks is None:
        qk = {layer: (cap.q[layer], cap.k[layer], cap.scaling[layer], cap.windows[layer], cap.softcaps[layer])
              for layer in range(NL)}
    else:
        qk = sharded.exchange_qk(ranks, cap, mine, NL)

    def sums():
        for layer in sorted(qk):
            q, k, scale, window, softcap = qk.pop(layer)  # free what this layer no longer needs
            yield layer, layer_attention_sum(q, k, scale, L, window=window, softcap=softcap)

    src.layer_sums = sums()
    return src


def _too_large_to_load(spec: str | None, reporter) -> bool:
    """True, with a log line saying so, when the model's float32 weights would not fit in available memory."""
    from dam_cli.profiling.streaming import stream_note, weights_too_large

    sizes = weights_too_large(spec, reporter)
    if sizes is not None:
        reporter.log(stream_note(*sizes))
    return sizes is not None


def score_needles(lm, cfg: ProfileConfig, length: int, device: str, reporter, ranks=None) -> torch.Tensor | None:
    """Needle score of every head, float32 `[N_L, H]`: the mean over `cfg.needle_samples` prompts
    of `needle.needle_scores` (dam_cli/needle.py), from the calibration text. With `ranks`, each rank
    scores prompts r, r + N, ... and rank 0 adds them up in prompt order (others get None)."""
    from dam_cli.profiling import sharded
    from dam_cli.profiling.calib import documents
    from dam_cli.profiling.capture import capture_qk
    from dam_cli.profiling.needle import needle_prompts, needle_scores

    docs, _ = documents(list(cfg.calib), cfg.text_field)
    prompts = needle_prompts(lm.tokenizer, docs, length, cfg.needle_samples)
    NL, H = int(lm.identity["n_layers"]), int(lm.identity["n_heads"])
    mine = list(range(len(prompts))) if ranks is None else sharded.owned_windows(len(prompts), ranks)
    scores: dict[int, list[torch.Tensor]] = {}
    with reporter.task("scoring heads on needle prompts", len(mine)) as task:
        for i in mine:
            p = prompts[i]
            cap = capture_qk(lm.model, [p.ids], device)
            scores[i] = [needle_scores(cap.q[layer][0], cap.k[layer][0], cap.scaling[layer], p.needle, p.rows,
                                       window=cap.windows[layer], softcap=cap.softcaps[layer]) for layer in range(NL)]
            del cap
            task.advance()
    if ranks is not None:
        scores = sharded.gather_by_index(ranks, scores)
        if scores is None:
            return None
    total = torch.zeros(NL, H, dtype=torch.float64)
    for i in range(len(prompts)):  # prompt order: the same float64 sums as one process
        for layer in range(NL):
            total[layer] += scores[i][layer]
    return (total / len(prompts)).float()


def _check_retrieval_heads(cfg, identity: dict) -> None:
    """`DamUsageError` for more --retrieval-heads, given by the user, than the model has heads (all would be dense).
    A recipe's own count (16 in the recommended one) is left as it is on a model with fewer heads."""
    heads = int(identity["n_layers"]) * int(identity["n_heads"])
    if cfg.retrieval_heads_given and cfg.retrieval_heads > heads:
        raise DamUsageError(f"--retrieval-heads {cfg.retrieval_heads} is more than the model's {heads} heads "
                            f"({identity['n_layers']} layers x {identity['n_heads']}): give at most {heads}")

"""The methods `dam eval` compares: a registry of profile builders and the switch that puts a model on one.

`METHOD_BUILDERS` maps a method name to `builder(ctx, length) -> Profile` (None: full attention);
`method_active` runs a block with the model on that method's attention and restores the model after.
New methods plug in by adding a builder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dam_cli.errors import DamError
from dam_cli.evaluation import baselines
from dam_cli.evaluation.config import EvalConfig, uses_reference


@dataclass
class _Context:
    """What method builders may read: the DAM profile and per-length caches."""

    profile: Any
    identity: dict
    config: EvalConfig
    density: dict[int, float] = field(default_factory=dict)  # length -> DAM mean density
    streaming: dict[int, Any] = field(default_factory=dict)  # length -> StreamingLLM profile
    options_density: dict[int, float] = field(default_factory=dict)
    streaming_options: dict[int, Any] = field(default_factory=dict)
    streaming_options_dynamic: dict[int, Any] = field(default_factory=dict)
    # (method, length) -> measured density of a dynamic method (`_DensityProbe.summary`).
    measured: dict[tuple[str, int], dict] = field(default_factory=dict)
    # (id(profile), length, layer, window) -> static cells per (query block, key block), `static_block_counts`.
    static_blocks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    # measure(method, length): one forward of `method` on the held-out window through the probe.
    measure: Callable[[str, int], None] | None = None

    def dam_density(self, length: int) -> float:
        if length not in self.density:
            self.density[length] = float(self.profile.density(length).mean())
        return self.density[length]

    def options_dam_density(self, length: int) -> float:
        if length not in self.options_density:
            self.options_density[length] = float(self.config.options_profile.density(length).mean())
        return self.options_density[length]

    def dynamic_density(self, method: str, length: int) -> float:
        """Measured mean density of dynamic `method` at `length` (one probe forward if not yet measured)."""
        if (method, length) not in self.measured and self.measure is not None:
            self.measure(method, length)
        if (method, length) not in self.measured:
            raise DamError(f"the density of {method} at {length} tokens was not measured")
        return self.measured[(method, length)]["density"]

    def static_block_counts(self, profile, layer: int, length: int, window: int | None = None) -> torch.Tensor:
        """Static cells of `profile`'s layer per block pair of the dynamic selection, cached; in a sliding-window
        layer (`window`) only those inside the window, the cells the kernels compute (a full head's row is its
        window, not every causal key)."""
        from dam_kernels.pair_counts import static_block_counts

        key = (id(profile), length, layer, window)
        if key not in self.static_blocks:
            def rows_of(rows: torch.Tensor, n: int) -> torch.Tensor:
                m = profile.mask_rows(layer, rows, n)
                return m if window is None else m & (rows[:, None] - torch.arange(n)[None, :] < window)

            self.static_blocks[key] = static_block_counts(rows_of, length, self.config.dynamic.block)
        return self.static_blocks[key]


def _build_dam(ctx: _Context, length: int):
    return ctx.profile


def _matched_streaming(ctx: _Context, cache: dict, length: int, target: Callable[[], float]):
    """The StreamingLLM profile whose density matches `target()` at `length`, cached per length."""
    if length not in cache:
        goal = min(1.0, target())
        w = baselines.matched_window(length, goal, ctx.config.sink)
        cache[length] = baselines.streaming_profile(ctx.identity, sink=ctx.config.sink, window=w,
                                                    length=length, target_density=goal)
    return cache[length]


def _build_streaming(ctx: _Context, length: int):
    return _matched_streaming(ctx, ctx.streaming, length, lambda: ctx.dam_density(length))


def _build_options(ctx: _Context, length: int):
    return ctx.config.options_profile


def _build_streaming_options(ctx: _Context, length: int):
    return _matched_streaming(ctx, ctx.streaming_options, length, lambda: ctx.options_dam_density(length))


def _build_streaming_options_dynamic(ctx: _Context, length: int):
    """StreamingLLM at the measured density of dam-options-dynamic (on the held-out window at `length`)."""
    return _matched_streaming(ctx, ctx.streaming_options_dynamic, length,
                              lambda: ctx.dynamic_density("dam-options-dynamic", length))


# name -> builder(ctx, length) -> Profile for the backend, or None for full attention.
# Beyond-paper comparisons: "dam-options" is the profile given with --options-profile,
# "streaming-options" a StreamingLLM baseline at its density, and the "-dynamic" methods add the
# top-k key blocks per query block (`dam_kernels.dynamic`) to dam or dam-options.
METHOD_BUILDERS: dict[str, Callable[[_Context, int], Any] | None] = {
    "full": None,
    "dam": _build_dam,
    "streaming": _build_streaming,
    "dam-options": _build_options,
    "streaming-options": _build_streaming_options,
    "dam-dynamic": _build_dam,
    "dam-options-dynamic": _build_options,
    "streaming-options-dynamic": _build_streaming_options_dynamic,
}


def method_topk(ctx: _Context, method: str) -> int:
    """Top-k key blocks of the dynamic part for `method` (0: static mask only).

    Only the DAM methods get the dynamic part: `streaming-options-dynamic` is plain StreamingLLM
    (sink + window), matched to the density of `dam-options-dynamic`.
    """
    return ctx.config.dynamic.topk if method.startswith("dam") and method.endswith("-dynamic") else 0


def dynamic_extra_density(length: int, topk: int, block: int, tail_topk: int | None = None) -> float:
    """Upper bound of the share of causal pairs the dynamic part adds at `length` (overlap with
    the static mask ignored): each row of query block `qb` gets `min(topk, qb)` whole blocks
    (`min(tail_topk, qb)` in the last query block when `tail_topk` is given)."""
    rows = torch.arange(length)
    k_row = torch.full((length,), topk)
    if tail_topk is not None:
        k_row[rows // block == (length - 1) // block] = tail_topk
    extra = torch.minimum(rows // block, k_row) * block
    return float(extra.sum()) / (length * (length + 1) / 2)


@contextlib.contextmanager
def method_active(model, method: str, ctx: _Context, length: int, device: str,
                  measure: bool = False) -> Iterator[None]:
    """Run the body with `model` on `method`'s attention at `length`; restore the model after.

    `measure` (dynamic methods): count the pairs the method allows in the body's prefill of
    `length` tokens and store the measured density in `ctx.measured[(method, length)]`.
    """
    from dam_cli.evaluation import probes  # probes imports this module
    from dam_cli.runtime import backend

    build = METHOD_BUILDERS[method]
    probe = None
    if build is None:
        if uses_reference(ctx.config, device):
            with probes.full_reference(model):
                yield
            return
        backend.enable_dense(model)
    else:
        prof = build(ctx, length)
        topk = method_topk(ctx, method)
        # Where `full` runs the reference, so does DAM (not the CPU gathered path): the same arithmetic on both sides.
        kernels = "reference" if uses_reference(ctx.config, device) else ctx.config.backend
        backend.enable_dam(model, prof, backend=kernels, dynamic=ctx.config.dynamic if topk else None)
        if measure and topk:
            probe = probes._DensityProbe(ctx, prof, ctx.config.dynamic, length)
    try:
        if probe is None:
            yield
        else:
            with probes.probing(model, probe):
                yield
    finally:
        backend.disable_dam(model)
    if probe is not None:
        ctx.measured[(method, length)] = probe.summary()

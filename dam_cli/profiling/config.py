"""The options of `dam profile` (`ProfileConfig`) and their checks (`validate`), apart from the work: nothing
here imports torch, so the command refuses bad options in one line before the slow imports and any output."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from dam_cli.atomic import check_writable
from dam_cli.errors import DamUsageError

MAX_PCL = 65536  # one head's L x L float32 sums are then 16 GiB
MAX_SAMPLES = 100_000  # calibration windows: far more than any profile needs (a profile converges in tens)
DEFAULT_PCL = 512  # the paper's L
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_NEEDLE_SAMPLES = 10_000  # needle prompts, each a model run of --needle-length tokens (the recipe uses 8)
MAX_COUNT = 2**31 - 1  # --min-support, --local-window, --retrieval-heads, --needle-length: int32 positions and counts
MIN_LAM = 1e-8  # a |lambda| under this loses (x^lambda - 1) / lambda to float64 rounding: --lam 0 is its limit


@dataclass(frozen=True)
class ProfileConfig:
    """Options of `dam profile` (defaults: the paper's recipe)."""

    output: str  # where the .safetensors profile goes
    model: str | None = None  # folder, .gguf, cached hub id; None = embedded SmolLM2
    calib: tuple[str, ...] = ()  # files/folders/JSONL; empty = built-in text
    text_field: str = "text"  # JSONL field holding the text
    samples: int = 16  # number of calibration windows
    pcl: int | None = None  # pattern capture length L; None: DEFAULT_PCL, or the capture's with from_capture
    tau: float = 0.3  # threshold on the shifted Box-Cox values
    lam: float = 0.5  # Box-Cox lambda
    mu: float = 0.8  # pattern match ratio
    eps: float = 1e-10  # the spec's epsilon, masks.EPS (kept here without importing torch; a test checks)
    min_support: int = 1  # beyond-paper: minimum cells of a pattern (1 = faithful)
    pattern_mass: float | None = None  # beyond-paper: offsets/columns covering this share of mass
    retrieval_heads: int = 0  # beyond-paper: this many heads stay on full attention
    retrieval_heads_given: bool = False  # the count came from the user (refused above the model's heads), not a recipe
    retrieval_by: str = "mass"  # which: "mass" (least kept by their patterns) or "needle" (needle scores)
    local_window: int = 0  # beyond-paper: every head also keeps its W most recent keys (0 = faithful)
    needle_length: int = 0  # tokens of a needle prompt (0: 4 x pcl, at most the model's context)
    needle_samples: int = 8  # needle prompts
    seed: int = 0  # torch seed (the faithful recipe draws nothing random)
    device: str = "auto"  # auto, cpu, cuda
    save_capture: str | None = None  # write raw statistics (HDF5) here
    from_capture: str | None = None  # re-derive from this capture instead of running the model
    force: bool = False  # replace an existing output
    runtime: dict[str, Any] | None = None  # run-time options the profile recommends (recipes.RECIPE_RUNTIME)
    stream: bool = False  # run the model one decoder layer at a time (streaming.py); automatic when it would not fit
    nproc: int = 1  # processes sharing the work (dam_cli.distributed); the file is the same for any number
    device_map: str | None = None  # spread the model's layers over the devices (accelerate), instead of `device`


# |lambda| beyond this: the Box-Cox of the 1e-10 floor leaves float32 (below -3.85), or every mean flattens to
# about -1 / lambda and the threshold keeps nothing meaningful
MAX_LAM = 3.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))


# (fields, the check, what it wants, whether None is allowed): the ProfileConfig fields a library call may get wrong
_FIELD_TYPES = (
    (("samples", "min_support", "retrieval_heads", "local_window", "needle_length", "needle_samples", "seed",
      "nproc"), _is_int, "an int", False),
    (("pcl",), _is_int, "an int", True),
    (("tau", "lam", "mu", "eps"), _is_number, "a number", False),
    (("pattern_mass",), _is_number, "a number", True),
    (("output",), _is_path, "a file path", False),
    (("text_field", "retrieval_by", "device"), lambda v: isinstance(v, str), "a str", False),
    (("model", "save_capture", "from_capture", "device_map"), lambda v: isinstance(v, str), "a str", True),
    (("runtime",), lambda v: isinstance(v, dict), "a dict of run-time options (recipes.recipe_fields)", True),
)


def _check_types(cfg: ProfileConfig) -> None:
    """A field of the wrong type (a library call; the CLI parses its own) as one line naming it, before the
    checks of values that would meet it as a raw TypeError."""
    for names, ok, want, none_ok in _FIELD_TYPES:
        for name in names:
            v = getattr(cfg, name)
            if not ((none_ok and v is None) or ok(v)):
                raise DamUsageError(f"ProfileConfig.{name} must be {want}{' or None' if none_ok else ''}, got {v!r}")


def validate(cfg: ProfileConfig) -> list[str]:
    """Check option values, output paths and calibration paths before any work (nothing is loaded); return the
    calibration files the paths name (`calib.calibration_files`; none with --from-capture).

    Every refusal is one line naming the flag: DamUsageError (exit 2), or DamError for unreadable paths.
    """
    if isinstance(cfg.calib, (str, bytes)) or not isinstance(cfg.calib, (tuple, list)) or not all(
            isinstance(c, str) for c in cfg.calib):
        hint = f"one file: calib=({cfg.calib!r},)" if isinstance(cfg.calib, str) else "() for the built-in text"
        raise DamUsageError(f"calib must be a tuple of str paths ({hint}), got {cfg.calib!r}")
    _check_types(cfg)
    if not (isinstance(cfg.eps, float) and math.isfinite(cfg.eps) and 0 < cfg.eps < 1e-3):
        raise DamUsageError(f"eps must be a small positive number (the spec's 1e-10), got {cfg.eps!r}")
    if not (math.isfinite(cfg.tau) and cfg.tau > 0):
        raise DamUsageError(f"--tau must be > 0 and finite (the true mask is then causal), got {cfg.tau}")
    if not (math.isfinite(cfg.lam) and -MAX_LAM <= cfg.lam <= MAX_LAM):
        raise DamUsageError(f"--lam must be a number from {-MAX_LAM:g} to {MAX_LAM:g} (the Box-Cox lambda; paper: "
                            f"0.5), got {cfg.lam}")
    if 0 < abs(cfg.lam) < MIN_LAM:
        raise DamUsageError(f"--lam {cfg.lam:g} is so close to 0 that the Box-Cox transform rounds away: use --lam 0 "
                            "(the log transform it tends to)")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise DamUsageError(f"--seed must be from 0 to {MAX_SEED:,} (2^63 - 1), got {cfg.seed:,}")
    if not 0 < cfg.mu <= 1:
        raise DamUsageError(f"--mu must be in (0, 1], got {cfg.mu}")
    if cfg.pcl is not None and not 2 <= cfg.pcl <= MAX_PCL:
        raise DamUsageError(f"--pcl must be from 2 to {MAX_PCL}, got {cfg.pcl}")
    if not 1 <= cfg.samples <= MAX_SAMPLES:
        raise DamUsageError(f"--samples must be from 1 to {MAX_SAMPLES:,} (calibration windows; the shipped profiles "
                            f"use 8 to 16), got {cfg.samples:,}")
    for flag, value, low in (("--min-support", cfg.min_support, 1), ("--local-window", cfg.local_window, 0),
                             ("--retrieval-heads", cfg.retrieval_heads, 0), ("--needle-length", cfg.needle_length, 0)):
        if not low <= value <= MAX_COUNT:
            raise DamUsageError(f"{flag} must be from {low} to {MAX_COUNT:,} (2^31 - 1), got {value:,}")
    if not 1 <= cfg.needle_samples <= MAX_NEEDLE_SAMPLES:
        raise DamUsageError(f"--needle-samples must be from 1 to {MAX_NEEDLE_SAMPLES:,} (needle prompts, each a "
                            f"model run; the recipe uses 8), got {cfg.needle_samples:,}")
    if cfg.pattern_mass is not None and not 0 < cfg.pattern_mass <= 1:
        raise DamUsageError(f"--pattern-mass must be in (0, 1], got {cfg.pattern_mass}")
    if cfg.retrieval_by not in ("mass", "needle"):
        raise DamUsageError(f"--retrieval-by must be mass or needle, got {cfg.retrieval_by!r}")
    if cfg.retrieval_by == "needle":
        if not cfg.retrieval_heads:
            raise DamUsageError("--retrieval-by needle chooses retrieval heads: give their number with "
                                "--retrieval-heads")
        if cfg.from_capture:
            raise DamUsageError("--retrieval-by needle runs the model on needle prompts: it cannot be combined "
                                "with --from-capture (use --retrieval-by mass, or profile from the model)")
    from dam_cli.distributed import check_nproc, requested_world

    check_nproc(cfg.nproc, None if cfg.from_capture else cfg.device.lower())
    if cfg.device_map is not None:
        from dam_cli.runtime.placement import DEVICE_MAPS

        if cfg.device_map not in DEVICE_MAPS:
            raise DamUsageError(f"unknown --device-map {cfg.device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
        clash = [flag for flag, on in (("--stream", cfg.stream), ("--from-capture", bool(cfg.from_capture)),
                                       ("--nproc", cfg.nproc > 1 or requested_world() > 1),
                                       (f"--device {cfg.device}", cfg.device.lower() != "auto")) if on]
        if clash:
            raise DamUsageError(f"--device-map places the model itself, which {clash[0]} does too or does not load: "
                                f"give one of them")
    if cfg.stream and (cfg.nproc > 1 or requested_world() > 1):
        raise DamUsageError("--stream runs the model one layer at a time in one process: drop --nproc (or torchrun), "
                            "or drop --stream")
    calib_files: list[str] = []
    if cfg.calib and not cfg.from_capture:
        from dam_cli.profiling.calib import calibration_files

        calib_files = calibration_files(list(cfg.calib))  # missing paths, FIFOs, devices: refused before the model
    reads = {"--from-capture": cfg.from_capture, "--calib": calib_files, "--model": cfg.model}
    check_writable(cfg.output, cfg.force, "--output", reads=reads)
    if cfg.from_capture and cfg.stream:
        raise DamUsageError("--stream runs the model one layer at a time and --from-capture does not run it: "
                            "give one of them")
    if cfg.from_capture and cfg.save_capture:
        raise DamUsageError("--save-capture and --from-capture cannot be combined")
    if cfg.save_capture:
        if os.path.abspath(cfg.save_capture) == os.path.abspath(cfg.output):
            raise DamUsageError("--save-capture and --output name the same file: give two paths")
        check_writable(cfg.save_capture, cfg.force, "--save-capture", reads=reads)
    return calib_files

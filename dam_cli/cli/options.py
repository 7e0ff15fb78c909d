"""Typer options that `dam generate` and `dam eval` share: one flag name and one help text each.

The five dynamic-part flags come with their defaults as a `DynamicSelection` (`GENERATE_DYNAMIC`
or `EVAL_DYNAMIC`), and `dynamic_flags` keeps the ones given: each replaces that field of the
profile's recommended setting, else of the default (checked once the profile is read, before any
model loads). Module-level imports: typer and the torch-free `dam_kernels.selection`, so `dam --help`
stays instant.
"""

from __future__ import annotations

import typer
from dam_kernels.selection import CLI_FLAGS, DynamicFlags, DynamicSelection

# `dam generate`: the dynamic part off (the paper's method); blocks of 128 tokens once turned on.
GENERATE_DYNAMIC = DynamicSelection()
# `dam eval`: the settings of its *-dynamic methods, whose whole point is the dynamic part.
EVAL_DYNAMIC = DynamicSelection(topk=8, block=64)
# A profile's recommended setting (`dam inspect` shows it) applies wherever a dynamic flag is not given.
_DEFAULT = "Default: the profile's recommended setting; for a profile without one, {value}."


def dynamic_topk_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["topk"], help=(
        "Beyond the paper: per query block, also attend the K earlier key blocks that score best against it "
        "(--dynamic-score); 0 = off. " + _DEFAULT.format(value=defaults.topk)))


def dynamic_block_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["block"], help=(
        "Block size (tokens, a multiple of 16) of the dynamic part's query and key blocks. "
        + _DEFAULT.format(value=defaults.block)))


def dynamic_tail_topk_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["tail_topk"], help=(
        "Beyond the paper: top-k of the prompt's last query block (its question) and of every decoded token, "
        "instead of --dynamic-topk. " + _DEFAULT.format(value="the same as --dynamic-topk")))


def dynamic_score_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["score"], help=(
        "How the dynamic part scores a key block: mean (pooled key . pooled query), bound (an upper bound on "
        "q.k from the block's elementwise key max and min; finds a lone outstanding key), antidiag (the "
        "block's attention mass estimated from one key in 16 per row, XAttention's antidiagonals; blocks kept "
        "until --dynamic-tail-mass of it, at most --dynamic-topk) or antisum (the same rule on XAttention's own "
        "estimate: each 8-row group's antidiagonal summed before the softmax; about half the cost on the CPU). "
        + _DEFAULT.format(value=defaults.score)))


def dynamic_tail_mass_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["tail_mass"], help=(
        "Beyond the paper: choose the prompt's last query block and every decoded token's blocks by their exact "
        "attention mass instead: the heaviest earlier blocks until this share of it (0 < G <= 1, own block "
        "included) is kept, at most --dynamic-tail-topk of them; the prompt's other blocks keep the share they "
        "had (--dynamic-mass). 0 turns the rule off: top-k blocks by a pooled score (--dynamic-score mean unless "
        "given), over a profile that records it. " + _DEFAULT.format(value="off")))


def dynamic_mass_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(None, CLI_FLAGS["mass"], help=(
        "Beyond the paper: with --dynamic-score antidiag or antisum, the share of each prompt block's estimated "
        "attention mass to keep (0 < G <= 1), apart from --dynamic-tail-mass, which then applies to the "
        "question's block and the decoded tokens only. " + _DEFAULT.format(value="--dynamic-tail-mass")))


def dynamic_flags(topk: int | None, block: int | None, tail_topk: int | None, score: str | None,
                  tail_mass: float | None = None, mass: float | None = None) -> DynamicFlags | None:
    """The dynamic-part flags given, as `DynamicFlags` (None when none was): each replaces that field of the
    profile's recommended setting (`dam.runtime`), else of the command's default (`GENERATE_DYNAMIC`,
    `EVAL_DYNAMIC`), so `--dynamic-topk 16` alone keeps the profile's score and mass. The merged setting is
    checked once the profile is read, before the model loads (a `DamUsageError` naming the flag, exit 2)."""
    from dam_cli.errors import DamUsageError

    given = {"topk": topk, "block": block, "tail_topk": tail_topk, "score": score, "tail_mass": tail_mass,
             "mass": mass}
    values = tuple((k, v) for k, v in given.items() if v is not None)
    if not values:
        return None
    flags = DynamicFlags(values)
    flags.over_any().validate(cli=True, error=DamUsageError)  # what no profile's setting can change, checked now
    return flags


def given_path(value):
    """Typer callback of a file option: a path given as "" (an unset shell variable, `--png "$OUT"`) is refused
    in one line; left to the command it would read as not given (the output silently skipped, the default model
    or profile used) or as the current folder."""
    if value == "" or (isinstance(value, (list, tuple)) and "" in value):
        raise typer.BadParameter("empty: give a path (is a shell variable unset?)")
    return value


def model_option():
    return typer.Option(None, "--model", "-m", callback=given_path, help=(
        "Model folder, .gguf file or cached hub id (default: the embedded SmolLM2-135M-Instruct)."))


def device_option():
    return typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")


def backend_option(evaluation: bool = False):
    auto = ("auto (Triton on CUDA; on the CPU every method, full included, on the exact reference: the same "
            "arithmetic on both sides, slow past a few thousand tokens)" if evaluation
            else "auto (Triton on CUDA, compiled on CPU)")
    tail = (" With compiled or gathered, full runs dense SDPA: the fast choice for long prompts on the CPU."
            if evaluation
            else "")
    return typer.Option("auto", "--backend", help=(
        f"DAM kernels: {auto}, triton, compiled (block-sparse C built on first use, CPU, prompts and decode steps; "
        f"gathered where no compiler), gathered (block-sparse PyTorch, CPU) or reference (the exact dense masked "
        f"softmax).{tail}"))


def device_map_option():
    return typer.Option(None, "--device-map", help=(
        "Spread the model's layers over the devices (accelerate's placement): auto, balanced, balanced_low_0 or "
        "sequential; for a model larger than one GPU (--device stays auto)."))

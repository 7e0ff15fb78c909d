"""Typer options that `dam generate` and `dam eval` share: one flag name and one help text each.

The five dynamic-part flags come with their defaults as a `DynamicSelection` (`GENERATE_DYNAMIC`
or `EVAL_DYNAMIC`), and `dynamic_selection` turns the parsed values into one checked
`DynamicSelection` before any model loads. Module-level imports: typer and the torch-free
`dam_kernels.selection`, so `dam --help` stays instant.
"""

from __future__ import annotations

import typer
from dam_kernels.selection import CLI_FLAGS, DynamicSelection

# `dam generate`: the dynamic part off (the paper's method); blocks of 128 tokens once turned on.
GENERATE_DYNAMIC = DynamicSelection()
# `dam eval`: the settings of its *-dynamic methods, whose whole point is the dynamic part.
EVAL_DYNAMIC = DynamicSelection(topk=8, block=64)


def dynamic_topk_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(defaults.topk, CLI_FLAGS["topk"], help=(
        "Beyond the paper: per query block, also attend the K earlier key blocks that score best against it "
        "(--dynamic-score); 0 = off."))


def dynamic_block_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(defaults.block, CLI_FLAGS["block"], help=(
        "Block size (tokens, a multiple of 16) of the dynamic part's query and key blocks."))


def dynamic_tail_topk_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(defaults.tail_topk, CLI_FLAGS["tail_topk"], help=(
        "Beyond the paper: top-k of the prompt's last query block (its question) and of every decoded token, "
        "instead of --dynamic-topk (default: the same)."))


def dynamic_score_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(defaults.score, CLI_FLAGS["score"], help=(
        "How the dynamic part scores a key block: mean (pooled key . pooled query) or bound (an upper bound on "
        "q.k from the block's elementwise key max and min; finds a lone outstanding key)."))


def dynamic_tail_mass_option(defaults: DynamicSelection = GENERATE_DYNAMIC):
    return typer.Option(defaults.tail_mass, CLI_FLAGS["tail_mass"], help=(
        "Beyond the paper: choose the prompt's last query block and every decoded token's blocks by their exact "
        "attention mass instead: the heaviest earlier blocks until this share of it (0 < G <= 1, own block "
        "included) is kept, at most --dynamic-tail-topk of them (default: off)."))


def dynamic_selection(topk: int, block: int, tail_topk: int | None, score: str,
                      tail_mass: float | None = None) -> DynamicSelection:
    """The parsed flags as one `DynamicSelection`, checked now: a bad value is a
    `DamUsageError` (exit 2) naming its flag, raised before anything is loaded."""
    from dam_cli.errors import DamUsageError

    return DynamicSelection(topk=topk, block=block, tail_topk=tail_topk, score=score, tail_mass=tail_mass).validate(
        cli=True, error=DamUsageError)


def model_option():
    return typer.Option(None, "--model", "-m", help=(
        "Model folder, .gguf file or cached hub id (default: the embedded SmolLM2-135M-Instruct)."))


def device_option():
    return typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")


def backend_option():
    return typer.Option("auto", "--backend", help=(
        "DAM kernels: auto (Triton on CUDA, reference on CPU), triton or reference."))

"""`dam eval`: compare full attention, DAM and StreamingLLM on alignment, attention recall and retrieval."""

from __future__ import annotations

import sys

import typer

from dam_cli.cli import options


def _split(value: str | None, cast, what: str):
    from dam_cli.errors import DamUsageError

    if value is None:
        return None
    example = "512,1024" if cast is int else "0.1,0.5,0.9" if cast is float else "full,dam"
    items = [v.strip() for v in value.split(",")]
    if value.strip() and not all(items):  # "64,,128" or "64,": a missing item is a typo, never skipped quietly
        raise DamUsageError(f"{what} {value!r} has an empty item: give a comma-separated list like {example}")
    try:  # each item once, in the order given (a length or method given twice would run twice, one result kept)
        out = tuple(dict.fromkeys(cast(v) for v in items if v))
    except ValueError:
        raise DamUsageError(f"cannot read {what} {value!r}: give a comma-separated list like {example}") from None
    if not out:
        raise DamUsageError(f"{what} is empty: give a comma-separated list")
    return out


MAX_COUNT = 2**31 - 1  # beyond any length or prompt count a run could use; larger would overflow int32


def check_counts(**counts: tuple) -> None:
    """Refuse, before anything loads, a count below its least value or beyond its greatest (MAX_COUNT unless
    given): `DamUsageError` (exit 2) naming the flag. `counts` maps a flag's name (underscores for dashes) to
    (value, least) or (value, least, greatest)."""
    from dam_cli.errors import DamUsageError

    for name, (value, least, *most) in counts.items():
        greatest = most[0] if most else MAX_COUNT
        if value is not None and not least <= value <= greatest:
            raise DamUsageError(f"--{name.replace('_', '-')} must be from {least} to {greatest:,}, got {value:,}")


MAX_SINK = 1024  # StreamingLLM keeps a few first tokens (4 by default); past this the band only costs memory
# Retrieval prompts per (task, length, depth): each is a generation per method, and the prompts are drawn before the
# first runs, so 2**31 of them filled memory for minutes with no progress line; 10,000 is days of GPU time.
MAX_SAMPLES = 10_000


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def _cmd(
        profile: str = typer.Option(..., "--profile", "-p", callback=options.given_path,
                                    help="DAM profile (.safetensors) made for this model."),
        model: str | None = options.model_option(),
        methods: str = typer.Option("full,dam,streaming", "--methods", help=(
            "Comma-separated: full, dam (the profile's static masks), streaming; beyond the paper: dam-dynamic "
            "(the profile as dam generate runs it, with its run-time setting), dam-options, streaming-options, "
            "dam-options-dynamic, streaming-options-dynamic (need --options-profile).")),
        options_profile: str | None = typer.Option(None, "--options-profile", callback=options.given_path, help=(
            "A profile of the same model made with beyond-paper options (dam profile --pattern-mass/"
            "--retrieval-heads/--min-support), for the *-options methods.")),
        dynamic_topk: int = options.dynamic_topk_option(options.EVAL_DYNAMIC),
        dynamic_block: int = options.dynamic_block_option(options.EVAL_DYNAMIC),
        dynamic_tail_topk: int | None = options.dynamic_tail_topk_option(options.EVAL_DYNAMIC),
        dynamic_score: str = options.dynamic_score_option(options.EVAL_DYNAMIC),
        dynamic_tail_mass: float | None = options.dynamic_tail_mass_option(options.EVAL_DYNAMIC),
        dynamic_mass: float | None = options.dynamic_mass_option(options.EVAL_DYNAMIC),
        tasks: str = typer.Option("alignment,recall,lines,passkey", "--tasks", help=(
            "Comma-separated: alignment, recall, lines, passkey; the long-context suite: niah_single, "
            "niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe, suite:passkey, memo, or suite for all.")),
        split: str = typer.Option("development", "--split", help=(
            "Seeds of the suite's prompts: development (tune here), heldout-a (report here) or heldout-b.")),
        per_task: int | None = typer.Option(None, "--per-task", help=(
            "Suite prompts per task and length: the split's first N seeds (default 3; 1 with --quick).")),
        prompt_form: str | None = typer.Option(None, "--prompt-form", help=(
            "Suite prompts as chat or completion (default: chat when the tokenizer has a chat template).")),
        lengths: str | None = typer.Option(None, "--lengths", help=(
            "Comma-separated token lengths (default: 1x,2x,4x,8x,16x the PCL up to the model's context).")),
        depths: str | None = typer.Option(None, "--depths", help="Needle depths in [0, 1] (default 0.1,0.5,0.9)."),
        samples: int | None = typer.Option(None, "--samples", "-n",
                                           help="Retrieval prompts per length and depth (default 2, at most 10,000)."),
        sample_start: int = typer.Option(0, "--sample-start", help=(
            "Index of the first retrieval prompt: a later start (e.g. 100) draws a held-out set never used "
            "to choose options.")),
        positions: int | None = typer.Option(None, "--positions",
                                             help="Scored positions per length for alignment (default 512)."),
        rows: int | None = typer.Option(None, "--rows",
                                        help="Query rows per length for attention recall (default 128)."),
        sink: int = typer.Option(4, "--sink", help="StreamingLLM sink tokens."),
        text: str | None = typer.Option(None, "--text", callback=options.given_path,
                                        help="Held-out text file for alignment/recall (default: built-in)."),
        quick: bool = typer.Option(False, "--quick",
                                   help="Tiny counts for CI (1x and 2x PCL, one depth, one prompt per task)."),
        json_out: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout."),
        png: str | None = typer.Option(None, "--png", callback=options.given_path,
                                       help="Write plots to this PNG file."),
        out: str | None = typer.Option(None, "--output", "-o", callback=options.given_path,
                                       help="Also write the JSON result to this file."),
        force: bool = typer.Option(False, "--force", "-f", help=(
            "Replace an existing --output or --png file (and start over from an unfinished run's journal).")),
        resume: bool = typer.Option(False, "--resume", help=(
            "Go on from --output's journal (OUT.partial.jsonl, every answer kept as it is made) of a run that "
            "stopped early: its answers are reused, only the rest generated.")),
        device: str = options.device_option(),
        backend: str = options.backend_option(evaluation=True),
        dtype: str = typer.Option("float32", "--dtype", help=(
            "float32 (the default, on every device: scores compare across machines), bfloat16, float16, or auto "
            "(bfloat16 on CUDA). On a GPU, head dim 256 (Gemma 3) needs bfloat16 or float16 for the kernels.")),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help=(
            "CUDA only: decode every answer over a static cache, one CUDA graph replayed per token (as dam "
            "generate --cuda-graph), the same tokens several times sooner; needs --dynamic-block a multiple of 64.")),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Measure how close DAM stays to full attention, against StreamingLLM at the same density.

        Alignment (top-1 agreement, KL from full, perplexity on held-out text), attention recall per
        layer and head, locally generated retrieval tasks (LongEval-style lines, passkey) at several
        lengths and depths, and a RULER-style long-context suite. See docs/guides/eval.md.

        Examples:

          dam eval --profile profiles/smollm2-135m-instruct-paper.safetensors --quick

          dam eval -p p.safetensors --lengths 512,1024,2048 --depths 0.2,0.8 --png eval.png --json

          dam eval -p p.safetensors --tasks suite --split heldout-a --per-task 9 --lengths 4096,8192

          dam eval -m gemma3-270m -p profiles/gemma3-270m.safetensors --tasks suite --prompt-form completion
          --lengths 32641 --device cuda --dtype bfloat16 --cuda-graph

          dam eval -p p.safetensors --options-profile opt.safetensors
          --methods full,dam,dam-options,streaming-options,dam-options-dynamic

          dam eval -p p.safetensors --tasks suite --lengths 16384 -o res.json --resume   (after Ctrl-C)
        """
        from dam_cli.cli.eval_png import check_png, write_png
        from dam_cli.cli.generate import check_machine
        from dam_cli.errors import DamError, DamUsageError
        from dam_cli.evaluation.journal import interrupted_note
        from dam_cli.evaluation.run import EvalRunConfig, result_json, run_eval
        from dam_cli.progress import NullReporter, RichReporter
        from dam_cli.runtime.models import resolve_dtype

        dynamic = options.dynamic_flags(dynamic_topk, dynamic_block, dynamic_tail_topk, dynamic_score,
                                        dynamic_tail_mass, dynamic_mass)
        lists = {"methods": _split(methods, str, "--methods"), "tasks": _split(tasks, str, "--tasks"),
                 "lengths": _split(lengths, int, "--lengths"), "depths": _split(depths, float, "--depths")}
        resolve_dtype(dtype, "cpu")  # a bad name is refused before anything loads
        # --per-task: run_eval checks it against the split's size, also before loading
        check_counts(sink=(sink, 0, MAX_SINK), samples=(samples, 1, MAX_SAMPLES), sample_start=(sample_start, 0),
                     positions=(positions, 1), rows=(rows, 1))
        check_machine(device, backend, False)  # --cuda-graph on the CPU: run_eval says it, also before loading
        if png:  # --output is checked by run_eval, also before the evaluation
            check_png(png, out, lists["tasks"], force,
                      {"--profile": profile, "--options-profile": options_profile, "--text": text, "--model": model})
        if options_profile and not any("options" in m for m in lists["methods"]):
            print(f"note: --options-profile is read by the *-options methods only: ignored with --methods {methods}",
                  file=sys.stderr)
        cfg = EvalRunConfig(
            profile=profile, model=model, device=device, options_profile=options_profile, quick=quick, **lists,
            samples=samples, sample_start=sample_start, split=split, per_task=per_task, prompt_form=prompt_form,
            align_positions=positions, recall_rows=rows, sink=sink, text=text, backend=backend, dynamic=dynamic,
            cuda_graph=cuda_graph, dtype=dtype, output=out, force=force, resume=resume)
        try:
            result = run_eval(cfg, reporter=NullReporter(notes=not quiet) if (quiet or json_out) else RichReporter())
        except BaseException as e:
            if not isinstance(e, DamUsageError) and (note := interrupted_note(out)) is not None:
                print(note, file=sys.stderr)
            raise
        if json_out:
            typer.echo(result_json(result))
        else:
            from rich.console import Console

            console = Console() if sys.stdout.isatty() else Console(width=200)  # a file or pipe: no column cut
            if result["config"]["tasks"]:
                console.print(table(result))
            if result.get("suite"):
                console.print(suite_table(result))
        if png:  # after the results are shown: a picture that cannot be written loses none of them
            try:
                write_png(result, png, force)
            except DamError as e:
                kept = f"{out} was written" if out else "the results are above"
                raise type(e)(f"{e} ({kept}; only the picture is missing)") from e


def _cell(v, fmt):
    return "-" if v is None else format(v, fmt)


def table(result: dict):
    """A Rich table: one row per (length, method) with density, alignment, recall and retrieval."""
    from dam_cli.evaluation.metrics import accuracy

    t = _compact(f"dam eval: {result.get('model')} with {result['profile'].get('path')} "
                 f"(PCL {result['profile'].get('pcl')})")
    tasks = [k for k in ("lines", "passkey") if k in result.get("retrieval", {})]
    for col in ["length", "method", "density", "agree", "KL", "ppl", "recall"] + tasks:
        _add_column(t, col, result["methods"])
    f = _cell
    for n in result["lengths"]:
        k = str(n)
        for m in result["methods"]:
            al = result["alignment"].get(m, {}).get(k, {})
            rc = result["recall"].get(m, {}).get(k, {})
            row = [k, m, f(result["density"].get(m, {}).get(k), ".4f"), f(al.get("agreement"), ".3f"),
                   f(al.get("kl"), ".3f"), f(al.get("ppl"), ".2f"), f(rc.get("mean"), ".3f")]
            row += [f(accuracy(result, task, m, n), ".2f") for task in tasks]
            t.add_row(*row)
    return t


def _add_column(t, col: str, methods) -> None:
    """A column that never cuts a name to "strea…": the method column as wide as the longest method, every column
    at least as wide as its header (a redirected output is printed 200 columns wide)."""
    if col == "method":
        t.add_column(col, justify="left", no_wrap=True, min_width=max([len(col), *map(len, methods)]))
    else:
        t.add_column(col, justify="right", no_wrap=True, min_width=len(col))


def _compact(title: str):
    """A table with a rule under the header and one space between columns (as `dam inspect`'s), so that the
    columns fit 80 characters uncut."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                 padding=(0, 1))


def suite_table(result: dict):
    """A Rich table of the suite: one row per (length, method) with density, the mean score per task family
    and over tasks."""
    suite = result["suite"]
    t = _compact(f"dam eval suite: {suite['per_task']} prompt(s) per task from split {suite['split']} "
                 f"({suite['prompt_form']} form)")
    for col in ["length", "method", "density", *suite["families"], "mean"]:
        _add_column(t, col, result["methods"])
    for n in result["lengths"]:
        k = str(n)
        for m in result["methods"]:
            s = suite["scores"][m][k]
            t.add_row(k, m, _cell(result["density"].get(m, {}).get(k), ".4f"),
                      *[_cell(s["families"].get(fam), ".2f") for fam in suite["families"]], _cell(s["mean"], ".2f"))
    return t

"""`dam eval`: compare full attention, DAM and StreamingLLM on alignment, attention recall and retrieval."""

from __future__ import annotations

import sys

import typer

from dam_cli.cli import options


def _split(value: str | None, cast, what: str):
    from dam_cli.errors import DamUsageError

    if value is None:
        return None
    try:  # each item once, in the order given (a length or method given twice would run twice, one result kept)
        out = tuple(dict.fromkeys(cast(v.strip()) for v in value.split(",") if v.strip()))
    except ValueError:
        raise DamUsageError(f"cannot read {what} {value!r}: give a comma-separated list like "
                            f"{'512,1024' if cast is int else '0.1,0.5,0.9'}") from None
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
# The tasks `write_png` draws: top-1 agreement (alignment) and retrieval accuracy (lines, passkey).
PNG_TASKS = ("alignment", "lines", "passkey")


def check_png(png: str, out: str | None, tasks: tuple[str, ...], force: bool, reads: dict | None = None) -> None:
    """Refuse, before the evaluation, a --png that cannot be written or would show nothing: the path as
    `check_writable` checks it (with `reads`, the files the run reads), the same file as --output, or --tasks with
    nothing it plots."""
    import os

    from dam_cli.atomic import check_writable
    from dam_cli.errors import DamUsageError
    from dam_cli.evaluation.config import split_task_names

    if out and os.path.abspath(out) == os.path.abspath(png):
        raise DamUsageError("--png and --output name the same file: give two paths")
    if not any(t in PNG_TASKS for t in split_task_names(tasks)[0]):
        raise DamUsageError(f"--png plots only {', '.join(PNG_TASKS)}, and --tasks has none of them: add one to "
                            "--tasks, or drop --png")
    check_writable(png, force, "--png", reads=reads)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def _cmd(
        profile: str = typer.Option(..., "--profile", "-p", callback=options.given_path,
                                    help="DAM profile (.safetensors) made for this model."),
        model: str | None = options.model_option(),
        methods: str = typer.Option("full,dam,streaming", "--methods", help=(
            "Comma-separated: full, dam, streaming; beyond the paper: dam-options, streaming-options, "
            "dam-options-dynamic, streaming-options-dynamic (need --options-profile), dam-dynamic.")),
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
                                           help="Retrieval prompts per length and depth (default 2)."),
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
        from dam_cli.cli.generate import check_machine
        from dam_cli.errors import DamUsageError
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
        check_counts(sink=(sink, 0, MAX_SINK), samples=(samples, 1), sample_start=(sample_start, 0),
                     positions=(positions, 1), rows=(rows, 1))
        check_machine(device, backend, False)  # --cuda-graph on the CPU: run_eval says it, also before loading
        if png:  # --output is checked by run_eval, also before the evaluation
            check_png(png, out, lists["tasks"], force,
                      {"--profile": profile, "--options-profile": options_profile, "--text": text, "--model": model})
        cfg = EvalRunConfig(
            profile=profile, model=model, device=device, options_profile=options_profile, quick=quick, **lists,
            samples=samples, sample_start=sample_start, split=split, per_task=per_task, prompt_form=prompt_form,
            align_positions=positions, recall_rows=rows, sink=sink, text=text, backend=backend, dynamic=dynamic,
            cuda_graph=cuda_graph, dtype=dtype, output=out, force=force, resume=resume)
        try:
            result = run_eval(cfg, reporter=NullReporter() if (quiet or json_out) else RichReporter())
        except BaseException as e:
            if not isinstance(e, DamUsageError) and (note := interrupted_note(out)) is not None:
                print(note, file=sys.stderr)
            raise
        if png:
            write_png(result, png, force)
        if json_out:
            typer.echo(result_json(result))
        else:
            from rich.console import Console

            console = Console()
            if result["config"]["tasks"]:
                console.print(table(result))
            if result.get("suite"):
                console.print(suite_table(result))


def _cell(v, fmt):
    return "-" if v is None else format(v, fmt)


def table(result: dict):
    """A Rich table: one row per (length, method) with density, alignment, recall and retrieval."""
    from rich.table import Table

    from dam_cli.evaluation.metrics import accuracy

    t = Table(title=f"dam eval: {result.get('model')} with {result['profile'].get('path')} "
                    f"(PCL {result['profile'].get('pcl')})")
    tasks = [k for k in ("lines", "passkey") if k in result.get("retrieval", {})]
    for col in ["length", "method", "density", "agree", "KL", "ppl", "recall"] + tasks:
        t.add_column(col, justify="left" if col == "method" else "right")
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


def suite_table(result: dict):
    """A Rich table of the suite: one row per (length, method) with density, the mean score per task family
    and over tasks."""
    from rich.table import Table

    suite = result["suite"]
    t = Table(title=f"dam eval suite: {suite['per_task']} prompt(s) per task from split {suite['split']} "
                    f"({suite['prompt_form']} form)")
    for col in ["length", "method", "density", *suite["families"], "mean"]:
        t.add_column(col, justify="left" if col == "method" else "right")
    for n in result["lengths"]:
        k = str(n)
        for m in result["methods"]:
            s = suite["scores"][m][k]
            t.add_row(k, m, _cell(result["density"].get(m, {}).get(k), ".4f"),
                      *[_cell(s["families"].get(fam), ".2f") for fam in suite["families"]], _cell(s["mean"], ".2f"))
    return t


def _length_ticks(ax, lengths) -> None:
    """Ticks at the measured lengths only, as plain numbers (log axis without 2x10^3 clutter)."""
    from matplotlib.ticker import NullLocator

    ax.set_xticks(lengths, [str(n) for n in lengths], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())


def write_png(result: dict, path: str, force: bool = False) -> None:
    """Plots of the panels that have data: retrieval accuracy and top-1 agreement vs length per method,
    and a length x depth accuracy heatmap per (task, method). Nothing to plot: DamUsageError, nothing
    written. An existing `path` is replaced only with `force`. matplotlib is imported only here."""
    import io

    from dam_cli.errors import DamUsageError

    methods, lengths = result["methods"], result["lengths"]
    tasks = [k for k in ("lines", "passkey") if k in result.get("retrieval", {})]
    aligned = [m for m in methods if result.get("alignment", {}).get(m)]
    tops = (["retrieval"] if tasks else []) + (["alignment"] if aligned else [])
    if not tops:
        raise DamUsageError(f"nothing to plot in {path}: --png draws {', '.join(PNG_TASKS)}, and none of them ran")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dam_cli.atomic import atomic_write_bytes

    heat = [(task, m) for task in tasks for m in methods]
    ncols = max(len(tops), len(methods) if heat else 1)
    nrows = 1 + (len(heat) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False,
                             layout="constrained")  # constrained: titles and tick labels never overlap
    for ax, panel in zip(axes[0], tops):
        if panel == "retrieval":
            _retrieval_panel(ax, result, tasks)
        else:
            _alignment_panel(ax, result, aligned)
    for a in axes[0][len(tops):]:
        a.axis("off")
    depths = result["config"]["depths"]
    for idx, (task, m) in enumerate(heat):
        ax = axes[1 + idx // ncols][idx % ncols]
        cells = result["retrieval"][task].get(m, {})
        grid = [[cells.get(str(n), {}).get(f"{d:g}", {}).get("accuracy", float("nan")) for n in lengths]
                for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set(xlabel="length", ylabel="depth", title=f"{task}: {m}")
    for idx in range(len(heat), (nrows - 1) * ncols):
        axes[1 + idx // ncols][idx % ncols].axis("off")
    if heat:
        fig.colorbar(im, ax=axes[1:, -1].tolist(), shrink=0.8, label="accuracy")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), force)


def _retrieval_panel(ax, result: dict, tasks: list[str]) -> None:
    from dam_cli.evaluation.metrics import accuracy

    lengths = result["lengths"]
    for m in result["methods"]:
        for task, style in zip(tasks, ("-o", "--s")):
            ys = [accuracy(result, task, m, n) for n in lengths]
            ax.plot(lengths, [float("nan") if y is None else y for y in ys], style, label=f"{m} {task}")
    ax.set(xscale="log", xlabel="length (tokens)", ylabel="accuracy", title="retrieval accuracy", ylim=(-0.05, 1.05))
    _length_ticks(ax, lengths)
    ax.legend(fontsize=7)


def _alignment_panel(ax, result: dict, methods: list[str]) -> None:
    lengths = result["lengths"]
    for m in methods:
        ys = [result["alignment"][m].get(str(n), {}).get("agreement") for n in lengths]
        ax.plot(lengths, [float("nan") if y is None else y for y in ys], "-o", label=m)
    ax.set(xscale="log", xlabel="length (tokens)", ylabel="top-1 agreement with full",
           title="alignment", ylim=(-0.05, 1.05))
    _length_ticks(ax, lengths)
    ax.legend(fontsize=7)

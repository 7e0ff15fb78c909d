"""`dam eval --png`: the evaluation's pictures, checked before the run and drawn after it.

Panels, each where its data ran: retrieval accuracy (lines, passkey) and top-1 agreement against length per method;
the long-context suite, one panel per length (each task family's mean score, a bar per method, the method's
measured density in the legend); a length x depth accuracy heatmap per (retrieval task, method). matplotlib is
imported only when a picture is drawn.
"""

from __future__ import annotations

import os

# The tasks of `--tasks` that `write_png` draws (besides any of the suite's): top-1 agreement and retrieval accuracy.
PNG_TASKS = ("alignment", "lines", "passkey")


def check_png(png: str, out: str | None, tasks: tuple[str, ...], force: bool, reads: dict | None = None) -> None:
    """Refuse, before the evaluation, a --png that cannot be written or would show nothing: the path as
    `check_writable` checks it (with `reads`, the files the run reads), the same file as --output, or --tasks with
    nothing it plots."""
    from dam_cli.atomic import check_writable
    from dam_cli.errors import DamUsageError
    from dam_cli.evaluation.config import split_task_names

    if out and os.path.abspath(out) == os.path.abspath(png):
        raise DamUsageError("--png and --output name the same file: give two paths")
    ours, suite = split_task_names(tasks)
    if not suite and not any(t in PNG_TASKS for t in ours):
        raise DamUsageError(f"--png plots only {', '.join(PNG_TASKS)} and the suite's tasks, and --tasks has none "
                            "of them: add one to --tasks, or drop --png")
    check_writable(png, force, "--png", reads=reads)


def _length_ticks(ax, lengths) -> None:
    """Ticks at the measured lengths only, as plain numbers (log axis without 2x10^3 clutter)."""
    from matplotlib.ticker import NullLocator

    ax.set_xticks(lengths, [str(n) for n in lengths], fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())


def write_png(result: dict, path: str, force: bool = False) -> None:
    """The panels that have data (module doc) in one PNG at `path`. Nothing to plot: DamUsageError, nothing
    written. An existing `path` is replaced only with `force`."""
    import io

    from dam_cli.errors import DamUsageError

    methods, lengths = result["methods"], result["lengths"]
    tasks = [k for k in ("lines", "passkey") if k in result.get("retrieval", {})]
    aligned = [m for m in methods if result.get("alignment", {}).get(m)]
    suite = result.get("suite") or None
    panels = (["retrieval"] if tasks else []) + (["alignment"] if aligned else [])
    panels += [("suite", n) for n in lengths] if suite else []
    if not panels:
        raise DamUsageError(f"nothing to plot in {path}: --png draws {', '.join(PNG_TASKS)} and the suite's tasks, "
                            "and none of them ran")

    from dam_cli.atomic import atomic_write_bytes
    from dam_cli.inspection.png import agg_pyplot

    plt = agg_pyplot()

    heat = [(task, m) for task in tasks for m in methods]
    ncols = max(min(len(panels), 3), len(methods) if heat else 1)
    top_rows = -(-len(panels) // ncols)
    nrows = top_rows + -(-len(heat) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False,
                             layout="constrained")  # constrained: titles and tick labels never overlap
    flat_top = [axes[i // ncols][i % ncols] for i in range(top_rows * ncols)]
    for ax, panel in zip(flat_top, panels):
        if panel == "retrieval":
            _retrieval_panel(ax, result, tasks)
        elif panel == "alignment":
            _alignment_panel(ax, result, aligned)
        else:
            _suite_panel(ax, result, panel[1])
    for ax in flat_top[len(panels):]:
        ax.axis("off")
    depths = result["config"]["depths"]
    im = None
    for idx, (task, m) in enumerate(heat):
        ax = axes[top_rows + idx // ncols][idx % ncols]
        cells = result["retrieval"][task].get(m, {})
        grid = [[cells.get(str(n), {}).get(f"{d:g}", {}).get("accuracy", float("nan")) for n in lengths]
                for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set(xlabel="length", ylabel="depth", title=f"{task}: {m}")
    for idx in range(len(heat), (nrows - top_rows) * ncols):
        axes[top_rows + idx // ncols][idx % ncols].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes[top_rows:, -1].tolist(), shrink=0.8, label="accuracy")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), force)


def _colour(result: dict, method: str) -> str:
    """One colour per method in every panel (matplotlib's cycle, in the order of --methods); tasks differ by line."""
    return f"C{result['methods'].index(method) % 10}"


def _retrieval_panel(ax, result: dict, tasks: list[str]) -> None:
    from dam_cli.evaluation.metrics import accuracy

    lengths = result["lengths"]
    for m in result["methods"]:
        for task, style in zip(tasks, ("-o", "--s")):
            ys = [accuracy(result, task, m, n) for n in lengths]
            ax.plot(lengths, [float("nan") if y is None else y for y in ys], style, label=f"{m} {task}",
                    color=_colour(result, m))
    ax.set(xscale="log", xlabel="length (tokens)", ylabel="accuracy", title="retrieval accuracy", ylim=(-0.05, 1.05))
    _length_ticks(ax, lengths)
    ax.legend(fontsize=7)


def _alignment_panel(ax, result: dict, methods: list[str]) -> None:
    lengths = result["lengths"]
    for m in methods:
        ys = [result["alignment"][m].get(str(n), {}).get("agreement") for n in lengths]
        ax.plot(lengths, [float("nan") if y is None else y for y in ys], "-o", label=m, color=_colour(result, m))
    ax.set(xscale="log", xlabel="length (tokens)", ylabel="top-1 agreement with full",
           title="alignment", ylim=(-0.05, 1.05))
    _length_ticks(ax, lengths)
    ax.legend(fontsize=7)


def suite_bars(result: dict, length: int) -> tuple[list[str], dict[str, list[float]]]:
    """What one suite panel draws: the task families in the suite's order, and per method its mean score on each
    family (then over tasks, "mean") at `length`."""
    suite = result["suite"]
    families = [*suite["families"], "mean"]
    bars = {}
    for m in result["methods"]:
        s = suite["scores"][m][str(length)]
        bars[m] = [s["families"].get(f, float("nan")) for f in suite["families"]] + [s["mean"]]
    return families, bars


def _suite_panel(ax, result: dict, length: int) -> None:
    families, bars = suite_bars(result, length)
    width = 0.8 / max(len(bars), 1)
    for i, (m, ys) in enumerate(bars.items()):
        density = result.get("density", {}).get(m, {}).get(str(length))
        label = m if density is None else f"{m} ({density:.1%})"
        ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(families))], ys, width, label=label,
               color=_colour(result, m))
    suite = result["suite"]
    ax.set_xticks(range(len(families)), families, fontsize=7)
    ax.set(ylabel="mean score", ylim=(0, 1.05),
           title=f"suite at {length:,} tokens ({suite['split']}, {suite['per_task']} a task)")
    ax.legend(fontsize=6, title="method (measured density)", title_fontsize=6, loc="upper center",
              bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)  # below the bars, never over them

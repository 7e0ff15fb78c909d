"""`dam inspect`: read, summarise, picture, compare and check profiles (docs/guides/inspect.md).

Parses options, makes one library call per mode (`dam_cli.inspection.{summary,compare,check}`), renders
the result (`dam_cli.inspection.render`). torch and matplotlib are imported only inside the command.
"""

from __future__ import annotations

import json

import typer

from dam_cli.cli import options

HELP = ('Summarise a DAM profile, picture a head, compare two profiles, or check one.\n\n'
        "P alone prints the header (model, shape, recipe, calibration), a per-layer table (density at the PCL "
        "and at --length, mean matched offsets |R| and columns |C|, head-class counts) and the heads worth a look. "
        "--layer adds that layer's heads; --head adds pictures of one head's masks. Head classes and the JSON "
        "shape: docs/guides/inspect.md."
        '\n'
        '\n'
        'Examples:\n'
        '\n'
        '  dam inspect profiles/smollm2-135m-instruct-paper.safetensors\n'
        '\n'
        '  dam inspect P.safetensors --length 32768 --layer 5 --head 2\n'
        '\n'
        '  dam inspect P.safetensors --png profile.png\n'
        '\n'
        '  dam inspect P.safetensors --json > summary.json\n'
        '\n'
        '  dam inspect tau03.safetensors tau05.safetensors\n'
        '\n'
        '  dam inspect P.safetensors --check\n'
        )


def register(app: typer.Typer) -> None:
    """Add the `inspect` command to the `dam` app."""

    @app.command("inspect", help=HELP, no_args_is_help=True)
    def inspect_cmd(
        profile: str = typer.Argument(..., help="Profile file (.safetensors) made by `dam profile`.",
                                      show_default=False, callback=options.given_path),
        other: str | None = typer.Argument(None, help="Second profile: compare it (B) with the first (A).",
                                              show_default=False, callback=options.given_path),
        length: int | None = typer.Option(None, "--length", "-s", metavar="S",
                                             help="Sequence length for Stage-2 densities and the Stage-2 picture "
                                                  "(default: 8 x PCL, capped at the model's max position)."),
        layer: int | None = typer.Option(None, "--layer", "-l", help="Show this layer per head."),
        head: int | None = typer.Option(None, "--head", help="With --layer: picture this head's masks."),
        png: str | None = typer.Option(None, "--png", metavar="FILE", callback=options.given_path,
                                           help="Also write a PNG: every head's mask and a density heatmap."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout, nothing else."),
        check: bool = typer.Option(False, "--check", help="Validate only; exit 0 if valid, 1 with the reason if not."),
        force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --png file."),
    ) -> None:
        from rich.console import Console
        from rich.text import Text

        from dam_cli.atomic import check_writable
        from dam_cli.errors import DamError, DamUsageError
        from dam_cli.inspection import check as checking
        from dam_cli.inspection import compare as comparing
        from dam_cli.inspection import png as drawing
        from dam_cli.inspection import render, summary
        from dam_cli.text import safe_text

        out = Console(highlight=False, soft_wrap=False)
        err = Console(stderr=True, highlight=False, soft_wrap=True)

        if check:
            if png is not None or layer is not None or head is not None or length is not None:
                raise DamUsageError("--check validates only: drop --png, --layer, --head and --length")
            results = [checking.check(p) for p in (profile, other) if p is not None]
            if as_json:
                docs = [r.to_dict() for r in results]
                typer.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, allow_nan=False))
            else:
                render.render_check(results, out)
            bad = [r for r in results if not r.valid]
            if bad:
                # One reason on stderr for CI logs (stdout holds the report or the JSON).
                reason, where = bad[0].errors[0], safe_text(bad[0].path)
                failed = DamError(reason if reason.startswith(where) else f"{where}: {reason}")
                failed.json_reported = as_json  # the report on stdout says it: no second JSON document
                raise failed
            return

        if png is not None:
            if other is not None:
                raise DamUsageError("--png draws one profile: drop the second profile or --png")
            # before any work: special files, folders, read-only, full disk, the profile itself
            check_writable(png, force, "--png", reads={"the profile": profile})

        if other is not None:
            cmp = comparing.compare(profile, other, length, layer=layer, head=head)
            if as_json:
                typer.echo(json.dumps(cmp.to_dict(), indent=2, allow_nan=False))
            else:
                render.render_comparison(cmp, out, layer=layer, head=head)
            return

        # The terminal picture fits two grids side by side in the console width.
        grid = max(8, min(64, (out.width - 6) // 2))
        s = summary.summarize(profile, length, layer=layer, head=head, grid=grid,
                              tile=drawing.PNG_TILE if png is not None else None)
        if png is not None:
            w, h = drawing.write_png(s, png, force)
            err.print(Text(f"wrote {safe_text(png)} ({w} x {h} px)"))
        if as_json:
            typer.echo(json.dumps(s.to_dict(), indent=2, allow_nan=False))
        else:
            render.render_summary(s, out, layer=layer)

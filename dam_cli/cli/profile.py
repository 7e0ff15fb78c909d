"""`dam profile`: options -> ProfileConfig -> run_profile -> summary table or JSON."""

from __future__ import annotations

import json
import sys

import typer

from dam_cli.cli import options

HELP = """Profile a frozen model's attention and save one DAM mask per (layer, query head).

Runs the model on calibration text, captures float32 attention after rotary embedding, and
applies the DAM recipe (Box-Cox, shift, threshold tau, pattern match mu). With no --model the
embedded SmolLM2-135M-Instruct is used; with no --calib, built-in text from Python's own docs.

Examples:

  dam profile --output smollm2.safetensors

  dam profile --recipe paper --output faithful.safetensors

  dam profile --model ./my-llama --calib news.jsonl --samples 32 --pcl 1024 --output p.safetensors

  dam profile --pcl 512 --save-capture cap.h5 --output a.safetensors

  dam profile --from-capture cap.h5 --tau 0.2 --mu 0.9 --output b.safetensors --json

  dam profile --recipe paper --pattern-mass 0.9 --min-support 64 -o mass-patterns.safetensors

  dam profile --model gemma3-270m --retrieval-heads 0 --runtime recommended -o profiles/gemma3-270m.safetensors

  dam profile --model ./qwen2.5-7b-q4_k_m.gguf --stream --pcl 512 --samples 4 -o qwen7b.safetensors

  dam profile --nproc 2 --output p.safetensors      (the same file as one process, sooner)

  torchrun --nproc-per-node 2 $(which dam) profile --model ./my-llama --device cuda -o p.safetensors

  dam profile --model ./llama-70b --device-map auto --pcl 512 --samples 8 -o llama70b.safetensors

A model whose float32 weights would not fit in memory is streamed without --stream: one decoder layer's
weights are read (from safetensors shards or a GGUF file), run on every window, and dropped.
"""


def register(app: typer.Typer) -> None:
    @app.command("profile", help=HELP, no_args_is_help=False)
    def profile_cmd(
        output: str = typer.Option(..., "--output", "-o", callback=options.given_path,
                                   help="Where to write the .safetensors profile."),
        model: str = typer.Option(
            None, "--model", "-m", callback=options.given_path,
            help="Model folder, .gguf file or cached hub id (default: embedded SmolLM2-135M-Instruct)."),
        calib: list[str] = typer.Option(
            None, "--calib", callback=options.given_path,
            help="Calibration text: files, folders, JSON lines (.jsonl, .ndjson) or JSON records (.json: an object "
                 "or a list of objects with a text field); repeatable. "
                 "Default: built-in text."),
        text_field: str = typer.Option("text", "--text-field", help="JSONL / JSON field holding the text."),
        samples: int = typer.Option(16, "--samples", "-n", help="Number of calibration windows of --pcl tokens."),
        pcl: int = typer.Option(
            None, "--pcl", "-L", show_default=False,
            help="Pattern capture length L (default and paper: 512; with --from-capture, the capture's)."),
        tau: float = typer.Option(0.3, "--tau", help="Threshold on shifted Box-Cox attention (paper: 0.3; > 0)."),
        lam: float = typer.Option(0.5, "--lam", help="Box-Cox lambda (paper: 0.5)."),
        mu: float = typer.Option(0.8, "--mu", help="Pattern match ratio in (0, 1] (paper: 0.8)."),
        recipe: str = typer.Option(
            None, "--recipe", show_default=False,
            help="recommended (the default: mass-chosen patterns, 16 needle-scored retrieval heads, and run-time "
                 "dynamic options recorded in the profile) or paper (the paper's method exactly; the default with "
                 "--from-capture, since needle scores need the model). Options below override the recipe's values."),
        min_support: int = typer.Option(
            None, "--min-support", show_default=False,
            help="Beyond the paper: ignore diagonals/columns shorter than this many cells "
                 "(paper: 1; recommended: 64)."),
        pattern_mass: float = typer.Option(
            None, "--pattern-mass",
            help="Beyond the paper: choose each head's offsets and columns as the smallest set covering this share "
                 "of its mean attention mass (recommended: 0.9)."),
        local_window: int = typer.Option(
            0, "--local-window",
            help="Beyond the paper: every head also keeps its W most recent keys, inside L and beyond "
                 "(0 = faithful; e.g. 64)."),
        retrieval_heads: int = typer.Option(
            None, "--retrieval-heads", show_default=False,
            help="Beyond the paper: keep this many heads on full attention, chosen by --retrieval-by (paper: 0; "
                 "recommended: 16)."),
        retrieval_by: str = typer.Option(
            None, "--retrieval-by", show_default=False,
            help="Which heads --retrieval-heads keeps: mass (those whose patterns keep the least attention mass) or "
                 "needle (those that attend most to a hidden code when asked for it; recommended)."),
        needle_length: int = typer.Option(
            0, "--needle-length",
            help="Tokens per needle prompt of --retrieval-by needle (default 4 x --pcl, at most the model's context)."),
        needle_samples: int = typer.Option(8, "--needle-samples", help="Needle prompts of --retrieval-by needle."),
        runtime: str = typer.Option(
            "recipe", "--runtime",
            help="Run-time options the profile records for dam generate / dam eval / enable_dam: recipe (the "
                 "recipe's, unless a mask option above changed), recommended (the recommended dynamic part even so: "
                 "e.g. with --retrieval-heads 0 on a model with sliding-window layers) or none."),
        seed: int = typer.Option(0, "--seed", help=(
            "Seed recorded in the profile (no recipe draws anything random today: the needle prompts use their own "
            "fixed seed, so every seed gives the same masks).")),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        save_capture: str = typer.Option(None, "--save-capture", callback=options.given_path,
                                         help="Also write the raw statistics (HDF5) for later re-derivation."),
        from_capture: str = typer.Option(None, "--from-capture", callback=options.given_path,
                                         help="Re-derive masks from a saved capture; the model is not run."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (for CI)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table; errors only."),
        force: bool = typer.Option(False, "--force", "-f", help="Replace an existing --output (and --save-capture)."),
        stream: bool = typer.Option(
            False, "--stream",
            help="Run the model one decoder layer at a time (memory: one layer plus activations), for models larger "
                 "than memory; chosen by itself when the float32 weights would not fit. Same profile as a full load."),
        nproc: int = typer.Option(
            1, "--nproc",
            help="Share the work among N processes (torch.distributed: gloo on CPUs, NCCL with GPUs, cuda:0..N-1): "
                 "each captures every N-th window and derives every N-th layer. The file is byte-identical to one "
                 "process's. Under torchrun, leave it at 1."),
        device_map: str | None = options.device_map_option(),
    ) -> None:
        from dam_cli.distributed import launched_rank
        from dam_cli.profiling.config import ProfileConfig, validate
        from dam_cli.profiling.recipes import recipe_fields
        from dam_cli.progress import NullReporter, RichReporter
        from dam_cli.text import safe_text

        other_rank = launched_rank() != 0  # under torchrun, rank 0 alone reports
        reporter = (NullReporter(notes=as_json and not quiet and not other_rank) if (quiet or as_json or other_rank)
                    else RichReporter())
        given = dict(min_support=min_support, pattern_mass=pattern_mass, retrieval_heads=retrieval_heads,
                     retrieval_by=retrieval_by, local_window=local_window or None,
                     needle_length=needle_length or None, pcl=pcl,
                     tau=None if tau == 0.3 else tau, lam=None if lam == 0.5 else lam, mu=None if mu == 0.8 else mu)
        fields = recipe_fields(recipe or ("paper" if from_capture else "recommended"), given, runtime)
        if from_capture and retrieval_by is None and fields.get("retrieval_by") == "needle":  # the recipe's choice
            from dam_cli.errors import DamUsageError

            raise DamUsageError(f"--recipe {recipe} chooses its retrieval heads with needle prompts, which need the "
                                "model: with --from-capture use --recipe paper, or add --retrieval-by mass")
        cfg = ProfileConfig(output=output, model=model, calib=tuple(calib or ()), text_field=text_field,
                            samples=samples, tau=tau, lam=lam, mu=mu, needle_samples=needle_samples,
                            seed=seed, device=device, save_capture=save_capture, from_capture=from_capture,
                            force=force, stream=stream, nproc=nproc, device_map=device_map,
                            retrieval_heads_given=retrieval_heads is not None,
                            **{k: v for k, v in fields.items() if k not in ("tau", "lam", "mu")})
        calib_files = validate(cfg)  # bad options and paths: one line, before any other output (no torch import)
        if text_field != "text" and calib_files:
            from dam_cli.profiling.calib import is_json, is_jsonl

            if not any(is_jsonl(f) or is_json(f) for f in calib_files):
                print(f"note: --text-field names a field of JSON records, and no --calib file is JSON (.jsonl, .json): "
                      f"--text-field {safe_text(text_field)} ignored", file=sys.stderr)
        # The first line comes at once: importing torch and loading (or first converting) the model take a while.
        source = f"the capture {safe_text(from_capture)}" if from_capture else (safe_text(model) if model else
                                                                               "the embedded SmolLM2-135M-Instruct")
        reporter.log(f"dam profile: {source} -> {safe_text(output)}; importing torch")
        from dam_cli.profiling.run import run_profile

        result = run_profile(cfg, reporter)
        if result is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
        if as_json:
            doc = {"output": result.output, "seconds": round(result.seconds, 3), **result.summary}
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        elif not quiet:
            _render(result)


def _render(result) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dam_cli.text import safe_text

    s = result.summary
    con = Console()
    r = s["recipe"]
    title = (f"DAM profile of {safe_text(s['model'])}: L={r['pcl']} tau={r['tau']} lam={r['lam']} mu={r['mu']}, "
             f"{safe_text(s['calibration'].get('samples'))} samples")
    t = Table(title=Text(title), title_justify="left")  # Text: a name from a file is never read as markup
    for c in ("layer", "true-mask density", "offsets/head", "columns/head", "mass kept"):
        t.add_column(c, justify="right")
    for row in s["layers"]:
        t.add_row(str(row["layer"]), f"{row['true_density']:.4f}", f"{row['offsets_mean']:.2f}",
                  f"{row['columns_mean']:.2f}", f"{row['mass_kept']:.3f}")
    t.add_row("all", f"{s['true_density']:.4f}", f"{s['offsets_per_head']:.2f}", f"{s['columns_per_head']:.2f}", "",
              style="bold")
    con.print(t)
    con.print(f"wrote {safe_text(result.output)} in {result.seconds:.1f} s", markup=False)

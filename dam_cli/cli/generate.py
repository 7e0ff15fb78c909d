"""`dam generate`: parse options into a GenerateConfig, make one library call, render the result.

Text streams to stdout as it is generated and the statistics go to stderr; with --json nothing
streams and one JSON object (text and statistics) is printed on stdout. JSON-lines prompts (a
`--prompt-file` named *.jsonl, or `--jsonl`) run in batches: one JSON line per prompt on stdout.
"""

from __future__ import annotations

import typer

from dam_cli.cli import options

HELP = """Generate text from a prompt with DAM sparse attention (or full attention to compare).

The prompt comes from --prompt, --prompt-file, or stdin. Text streams to stdout; prompt tokens, time to first
token, decode speed, peak memory and the profile's density at this length go to stderr. On CUDA the Triton kernels
run; on the CPU block-sparse PyTorch over the kept key blocks (equal to the exact reference up to rounding).

Many prompts: a --prompt-file named *.jsonl (or --jsonl, e.g. for stdin) holds one JSON object per line,
{"prompt": "...", "id": "..."} (id optional: the line number). They run in batches of --batch-size (default 8), left
padded, each prompt getting the tokens it would get alone; stdout gets one JSON line per prompt (id, text,
prompt_tokens, new_tokens, finish_reason), stderr the totals and throughput.

Several GPUs (docs/guides/multi-gpu.md): --tp under `torchrun --nproc-per-node N` splits the heads over N processes
(each runs DAM on its own heads; rank 0 prints), --device-map auto spreads the layers of a model too large for one.

Examples:

  dam generate --profile profiles/smollm2-135m-instruct-paper.safetensors --prompt "Tell me a story"

  dam generate --profile smollm2.safetensors --prompt-file long.txt --max-new-tokens 64

  cat report.txt | dam generate --profile smollm2.safetensors --chat --json

  dam generate --model ./my-llama --profile my-llama.safetensors --attention full --device cuda

  dam generate --model ./my-llama --profile my-llama.safetensors --prompt-file long.txt --cuda-graph

  dam generate --profile smollm2.safetensors --prompt-file prompts.jsonl --batch-size 16 --max-new-tokens 64

  dam generate --profile profiles/smollm2-135m-instruct.safetensors --prompt-file long.txt \\
      --dynamic-topk 9 --dynamic-block 64 --dynamic-tail-topk 32 --dynamic-tail-mass 0

  torchrun --nproc-per-node 2 "$(command -v dam)" generate --tp --model ./my-llama --profile my-llama.safetensors \\
      --prompt-file long.txt

  dam generate --device-map auto --model ./big-llama --profile big-llama.safetensors --prompt-file long.txt
"""


def register(app: typer.Typer) -> None:
    @app.command("generate", help=HELP, no_args_is_help=False)
    def _cmd(
        profile: str = typer.Option(None, "--profile", "-p", callback=options.given_path, help=(
            "DAM profile (.safetensors) made for this model by `dam profile`; required with --attention dam.")),
        model: str = options.model_option(),
        prompt: str = typer.Option(None, "--prompt", help="Prompt text."),
        prompt_file: str = typer.Option(None, "--prompt-file", callback=options.given_path,
                                        help="Read the prompt from this UTF-8 file ('-' for stdin)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate at most."),
        attention: str = typer.Option("dam", "--attention", help=(
            "dam (sparse, needs --profile), full (plain dense SDPA through the same registry) or sdpa "
            "(transformers' own).")),
        backend: str = options.backend_option(),
        chat: bool = typer.Option(False, "--chat",
                                  help="Wrap the prompt in the model's chat template (one user turn)."),
        device: str = options.device_option(),
        dtype: str = typer.Option("auto", "--dtype",
                                  help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16."),
        seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default); > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", help=(
            "Nucleus sampling: keep the smallest set of tokens with this much probability.")),
        top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
        ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at end-of-sequence (for timing)."),
        dynamic_topk: int = options.dynamic_topk_option(),
        dynamic_block: int = options.dynamic_block_option(),
        dynamic_tail_topk: int | None = options.dynamic_tail_topk_option(),
        dynamic_score: str = options.dynamic_score_option(),
        dynamic_tail_mass: float | None = options.dynamic_tail_mass_option(),
        dynamic_mass: float | None = options.dynamic_mass_option(),
        cuda_graph: bool = typer.Option(False, "--cuda-graph", help=(
            "Decode with a static KV cache and one CUDA graph replayed per token: removes the per-step host "
            "overhead (CUDA only; with --dynamic-topk, --dynamic-block must be a multiple of 64).")),
        as_json: bool = typer.Option(False, "--json", help=(
            "Print text and statistics as one JSON object on stdout (no streaming); with JSON-lines prompts, "
            "the same one line per prompt.")),
        jsonl: bool = typer.Option(False, "--jsonl", help=(
            "The prompt file (or stdin) holds JSON lines, {\"prompt\": ..., \"id\": ...}, whatever its name "
            "(a --prompt-file named *.jsonl needs no flag).")),
        batch_size: int | None = typer.Option(None, "--batch-size", help=(
            "Prompts generated together, with JSON-lines prompts (default 8).")),
        tp: bool = typer.Option(False, "--tp", help=(
            "Tensor parallel: split the attention heads (and the MLPs) over the processes of `torchrun "
            "--nproc-per-node N`, one GPU each (gloo on CPUs); each rank runs DAM on its heads, rank 0 prints.")),
        device_map: str | None = options.device_map_option(),
    ) -> None:
        import sys

        if tp:  # every rank runs this command; rank 0 alone speaks, refusals included
            quiet_unless_rank_zero()
        from dam_cli.runtime.generate import GenerateConfig, check_config, format_stats, is_batch, run_generate

        dynamic = options.dynamic_flags(dynamic_topk, dynamic_block, dynamic_tail_topk, dynamic_score,
                                        dynamic_tail_mass, dynamic_mass)
        cfg = GenerateConfig(profile=profile, model=model, prompt=prompt, prompt_file=prompt_file,
                             max_new_tokens=max_new_tokens, attention=attention, backend=backend, chat=chat,
                             device=device, dtype=dtype, seed=seed, temperature=temperature, top_p=top_p,
                             top_k=top_k, ignore_eos=ignore_eos, dynamic=dynamic, cuda_graph=cuda_graph,
                             jsonl=jsonl, batch_size=batch_size, tp=tp, device_map=device_map)
        check_config(cfg)  # the option combinations first, then what this machine can do
        check_machine(device, backend if attention == "dam" else None, cuda_graph)
        unused = [flag for flag, given in (("--dynamic-*", dynamic is not None), ("--backend", backend != "auto"))
                  if given]
        if attention != "dam" and unused:  # said once, as profile says of what --from-capture ignores
            verb = "applies" if len(unused) == 1 else "apply"
            print(f"note: {' and '.join(unused)} {verb} to --attention dam only: ignored with --attention {attention}",
                  file=sys.stderr)
        if is_batch(cfg):
            run_prompt_lines(cfg)
            return

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = run_generate(cfg, on_text=None if as_json else stream)
        if as_json:
            sys.stdout.write(json_line(result.to_dict()))
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(format_stats(result), file=sys.stderr)


def json_line(obj) -> str:
    """One JSON line, UTF-8 text as it is (generated text stays readable); a path holding bytes that were not UTF-8
    (surrogate escapes) is written as JSON `\\u` escapes, never as the raw bytes."""
    import json

    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8") + "\n"


def run_prompt_lines(cfg) -> None:
    """JSON-lines prompts: one JSON line per prompt on stdout as its batch completes, the totals on stderr."""
    import sys

    from dam_cli.runtime.generate_batch import format_totals, run_batch

    def emit(result) -> None:
        sys.stdout.write(json_line(result.to_dict()))
        sys.stdout.flush()

    totals = run_batch(cfg, on_result=emit)
    print(format_totals(totals), file=sys.stderr)


def quiet_unless_rank_zero() -> None:
    """Under `--tp` every rank runs the same generation: ranks other than 0 write nothing, to stdout or stderr
    (their C++ libraries included), unless DAM_DEBUG is set (then every rank's errors show, with tracebacks)."""
    import os
    import sys

    from dam_cli.distributed import launched_rank
    from dam_cli.errors import debug_enabled

    if launched_rank() == 0 or debug_enabled():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    sys.stdout = sys.stderr = open(null, "w")  # kept open until the process ends


def check_machine(device: str, backend: str | None, cuda_graph: bool) -> None:
    """Refuse, before the model loads, an unknown `--backend`, and flags this machine cannot honour: `--backend
    triton` or `--cuda-graph` where the run would be on the CPU (`--device cpu`, or `auto` without a CUDA GPU).
    `DamUsageError`."""
    import torch

    from dam_cli.errors import DamUsageError
    from dam_cli.runtime.attention import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise DamUsageError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")

    d = (device or "auto").lower()
    on_cpu = d == "cpu" or (d == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return  # `--device cuda` without a GPU gets its own message when the device is resolved
    where = "--device cpu was given" if d == "cpu" else "this machine has no CUDA GPU"
    if backend == "triton":
        raise DamUsageError(f"--backend triton needs a CUDA GPU, and {where}: use --backend auto or reference")
    if cuda_graph:
        raise DamUsageError(f"--cuda-graph needs a CUDA device, and {where}: drop --cuda-graph, or pass --device "
                            "cuda on a machine with a GPU")

"""`dam eval` as a library: how close DAM stays to full attention, against StreamingLLM at the same density.

`evaluate(model, tokenizer, identity, profile, EvalConfig)` runs every (task, method, length) on a
loaded model and returns one JSON-serialisable dict (schema in docs/guides/eval.md);
`run_eval(EvalRunConfig)` is the whole `dam eval` command short of rendering: it checks the
options, loads the profiles and the model, evaluates and writes the JSON file.
Tasks run here: `alignment`, `recall`, and the `lines` / `passkey` retrieval prompts of `tasks`;
the suite's tasks in `suite_run`; the methods are in `methods`, the attention probes in `probes`,
the measurements in `metrics`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from dam_kernels.selection import DynamicFlags, DynamicSelection, resolve_dynamic

from dam_cli.errors import DamError, DamUsageError
from dam_cli.evaluation import baselines, tasks
from dam_cli.evaluation.answers import greedy_answer, number_ended
from dam_cli.evaluation.config import (
    DEFAULT_DYNAMIC,
    METHODS,
    RESULT_SCHEMA,
    TASK_NAMES,
    EvalConfig,
    check_options,
    default_lengths,
    generated_tokens,
    quick_config,
    split_task_names,
    uses_reference,
    validate,
)
from dam_cli.evaluation.heldout import heldout_tokens
from dam_cli.evaluation.journal import (
    AnswerJournal,
    NullJournal,
    check_journal,
    fingerprint,
    journal_path,
    kept_or_made,
)
from dam_cli.evaluation.methods import METHOD_BUILDERS, _Context, method_active, method_topk
from dam_cli.evaluation.metrics import alignment_metrics, attention_recall, score_positions
from dam_cli.evaluation.probes import new_record, record_full_qk, recording
from dam_cli.evaluation.suite_run import run_suite, suite_prompts_by_length
from dam_cli.progress import NullReporter

# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, identity: dict, profile, config: EvalConfig, *, device: str = "cpu",
             reporter=None, journal=None, model_arg: str | None = None) -> dict:
    """Run every (task, method, length) of `config` on `model`; return the JSON-serialisable result.

    Checks first that the profile matches the model and that the config is valid (DamError /
    DamUsageError). The model is restored to its own attention afterwards. `journal`
    (`journal.AnswerJournal`): generated answers are kept in it as they come, and those it already holds
    are not generated again. `model_arg`: the `--model` the profile's refusal tells the user to profile.
    """
    from dam_cli.runtime.backend import check_profile_matches

    reporter = reporter or NullReporter()
    validate(config, identity)
    check_profile_matches(profile, identity, model_arg=model_arg)
    ctx = _Context(profile=profile, identity=identity, config=config)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "model": identity.get("name"),
        "profile": {"path": getattr(profile, "path", None), "pcl": profile.pcl,
                    "recipe": profile.meta.recipe},
        "device": device,
        "full_attention": "reference: the model's attention, causal within its windows (same arithmetic as dam)"
        if uses_reference(config, device)
        else "dense SDPA",
        "config": config_settings(config),
        "options_profile": None if config.options_profile is None else {
            "path": getattr(config.options_profile, "path", None), "pcl": config.options_profile.pcl,
            "recipe": config.options_profile.meta.recipe},
        "lengths": list(config.lengths),
        "methods": list(config.methods),
        "density": {}, "streaming_window": {}, "alignment": {}, "recall": {}, "retrieval": {},
        "prompts": [], "suite": None, "seconds": {},
    }
    suite = suite_prompts_by_length(tokenizer, config) if config.suite_tasks else None  # before any forward
    for task in (t for t in config.tasks if t in tasks.TASKS):  # a length too short for a task: said before too
        tasks.make_prompt(task, tokenizer, min(config.lengths), config.depths[0], config.sample_start)
    ctx.measure = _measure_forward(model, tokenizer, ctx, device)
    if "alignment" in config.tasks or "recall" in config.tasks:
        _run_alignment(model, tokenizer, ctx, result, device, reporter)
    for task in config.tasks:
        if task in tasks.TASKS:
            _run_retrieval(model, tokenizer, ctx, task, result, device, reporter, journal)
    if suite is not None:
        result["suite"], seconds = run_suite(model, tokenizer, ctx, suite, device, reporter, journal)
        for m, s in seconds.items():
            _add_seconds(result, m, s)
    # Densities last: a dynamic method's is measured on the held-out window (during its alignment
    # forward, or by one forward of its own), and streaming-options-dynamic is matched to it.
    result["dynamic_density"] = {}
    for n in config.lengths:
        key = str(n)
        for m in config.methods:
            if m == "full":
                d = 1.0
            elif m.startswith("streaming"):
                sp = METHOD_BUILDERS[m](ctx, n)
                d = baselines.streaming_density(n, sp.meta.recipe["sink"], sp.meta.recipe["window"])
                result["streaming_window"].setdefault(m, {})[key] = {"sink": sp.meta.recipe["sink"],
                                                                     "window": sp.meta.recipe["window"]}
            elif method_topk(ctx, m):  # measured: the selection depends on the input
                d = ctx.dynamic_density(m, n)
                result["dynamic_density"].setdefault(m, {})[key] = ctx.measured[(m, n)]
            else:
                d = float(METHOD_BUILDERS[m](ctx, n).density(n).mean())
            result["density"].setdefault(m, {})[key] = d
    result["seconds"]["total"] = time.perf_counter() - t_start
    result["resumed_answers"] = journal.reused if journal is not None else 0
    return result


def config_settings(config: EvalConfig) -> dict:
    """`config` as the result's `config` (and the journal's fingerprint) hold it: plain JSON values, the options
    profile left out (the result names it apart)."""
    return {f.name: v.as_dict() if isinstance(v, DynamicSelection) else list(v) if isinstance(v, tuple) else v
            for f in fields(config) if f.name != "options_profile" for v in [getattr(config, f.name)]}


def _measure_forward(model, tokenizer, ctx: _Context, device: str) -> Callable[[str, int], None]:
    """`ctx.measure`: one forward of a dynamic method on the held-out window, through the probe."""
    held: list[list[int]] = []

    def measure(method: str, length: int) -> None:
        if not held:
            held.append(heldout_tokens(tokenizer, max(ctx.config.lengths), ctx.config.text))
        x = torch.tensor([held[0][:length]], dtype=torch.long, device=device)
        with method_active(model, method, ctx, length, device, measure=True), torch.no_grad():
            model(input_ids=x, use_cache=False, logits_to_keep=1)

    return measure


def _run_alignment(model, tokenizer, ctx: _Context, result: dict, device: str, reporter) -> None:
    cfg = ctx.config
    ids = heldout_tokens(tokenizer, max(cfg.lengths), cfg.text)
    want_align, want_recall = "alignment" in cfg.tasks, "recall" in cfg.tasks
    methods = list(cfg.methods)
    if "full" not in methods:  # full is the reference of both measurements
        methods = ["full"] + methods
    # Baselines matched to a dynamic method's measured density run after it (its forward measures).
    methods.sort(key=lambda m: m.startswith("streaming") and m.endswith("-dynamic"))
    total = len(cfg.lengths) * len(methods)
    with reporter.task("alignment / recall", total) as bar:
        for n in cfg.lengths:
            key = str(n)
            x = torch.tensor([ids[:n]], dtype=torch.long, device=device)
            pos = score_positions(n, cfg.align_positions)
            targets = torch.tensor(ids[1:n])[pos]
            rows = torch.linspace(0, n - 1, min(cfg.recall_rows, n)).round().to(torch.int64).unique()
            logp_full = rec = None
            for m in methods:
                t0 = time.perf_counter()
                recorder = contextlib.nullcontext()
                if m == "full" and want_recall and uses_reference(cfg, device):
                    rec = new_record(rows, device)  # the full forward itself records q/k
                    recorder = recording(rec)
                probe = bool(method_topk(ctx, m)) and (m, n) not in ctx.measured
                with recorder, method_active(model, m, ctx, n, device, measure=probe), torch.no_grad():
                    logits = model(input_ids=x, use_cache=False, logits_to_keep=pos.to(device)).logits
                logp = torch.log_softmax(logits[0].float().cpu(), dim=-1)
                if m == "full":
                    logp_full = logp
                    if want_recall and rec is None:
                        rec = record_full_qk(model, x, rows, device)
                if want_align and m in cfg.methods:
                    result["alignment"].setdefault(m, {})[key] = alignment_metrics(logp_full, logp, targets)
                if want_recall and m in cfg.methods:
                    result["recall"].setdefault(m, {})[key] = _recall_of(ctx, m, n, rec, rows)
                _add_seconds(result, m, time.perf_counter() - t0)
                bar.advance()
            del logp_full, rec


def _recall_of(ctx: _Context, method: str, length: int, rec: dict, rows: torch.Tensor) -> dict:
    """Per-layer, per-head recall of `method`'s mask at `length` from the recorded full q/k, against the
    model's full attention as recorded (each layer's sliding window and soft-cap; absent: none)."""
    build = METHOD_BUILDERS[method]
    n_layers = len(rec["q"])
    if build is None:
        per = [[1.0] * rec["q"][layer].shape[0] for layer in range(n_layers)]
    else:
        prof = build(ctx, length)
        per = []
        for layer in range(n_layers):
            allowed = prof.mask_rows(layer, rows, length)
            per.append(attention_recall(rec["q"][layer], rec["k"][layer], rec["scale"][layer], rows, allowed,
                                        window=rec.get("window", {}).get(layer),
                                        softcap=rec.get("softcap", {}).get(layer)).tolist())
    flat = [v for row in per for v in row]
    return {"mean": sum(flat) / len(flat), "min": min(flat), "per_head": per, "rows": int(rows.shape[0])}


def _run_retrieval(model, tokenizer, ctx: _Context, task: str, result: dict, device: str, reporter,
                   journal=None) -> None:
    cfg = ctx.config
    journal = journal or NullJournal()

    def answer(p) -> str:
        return greedy_answer(model, tokenizer, p.ids, cfg.max_new_tokens, device, stop=number_ended(tokenizer),
                             graph=cfg.cuda_graph)

    prompts = [tasks.make_prompt(task, tokenizer, n, d, i)
               for n in cfg.lengths for d in cfg.depths
               for i in range(cfg.sample_start, cfg.sample_start + cfg.samples)]
    out = result["retrieval"].setdefault(task, {})
    with reporter.task(f"{task} retrieval", len(prompts) * len(cfg.methods)) as bar:
        for m in cfg.methods:
            for n in cfg.lengths:
                batch = [p for p in prompts if p.length == n]
                keys = [("retrieval", task, m, n, p.depth, p.index) for p in batch]
                t0 = time.perf_counter()
                answers = kept_or_made(journal, keys, batch, method_active(model, m, ctx, n, device), answer)
                for p, text in zip(batch, answers, strict=True):
                    ok = tasks.is_correct(text, p.answer)
                    cell = out.setdefault(m, {}).setdefault(str(n), {}).setdefault(
                        f"{p.depth:g}", {"correct": 0, "total": 0})
                    cell["correct"] += int(ok)
                    cell["total"] += 1
                    result["prompts"].append({"task": task, "method": m, "length": n, "depth": p.depth,
                                              "index": p.index, "tokens": len(p.ids), "answer": p.answer,
                                              "output": text, "parsed": tasks.parse_answer(text),
                                              "correct": ok})
                    bar.advance()
                _add_seconds(result, m, time.perf_counter() - t0)
    for by_len in out.values():
        for cells in by_len.values():
            for c in cells.values():
                c["accuracy"] = c["correct"] / c["total"]


def _add_seconds(result: dict, method: str, s: float) -> None:
    result["seconds"][method] = result["seconds"].get(method, 0.0) + s



# ----------------------------------------------------------------------------------------------
# The library call
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalRunConfig:
    """Everything `dam eval` needs; the CLI fills it from its options.

    A count left at None takes `EvalConfig`'s default, or `quick_config`'s when `quick` is set.
    """

    profile: str  # DAM profile file made for the model
    model: str | None = None  # model spec for load_model (None = embedded SmolLM2)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    options_profile: str | None = None  # profile file made with beyond-paper options, for the *-options methods
    methods: tuple[str, ...] = METHODS  # names of METHOD_BUILDERS, in report order
    tasks: tuple[str, ...] = TASK_NAMES  # `--tasks` names: TASK_NAMES, suite tasks, `suite`, `suite:NAME`
    lengths: tuple[int, ...] | None = None  # None: default_lengths (1x..16x the PCL within the model's context)
    quick: bool = False  # tiny counts for CI (quick_config), and 1x, 2x the PCL by default
    depths: tuple[float, ...] | None = None
    samples: int | None = None
    sample_start: int = 0
    split: str = "development"  # the suite's seed split
    per_task: int | None = None  # suite prompts per task and length
    prompt_form: str | None = None  # suite prompts: chat | completion (None: chat when the tokenizer has a template)
    align_positions: int | None = None
    recall_rows: int | None = None
    sink: int = baselines.DEFAULT_SINK
    text: str | None = None  # held-out text file (None: built-in)
    backend: str = "auto"  # dam kernels: auto | triton | reference
    cuda_graph: bool = False  # answers decoded by the static-cache CUDA-graph loop (CUDA only)
    dtype: str = "float32"  # the model's dtype: float32 | bfloat16 | float16 | auto (bfloat16 on CUDA)
    # the dynamic part of the dam-*-dynamic methods: whole, or the flags given over what the (options) profile
    # recommends (else the default); None: that recommendation
    dynamic: DynamicSelection | DynamicFlags | None = None
    output: str | None = None  # also write the JSON result (`result_json`) to this file
    force: bool = False  # replace an existing `output` file (checked before the evaluation)
    resume: bool = False  # reuse the answers of `output`'s journal (`journal`), left by a run that stopped early


def result_json(result: dict) -> str:
    """The result as `--json` prints it and `--output` writes it (less the final newline)."""
    return json.dumps(result, indent=1, sort_keys=True)


def eval_config(cfg: EvalRunConfig, pcl: int, max_position: int, options_profile=None) -> EvalConfig:
    """The `EvalConfig` of a run on a model whose context is `max_position` tokens (0: unknown),
    with a profile of PCL `pcl`; `options_profile` is the loaded profile of `cfg.options_profile`."""
    ours, suite = split_task_names(cfg.tasks)
    kw: dict[str, Any] = {
        "methods": cfg.methods, "tasks": ours, "suite_tasks": suite, "sink": cfg.sink, "backend": cfg.backend,
        "text": cfg.text, "dynamic": cfg.dynamic, "sample_start": cfg.sample_start, "split": cfg.split,
        "prompt_form": cfg.prompt_form, "cuda_graph": cfg.cuda_graph}
    if options_profile is not None:
        kw["options_profile"] = options_profile
    for name in ("depths", "samples", "per_task", "align_positions", "recall_rows"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    make = quick_config if cfg.quick else (lambda lengths, **kw: EvalConfig(lengths=lengths, **kw))
    if cfg.lengths is not None:
        return make(cfg.lengths, **kw)
    # Prompts that generate need room for their answer within the model's context.
    reserve = max(0, generated_tokens(make((1,), **kw)) - 1)
    return make(default_lengths(pcl, max_position, cfg.quick, reserve), **kw)


def check_graph_run(cfg: EvalRunConfig, device: str, head_dim: int | None = None, dtype=None) -> None:
    """`--cuda-graph` needs CUDA, the kernels (not the reference), dynamic blocks of whole decode key blocks, and
    (where the profile names the model's head dim) kernels that take that head dim in this dtype on this GPU:
    all checked before the model loads, not after full attention's prompts."""
    from dam_cli.runtime.decode import check_graph_dynamic

    if not device.startswith("cuda"):
        raise DamUsageError(f"--cuda-graph needs a CUDA device, and this run is on {device}: drop --cuda-graph")
    if cfg.backend == "reference":
        raise DamUsageError("--cuda-graph runs the Triton kernels: drop --backend reference, or drop --cuda-graph")
    check_graph_dynamic(cfg.dynamic, DamUsageError)
    if head_dim and dtype is not None:
        from dam_cli.runtime.attention import triton_refusal

        why = triton_refusal(torch.empty(1, 1, 1, int(head_dim), dtype=dtype, device=device))
        if why is not None:
            raise DamUsageError(f"--cuda-graph runs the Triton kernels, which refuse this model here ({why}): "
                                "pass --dtype bfloat16, or drop --cuda-graph")


def _same_model(options, profile, cfg: EvalRunConfig) -> None:
    """DamUsageError unless the --options-profile was made for the model of the --profile."""
    from dam_cli.runtime.backend import check_profile_matches, describe_identity
    from dam_cli.text import safe_text

    try:
        check_profile_matches(options, profile.meta.model)
    except DamError:
        raise DamUsageError(f"--options-profile {safe_text(cfg.options_profile)} and --profile "
                            f"{safe_text(cfg.profile)} were made for different models "
                            f"({describe_identity(options.meta.model)}; {describe_identity(profile.meta.model)}): "
                            "give two profiles of the same model") from None


def eval_reads(cfg: EvalRunConfig) -> dict:
    """The files an evaluation reads, by option: an output must not replace one of them (`check_writable`)."""
    return {"--profile": cfg.profile, "--options-profile": cfg.options_profile, "--text": cfg.text,
            "--model": cfg.model}


def run_eval(cfg: EvalRunConfig, reporter=None) -> dict:
    """Run `dam eval` short of rendering: load the profiles and the model, evaluate, write `cfg.output`.

    Names, options, the output path (`check_writable`) and lengths against the profile's model are
    checked before any model is loaded; `evaluate` checks the rest. Progress goes to `reporter`.
    """
    from dam_cli.artifact.profile import load_profile
    from dam_cli.atomic import atomic_write_bytes, check_writable
    from dam_cli.runtime.backend import recommended_dynamic
    from dam_cli.runtime.models import load_model, resolve_device, resolve_dtype

    reporter = reporter or NullReporter()
    _, suite_tasks = split_task_names(cfg.tasks)
    from dam_cli.runtime.attention import BACKENDS

    if cfg.backend not in BACKENDS:  # the CLI checks it too; a library call once learnt it after the model loaded
        raise DamUsageError(f"unknown --backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    flags = cfg.dynamic.over_any() if isinstance(cfg.dynamic, DynamicFlags) else cfg.dynamic or DEFAULT_DYNAMIC
    check_options(cfg.methods, flags, cfg.split, EvalConfig.per_task if cfg.per_task is None else cfg.per_task,
                  cfg.prompt_form)
    moot = [f for f, on in (("--split", cfg.split != "development"), ("--per-task", cfg.per_task is not None),
                            ("--prompt-form", cfg.prompt_form is not None)) if on]
    if moot and not suite_tasks:
        reporter.log(f"note: {', '.join(moot)} choose the RULER-style suite's prompts, and no suite task is asked "
                     f"for (--tasks {','.join(cfg.tasks)}): ignored")
    if cfg.output:  # a path that cannot take the result is refused now, not after the evaluation
        check_writable(cfg.output, cfg.force, "--output", reads=eval_reads(cfg))
    check_journal(cfg.output, cfg.resume, cfg.force)
    if cfg.text:  # a missing or special --text file is said before the model loads
        from dam_cli.profiling.calib import open_regular

        open_regular(cfg.text, "held-out text").close()
    profile = load_profile(cfg.profile)
    options = load_profile(cfg.options_profile) if cfg.options_profile else None
    if options is not None:  # before the model loads: the two profiles must be of one model
        _same_model(options, profile, cfg)
    # The dynamic flags given, over what the profile of the dynamic methods recommends, else the default.
    cfg = replace(cfg, dynamic=resolve_dynamic(cfg.dynamic, recommended_dynamic(options or profile), DEFAULT_DYNAMIC))
    cfg.dynamic.validate(cli=True, error=DamUsageError)
    cap = int(profile.meta.model.get("max_position") or 0)
    for n in cfg.lengths or ():
        if cap and n > cap:  # fail before loading the model; evaluate() checks again against the model
            raise DamUsageError(f"length {n} is beyond the model's context of {cap} tokens: use --lengths up to {cap}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.cuda_graph:
        check_graph_run(cfg, device, profile.meta.model.get("head_dim"), dtype)
    loaded = load_model(cfg.model, device=device, dtype=dtype)
    config = eval_config(cfg, profile.pcl, int(loaded.identity.get("max_position") or 0), options)
    journal = None
    if cfg.output:
        journal = AnswerJournal(journal_path(cfg.output), fingerprint(
            model=cfg.model, identity=loaded.identity, profile=cfg.profile, options_profile=cfg.options_profile,
            device=device, dtype=str(dtype), config=config_settings(config)), cfg.resume)
    written = False
    try:
        result = evaluate(loaded.model, loaded.tokenizer, loaded.identity, profile, config, device=device,
                          reporter=reporter, journal=journal, model_arg=cfg.model)
        result["profile"]["path"] = cfg.profile
        result["dtype"] = str(dtype).removeprefix("torch.")
        if cfg.output:
            atomic_write_bytes(cfg.output, result_json(result).encode() + b"\n", cfg.force)
            written = True
    finally:  # kept for a run that stopped with answers in it (none: it would trip the next run for nothing), and
        # where an earlier run's answers went unused (its methods, tasks or lengths were not asked for this time)
        if journal is not None and journal.answers and (not written or journal.unused):
            journal.close()
            if written:
                from dam_cli.progress import note
                from dam_cli.text import safe_text

                note(reporter, f"{journal.unused} answer(s) of the journal {safe_text(journal.path)} were for "
                     "methods, tasks or lengths this run did not ask for: it is kept (the earlier command with "
                     "--resume reuses them; delete it, or pass --force, to start over)")
        elif journal is not None:
            journal.remove()
    return result


"""`dam eval`'s run of the RULER-style suite (`dam_cli.evaluation.suite`): every method answers the same prompts.

`suite_prompts_by_length` makes the prompts once, before any forward; `run_suite` answers each one greedily
under each method, up to the prompt's own `max_new_tokens`, scores it with `suite.score` and returns the
`result["suite"]` dict (split, seeds, per-task and per-family means, every prompt's outputs) and the seconds
each method took. `suite_summary` is the pure aggregation.
"""

from __future__ import annotations

import time

from dam_cli.evaluation.answers import greedy_answer
from dam_cli.evaluation.config import EvalConfig, suite_family
from dam_cli.evaluation.journal import NullJournal, kept_or_made
from dam_cli.evaluation.methods import _Context, method_active
from dam_cli.evaluation.suite import score, split_seeds, suite_prompts
from dam_cli.evaluation.suite.prompting import Prompt, use_chat


def suite_chat(tokenizer, config: EvalConfig) -> bool:
    """Whether the suite's prompts use the chat form: `--prompt-form`, else when the tokenizer has a template."""
    return use_chat(tokenizer, None if config.prompt_form is None else config.prompt_form == "chat")


def suite_prompts_by_length(tokenizer, config: EvalConfig) -> dict[int, list[Prompt]]:
    """Per length, `config.per_task` prompts of each suite task from `config.split` (DamError when a length is
    too short for a task)."""
    chat = suite_chat(tokenizer, config)
    return {n: suite_prompts(tokenizer, n, config.split, config.per_task, tasks=config.suite_tasks, chat=chat)
            for n in config.lengths}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def suite_summary(records: list[dict], method: str, length: int) -> dict:
    """Mean score of `method` at `length` per task, per family (the mean of its tasks' means) and over tasks."""
    per_task: dict[str, list[float]] = {}
    for r in records:
        if r["length"] == length:
            per_task.setdefault(r["task"], []).append(r["outputs"][method]["score"])
    task_means = {t: _mean(v) for t, v in per_task.items()}
    families: dict[str, list[float]] = {}
    for t, v in task_means.items():
        families.setdefault(suite_family(t), []).append(v)
    return {"tasks": task_means, "families": {f: _mean(v) for f, v in families.items()},
            "mean": _mean(list(task_means.values()))}


def run_suite(model, tokenizer, ctx: _Context, prompts: dict[int, list[Prompt]], device: str,
              reporter, journal=None) -> tuple[dict, dict[str, float]]:
    """Answer and score every prompt of `prompts` under every method of `ctx.config`; return the
    `result["suite"]` dict and the seconds per method. `journal` (`journal.AnswerJournal`): answers kept by an
    earlier run are taken from it, new ones written to it as they come."""
    cfg = ctx.config
    journal = journal or NullJournal()

    def answer(p: Prompt) -> str:
        return greedy_answer(model, tokenizer, p.ids, p.meta["max_new_tokens"], device, graph=cfg.cuda_graph)

    records = [{"task": p.meta["task"], "length": n, "seed": p.meta["seed"], "index": p.meta["index"],
                "haystack": p.meta["haystack"], "tokens": len(p.ids), "answers": list(p.answers),
                "max_new_tokens": p.meta["max_new_tokens"], "outputs": {}}
               for n in cfg.lengths for p in prompts[n]]
    seconds: dict[str, float] = {}
    total = sum(len(v) for v in prompts.values()) * len(cfg.methods)
    with reporter.task("suite", total) as bar:
        for m in cfg.methods:
            t0 = time.perf_counter()
            at = 0
            for n in cfg.lengths:
                ps = prompts[n]
                keys = [("suite", m, n, p.meta["task"], p.meta["seed"], p.meta["index"]) for p in ps]
                answers = kept_or_made(journal, keys, ps, method_active(model, m, ctx, n, device), answer)
                for p, text in zip(ps, answers, strict=True):
                    records[at]["outputs"][m] = {"output": text, "score": score(p, text)}
                    at += 1
                    bar.advance()
            seconds[m] = time.perf_counter() - t0
    return {
        "tasks": list(cfg.suite_tasks),
        "families": list(dict.fromkeys(suite_family(t) for t in cfg.suite_tasks)),
        "split": cfg.split,
        "seeds": list(split_seeds(cfg.split, cfg.per_task)),
        "per_task": cfg.per_task,
        "prompt_form": "chat" if suite_chat(tokenizer, cfg) else "completion",
        "scores": {m: {str(n): suite_summary(records, m, n) for n in cfg.lengths} for m in cfg.methods},
        "prompts": records,
    }, seconds

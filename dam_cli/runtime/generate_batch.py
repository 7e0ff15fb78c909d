"""`dam generate` over JSON-lines prompts: many prompts, generated in batches, one result per prompt.

Each non-blank line is a JSON object `{"prompt": TEXT}` with an optional `"id"` (a string or an integer;
default: the line number). `read_prompt_lines` checks every line before any model work (one line naming
the line number, `DamUsageError`); `run_batch` then loads the model once, left-pads each batch of
`batch_size` prompts (in file order) and runs `dam_cli.runtime.decode.batch_decode_loop`, where every
prompt gets the tokens it gets alone (greedy; sampling draws for the whole batch from one seeded generator).

Module-level imports are torch and dam_cli's runtime only, as in `dam_cli.runtime.generate`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dam_cli.errors import DamError, DamUsageError
from dam_cli.json_keys import DuplicateKey, unique_keys
from dam_cli.runtime.decode import batch_decode_loop, eos_ids_of
from dam_cli.runtime.generate import (
    DEFAULT_BATCH_SIZE,
    GenerateConfig,
    check_config,
    check_length,
    encode_prompt,
    is_batch,
    load_run,
    model_context,
    ran_backend,
    read_input,
    switch_attention,
)
from dam_cli.runtime.prompt_input import MAX_BATCH_FILE_BYTES, MAX_PROMPT_BYTES
from dam_cli.text import human_bytes, safe_text

KEYS = ("prompt", "id")  # what a line may hold


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of the file: its line number (from 1), its id and its text."""

    line: int
    id: str | int
    text: str


@dataclass(frozen=True)
class PromptResult:
    """What `dam generate` prints for one prompt, as one JSON line."""

    id: str | int
    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "eos" or "length"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BatchTotals:
    """The whole run: counts, generation time (prefill and decode of every batch; not the model load)."""

    prompts: int
    batches: int
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    attention: str
    backend: str | None  # the DAM kernels that ran; None without DAM
    device: str
    dtype: str

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation time."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


JSON_KINDS = {str: "string", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}


def parse_prompt_lines(text: str, where: str) -> list[BatchPrompt]:
    """The prompts of JSON-lines `text` (blank lines skipped); `DamUsageError` naming `where`, the line number
    and what is wrong at the first bad line: not JSON, not an object, an unknown key, no non-empty "prompt"
    string, an "id" that is not a string or an integer, an id used twice (2 and "2" are one id), a key given twice;
    or no prompt at all."""
    out: list[BatchPrompt] = []
    first_line: dict = {}
    # Lines end at \n, \r\n or \r only: JSON strings may hold U+0085, U+2028 and U+2029 raw, where
    # str.splitlines would end a line.
    for n, raw in enumerate(re.split(r"\r\n|\n|\r", text), start=1):
        if not raw.strip():
            continue
        bad = lambda what, n=n: DamUsageError(f"{where} line {n}: {what}")  # noqa: E731
        try:
            obj = json.loads(raw, object_pairs_hook=unique_keys)
        except DuplicateKey as e:
            raise bad(f"key {safe_text(json.dumps(e.key))[:40]} given twice: give each key once") from None
        except json.JSONDecodeError as e:
            at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at" ends in it
            raise bad(f"not valid JSON ({e.msg}{at} column {e.colno}): write one object per line, "
                      '{"prompt": "...", "id": "..."}') from None
        except RecursionError:
            raise bad("JSON nested too deeply: write one flat object per line, {\"prompt\": \"...\"}") from None
        except ValueError:  # an integer past Python's digit limit for conversion
            raise bad("a number too long to read (over 4,300 digits): shorten it, or give an id as a string") from None
        if not isinstance(obj, dict):
            raise bad(f'a JSON {JSON_KINDS.get(type(obj), "value")}, not an object: write {{"prompt": "..."}}')
        unknown = [k for k in obj if k not in KEYS]
        if unknown:
            raise bad(f'unknown key {safe_text(json.dumps(unknown[0]))}: a line has "prompt" and an optional "id"')
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise bad('no "prompt" string: write {"prompt": "..."}')
        if not prompt.strip():
            raise bad("the prompt is empty: give some text")
        if len(prompt) > MAX_PROMPT_BYTES // 4 and len(prompt.encode("utf-8", "surrogatepass")) > MAX_PROMPT_BYTES:
            raise bad(f"the prompt is over the {human_bytes(MAX_PROMPT_BYTES)} cap on a prompt (beyond any model's "
                      "context): shorten it")
        ident = obj.get("id", n)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise bad(f'"id" must be a string or an integer, got {safe_text(json.dumps(ident))[:40]}')
        for what, value in (("prompt", prompt), ('"id"', ident)):  # both are printed back as UTF-8
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"the {what} holds an unpaired surrogate escape (\\ud800 to \\udfff): fix the text") from None
        if str(ident) in first_line:  # as printed back: the id 2 and the id "2" are one id
            raise bad(f"id {safe_text(json.dumps(ident))[:40]} is already the id of line {first_line[str(ident)]}: "
                      "give every prompt its own id")
        first_line[str(ident)] = n
        out.append(BatchPrompt(line=n, id=ident, text=prompt))
    if not out:
        raise DamUsageError(f'{where} holds no prompts: write one JSON object per line, {{"prompt": "..."}}')
    return out


def read_prompt_lines(cfg: GenerateConfig, stdin=None) -> list[BatchPrompt]:
    """The prompts of the JSON-lines prompt file of `cfg` (or stdin), every line checked."""
    where = "stdin" if cfg.prompt_file in (None, "-") else f"prompt file {safe_text(cfg.prompt_file)}"
    return parse_prompt_lines(read_input(cfg, stdin, cap=MAX_BATCH_FILE_BYTES), where)


def batches_of(n: int, size: int) -> list[range]:
    """Indices 0 .. n-1 in consecutive batches of at most `size`."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def check_graph_batches(prompts: list[BatchPrompt], lengths: list[int], batches: list[range]) -> None:
    """`DamUsageError` naming the lines of the first batch whose prompts encode to different lengths: the
    CUDA-graph loop decodes equal-length batches only."""
    for idx in batches:
        lens = sorted({lengths[i] for i in idx})
        if len(lens) > 1:
            raise DamUsageError(f"--cuda-graph decodes batches of equal-length prompts only, and lines "
                                f"{prompts[idx[0]].line}-{prompts[idx[-1]].line} encode to {lens[0]} to "
                                f"{lens[-1]} tokens: drop --cuda-graph, or pass --batch-size 1")


def run_batch(cfg: GenerateConfig, on_result: Callable[[PromptResult], None] | None = None, stdin=None,
              log: Callable[[str], None] | None = None) -> BatchTotals:
    """Generate for every prompt of a JSON-lines file, in batches of `cfg.batch_size`, in file order.

    Every line, option and prompt length is checked before generation starts (the lines before the model
    loads). Each prompt's result goes to `on_result` as its batch completes; returns the totals.
    """
    from dam_cli.runtime import backend as dam_backend

    log = log or (lambda _m: None)
    check_config(cfg)
    if not is_batch(cfg):
        raise DamUsageError("run_batch takes JSON-lines prompts: a --prompt-file named *.jsonl, or --jsonl")
    prompts = read_prompt_lines(cfg, stdin)
    run = load_run(cfg, log)
    model, tok, device = run.model, run.tokenizer, run.device
    encoded = []
    for p in prompts:
        ids = encode_prompt(tok, p.text, cfg.chat)
        try:
            check_length(len(ids), cfg.max_new_tokens, model_context(model))
        except DamError as e:
            where = "stdin" if cfg.prompt_file in (None, "-") else f"prompt file {safe_text(cfg.prompt_file)}"
            raise type(e)(f"{where} line {p.line}: {e}") from None
        encoded.append(ids)
    size = cfg.batch_size or DEFAULT_BATCH_SIZE
    batches = batches_of(len(prompts), size)
    if cfg.cuda_graph:
        check_graph_batches(prompts, [len(x) for x in encoded], batches)
    eos = eos_ids_of(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    pick = switch_attention(run, cfg)
    seconds, new_tokens = 0.0, 0

    def routed() -> None:  # every layer must have gone through the registry, or DAM did nothing
        if cfg.attention != "sdpa":
            dam_backend.check_routed(model)

    try:
        for k, idx in enumerate(batches):
            rows = [encoded[i] for i in idx]
            S = max(len(r) for r in rows)
            ids = torch.full((len(rows), S), int(pad), dtype=torch.long)
            mask = torch.zeros(len(rows), S, dtype=torch.long)
            for b, r in enumerate(rows):  # left padding: every row ends at the last slot
                ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[b, S - len(r):] = 1
            log(f"batch {k + 1}/{len(batches)}: {len(rows)} prompts of {min(map(len, rows)):,} to {S:,} tokens")
            dam_backend.reset_seen(model)
            t0 = time.perf_counter()
            res = batch_decode_loop(model, ids.to(device), mask.to(device), max_new_tokens=cfg.max_new_tokens,
                                    pick=pick, eos_ids=() if cfg.ignore_eos else eos, after_prefill=routed,
                                    graph=cfg.cuda_graph)
            seconds += time.perf_counter() - t0
            for i, r in zip(idx, res):
                new_tokens += len(r.tokens)
                if on_result is not None:
                    on_result(PromptResult(id=prompts[i].id, text=tok.decode(r.tokens, skip_special_tokens=True),
                                           prompt_tokens=len(encoded[i]), new_tokens=len(r.tokens),
                                           finish_reason=r.finish_reason))
    finally:
        dam_backend.disable_dam(model)
    return BatchTotals(prompts=len(prompts), batches=len(batches), batch_size=size,
                       prompt_tokens=sum(map(len, encoded)), new_tokens=new_tokens, seconds=seconds,
                       attention=cfg.attention, backend=ran_backend(run, cfg), device=device,
                       dtype=str(run.dtype).removeprefix("torch."))


def format_totals(t: BatchTotals) -> str:
    """One human line of totals for stderr."""
    att = f"attention {t.attention}" + (f" ({t.backend})" if t.backend else "")
    prompts, batches = ("prompt" if t.prompts == 1 else "prompts"), ("batch" if t.batches == 1 else "batches")
    return (f"{t.prompts:,} {prompts} in {t.batches:,} {batches} of up to {t.batch_size} · {t.prompt_tokens:,} prompt "
            f"tokens, {t.new_tokens:,} new tokens in {t.seconds:.2f} s · throughput {t.tokens_per_s:.1f} tokens/s "
            f"generated · {att}, {t.device}, {t.dtype}")

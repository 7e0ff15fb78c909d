"""Every decode loop, in one place: what `dam generate` and `benchmarks/generate.py` run (and
the pieces `dam eval` uses).

- `token_loop`: the loop the others share (prefill, then pick a token and feed it back), with
  wall-clock times per token as a user sees them;
- `decode_loop`: a dynamic KV cache, one forward per token;
- `graph_decode_loop`: a static KV cache and one CUDA graph replayed per token (`--cuda-graph`);
- `batch_decode_loop` (on `batch_token_loop`): either of them for a batch of rows, left-padded ones
  too (dynamic cache only), each row getting what it gets alone;
- `make_picker` (greedy or seeded sampling), `eos_ids_of`, `TextStream` (ids to text as they
  arrive), `new_cache`, `new_static_cache` and `forward_kwargs` (this transformers version's
  cache keyword).

Why the graph loop: with a dynamic cache, every decode step runs the model's Python; for a
16-layer model at 131K tokens that host work (module calls, cache appends, about 50 kernel
launches per layer) costs more than the attention itself (docs/results/generate-speed.md). The
graph loop removes it:

1. transformers' `StaticCache` is sized for the prompt plus the new tokens;
2. the prompt is prefilled as usual (the attention functions are told the filled length on the
   host, through `backend.set_static`);
3. the first decode step runs eagerly, reading the fill level from a device tensor, which
   compiles every kernel that the graph will hold;
4. one decode step is captured in a CUDA graph, its token, position and fill level in fixed
   device buffers;
5. each later token: write the token and its position into those buffers, replay, pick the
   next token from the graph's logits.

The DAM decode kernel reads the fill level on the device and is launched with a grid that
covers every position (`dam_kernels.decode`, `valid_len`), so one graph serves all steps.
`dam_dense` decodes over the static cache with the unfilled slots masked; any other
implementation reads the static cache as transformers does. Without CUDA (or with
`use_graph=False`) the same steps run eagerly: the CPU tests check the static path against
`decode_loop` this way. The dynamic part is graph-safe too: the selection reads the query block
from the fill level on the device, and the decode kernel takes the selected blocks as extra
candidates (the block must be a multiple of the decode kernel's 64-key block).

Module-level imports are torch and dam_cli's runtime only (no typer, rich or h5py).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dam_cli.errors import DamError
from dam_cli.runtime import backend as dam_backend
from dam_cli.runtime.attention import DECODE_BLOCK_N

Picker = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> token ids [B]


# ----------------------------------------------------------------------------------------------
# Pieces the loops share
# ----------------------------------------------------------------------------------------------

def forward_kwargs(model) -> tuple[str, bool]:
    """The cache keyword of this transformers version ("cache" from 5.2x, else "past_key_values"),
    and whether forward takes `logits_to_keep` (so prefill computes one row of logits, not S)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def new_cache(model, capacity: int | None = None):
    """An empty dynamic KV cache for `model` that keeps every key, sliding-window layers included.

    transformers' `DynamicCache(config)` keeps only the last W-1 keys of a sliding layer; DAM runs
    keep them all (the attention applies the window), so keys cover positions 0 .. Sk-1 in every
    layer. Other layer kinds the config asks for (linear attention, shared KV) stay as it makes them.
    With `capacity` (the prompt plus the new tokens) and the model on the CPU, the layers write into buffers
    reserved for that many positions instead of concatenating every step (`reserved_cache`).
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signatures
        return DynamicCache()
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    if capacity is not None and dam_backend.on_cpu(model):
        from .reserved_cache import reserve

        reserve(cache, capacity)
    return cache


def new_static_cache(model, max_len: int):
    """transformers' StaticCache for `model`, `max_len` slots per layer (buffers made on first use).

    Sliding-window layers get full-length slots too (transformers would make W-slot ring buffers):
    slot `t` holds position `t` in every layer, as the graph loop and the attention functions expect.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=model.config, max_cache_len=int(max_len))
    cache.layers = [StaticLayer(max_cache_len=int(max_len)) if type(layer) is StaticSlidingWindowLayer else layer
                    for layer in cache.layers]
    return cache


def make_picker(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> Picker:
    """Next-token choice from logits `[B, V]` -> ids `[B]`: argmax when temperature is 0, else sampling."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        # the best at 0, the rest at most 0 (no overflow), and a temperature below float32's smallest normal number
        # (which would round to 0) divides as that number: the same choice, the best token
        x = (x - x.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
        if top_k:
            kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if top_p < 1:
            sx, order = torch.sort(x, dim=-1, descending=True)
            p = torch.softmax(sx, dim=-1)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop = (torch.cumsum(p, dim=-1) - p) >= top_p
            drop[..., 0] = False  # a top_p that rounds to 0 in float32 would drop every token
            x = x.scatter(-1, order, sx.masked_fill(drop, float("-inf")))
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return pick


def eos_ids_of(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


class TextStream:
    """Turns token ids into text pieces as they arrive, holding back incomplete characters."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0

    def put(self, tid: int) -> None:
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    tokens: list[int]  # generated ids, the first one included
    ttft_s: float  # prefill start to the first id on the host
    decode_s: float  # from the first id to the last one
    finish_reason: str  # "eos", "stop" (the caller's `stop` said so) or "length"


def token_loop(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, int], torch.Tensor], *,
               max_new_tokens: int, pick: Picker | None = None, eos_ids: Sequence[int] = (),
               on_token: Callable[[int], None] | None = None,
               after_prefill: Callable[[], None] | None = None,
               stop: Callable[[list[int]], bool] | None = None) -> LoopResult:
    """The token loop of one sequence: `prefill()` gives the last position's logits `[1, V]`; then
    `step(token, n)` (the `n`-th generated token fed back) gives the next logits.

    Each id is read on the host as it is made (that read is the step's synchronisation), so
    times are wall-clock per token as a user sees them. Stops at an id in `eos_ids` (kept in
    the tokens), once `stop(tokens)` is true, or after `max_new_tokens`. `batch_token_loop` with one row.
    """
    on_step = None if on_token is None else (lambda ids: on_token(ids[0]))
    return batch_token_loop(prefill, step, max_new_tokens=max_new_tokens, pick=pick, eos_ids=eos_ids,
                            after_prefill=after_prefill, on_step=on_step, stop=stop)[0]


def batch_token_loop(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, int], torch.Tensor], *,
                     max_new_tokens: int, pick: Picker | None = None, eos_ids: Sequence[int] = (),
                     after_prefill: Callable[[], None] | None = None,
                     on_step: Callable[[list[int]], None] | None = None,
                     stop: Callable[[list[int]], bool] | None = None) -> list[LoopResult]:
    """The token loop every decode loop shares: `prefill()` gives logits `[B, V]`, `step(tokens [B], n)` the next.

    One host read of the B ids per step (`on_step` gets them). A row stops at an id in `eos_ids` (kept in its
    tokens), once `stop(its tokens)` is true, or after `max_new_tokens`; the batch runs until every row stopped
    (a stopped row is still fed, its ids dropped). Per row: its tokens and finish reason ("eos", "stop" or
    "length"); `ttft_s` is the batch's; `decode_s` runs to that row's last id.
    """
    pick = pick or make_picker()
    eos = set(int(e) for e in eos_ids)

    def ended(row: list[int]) -> str | None:
        if row[-1] in eos:
            return "eos"
        return "stop" if stop is not None and stop(row) else None

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = prefill()
        if after_prefill is not None:
            after_prefill()
        tok = pick(logits)
        ids = [int(t) for t in tok.tolist()]
        t1 = now = time.perf_counter()
        if on_step:
            on_step(ids)
        tokens = [[t] for t in ids]
        reasons = [ended(row) for row in tokens]
        ends: list[float | None] = [None if r is None else t1 for r in reasons]
        n = 1
        while n < max_new_tokens and any(r is None for r in reasons):
            tok = pick(step(tok, n))
            ids = [int(t) for t in tok.tolist()]
            now = time.perf_counter()
            n += 1
            if on_step:
                on_step(ids)
            for b, t in enumerate(ids):
                if reasons[b] is None:
                    tokens[b].append(t)
                    reasons[b] = ended(tokens[b])
                    ends[b] = None if reasons[b] is None else now
    return [LoopResult(tokens=tokens[b], ttft_s=t1 - t0, decode_s=(now if ends[b] is None else ends[b]) - t1,
                       finish_reason=reasons[b] or "length") for b in range(len(tokens))]


def _dynamic_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache):
    """(prefill, step) over a dynamic cache for `token_loop` / `batch_token_loop`.

    A left-padded batch (`attention_mask` with zeros) passes its mask, grown by one column per step,
    and each row's positions counted from its first real token (transformers counts them from slot 0).
    """
    cache_kw, has_keep = forward_kwargs(model)
    kw = {cache_kw: cache, "use_cache": True, **({"logits_to_keep": 1} if has_keep else {})}
    if attention_mask is None or bool(attention_mask.all()):
        return ((lambda: model(input_ids=input_ids, **kw).logits[:, -1]),
                (lambda tok, _n: model(input_ids=tok.view(-1, 1), **kw).logits[:, -1]))
    mask = [attention_mask.to(device=input_ids.device, dtype=torch.long)]
    lengths = mask[0].sum(-1, keepdim=True)  # [B, 1]: each row's real tokens

    def prefill() -> torch.Tensor:
        pos = (mask[0].cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=input_ids, attention_mask=mask[0], position_ids=pos, **kw).logits[:, -1]

    def step(tok: torch.Tensor, n: int) -> torch.Tensor:
        mask[0] = torch.cat([mask[0], mask[0].new_ones(mask[0].shape[0], 1)], dim=1)
        return model(input_ids=tok.view(-1, 1), attention_mask=mask[0], position_ids=lengths + (n - 1),
                     **kw).logits[:, -1]

    return prefill, step


def decode_loop(model, input_ids: torch.Tensor, *, max_new_tokens: int, pick: Picker | None = None,
                eos_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
                after_prefill: Callable[[], None] | None = None, cache=None,
                stop: Callable[[list[int]], bool] | None = None) -> LoopResult:
    """Prefill `input_ids` `[1, S]`, then decode one token per forward over a dynamic cache
    (`cache`, or a new one).

    The contract of `token_loop`: ids read on the host as they are made; stops at an id in
    `eos_ids`, once `stop(tokens)` is true, or after `max_new_tokens`.
    """
    if cache is None:
        cache = new_cache(model, input_ids.shape[-1] + max_new_tokens)
    prefill, step = _dynamic_steps(model, input_ids, None, cache)
    return token_loop(prefill, step, max_new_tokens=max_new_tokens, pick=pick, eos_ids=eos_ids,
                      on_token=on_token, after_prefill=after_prefill, stop=stop)


def check_graph_dynamic(dyn, error: type[DamError] = DamError) -> None:
    """The CUDA-graph loop's need of the dynamic part `dyn` (None: off): selection blocks of whole decode-kernel
    key blocks, so that a step can re-sum its block in place; `error` (DamUsageError where a flag is at fault)."""
    if dyn is not None and dyn.on and dyn.block % DECODE_BLOCK_N:
        raise error(f"--cuda-graph with the dynamic part needs --dynamic-block a multiple of {DECODE_BLOCK_N} "
                    f"(the decode kernel's key block), got {dyn.block}")


@contextlib.contextmanager
def _graph_steps(model, input_ids: torch.Tensor, max_new_tokens: int, use_graph: bool | None):
    """(prefill, step) over a static cache, decode steps replayed from one CUDA graph (see the module
    docstring), for the rows of `input_ids` `[B, S]` (all of one length); the model is told of the static
    cache while the context lasts."""
    dyn = dam_backend.dynamic_of(model)
    check_graph_dynamic(dyn)
    device = input_ids.device
    if use_graph is None:
        use_graph = device.type == "cuda"
    if use_graph and device.type != "cuda":
        raise DamError(f"CUDA graphs need the model on a CUDA device, not {device}: drop --cuda-graph")
    B, S = (int(x) for x in input_ids.shape)
    slots = S + max_new_tokens
    if dyn is not None:  # whole selection blocks, so a step can re-sum its block in place
        slots = -(-slots // dyn.block) * dyn.block
    cache = new_static_cache(model, slots)
    cache_kw, has_keep = forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    valid = torch.full((1,), S, dtype=torch.long, device=device)  # filled slots after this step's append
    pos = torch.zeros(B, 1, dtype=torch.long, device=device)  # this step's position
    tok_in = torch.zeros(B, 1, dtype=torch.long, device=device)  # this step's input tokens
    static = dam_backend.StaticKV(valid_len=valid, host_len=S)
    graph: list = []  # [CUDAGraph, its logits] once captured

    def forward() -> torch.Tensor:
        return model(input_ids=tok_in, position_ids=pos, use_cache=True, **{cache_kw: cache}, **extra).logits

    def prefill() -> torch.Tensor:
        out = model(input_ids=input_ids, position_ids=torch.arange(S, device=device)[None].expand(B, S),
                    use_cache=True, **{cache_kw: cache}, **extra).logits[:, -1]
        static.host_len = None  # from here on the fill level is read on the device
        return out

    def step(tok: torch.Tensor, n: int) -> torch.Tensor:
        p = S + n - 1  # position of the tokens fed in this step
        tok_in.copy_(tok.view(B, 1))
        pos.fill_(p)
        valid.fill_(p + 1)
        if graph:
            graph[0].replay()
            return graph[1][:, -1]
        if use_graph and n >= 2:
            # The first step ran eagerly (kernels compiled, workspaces allocated): capture this
            # one. Capturing records without running, so replay it once right away.
            g = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(device)
            with torch.cuda.graph(g):
                logits = forward()
            graph.extend([g, logits])
            g.replay()
            return logits[:, -1]
        return forward()[:, -1]

    dam_backend.set_static(model, static)
    try:
        yield prefill, step
    finally:
        dam_backend.set_static(model, None)
        graph.clear()


def graph_decode_loop(model, input_ids: torch.Tensor, *, max_new_tokens: int, pick: Picker | None = None,
                      eos_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None,
                      after_prefill: Callable[[], None] | None = None, use_graph: bool | None = None,
                      stop: Callable[[list[int]], bool] | None = None) -> LoopResult:
    """Prefill `input_ids` `[1, S]` into a static cache, then decode by replaying a CUDA graph.

    Same contract and result as `decode_loop` (each id is read on the host as it is made; stops
    at an id in `eos_ids`, once `stop(tokens)` is true, or after `max_new_tokens`). `use_graph`
    defaults to whether the model is on CUDA.
    """
    with _graph_steps(model, input_ids, max_new_tokens, use_graph) as (prefill, step):
        return token_loop(prefill, step, max_new_tokens=max_new_tokens, pick=pick, eos_ids=eos_ids,
                          on_token=on_token, after_prefill=after_prefill, stop=stop)


def batch_decode_loop(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      max_new_tokens: int, pick: Picker | None = None, eos_ids: Sequence[int] = (),
                      after_prefill: Callable[[], None] | None = None, graph: bool = False,
                      use_graph: bool | None = None, on_step: Callable[[list[int]], None] | None = None,
                      ) -> list[LoopResult]:
    """Generate for a batch `input_ids` `[B, S]`, left-padded where `attention_mask` `[B, S]` is 0: each row
    gets the tokens it gets alone from `decode_loop` (`graph=True`: `graph_decode_loop`, rows of one length
    only). The contract of `batch_token_loop`: one `LoopResult` per row.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and graph:
        raise DamError("padded batches do not decode under --cuda-graph (its static cache has one fill level for "
                       "every row): drop --cuda-graph, or batch prompts of equal length")
    loop = dict(max_new_tokens=max_new_tokens, pick=pick, eos_ids=eos_ids, after_prefill=after_prefill,
                on_step=on_step)
    if not graph:
        cache = new_cache(model, input_ids.shape[-1] + max_new_tokens)
        return batch_token_loop(*_dynamic_steps(model, input_ids, attention_mask, cache), **loop)
    with _graph_steps(model, input_ids, max_new_tokens, use_graph) as (prefill, step):
        return batch_token_loop(prefill, step, **loop)

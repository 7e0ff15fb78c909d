"""The faster decode loop: a static KV cache and one CUDA graph replayed per token.

With a dynamic cache, every decode step runs the model's Python: for a 16-layer model at 131K
tokens that host work (module calls, cache appends, about 50 kernel launches per layer) costs
more than the attention itself (docs/bench-generate.md). This loop removes it:

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
implementation reads the static cache as transformers does.

Without CUDA (or with `use_graph=False`) the same steps run eagerly: the CPU tests check the
static path against the dynamic-cache loop this way. The dynamic part (top-k key blocks) is
graph-safe too: the selection reads the query block from the fill level on the device, and the
decode kernel takes the selected blocks as extra candidates, so nothing is read on the host
(the block size must be a multiple of the decode kernel's 64-key block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dam_cli.errors import DamError


def new_static_cache(model, max_len: int):
    """transformers' StaticCache for `model`, `max_len` slots per layer (buffers made on first use)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=int(max_len))


def graph_decode_loop(model, input_ids: torch.Tensor, *, max_new_tokens: int,
                      pick: Callable[[torch.Tensor], torch.Tensor] | None = None, eos_ids: Sequence[int] = (),
                      on_token: Callable[[int], None] | None = None,
                      after_prefill: Callable[[], None] | None = None, use_graph: bool | None = None):
    """Prefill `input_ids` `[1, S]` into a static cache, then decode by replaying a CUDA graph.

    Same contract and result as `generate.decode_loop` (each id is read on the host as it is
    made; stops at an id in `eos_ids` or after `max_new_tokens`). `use_graph` defaults to
    whether the model is on CUDA.
    """
    from dam_cli.runtime import backend as dam_backend
    from dam_cli.runtime.attention import DECODE_BLOCK_N
    from dam_cli.runtime.generate import _forward_kwargs, token_loop

    topk_block = dam_backend.dynamic_block(model)
    if dam_backend.dynamic_topk(model) and topk_block % DECODE_BLOCK_N:
        raise DamError(f"--dynamic-topk under --cuda-graph needs --dynamic-block a multiple of {DECODE_BLOCK_N} (the decode "
                       f"kernel's key block), got {topk_block}")
    device = input_ids.device
    if use_graph is None:
        use_graph = device.type == "cuda"
    if use_graph and device.type != "cuda":
        raise DamError(f"CUDA graphs need the model on a CUDA device, not {device}: drop --cuda-graph")
    S = int(input_ids.shape[1])
    slots = S + max_new_tokens
    if dam_backend.dynamic_topk(model):  # whole selection blocks, so a step can re-sum its block in place
        slots = -(-slots // topk_block) * topk_block
    cache = new_static_cache(model, slots)
    cache_kw, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    valid = torch.full((1,), S, dtype=torch.long, device=device)  # filled slots after this step's append
    pos = torch.zeros(1, 1, dtype=torch.long, device=device)  # this step's position
    tok_in = torch.zeros(1, 1, dtype=torch.long, device=device)  # this step's input token
    static = dam_backend.StaticKV(valid_len=valid, host_len=S)
    graph: list = []  # [CUDAGraph, its logits] once captured

    def forward() -> torch.Tensor:
        return model(input_ids=tok_in, position_ids=pos, use_cache=True, **{cache_kw: cache}, **extra).logits

    def prefill() -> torch.Tensor:
        out = model(input_ids=input_ids, position_ids=torch.arange(S, device=device)[None], use_cache=True,
                    **{cache_kw: cache}, **extra).logits[:, -1]
        static.host_len = None  # from here on the fill level is read on the device
        return out

    def step(tok: torch.Tensor, n: int) -> torch.Tensor:
        p = S + n - 1  # position of the token fed in this step
        tok_in.copy_(tok.view(1, 1))
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
        return token_loop(prefill, step, max_new_tokens=max_new_tokens, pick=pick, eos_ids=eos_ids,
                          on_token=on_token, after_prefill=after_prefill)
    finally:
        dam_backend.set_static(model, None)
        graph.clear()

"""Which layers' DAM attention costs full attention's answers: a teacher-forced study on the suite's prompts.

For each prompt, full attention answers greedily; then one forward over the prompt and that answer scores the
answer's tokens (mean negative log-probability, and whether every token is still the argmax) under full attention,
under DAM (the profile's run-time setting), and under DAM with one group of layers on full attention. A group whose
layers on full attention bring DAM's score back to full attention's is where the answers are lost. The forwards are
teacher-forced (the answer rows sit in the prefill's last query block, scored by the exact-mass rule as decode
rows are), so this ranks layers; `dam eval` measures answers.

    python benchmarks/layer_sensitivity.py --lengths 2048 --split development --per-task 4 --groups 6 -o out.json

`eval RANGES DAM-EVAL-ARGS` runs `dam eval` with the prompt mass of those layers changed (attention and density
probe), e.g. `python benchmarks/layer_sensitivity.py eval 0-19:0.95,20-29:0.8 -p PROFILE --tasks suite ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import dam_cli.runtime.attention as attention
from dam_cli.artifact.profile import load_profile
from dam_cli.evaluation.suite import score, suite_prompts
from dam_cli.evaluation.suite.prompting import use_chat
from dam_cli.runtime.backend import disable_dam, enable_dam, enable_dense
from dam_cli.runtime.decode import decode_loop
from dam_cli.runtime.models import load_model

FULL_LAYERS: set[int] = set()  # layers the DAM forward runs on full attention
LAYER_DYNAMIC: dict[int, object] = {}  # layer -> "off" (static masks only) or a prompt mass for that layer
_dam_sparse = attention.sparse_attention


def _sparse_or_full(q, k, v, profile, layer: int, **kw):
    if layer in FULL_LAYERS and kw.get("start", 0) == 0 and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=kw.get("scale"),
                                              enable_gqa=q.shape[1] != k.shape[1])
    if layer in LAYER_DYNAMIC and kw.get("dynamic") is not None:
        change = LAYER_DYNAMIC[layer]
        kw["dynamic"] = None if change == "off" else replace(kw["dynamic"], mass=float(change))
    return _dam_sparse(q, k, v, profile, layer, **kw)


def parse_variant(spec: str) -> tuple[str, dict[int, object]]:
    """`NAME:FIRST-LAST:off` (static masks only in those layers) or `NAME:FIRST-LAST:MASS` (that prompt mass
    there); several ranges joined by `,` after the name: `early:0-19:0.95,20-29:0.8`."""
    name, rest = spec.split(":", 1)
    out: dict[int, object] = {}
    for part in rest.split(","):
        rng, change = part.split(":")
        a, b = (int(x) for x in rng.split("-"))
        out.update({layer: change for layer in range(a, b + 1)})
    return name, out




def answer_scores(model, ids: list[int], answer: list[int]) -> dict:
    """Teacher-forced: mean NLL of `answer` after `ids`, and whether each of its tokens is the argmax."""
    x = torch.tensor([ids + answer[:-1]])
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False, logits_to_keep=len(answer)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    t = torch.tensor(answer)
    nll = -logp.gather(-1, t[:, None]).squeeze(-1)
    return {"nll": nll.mean().item(), "argmax_all": bool((logp.argmax(-1) == t).all()),
            "argmax_share": (logp.argmax(-1) == t).float().mean().item()}


def run_eval(spec: str, argv: list[str]) -> int:
    """`dam eval ARGV` with the prompt mass of some layers changed (`parse_variant`'s ranges, masses only): in the
    attention and in the density probe, so the reported density is the variant's."""
    from dam_cli.cli.app import main as dam_main
    from dam_cli.evaluation import probes

    _, changes = parse_variant("eval:" + spec)
    if "off" in changes.values():
        raise SystemExit("eval takes masses only (the density probe has no static-only layer)")
    LAYER_DYNAMIC.update(changes)
    count = probes._DensityProbe.count

    def layer_count(self, layer, query, key, window=None):
        d = self.dynamic
        if layer in LAYER_DYNAMIC:
            self.dynamic = replace(d, mass=float(LAYER_DYNAMIC[layer]))
        try:
            return count(self, layer, query, key, window)
        finally:
            self.dynamic = d

    probes._DensityProbe.count = layer_count
    sys.argv = ["dam", "eval", *argv]
    dam_main()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    attention.sparse_attention = _sparse_or_full  # the DAM backend imports it at each call: the study's layers
    if argv[:1] == ["eval"]:  # layer_sensitivity.py eval RANGES:MASS[,...] DAM-EVAL-ARGS...
        return run_eval(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/smollm2-135m-instruct.safetensors")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--split", default="development")
    ap.add_argument("--per-task", type=int, default=4)
    ap.add_argument("--tasks", default=None, help="comma-separated suite tasks (default: all)")
    ap.add_argument("--groups", type=int, default=6, help="contiguous layer groups to put on full attention")
    ap.add_argument("--only-lost", action="store_true",
                    help="run the groups only on prompts where DAM's answer tokens are not all the argmax "
                    "(never on prompts full attention scores 0 on)")
    ap.add_argument("--variant", action="append", default=[],
                    help="a per-layer change of the dynamic part scored on every prompt (parse_variant)")
    ap.add_argument("--answered-only", action="store_true", help="score only prompts full attention scores on")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    loaded = load_model(None, device="cpu", dtype=torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    profile = load_profile(a.profile)
    n_layers = model.config.num_hidden_layers
    size = -(-n_layers // max(1, a.groups))
    groups = [list(range(g, min(g + size, n_layers))) for g in range(0, n_layers, size)] if a.groups else []
    kw = {} if a.tasks is None else {"tasks": tuple(a.tasks.split(","))}
    rows = []
    for length in (int(x) for x in a.lengths.split(",")):
        prompts = suite_prompts(tok, length, a.split, a.per_task, chat=use_chat(tok, None), **kw)
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            enable_dense(model)
            out = decode_loop(model, torch.tensor([p.ids]), max_new_tokens=p.meta["max_new_tokens"],
                              eos_ids=(tok.eos_token_id,), stop=None)
            answer = list(out.tokens)
            text = tok.decode(answer[:-1] if out.finish_reason == "eos" else answer, skip_special_tokens=True)
            row = {"length": length, "task": p.meta["task"], "seed": p.meta["seed"], "index": p.meta["index"],
                   "full_score": score(p, text), "answer_tokens": len(answer),
                   "full": answer_scores(model, p.ids, answer)}
            disable_dam(model)
            enable_dam(model, profile, backend="gathered")
            FULL_LAYERS.clear()
            if a.answered_only and row["full_score"] == 0:
                disable_dam(model)
                continue
            row["dam"] = answer_scores(model, p.ids, answer)
            for spec in a.variant:
                name, changes = parse_variant(spec)
                LAYER_DYNAMIC.update(changes)
                row.setdefault("variants", {})[name] = answer_scores(model, p.ids, answer)
                LAYER_DYNAMIC.clear()
            if groups and row["full_score"] > 0 and (not a.only_lost or not row["dam"]["argmax_all"]):
                row["groups"] = {}
                for g in groups:
                    FULL_LAYERS.clear()
                    FULL_LAYERS.update(g)
                    row["groups"][f"{g[0]}-{g[-1]}"] = answer_scores(model, p.ids, answer)
                FULL_LAYERS.clear()
            disable_dam(model)
            rows.append(row)
            scored = {**row.get("variants", {}), **row.get("groups", {})}
            gs = " ".join(f"{k}:{v['nll']:.3f}" for k, v in scored.items())
            print(f"{length} {i + 1}/{len(prompts)} {row['task']:16s} full {row['full_score']:.2f} "
                  f"nll full {row['full']['nll']:.3f} dam {row['dam']['nll']:.3f} "
                  f"argmax {row['dam']['argmax_share']:.2f} | {gs} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
            with open(a.output, "w") as f:
                json.dump({"profile": a.profile, "split": a.split, "per_task": a.per_task, "groups": groups,
                           "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

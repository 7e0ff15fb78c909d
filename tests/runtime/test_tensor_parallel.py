"""Tensor-parallel DAM (`dam_cli.runtime.tensor_parallel`): each rank's slice of a profile holds exactly the global
profile's rows of its heads; the head split is read off the weights' placements; heads that do not split are refused;
and under `torchrun --nproc-per-node 2` (gloo, CPU) the tiny Llama split by heads generates the tokens and logits
of one process, through the library and through `dam generate --tp`, with rank 0 alone printing.

The profile's heads differ strongly (dense, self only, sink and band, random, rotated per layer), and the test
checks first that handing any rank the wrong heads changes the logits far beyond the tolerance: a wrong head
mapping cannot pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_llama
from helpers import (
    MODEL_FIELDS_WITH_CONTEXT,
    cli_env,
    cpu_backend,
    identity_profile,
    profile_for,
    random_masks,
    run_cli,
)
from torch.distributed.tensor.placement_types import Replicate, Shard

from dam_cli.errors import DamError, DamUsageError
from dam_cli.runtime.tensor_parallel import HeadShard, check_split, head_shard, profile_slice

PROMPT = "the cat is on the tree and the dog is in the house of the river 1 2 3 what is the key ? the answer is"
NEW_TOKENS = 8
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def identity(n_layers=2, heads=8, kv_heads=4) -> dict:
    return {"name": "t", "architecture": "llama", "n_layers": n_layers, "n_heads": heads, "n_kv_heads": kv_heads,
            "head_dim": 16, "max_position": 1024, "rope": {}, "config_sha256": "x"}


# ---- the slice of a profile ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_slice_holds_the_global_rows_of_its_heads(size):
    full = torch.zeros(2, 8, dtype=torch.bool)
    full[0, 5] = full[1, 2] = True
    prof = identity_profile(identity(), 16, seed=1, full_heads=full)
    prof.path = "global.safetensors"
    per = 8 // size
    slices = [profile_slice(prof, HeadShard(rank=r, size=size)) for r in range(size)]
    for r, part in enumerate(slices):
        heads = slice(r * per, (r + 1) * per)
        assert part.n_heads == part.meta.n_heads == per and part.meta.n_kv_heads == 4 // size
        assert part.n_layers == 2 and part.pcl == 16 and part.path == "global.safetensors"
        assert part.meta.recipe == prof.meta.recipe and part.meta.model["config_sha256"] == "x"
        assert torch.equal(part.true_mask, prof.true_mask[:, heads])
        assert torch.equal(part.offsets, prof.offsets[:, heads]) and torch.equal(part.columns, prof.columns[:, heads])
        assert torch.equal(part.full, prof.full[:, heads])
        for name, stat in prof.stats.items():
            torch.testing.assert_close(part.stats[name], stat[:, heads], rtol=0, atol=0, equal_nan=True, msg=name)
        for layer in range(2):  # the Stage-2 masks the kernels use, beyond L: the global rows of these heads
            assert torch.equal(part.mask(layer, 40), prof.mask(layer, 40)[heads])
    # The ranks' slices differ (random masks), and together they are the whole profile.
    assert not torch.equal(slices[0].true_mask, slices[1].true_mask)
    assert torch.equal(torch.cat([s.true_mask for s in slices], dim=1), prof.true_mask)
    assert prof.n_heads == 8 and prof.meta.n_kv_heads == 4  # the global profile is left as it was


@pytest.mark.parametrize("heads, kv_heads, size, needle", [
    (4, 2, 3, "4 attention heads and 2 kv heads do not split evenly over 3 tensor-parallel ranks: run torchrun "
              "with --nproc-per-node 2"),
    (8, 2, 4, "--nproc-per-node 2"),
    (6, 3, 2, "--nproc-per-node 3"),
    (5, 1, 2, "this model cannot be split by heads: run it in one process"),
])
def test_heads_that_do_not_split_are_refused(heads, kv_heads, size, needle):
    with pytest.raises(DamError, match=needle):
        check_split(heads, kv_heads, size)
    prof = identity_profile(identity(1, heads, kv_heads), 16)
    with pytest.raises(DamError, match="do not split evenly"):
        profile_slice(prof, HeadShard(rank=0, size=size))


def test_heads_that_split_pass():
    check_split(4, 2, 2)
    check_split(32, 8, 8)
    check_split(3, 1, 1)  # one rank: nothing to split


# ---- the split read off the model -----------------------------------------------------------------------------------

class FakeMesh:
    """What `head_shard` reads of a torch DeviceMesh: dimension names and sizes, this process's coordinates."""

    def __init__(self, names, sizes, coords):
        self.mesh_dim_names, self.sizes, self.coords, self.ndim = names, sizes, coords, len(sizes)

    def size(self, dim):
        return self.sizes[dim]

    def get_local_rank(self, dim=0):
        return self.coords[dim]


def tiny_llama_placed(mesh, placements):
    """The tiny Llama whose q_proj weights carry `device_mesh` / `placements`, as DTensor parameters do."""
    model = build_tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.device_mesh = mesh
        layer.self_attn.q_proj.weight.placements = placements
    return model


def test_head_shard_reads_the_tp_dimension_of_the_weights_mesh():
    assert head_shard(build_tiny_llama()) is None  # plain weights, no transformers split: one process
    one_dim = tiny_llama_placed(FakeMesh(("tp",), (2,), (1,)), (Shard(0),))
    assert head_shard(one_dim) == HeadShard(rank=1, size=2)
    # transformers' mesh has several dimensions: only the one named "tp" splits heads (FSDP gathers its shards)
    two_dim = tiny_llama_placed(FakeMesh(("fsdp", "tp"), (2, 4), (1, 3)), (Shard(0), Shard(0)))
    assert head_shard(two_dim) == HeadShard(rank=3, size=4)
    fsdp_only = tiny_llama_placed(FakeMesh(("fsdp", "tp"), (2, 1), (1, 0)), (Shard(0), Replicate()))
    fsdp_only._tp_size = 2  # DTensor weights say it all: the private size is not read
    assert head_shard(fsdp_only) is None
    assert head_shard(tiny_llama_placed(FakeMesh(("tp",), (2,), (0,)), (Replicate(),))) is None
    unnamed = tiny_llama_placed(FakeMesh(None, (2,), (1,)), (Shard(0),))
    assert head_shard(unnamed) == HeadShard(rank=1, size=2)


def test_head_shard_falls_back_on_transformers_private_size(monkeypatch):
    """Weights that are not DTensors: transformers' `_tp_size`, the rank on its mesh's "tp" dimension, else the
    process's rank."""
    model = build_tiny_llama()
    model._tp_size = 2
    monkeypatch.setenv("RANK", "3")
    assert head_shard(model) == HeadShard(rank=1, size=2)

    class Mesh:
        mesh_dim_names = ("pp", "tp")

        def __getitem__(self, name):
            assert name == "tp"
            return FakeMesh(None, (2,), (0,))

    model._device_mesh = Mesh()
    assert head_shard(model) == HeadShard(rank=0, size=2)


def test_enable_dam_checks_the_global_profile_and_keeps_the_rank_slice():
    from dam_cli.runtime import backend

    model = tiny_llama_placed(FakeMesh(("tp",), (2,), (1,)), (Shard(0),))
    prof = distinct_heads_profile(model)
    backend.enable_dam(model, prof)
    try:
        local = backend._MODEL_STATE[model][0].profile
        assert local.n_heads == 2 and local.meta.n_kv_heads == 1
        assert torch.equal(local.true_mask, prof.true_mask[:, 2:4])
    finally:
        backend.disable_dam(model)
    # the global check comes first: a profile of another shape is refused by the model's whole identity
    other = identity_profile({**backend.model_identity_of(model), "n_heads": 2, "n_kv_heads": 1}, 16)
    with pytest.raises(DamError, match="2 heads, 1 kv heads"):
        backend.enable_dam(model, other)


def test_tensor_parallel_loading_without_torchrun_is_refused(tiny_model_dir, monkeypatch):
    from dam_cli.runtime.models import load_model

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DamError, match=r"not started by torchrun \(no WORLD_SIZE\): run `torchrun --nproc-per-node N"):
        load_model(tiny_model_dir, tp_plan="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DamError, match="no RANK, MASTER_ADDR, MASTER_PORT"):
        load_model(tiny_model_dir, tp_plan="auto")


# ---- two ranks against one process ----------------------------------------------------------------------------------

def distinct_heads_profile(model, L: int = 16, order=(0, 1, 2, 3)):
    """Heads that differ strongly, rotated per layer: dense, self only, sink and local band, random;
    `order` permutes the heads (a wrong head mapping, for the sensitivity check)."""
    from helpers import identity_of

    ident = identity_of(model)
    NL, H = ident["n_layers"], ident["n_heads"]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    tm, off, col = random_masks(NL, H, L, p_m=0.3, p_r=0.2, p_c=0.2, seed=5)
    for layer in range(NL):
        for h in range(H):
            kind = (h + layer) % 4
            if kind == 0:
                tm[layer, h], off[layer, h], col[layer, h] = j <= i, True, True
            elif kind == 1:
                tm[layer, h], off[layer, h], col[layer, h] = i == j, False, False
            elif kind == 2:
                tm[layer, h], off[layer, h], col[layer, h] = (j == 0) | ((i >= j) & (i - j < 2)), False, False
                off[layer, h, :2] = col[layer, h, 0] = True
    order = list(order)
    return profile_for(ident, tm[:, order], off[:, order], col[:, order], MODEL_FIELDS_WITH_CONTEXT)


def greedy_run(model, tokenizer) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of PROMPT and the logits `[NEW_TOKENS, V]` they were picked from."""
    from dam_cli.runtime.decode import decode_loop

    logits = []
    pick = lambda x: (logits.append(x[0].float().clone()), x.argmax(-1))[1]  # noqa: E731
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    res = decode_loop(model, ids, max_new_tokens=NEW_TOKENS, pick=pick)
    return res.tokens, torch.stack(logits)


def one_process(model, tokenizer, profile=None) -> tuple[list[int], torch.Tensor]:
    from dam_cli.runtime import backend

    if profile is None:
        backend.enable_dense(model)
    else:
        backend.enable_dam(model, profile)
    try:
        return greedy_run(model, tokenizer)
    finally:
        backend.disable_dam(model)


# The worker every rank runs: the library path, then `dam generate --tp` in the same process.
WORKER = textwrap.dedent("""
    import json, os, sys, torch
    from dam_cli.artifact.profile import load_profile
    from dam_cli.runtime import backend
    from dam_cli.runtime.models import load_model
    from dam_cli.runtime.tensor_parallel import head_shard

    folder, profile_path, out_dir, prompt, n = sys.argv[1:6]
    loaded = load_model(folder, tp_plan="auto")
    model, tok = loaded.model, loaded.tokenizer
    prof = load_profile(profile_path)
    backend.enable_dam(model, prof)
    local = backend._MODEL_STATE[model][0].profile
    from dam_cli.runtime.decode import decode_loop
    logits = []
    pick = lambda x: (logits.append(x[0].float().clone()), x.argmax(-1))[1]
    res = decode_loop(model, torch.tensor([tok(prompt)["input_ids"]]), max_new_tokens=int(n), pick=pick,
                      after_prefill=lambda: backend.check_routed(model))
    backend.disable_dam(model)
    shard = head_shard(model)
    torch.save({"tokens": res.tokens, "logits": torch.stack(logits), "rank": shard.rank, "size": shard.size,
                "q_heads": model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0] // 16,
                "true_mask": local.true_mask, "offsets": local.offsets, "n_kv_heads": local.meta.n_kv_heads},
               os.path.join(out_dir, f"rank{int(os.environ['RANK'])}.pt"))
    sys.argv = ["dam", "generate", "--tp", "--model", folder, "--profile", profile_path, "--prompt", prompt,
                "--max-new-tokens", n, "--ignore-eos", "--json"]
    from dam_cli.cli.app import main
    main()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed next to this Python")
def test_two_ranks_generate_the_tokens_and_logits_of_one_process(tiny_model_dir, tmp_path):
    from dam_cli.runtime.models import load_model

    loaded = load_model(tiny_model_dir)
    model, tok = loaded.model, loaded.tokenizer
    prof = distinct_heads_profile(model)
    tokens, logits = one_process(model, tok, prof)
    # The check can fail: DAM changes this model's output, and so would any rank running another rank's heads
    # (halves swapped) or its own heads in another order.
    for wrong in (None, (2, 3, 0, 1), (1, 0, 3, 2)):
        _, other = one_process(model, tok, None if wrong is None else distinct_heads_profile(model, order=wrong))
        assert (other - logits).abs().max() > 1e-2, wrong
    path = tmp_path / "tiny.safetensors"
    prof.save(path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                          str(free_port()), str(script), tiny_model_dir, str(path), str(tmp_path), PROMPT,
                          str(NEW_TOKENS)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        assert (got["rank"], got["size"], got["q_heads"]) == (r, 2, 2)  # this rank computed 2 of the 4 heads
        assert torch.equal(got["true_mask"], prof.true_mask[:, 2 * r:2 * r + 2]) and got["n_kv_heads"] == 1
        assert torch.equal(got["offsets"], prof.offsets[:, 2 * r:2 * r + 2])
        assert got["tokens"] == tokens
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0)
    assert not torch.equal(ranks[0]["true_mask"], ranks[1]["true_mask"])
    # `dam generate --tp`: rank 0 alone prints, one JSON line, the text of one process
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    assert len(lines) == 1, out.stdout
    code, alone, err = run_cli("generate", "--model", tiny_model_dir, "--profile", str(path), "--prompt", PROMPT,
                               "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--json")
    assert code == 0, err
    got, want = json.loads(lines[0]), json.loads(alone)
    assert got["text"] == want["text"] and got["new_tokens"] == NEW_TOKENS
    assert (got["attention"], got["backend"], got["device"]) == ("dam", cpu_backend(), "cpu")
    assert "error:" not in out.stderr  # no rank refused anything


# ---- the CLI's refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    ([], "--tp splits the model over the processes torchrun starts"),
    (["--cuda-graph"], "--cuda-graph does not run tensor-parallel yet: drop --cuda-graph or --tp"),
    (["--device-map", "auto"], "--tp and --device-map both place the model"),
    (["--device", "cpu"], "--tp places the model itself"),
])
def test_tp_refusals_are_usage_errors_before_anything_loads(tiny_model_dir, tiny_all_allowed_profile, monkeypatch,
                                                            args, needle):
    from helpers import run_cli_refusing_loads

    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    run = run_cli_refusing_loads(monkeypatch, "loaded before the --tp checks")
    code, err = run("generate", "--tp", "--model", tiny_model_dir, "--profile", tiny_all_allowed_profile,
                    "--prompt", "the cat", *args)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_usage_error_type_of_the_launcher_check(monkeypatch):
    from dam_cli.runtime.tensor_parallel import require_launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DamUsageError, match="--tp splits"):
        require_launcher()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert require_launcher() == 2

"""Helpers shared by the test packages (imported as `helpers`; tests/ is on pythonpath, and no test module
imports another): repository paths, the `dam` command in-process and as a process, profile files as bytes,
random / all-allowed / structured profiles (synthetic or made for a model's identity), random attention inputs,
the dense masked softmax the kernel and attention tests check against, and the device the Triton kernels run on."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shipped profiles: the paper's recipe (most tests use it: its properties are the spec's) and the recommended one.
SHIPPED_PROFILE = os.path.join(REPO_ROOT, "profiles", "smollm2-135m-instruct-paper.safetensors")
RECOMMENDED_PROFILE = os.path.join(REPO_ROOT, "profiles", "smollm2-135m-instruct.safetensors")


# ---- the `dam` command ---------------------------------------------------------------------------------------------

DAM_COMMAND = [sys.executable, "-m", "dam_cli.cli.app"]


def run_cli(*args: str, stdin=None, columns: int | None = None) -> tuple[int, str, str]:
    """`dam ARGS` in-process through the real entry point `dam_cli.cli.app.main`: (exit code, stdout, stderr).

    A normal return is exit 0. `stdin` (text, or a file object) is standard input, `columns` sets COLUMNS (Rich's
    width); argv, stdin, COLUMNS and the SIGTERM handler are restored afterwards, DAM_DEBUG is unset meanwhile."""
    from dam_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_stdin, old_term = sys.argv, sys.stdin, signal.getsignal(signal.SIGTERM)
    old_env = {k: os.environ.get(k) for k in ("DAM_DEBUG", "COLUMNS")}
    sys.argv = ["dam", *args]
    if stdin is not None:
        sys.stdin = io.StringIO(stdin) if isinstance(stdin, str) else stdin
    os.environ.pop("DAM_DEBUG", None)
    if columns is not None:
        os.environ["COLUMNS"] = str(columns)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
        signal.signal(signal.SIGTERM, old_term)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def run_cli_refusing_loads(monkeypatch, message: str):
    """A runner of `dam ARGS` in-process returning (exit code, stderr), under which loading a model or a profile
    raises AssertionError(`message`): for what must be checked before anything loads."""
    from dam_cli.artifact import profile as profile_mod
    from dam_cli.runtime import models

    def refuse(*_a, **_k):
        raise AssertionError(message)

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(profile_mod, "load_profile", refuse)
    return lambda *args, stdin=None: run_cli(*args, stdin=stdin)[::2]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `dam` child process: this one's, the repository off sys.path, no debug tracebacks."""
    return {**os.environ, "PYTHONSAFEPATH": "1", "DAM_DEBUG": "", **extra}


def run_cli_subprocess(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dam ARGS` as a separate process (`python -m dam_cli.cli.app`, environment `cli_env()`), text captured."""
    return subprocess.run([*DAM_COMMAND, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(),
                          timeout=timeout)


# ---- output and files ----------------------------------------------------------------------------------------------

def assert_inert(text: str) -> None:
    """No character that acts on a terminal: controls, DEL, C1, bidi overrides, line separators."""
    import unicodedata

    bad = [c for c in text if unicodedata.category(c) == "Cc" and c != "\n"
           or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"]
    assert not bad, (bad, text)


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_difference(a, b) -> str:
    """Where two safetensors files differ (metadata keys, tensor names, and per tensor the elements that
    differ with the largest gap), for an assertion message; "" when their bytes are equal."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return ""
    from safetensors import safe_open

    parts = []
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
        parts += [f"metadata {k}" for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
        for name in sorted(set(fa.keys()) | set(fb.keys())):
            if name not in fa.keys() or name not in fb.keys():
                parts.append(f"{name} in one file only")
                continue
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.shape != y.shape or x.dtype != y.dtype:
                parts.append(f"{name} {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(x, y):
                ne = x != y
                gap = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else None
                gap_text = "" if gap is None else f", max {gap:.3g}"
                parts.append(f"{name}: {int(ne.sum())} of {x.numel()} differ{gap_text}")
    return "; ".join(parts) or "same tensors and metadata, other bytes differ"


# ---- profile files as bytes ----------------------------------------------------------------------------------------

def profile_bytes(p) -> bytes:
    """The bytes `p.save` writes: the safetensors header, then the tensors."""
    from dam_cli.artifact.format import encode_profile

    head, bufs = encode_profile(p)
    return head + b"".join(a.tobytes() for a in bufs)


def header_and_offset(data: bytes) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset of its first tensor byte."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), 8 + n


def split_header(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and the bytes after it."""
    header, start = header_and_offset(data)
    return header, data[start:]


def join_header_text(header_text: str, body: bytes, pad: bool = True) -> bytes:
    """A safetensors file of this header text (space-padded to 8 bytes unless `pad` is False) and body."""
    raw = header_text.encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def join_header(header, body: bytes, pad: bool = True) -> bytes:
    """`join_header_text` of `header` as compact JSON with sorted keys."""
    return join_header_text(json.dumps(header, sort_keys=True, separators=(",", ":")), body, pad)


# ---- profiles ------------------------------------------------------------------------------------------------------

# The identity fields a profile made for a loaded model carries (the others keep Profile.from_masks' synthetic values).
MODEL_FIELDS = ("name", "architecture", "n_kv_heads", "head_dim", "config_sha256")
MODEL_FIELDS_WITH_CONTEXT = ("name", "architecture", "n_kv_heads", "head_dim", "max_position", "config_sha256")
Masks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # true masks, offsets, columns


def identity_of(model) -> dict:
    """`model`'s identity as `dam profile` records it; an identity dict is returned as it is."""
    if isinstance(model, dict):
        return model
    from dam_cli.runtime.backend import model_identity_of

    return model_identity_of(model)


def random_masks(n_layers: int, heads: int, L: int, *, p_m: float = 0.3, p_r: float = 0.15, p_c: float = 0.15,
                 seed: int = 0, generator: torch.Generator | None = None) -> Masks:
    """Bool (true masks `[n_layers, heads, L, L]` causal, offsets and columns `[n_layers, heads, L]`), each cell
    set with its probability; drawn in that order from `generator` (default: a new one seeded `seed`)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    tm = (torch.rand(n_layers, heads, L, L, generator=g) < p_m).tril()
    return tm, torch.rand(n_layers, heads, L, generator=g) < p_r, torch.rand(n_layers, heads, L, generator=g) < p_c


def all_allowed_masks(n_layers: int, heads: int, L: int) -> Masks:
    """Causal ones, every offset and every column matched: every causal pair allowed up to 2L."""
    ones = torch.ones(n_layers, heads, L, dtype=torch.bool)
    return torch.ones(n_layers, heads, L, L, dtype=torch.bool).tril(), ones, ones.clone()


def profile_for(model, tm, offsets, columns, fields=MODEL_FIELDS, **overrides):
    """A profile of these masks made for `model` (a loaded model or its identity): its `fields` stamped on the
    synthetic metadata, then `overrides`."""
    from dam_cli.artifact.profile import Profile

    ident = identity_of(model)
    return Profile.from_masks(tm, offsets, columns, **{**{k: ident[k] for k in fields}, **overrides})


def random_profile(n_layers: int = 1, heads: int = 4, L: int = 16, *, p_m: float = 0.3, p_r: float = 0.15,
                   p_c: float = 0.15, seed: int = 0, full_heads=None, model=None, fields=MODEL_FIELDS, **overrides):
    """A profile of `random_masks`; with `model` (a loaded model or an identity) its layers and heads are the
    model's and it carries the model's `fields` (`profile_for`)."""
    from dam_cli.artifact.profile import Profile

    if model is None:
        return Profile.from_masks(*random_masks(n_layers, heads, L, p_m=p_m, p_r=p_r, p_c=p_c, seed=seed),
                                  full_heads=full_heads, **overrides)
    ident = identity_of(model)
    tm, off, col = random_masks(ident["n_layers"], ident["n_heads"], L, p_m=p_m, p_r=p_r, p_c=p_c, seed=seed)
    return profile_for(ident, tm, off, col, fields, full_heads=full_heads, **overrides)


def all_allowed_profile(n_layers: int = 1, heads: int = 4, L: int = 16, *, model=None, fields=MODEL_FIELDS,
                        **overrides):
    """A profile of `all_allowed_masks`; with `model`, the model's layers and heads and `fields` (`profile_for`)."""
    from dam_cli.artifact.profile import Profile

    if model is None:
        return Profile.from_masks(*all_allowed_masks(n_layers, heads, L), **overrides)
    ident = identity_of(model)
    return profile_for(ident, *all_allowed_masks(ident["n_layers"], ident["n_heads"], L), fields, **overrides)


def guard_only_profile(n_layers: int = 1, heads: int = 4, L: int = 16):
    """Nothing kept but the guard: empty true masks, no offset, no column."""
    from dam_cli.artifact.profile import Profile

    zeros = torch.zeros(n_layers, heads, L, dtype=torch.bool)
    return Profile.from_masks(torch.zeros(n_layers, heads, L, L, dtype=torch.bool), zeros, zeros)


def identity_profile(identity: dict, L: int, *, every: bool = False, seed: int = 0, full_heads=None):
    """A profile for `identity` carrying the whole identity as its metadata (recipe tau 0.3, lam 0.5, mu 0.8 at
    pcl `L`): all-allowed (`every`) or random sparse (true masks 0.2, offsets and columns 0.1)."""
    from dam_cli.artifact.profile import Profile, ProfileMeta

    NL, H = identity["n_layers"], identity["n_heads"]
    masks = all_allowed_masks(NL, H, L) if every else random_masks(NL, H, L, p_m=0.2, p_r=0.1, p_c=0.1, seed=seed)
    meta = ProfileMeta(model=dict(identity), recipe={"pcl": L, "tau": 0.3, "lam": 0.5, "mu": 0.8, "eps": 1e-10},
                       calibration={"source": "test", "samples": 0, "tokens": 0, "token_sha256": ""})
    return Profile.from_masks(*masks, meta=meta, full_heads=full_heads)


def structured_profile(model, L: int):
    """Sink column + local band, the shape most real heads take, varied per head, made for `model`."""
    ident = identity_of(model)
    NL, H = ident["n_layers"], ident["n_heads"]
    offsets = torch.zeros(NL, H, L, dtype=torch.bool)
    columns = torch.zeros(NL, H, L, dtype=torch.bool)
    tm = torch.zeros(NL, H, L, L, dtype=torch.bool)
    for layer in range(NL):
        for h in range(H):
            band = 1 + (layer + h) % 3
            offsets[layer, h, :band] = True
            columns[layer, h, 0] = True
            if h % 2:
                columns[layer, h, 3] = True
            i = torch.arange(L)[:, None]
            j = torch.arange(L)[None, :]
            tm[layer, h] = ((i - j >= 0) & (i - j < band)) | ((j == 0) | ((j == 3) & (i >= 3) & bool(h % 2)))
    return profile_for(ident, tm, offsets, columns)


def half_dense_profile(heads: int = 4, L: int = 32, seed: int = 0):
    """Heads 0 and 1 allow every causal pair (up to 2L: full blocks, which windows cut through), the others are
    random (true masks 0.5, offsets 0.3, columns 0.2)."""
    from dam_cli.artifact.profile import Profile

    tm, r, c = random_masks(1, heads, L, p_m=0.5, p_r=0.3, p_c=0.2, seed=seed)
    tm[:, :2], r[:, :2], c[:, :2] = True, True, True
    return Profile.from_masks(tm.tril(), r, c)


# ---- attention inputs and the dense reference ----------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it before anything imports triton
# Where the Triton kernels run: the CPU interpreter, compiled on a GPU, or nowhere.
KERNEL_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
# bf16 tl.dot is wrong in the interpreter: bf16 runs only compiled.
KERNEL_DTYPES = [torch.float16, torch.float32] + ([] if INTERPRET else [torch.bfloat16])
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")


def require_kernel_device() -> str:
    """KERNEL_DEVICE; called while a test module imports, skips that module when compiled Triton has no CUDA."""
    if KERNEL_DEVICE is None:
        pytest.skip("compiled Triton needs CUDA (set TRITON_INTERPRET=1 for the CPU interpreter)",
                    allow_module_level=True)
    return KERNEL_DEVICE


def on_device(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors moved to KERNEL_DEVICE."""
    return [t.to(KERNEL_DEVICE) for t in ts]


def random_qkv(B: int, H: int, H_kv: int, S: int, start: int, D: int = 16, *, dtype=torch.float32, seed: int = 0,
               amp: float = 1.0, device="cpu") -> list[torch.Tensor]:
    """q `[B, H, S - start, D]` (the rows from `start`), k and v `[B, H_kv, S, D]`: standard normal, drawn in that
    order from one generator seeded `seed`, q and k times `amp`, then cast to `dtype` and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S - start, D, generator=g) * amp
    k = torch.randn(B, H_kv, S, D, generator=g) * amp
    v = torch.randn(B, H_kv, S, D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def dense_masked_softmax(q, k, v, allowed, *, scale: float | None = None, softcap: float | None = None,
                         dtype=torch.float64, device=None) -> torch.Tensor:
    """softmax(scores masked by `allowed`) @ v, computed entirely in `dtype` (float64: the oracle) on `device`
    (None: where q is). q `[B, H, Sq, D]`, k / v `[B, H_kv, Sk, D]` (grouped heads), `allowed` broadcasts to
    `[B, H, Sq, Sk]`; scores are q.k times `scale` (default D**-0.5), then `softcap * tanh(s / softcap)` if set."""
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    q, k, v = ((t if device is None else t.to(device)).to(dtype) for t in (q, k, v))
    k, v = k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    return torch.matmul(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1), v)


def window_mask(prof, rows, n_keys, key_start=0, window=None) -> torch.Tensor:
    """bool `[H, len(rows), n_keys]`: layer 0 of `prof` at `rows` over keys `key_start ..`, AND the causal window
    `i - j < window` (transformers' `sliding_window_overlay` with the causal mask) if one is given."""
    allowed = prof.mask_rows(0, rows, n_keys, key_start)
    if window is not None:
        j = key_start + torch.arange(n_keys)
        allowed = allowed & (rows[:, None] - j[None, :] < window) & (j[None, :] <= rows[:, None])
    return allowed


def mask_rows_fn(prof):
    """Layer 0 of `prof` as the `mask_rows(rows, n_keys, key_start)` callable `reference_attention` takes."""
    return lambda rows, n, k0=0: prof.mask_rows(0, rows, n, k0)


def check_against_oracle(out, q, k, v, prof, start, window=None, softcap=None, label="") -> None:
    """Kernel output vs the float64 `dense_masked_softmax` over `window_mask` (scores soft-capped) and vs the
    reference, FlashAttention-style: at most twice PyTorch's own error in the inputs' precision plus a small
    absolute term."""
    from dam_kernels.reference import reference_attention

    S = k.shape[2]
    allowed = window_mask(prof, torch.arange(start, S), S, 0, window)
    exact = dense_masked_softmax(q, k, v, allowed, softcap=softcap, device="cpu")
    low_dtype = torch.float32 if q.dtype == torch.bfloat16 else q.dtype
    low = dense_masked_softmax(q, k, v, allowed, softcap=softcap, dtype=low_dtype, device="cpu").to(q.dtype)
    torch_err = (low.double() - exact).abs().max().item()
    bound = 2 * torch_err + {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[q.dtype]
    got = out.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{label}: NaN"
    err = (got - exact).abs().max().item()
    assert err <= bound, f"{label}: vs float64 {err:.3g} > {bound:.3g} (torch {torch_err:.3g})"
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), mask_rows_fn(prof), start=start, window=window,
                              softcap=softcap).double()
    ref_err = (got - ref).abs().max().item()
    assert ref_err <= bound, f"{label}: vs reference {ref_err:.3g} > {bound:.3g}"


def register_dense_oracle(name: str, profile, windows: list[int | None] | None = None,
                          softcap: float | None = None) -> None:
    """Register attention implementation `name` with transformers: `dense_masked_softmax` in float32 over
    `profile.mask` rows AND each layer's window (`windows[layer]`, None: no window), scores soft-capped."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def fwd(module, q, k, v, attention_mask, scaling=None, **kw):
        Sq, Sk = q.shape[2], k.shape[2]
        layer = module.layer_idx
        allowed = profile.mask(layer, Sk)[:, Sk - Sq:, :]  # [H, Sq, Sk], keys from position 0
        if windows is not None and windows[layer] is not None:
            i, j = torch.arange(Sk - Sq, Sk)[:, None], torch.arange(Sk)[None, :]
            allowed = allowed & (i - j < windows[layer])
        o = dense_masked_softmax(q, k, v, allowed[None], scale=scaling, softcap=softcap, dtype=torch.float32)
        return o.to(q.dtype).transpose(1, 2), None

    AttentionInterface.register(name, fwd)
    AttentionMaskInterface.register(name, lambda *a, **k: None)


def stepwise_logits(model, ids: torch.Tensor, n_prompt: int, chunk: int | None = None, cache=None) -> list:
    """Logits of every position: prefill of `n_prompt` tokens (in chunks of `chunk` if given), then one
    teacher-forced decode step per remaining token of `ids`, over `cache` (default: a new dynamic cache)."""
    from dam_cli.runtime.decode import forward_kwargs, new_cache

    cache = new_cache(model) if cache is None else cache
    kw, _ = forward_kwargs(model)
    out = []
    with torch.no_grad():
        step = chunk or n_prompt
        for s0 in range(0, n_prompt, step):
            out.append(model(input_ids=ids[:, s0:min(n_prompt, s0 + step)], use_cache=True, **{kw: cache}).logits)
        for t in range(n_prompt, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: cache}).logits)
    return out


ANTISUM_SHAPES = [  # the summed estimate's kernels against their reference: S, start, stride, block, D, H, H_kv
    (70, 0, 4, 16, 16, 4, 2), (70, 37, 4, 16, 16, 4, 2), (64, 20, 2, 8, 16, 3, 1), (45, 0, 8, 16, 16, 2, 2),
    (300, 0, 16, 64, 64, 4, 2), (300, 130, 16, 64, 64, 2, 1), (200, 5, 8, 32, 96, 2, 2), (140, 64, 16, 16, 16, 2, 1),
    (150, 20, 8, 64, 256, 2, 1)]


def cpu_backend() -> str:
    """The CPU kernels `--backend auto` runs here: "compiled" where a C compiler built `dam_kernels.cpu_sparse`,
    else "gathered"."""
    from dam_kernels import cpu_sparse

    return "compiled" if cpu_sparse.load() is not None else "gathered"

"""Profiling a model larger than memory: the decoder runs one layer at a time, like sequential calibration.

The model is built without weights (parameters on the meta device). The embedding rows the prompts use are read,
and one pass of the model's own forward, with each decoder layer replaced by a recorder, gives layer 0's hidden
states and every layer's inputs (attention masks and rotary embeddings from the model's own modules). Then, for
each layer in turn: its weights are read, every window and needle prompt goes through it, with q and k recorded
through transformers' AttentionInterface (`capture.py`), and its weights are dropped. Memory holds one layer's
weights plus the activations. The sums, needle scores and so the profile are those of a whole-model load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from dam_cli.errors import DamError
from dam_cli.text import human_bytes, safe_text


@dataclass
class StreamedModel:
    """A model with no weights in memory, the source of its weights, its tokenizer and its identity."""

    model: Any  # transformers PreTrainedModel, parameters on the meta device
    weights: Any  # layer_weights.SafetensorsWeights or GGUFWeights
    tokenizer: Any
    identity: dict[str, Any]  # as models.model_identity gives for a whole-model load
    source: str
    resident_peak: int = 0  # the most decoder-layer parameters ever in memory at once
    layer_seconds: list[float] = field(default_factory=list)


def _locate(spec: str | None, reporter) -> tuple[str, str | None, dict, str, str]:
    """(folder, gguf file or None, from_pretrained kwargs, identity name, source), like load_model resolves."""
    from dam_cli.runtime.models import _resolve

    folder, gguf_file, kwargs, name, source = _resolve(spec, reporter)
    if not gguf_file and not os.path.isdir(folder):  # a hub id: its cached snapshot
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(folder, local_files_only=True)
        except Exception:  # noqa: BLE001 - huggingface_hub raises several types for a missing cache entry
            raise DamError(f"hub model {safe_text(spec)} is not in the local cache and nothing is downloaded: "
                           "download it elsewhere, or pass a local folder") from None
    return folder, gguf_file, kwargs, name, source


def _config(folder: str, gguf_file: str | None, kwargs: dict):
    from transformers import AutoConfig

    from dam_cli.runtime.models import _quiet_transformers

    restore = _quiet_transformers()
    try:
        if gguf_file:
            return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        return AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise DamError(f"cannot read the config of {safe_text(folder)}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        restore()


def weights_too_large(spec: str | None, reporter, copies: int = 1) -> tuple[int, int] | None:
    """(float32 bytes of `copies` whole-model loads, bytes available) when they would not fit in memory, else None."""
    from dam_cli.memory import available_memory
    from dam_cli.profiling.layer_weights import open_weights
    from dam_cli.runtime.models import ALIASES

    have = available_memory()
    if have is None or spec is None or spec in ALIASES:  # the aliases are small models
        return None
    try:
        folder, gguf_file, _, _, _ = _locate(spec, reporter)
        need = copies * open_weights(folder, gguf_file).fp32_bytes()  # from the files' headers alone
    except DamError:
        return None  # the whole-model load then says what is wrong
    return (need, have) if need > have else None


def open_streamed(spec: str | None, reporter) -> StreamedModel:
    """The model named by `spec` (as load_model takes it), built on the meta device, with its weight source."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dam_cli.profiling.layer_weights import open_weights
    from dam_cli.runtime.models import _causal_lm_class, _quiet_transformers, attention_for, model_identity

    folder, gguf_file, kwargs, name, source = _locate(spec, reporter)
    weights = open_weights(folder, gguf_file)  # first: it names a damaged or incomplete file as such
    config = _config(folder, gguf_file, kwargs)
    if getattr(config, "num_attention_heads", None) is None:
        raise DamError(f"{source} is not a decoder with multi-head attention (no num_attention_heads in its config)")
    restore = _quiet_transformers()
    try:
        impl = attention_for(config, _causal_lm_class(config), "sdpa")
        with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed for real
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DamError(f"cannot build model from {source}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        restore()
    model.eval()
    model.requires_grad_(False)
    return StreamedModel(model=model, weights=weights, tokenizer=tok, identity=model_identity(model.config, name),
                         source=source)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers (one ModuleList of num_hidden_layers modules)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise DamError(f"{type(model).__name__} keeps no list of {model.config.num_hidden_layers} decoder layers "
                       "where streaming looks for it: profile it without --stream")
    return layers


# ---- the layer inputs -----------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward (final norm, lm_head) has no weights."""


class _LayerInputs(torch.nn.Module):
    """Stands in for decoder layer `index` during one forward: records its inputs, returns the hidden states."""

    def __init__(self, index: int, last: bool, sink: list, layer: torch.nn.Module):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink
        if hasattr(layer, "attention_type"):  # read by some models' forward to pick the mask
            self.attention_type = layer.attention_type

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden if self.index == 0 else None, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


def _buffers_to(model, device: str) -> None:
    """Move the real buffers (rotary frequencies, embedding scales) to `device`; parameters stay on meta."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta and b.device != torch.device(device):
                module._buffers[name] = b.to(device)


def _embedding_name(model) -> str:
    weight = model.get_input_embeddings().weight
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is weight:
            return name
    raise DamError("the model's input embedding is not one of its parameters: profile it without --stream")


def layer_inputs(sm: StreamedModel, sequences: list[list[int]], device: str):
    """Per sequence: (layer 0's hidden states, [per layer (extra args, kwargs)]) from the model's own forward."""
    model = sm.model
    emb = model.get_input_embeddings()
    vocab = sorted({t for s in sequences for t in s})
    table = torch.tensor(vocab, dtype=torch.long)
    emb._parameters["weight"] = torch.nn.Parameter(sm.weights.rows(_embedding_name(model), vocab).to(device),
                                                   requires_grad=False)  # only the rows the prompts use
    layers = decoder_layers(model)
    parent = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    out = []
    try:
        for seq in sequences:
            sink: list = []
            n = len(layers)
            parent.layers = torch.nn.ModuleList([_LayerInputs(i, i == n - 1, sink, layers[i]) for i in range(n)])
            ids = torch.searchsorted(table, torch.tensor([seq], dtype=torch.long)).to(device)
            with torch.no_grad():
                try:
                    model(inputs_embeds=emb(ids), use_cache=False)
                except _Stop:
                    pass
            if len(sink) != n:
                raise DamError(f"the forward of {type(model).__name__} called {len(sink)} of its {n} decoder layers "
                               "in order: profile it without --stream")
            out.append((sink[0][0], [(a, k) for _, a, k in sink]))
    finally:
        parent.layers = layers
        emb._parameters["weight"] = torch.nn.Parameter(torch.empty_like(emb.weight, device="meta"),
                                                       requires_grad=False)
    return out


# ---- one layer at a time --------------------------------------------------------------------------------------------

def _load_layer(sm: StreamedModel, index: int, layer: torch.nn.Module, device: str) -> None:
    prefix = f"{_layer_prefix(sm.model)}{index}."
    names = [n for n, _ in layer.named_parameters()]
    tensors = sm.weights.tensors([prefix + n for n in names])
    for n in names:
        owner, _, leaf = n.rpartition(".")
        module = layer.get_submodule(owner) if owner else layer
        t = tensors.pop(prefix + n)
        if tuple(t.shape) != tuple(module._parameters[leaf].shape):
            raise DamError(f"{safe_text(prefix + n)} has shape {tuple(t.shape)} in the weights but "
                           f"{tuple(module._parameters[leaf].shape)} in the model: profile it without --stream")
        module._parameters[leaf] = torch.nn.Parameter(t.to(device), requires_grad=False)


def _drop_layer(layer: torch.nn.Module) -> None:
    for module in layer.modules():
        for leaf, p in module._parameters.items():
            if p is not None and not p.is_meta:
                module._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _layer_prefix(model) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise DamError("the decoder layers are not a submodule of the model: profile it without --stream")


def resident_parameters(model) -> int:
    """Decoder-layer parameters now in memory (not on the meta device)."""
    return sum(p.numel() for p in decoder_layers(model).parameters() if not p.is_meta)


@dataclass
class _LayerRecord:
    q: torch.Tensor  # [H, n, D] float32, post-rotary
    k: torch.Tensor  # [H_kv, n, D]
    scaling: float
    options: dict[str, Any]  # what else the capture recorded for layer_attention_sum (window, softcap)


def _run_layer(layer, index: int, hidden: torch.Tensor, extra: tuple, kwargs: dict):
    """Hidden states after `layer`, and what it recorded through the capture attention (a _LayerRecord)."""
    from dam_cli.profiling import capture

    rec = capture._Recorder()
    token = capture._RECORDER.set(rec)
    try:
        out = layer(hidden, *extra, **kwargs)
    except DamError as e:  # a feature the capture cannot measure, named: worded as capture_qk words it
        hint = getattr(capture, "_NO_PROFILE_HINT", None)
        raise DamError(str(e).replace(*hint) if hint else str(e)) from None
    finally:
        capture._RECORDER.reset(token)
    if index not in rec.q:
        raise DamError(f"decoder layer {index} did not go through transformers' AttentionInterface: this "
                       "architecture cannot be profiled")
    options = {key: getattr(rec, key)[index] for key in ("window", "softcap") if hasattr(rec, key)}
    return (out[0] if isinstance(out, tuple) else out), _LayerRecord(rec.q[index], rec.k[index],
                                                                     rec.scaling[index], options)


def needle_prompts_of(tokenizer, cfg, length: int) -> list:
    """The needle prompts sources.score_needles makes for `cfg` (same text, same seed)."""
    from dam_cli.profiling.calib import documents
    from dam_cli.profiling.needle import needle_prompts

    docs, _ = documents(list(cfg.calib), cfg.text_field)
    return needle_prompts(tokenizer, docs, length, cfg.needle_samples)


def stream_layer_sums(sm: StreamedModel, windows: list[list[int]], needles: list, L: int, device: str,
                      reporter, needle_score: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, attention sum `[H, L, L]`) for every layer, reading one layer's weights at a time.

    With `needles` (needle.NeedlePrompt), fills `needle_score[layer]` with the mean needle score of each head,
    as sources.score_needles does on a loaded model. Each layer's weights are dropped before the next is read.
    """
    from dam_cli.profiling.capture import CAPTURE_IMPL, attention_implementation, layer_attention_sum, register_capture
    from dam_cli.profiling.needle import needle_scores

    model, NL = sm.model, int(sm.identity["n_layers"])
    register_capture()
    _buffers_to(model, device)
    t0 = time.perf_counter()
    with attention_implementation(model, CAPTURE_IMPL), torch.no_grad():
        inputs = layer_inputs(sm, list(windows) + [p.ids for p in needles], device)
        prompts = f", {len(needles)} needle prompt{'s' if len(needles) > 1 else ''}" if needles else ""
        reporter.log(f"streaming {NL} decoder layers one at a time ({len(windows)} windows{prompts}); inputs took "
                     f"{time.perf_counter() - t0:.1f} s")
        hidden = [h for h, _ in inputs]
        layers = decoder_layers(model)
        for i in range(NL):
            t_layer = time.perf_counter()
            _load_layer(sm, i, layers[i], device)
            sm.resident_peak = max(sm.resident_peak, resident_parameters(model))
            records: list[_LayerRecord] = []
            total = torch.zeros(int(sm.identity["n_heads"]), dtype=torch.float64)
            for s, (_, per_layer) in enumerate(inputs):
                extra, kwargs = per_layer[i]
                hidden[s], rec = _run_layer(layers[i], i, hidden[s], extra, kwargs)
                if s < len(windows):
                    records.append(rec)
                else:
                    p = needles[s - len(windows)]
                    total += needle_scores(rec.q, rec.k, rec.scaling, p.needle, p.rows, **rec.options)
            _drop_layer(layers[i])
            if needles and needle_score is not None:
                needle_score[i] = (total / len(needles)).float()
            last = records[-1]  # every window records the same scale and options
            sums = layer_attention_sum(qs=[r.q for r in records], ks=[r.k for r in records], scale=last.scaling, L=L,
                                       **last.options)
            del records
            sm.layer_seconds.append(time.perf_counter() - t_layer)
            reporter.log(f"layer {i + 1} of {NL} streamed in {sm.layer_seconds[-1]:.1f} s "
                         f"({time.perf_counter() - t0:.0f} s in all)")
            yield i, sums


def stream_note(need: int, have: int) -> str:
    """The log line saying why a profile streams without --stream."""
    return (f"the model's float32 weights take about {human_bytes(need)}, more than the {human_bytes(have)} of "
            "memory available: streaming it one decoder layer at a time (as with --stream)")

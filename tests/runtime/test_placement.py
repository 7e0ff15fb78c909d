"""Where a generation run's model lives (`dam_cli.runtime.placement`): the --tp / --device-map checks, the load
keywords, the device a placed model's inputs go to, peak memory over every device it is on; and DAM attention on a
layer's own device (what a model spread by `device_map` needs): the masks and layouts the kernels read are made on
q's device and cached per device. The CPU has one device, so "meta" stands in for a second one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_llama
from helpers import random_profile, random_qkv

from dam_cli.errors import DamUsageError
from dam_cli.runtime.generate import GenerateConfig
from dam_cli.runtime.placement import (
    check_placement,
    cuda_devices,
    input_device,
    peak_memory,
    placement_kwargs,
)


def config(**kw) -> GenerateConfig:
    return GenerateConfig(profile="p.safetensors", prompt="a", **kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(tp=True, device_map="auto"), "--tp and --device-map both place the model: give one of them"),
    (dict(device_map="everywhere"), "unknown --device-map 'everywhere': choose one of auto, balanced"),
    (dict(device_map="auto", device="cpu"), "--device-map auto places the model itself"),
    (dict(device_map="auto", device="cuda:1"), "drop --device cuda:1"),
    (dict(device_map="auto", cuda_graph=True), "--cuda-graph captures one device, and the layers sit on several: "
                                               "drop --cuda-graph or --device-map auto"),
    (dict(tp=True, cuda_graph=True), "--cuda-graph does not run tensor-parallel yet"),
    (dict(tp=True, device="cpu"), "--tp places the model itself"),
    (dict(tp=True), "--tp splits the model over the processes torchrun starts"),
])
def test_placement_flags_that_cannot_work_are_usage_errors(kw, needle, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DamUsageError, match=needle.replace("(", r"\(")):
        check_placement(config(**kw))


def test_placement_flags_that_work_pass_and_become_load_keywords(monkeypatch):
    for env, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(env, value)
    for cfg, kwargs in ((config(), {}), (config(device="cpu"), {}), (config(device_map="auto"), {"device_map": "auto"}),
                        (config(device_map="sequential", device="AUTO"), {"device_map": "sequential"}),
                        (config(tp=True), {"tp_plan": "auto"})):
        check_placement(cfg)
        assert placement_kwargs(cfg) == kwargs


def test_input_device_is_the_input_embeddings():
    model = build_tiny_llama()
    assert input_device(model) == "cpu"
    on = lambda device: SimpleNamespace(get_input_embeddings=lambda: SimpleNamespace(  # noqa: E731
        weight=SimpleNamespace(device=torch.device(device))))
    assert input_device(on("cuda:1")) == "cuda:1"  # the first layer of a model spread over GPUs
    assert input_device(on("meta")) == "cpu"  # offloaded to disk: accelerate's hook moves the ids with it
    model.model.embed_tokens.to("meta")
    assert input_device(model) == "cpu"


def test_peak_memory_counts_every_cuda_device_of_the_model():
    model = build_tiny_llama()
    assert cuda_devices(model) == []
    peak, kind = peak_memory(model)
    assert kind == "cpu peak rss" and peak > 0
    spread = SimpleNamespace(parameters=lambda: iter(SimpleNamespace(device=torch.device(d)) for d in
                                                    ("cuda:1", "cpu", "cuda:0", "cuda:1")))
    assert cuda_devices(spread) == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_dam_attention_reads_the_profile_on_q_device():
    """A layer on another device gets its masks there: the reference builds its rows on q's device, the kernels'
    bitmaps and layouts are made and cached per device, so layers on two devices never share a tensor."""
    from dam_kernels.layout import device_masks, layout_for

    from dam_cli.runtime.attention import sparse_attention

    prof = random_profile(1, 4, 16, seed=2)
    q, k, v = random_qkv(1, 4, 2, 40, 0)
    out = sparse_attention(*(t.to("meta") for t in (q, k, v)), prof, 0, backend="reference")
    assert out.device.type == "meta" and out.shape == q.shape
    cpu, meta = device_masks(prof, 0, "cpu"), device_masks(prof, 0, "meta")
    assert cpu.mask_words.device.type == "cpu" and meta.mask_words.device.type == "meta"
    assert device_masks(prof, 0, "meta") is meta and device_masks(prof, 0, "cpu") is cpu
    assert layout_for(prof, 0, 40, 16, 16, "meta").kv_indices.device.type == "meta"
    assert layout_for(prof, 0, 40, 16, 16, "cpu").kv_indices.device.type == "cpu"

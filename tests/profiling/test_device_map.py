"""`dam profile --device-map`: accelerate places the model, inputs go to its first layer's device, same profile.

This machine has no GPU, so `auto` puts every layer on the CPU; what is checked is that the option reaches
`from_pretrained`, that the capture follows the placed model, and that the profile is the one a plain load writes.
"""

from __future__ import annotations

from helpers import run_cli

from dam_cli.runtime import models

ARGS = ("--pcl", "32", "--samples", "3", "--retrieval-heads", "2", "--needle-length", "96", "--needle-samples", "2",
        "-q")


def test_device_map_auto_writes_the_plain_profile(tiny_model_dir, tmp_path, monkeypatch):
    plain, mapped = tmp_path / "plain.safetensors", tmp_path / "mapped.safetensors"
    assert run_cli("profile", "--model", tiny_model_dir, *ARGS, "-o", str(plain))[0] == 0
    seen = []
    real = models.load_model

    def spy(*a, **kw):
        seen.append(kw.get("device_map"))
        return real(*a, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    code, _, err = run_cli("profile", "--model", tiny_model_dir, *ARGS, "-o", str(mapped), "--device-map", "auto")
    assert code == 0, err
    assert seen == ["auto"]
    assert plain.read_bytes() == mapped.read_bytes()


def test_device_map_refusals(tiny_model_dir, tmp_path):
    out = str(tmp_path / "p.safetensors")
    for extra, words in ((("--device-map", "everywhere"), "unknown --device-map"),
                         (("--device-map", "auto", "--stream"), "--stream"),
                         (("--device-map", "auto", "--nproc", "2"), "--nproc"),
                         (("--device-map", "auto", "--device", "cpu"), "--device cpu")):
        code, _, err = run_cli("profile", "--model", tiny_model_dir, "-o", out, *extra)
        assert code == 2 and words in err and err.count("\n") <= 2, (extra, err)

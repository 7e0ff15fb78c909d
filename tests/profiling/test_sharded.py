"""`dam profile --nproc N` and `torchrun ... dam profile`: several gloo processes, the same bytes as one.

Each run spawns fresh interpreters (a few seconds each on two cores), so the cases are few and each checks a lot.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import DAM_COMMAND, cli_env, run_cli, run_cli_subprocess

from dam_cli.distributed import Ranks
from dam_cli.profiling import sharded

# Needle-scored retrieval heads and mass-chosen patterns: every stage that runs on several ranks.
RECIPE = ("--pcl", "32", "--samples", "5", "--retrieval-heads", "2", "--needle-length", "96",
          "--needle-samples", "3")
SHARED = "2 processes: rank r captures windows r, r + 2, ... and derives layers r, r + 2, ..."  # rank 0's log line


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_and_layers_are_shared_out_once_each(world):
    for n in (0, 1, 5, 7):
        got = sorted(i for r in range(world) for i in sharded.owned_windows(n, Ranks(r, world)))
        assert got == list(range(n))
        layers = sorted(layer for r in range(world) for layer in sharded.owned_layers(n, Ranks(r, world)))
        assert layers == list(range(n))


def test_two_processes_write_the_same_profile_and_capture_as_one(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    code, _, err = run_cli("profile", "--model", tiny_model_dir, *RECIPE, "-q", "-o", str(one),
                           "--save-capture", str(tmp_path / "one.h5"))
    assert code == 0, err
    code, _, err = run_cli("profile", "--model", tiny_model_dir, *RECIPE, "-o", str(two), "--nproc", "2",
                           "--save-capture", str(tmp_path / "two.h5"))
    assert code == 0, err
    assert SHARED in err and "deriving masks per layer (rank 0's share): 1 of 1" in err  # two ranks really ran
    assert one.read_bytes() == two.read_bytes()
    # The capture rank 0 wrote from both ranks' layers re-derives to the same masks as the one-process capture.
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli("profile", "--from-capture", str(tmp_path / "one.h5"), "-o", str(a), "-q")[0] == 0
    code, _, err = run_cli("profile", "--from-capture", str(tmp_path / "two.h5"), "-o", str(b), "--nproc", "3")
    assert code == 0 and "3 processes: rank r derives layers r, r + 3" in err  # 3 ranks, 2 layers: one derives none
    assert a.read_bytes() == b.read_bytes()


def test_torchrun_writes_the_same_profile(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = ("profile", "--model", tiny_model_dir, *RECIPE)
    assert run_cli(*args, "-q", "-o", str(one))[0] == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", *DAM_COMMAND[1:], *args, "-o", str(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count(SHARED) == 1  # one group of two ranks, and rank 0 alone reports
    assert one.read_bytes() == two.read_bytes()


def test_a_finished_rank_ends_without_the_interpreters_teardown(tmp_path, monkeypatch):
    """A torchrun rank whose command succeeded leaves through `exit_without_teardown` (the teardown's SIGABRT failed
    a CI run); its streams are flushed first and the exit code is the one given."""
    from dam_cli import distributed
    from dam_cli.cli import app

    code = ("import sys; from dam_cli.distributed import exit_without_teardown; print('out', end=''); "
            "sys.stderr.write('err'); exit_without_teardown(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")

    class Ended(BaseException):  # not caught by main()'s handlers
        pass

    def end(code):
        raise Ended(code)

    monkeypatch.setattr(distributed, "exit_without_teardown", end)
    monkeypatch.setattr(sys, "argv", ["dam", "inspect", "--help"])
    monkeypatch.setattr(app, "app", lambda standalone_mode: 0)  # a command that succeeded
    for env, launched in (({}, False), ({"WORLD_SIZE": "2"}, False), ({"WORLD_SIZE": "2", "RANK": "1"}, True),
                          ({"WORLD_SIZE": "x", "RANK": "1"}, False)):
        for name in ("WORLD_SIZE", "RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert distributed.is_launched_rank() is launched
        if launched:
            with pytest.raises(Ended, match="0"):
                app.main()
        else:
            app.main()  # returns: a one-process run exits through the interpreter as before


def test_a_failing_rank_is_reported_by_rank_0_and_nothing_is_written(tiny_model_dir, tmp_path):
    import h5py

    cap = tmp_path / "cap.h5"
    assert run_cli("profile", "--model", tiny_model_dir, "--recipe", "paper", "--pcl", "32", "--samples", "2",
                   "-q", "-o", str(tmp_path / "p.safetensors"), "--save-capture", str(cap))[0] == 0
    with h5py.File(cap, "r+") as f:  # layer 1 belongs to rank 1 of 2
        d = f["attn_sum/0001"]
        a = d[()]
        a[0, 3, 0] = -1.0
        d[...] = a
    out = tmp_path / "out.safetensors"
    r = run_cli_subprocess("profile", "--from-capture", str(cap), "-o", str(out), "--nproc", "2", timeout=300)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "rank 1 of 2" in last and "layer 1 holds negative" in last, r.stderr
    assert "internal error" not in r.stderr
    assert not out.exists()


def test_nproc_refusals(tiny_model_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "p.safetensors")
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "-o", out, "--nproc", "0")
    assert code == 2 and "--nproc must be from 1" in err
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "-o", out, "--nproc", "2", "--stream")
    assert code == 2 and "--stream" in err and "--nproc" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "-o", out, "--nproc", "2")
    assert code == 2 and "torchrun" in err
    assert not os.path.exists(out)


def test_ranks_take_one_gpu_each_and_more_ranks_than_gpus_are_refused(monkeypatch):
    import torch

    from dam_cli.distributed import check_nproc
    from dam_cli.errors import DamUsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [Ranks(r, 2, local_rank=r).device("auto") for r in range(2)] == ["cuda:0", "cuda:1"]
    assert Ranks(1, 2, local_rank=1).device("cuda") == "cuda:1"
    assert Ranks(1, 2, local_rank=1).device("cuda:0") == "cuda:0"  # one named GPU: shared
    assert Ranks(1, 2, local_rank=1).device("cpu") == "cpu"
    for device in ("auto", "cuda"):
        with pytest.raises(DamUsageError, match="this machine has 1 GPU: use --nproc 1"):
            check_nproc(2, device)
    check_nproc(1, "cuda")
    monkeypatch.setattr("dam_cli.distributed.cpu_cores", lambda: 2)  # a 2-core machine
    check_nproc(2, "cpu")
    with pytest.raises(DamUsageError, match="more processes than this machine's 2 CPU cores"):
        check_nproc(3, "cpu")
    check_nproc(3, None)  # ranks that load no model (--from-capture)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Ranks(1, 2, local_rank=1).device("auto") == "cpu"


def test_nproc_is_refused_when_the_model_copies_would_not_fit(tiny_model_dir, tmp_path, monkeypatch):
    from dam_cli import memory
    from dam_cli.profiling.layer_weights import open_weights

    need = open_weights(tiny_model_dir, None).fp32_bytes()
    monkeypatch.setattr(memory, "available_memory", lambda: int(need * 1.5))  # one copy fits, two do not
    out = tmp_path / "p.safetensors"
    code, _, err = run_cli("profile", "--model", tiny_model_dir, "-o", str(out), "--nproc", "2")
    assert code == 1 and "--nproc 2 loads the model once per process" in err and "use fewer processes" in err
    assert not out.exists()


def test_a_rank_killed_from_outside_is_named_not_an_internal_error():
    """A rank killed by a signal (`kill -9`, the out-of-memory killer) sends no message and breaks rank 0's
    collective with a gloo RuntimeError; rank 0 names the rank and its signal in one DamError line."""
    import queue

    from dam_cli.distributed import _raise_peer_error
    from dam_cli.errors import DamError

    class NoMessage:
        def get(self, timeout):
            raise queue.Empty

    class Proc:
        def __init__(self, exitcode):
            self.exitcode = exitcode

        def join(self, timeout=None):
            pass

    with pytest.raises(DamError, match=r"rank 2: killed by signal 9 \(SIGKILL: out of memory\?\)"):
        _raise_peer_error(NoMessage(), [Proc(0), Proc(-9)], RuntimeError("Connection closed by peer"))
    # every rank alive and silent: the original error stands (a bug of dam, reported as such)
    assert _raise_peer_error(NoMessage(), [Proc(None)], RuntimeError("x")) is None

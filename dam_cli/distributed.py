"""Several processes: the process group, `--nproc` launching, and exchanges of Python objects.

Two ways in, one code path after:

- under `torchrun` (or any launcher that sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`):
  `from_env()` joins the group the launcher describes;
- `launch(n, fn, *args)` (`dam profile --nproc N`): this process becomes rank 0 and starts ranks
  1 .. N-1 itself (spawned, on 127.0.0.1 and a free port). A rank that fails sends its one-line
  message to rank 0, which raises it, and the others are stopped: nothing hangs on a dead peer.

The process group is gloo on CPUs and `cpu:gloo,cuda:nccl` with GPUs (NCCL for device tensors).
What dam exchanges lives in host memory (captured queries and keys, derived masks), so exchanges
go through a gloo group in either case. Each rank uses `cores // N` CPU threads (or OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

from dam_cli.errors import DamError, DamUsageError

MAX_NPROC = 64
TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a slow peer (layers can take minutes)


@dataclass
class Ranks:
    """This process's place in a group of `world` processes; rank 0 writes what the group makes."""

    rank: int
    world: int
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)  # the gloo group for host objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank runs on: `cuda:<local rank>` when the run asks for CUDA (or `auto` finds it),
        else `requested` (the CPU, or one named GPU that every rank then shares)."""
        import torch

        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's `obj` in rank order on `dst` (None elsewhere)."""
        import torch.distributed as dist

        out = [None] * self.world if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._group)
        return out


def group_ready() -> bool:
    """Whether this process is in an initialized process group (cheap: torch is not imported to find out)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launched_rank() -> int:
    """This process's rank: in its process group, else as a launcher (torchrun) set RANK; 0 without either."""
    if group_ready():
        import torch.distributed as dist

        return dist.get_rank()
    raw = os.environ.get("RANK", "")
    return int(raw) if raw.isdigit() else 0


def requested_world() -> int:
    """The group size a launcher such as torchrun asked for (1: none)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DamError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')!r}, not a number: launch with torchrun, "
                       "or unset it") from None


def from_env() -> Ranks | None:
    """Join the process group a launcher (torchrun) described in the environment; None when there is none."""
    world = requested_world()
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DamError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: launch with "
                       "`torchrun --nproc-per-node N dam ...`, or use --nproc N")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    return _join(rank, world, local, "env://")


def _join(rank: int, world: int, local_rank: int, init_method: str) -> Ranks:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise DamError("this torch build has no torch.distributed: install a build with it to run several processes")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=TIMEOUT) if dist.get_backend() != "gloo" else None
    torch.set_num_threads(threads_per_rank(world))
    return Ranks(rank=rank, world=world, local_rank=local_rank, _group=group)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(world: int) -> int:
    """CPU threads for each of `world` processes on this machine: OMP_NUM_THREADS when set (torchrun sets 1 unless
    told otherwise), else its cores shared out, at least one."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cpu_cores() // max(1, world))


def leave(ranks: Ranks | None) -> None:
    """Leave the group `ranks` joined (a no-op for a one-process run)."""
    if ranks is not None and group_ready():
        import torch.distributed as dist

        dist.destroy_process_group()


def check_nproc(nproc: int, device: str | None = None) -> None:
    """Refuse a process count that cannot run: out of range, under torchrun already, or, for ranks that each load
    the model on `device` (None: they load none), more ranks than CPU cores or GPUs."""
    if not 1 <= nproc <= MAX_NPROC:
        raise DamUsageError(f"--nproc must be from 1 to {MAX_NPROC}, got {nproc}")
    if nproc > 1 and requested_world() > 1:
        raise DamUsageError("--nproc starts its own processes, and this one was launched by torchrun already "
                            f"(WORLD_SIZE={requested_world()}): give one of them")
    if device is None or nproc == 1:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" or (device == "auto" and gpus):  # rank r on cuda:r (no GPU at all: the device check says so)
        if 0 < gpus < nproc:
            raise DamUsageError(f"--nproc {nproc} puts rank r on cuda:r, and this machine has {gpus} GPU"
                                f"{'s' if gpus > 1 else ''}: use --nproc {gpus}, or --device cpu")
    elif device in ("auto", "cpu") and nproc > cpu_cores():
        raise DamUsageError(f"--nproc {nproc} is more processes than this machine's {cpu_cores()} CPU cores, and each "
                            f"loads the whole model: use --nproc {cpu_cores()} or fewer")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, address: str, fn: Callable, args: tuple, errors) -> None:
    """Entry of a spawned rank: join, run, leave; a failure goes to rank 0 as one line."""
    from dam_cli.errors import Terminated

    try:
        ranks = _join(rank, world, rank, address)
        try:
            fn(*args, ranks=ranks)
        finally:
            leave(ranks)
    except DamError as e:
        errors.put((rank, str(e), getattr(e, "exit_code", 1)))
        sys.exit(1)
    except (KeyboardInterrupt, Terminated):
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - anything else is reported to rank 0 as one line
        errors.put((rank, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 70))
        sys.exit(1)
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> NoReturn:
    """End a rank whose work is done and whose group is left, skipping the interpreter's teardown.

    In that teardown a native thread that torch.distributed left joinable can abort the finished process
    ("terminate called without an active exception", SIGABRT), which rank 0 or torchrun then reports as a failed run:
    seen in CI once for a spawned `--nproc` rank and once for rank 1 of `torchrun ... dam profile`. Standard streams
    are flushed first; nothing of dam's waits for the teardown (outputs are written and renamed before this)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or full: the command already said what it could
            pass
    os._exit(code)


def is_launched_rank() -> bool:
    """Whether a launcher such as torchrun started this process as one rank of several."""
    try:
        return requested_world() > 1 and bool(os.environ.get("RANK"))
    except DamError:
        return False


def launch(nproc: int, fn: Callable, *args: Any, main_kwargs: dict[str, Any] | None = None) -> Any:
    """Run `fn(*args, ranks=...)` in `nproc` processes; this process is rank 0 and returns its result.

    `main_kwargs` go to rank 0's call only (e.g. a progress reporter, which cannot be sent to a process).
    Ranks 1 .. nproc-1 are spawned (fresh interpreters: no state inherited). When any rank fails,
    its message is raised here as a DamError (a rank's own DamError keeps its exit code) and the
    other ranks are stopped.
    """
    import multiprocessing as mp

    import torch

    check_nproc(nproc)
    threads = torch.get_num_threads()  # rank 0's share is this process's: restored after
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_child, args=(r, nproc, address, fn, args, errors), daemon=True)
             for r in range(1, nproc)]
    for p in procs:
        p.start()
    ok = False
    try:
        ranks = _join(0, nproc, 0, address)
        try:
            result = fn(*args, ranks=ranks, **(main_kwargs or {}))
        except DamError:
            raise
        except Exception as e:  # a collective broken by a peer that failed: report the peer's reason
            _raise_peer_error(errors, procs, e)
            raise
        finally:
            leave(ranks)
        for p in procs:
            p.join()
        bad = [p for p in procs if p.exitcode != 0]
        if bad:
            _raise_peer_error(errors, procs, None)
        ok = True
        return result
    finally:
        if not ok:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
        torch.set_num_threads(threads)


def _raise_peer_error(errors, procs, cause: BaseException | None) -> None:
    """Raise the first failed rank's message as a DamError (waiting briefly for it to arrive)."""
    import queue

    try:
        rank, message, code = errors.get(timeout=10)
    except queue.Empty:
        for p in procs:  # a rank killed from outside (out of memory, kill -9) sent nothing: its exit says why
            p.join(timeout=1)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if cause is None or dead:
            codes = ", ".join(f"rank {r}: {_exit_words(c)}" for r, c in dead)
            raise DamError(f"a process of the run stopped without a message ({codes}): run again with --nproc 1 "
                           "to see the error, or with fewer processes if memory is short") from None
        return
    err = DamUsageError if code == 2 else DamError
    raise err(f"rank {rank} of {len(procs) + 1}: {message}") from None


def _exit_words(code: int) -> str:
    """A process's exit code in words: `exit 3`, `killed by signal 9 (SIGKILL: out of memory?)`."""
    if code >= 0:
        return f"exit {code}"
    return f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")

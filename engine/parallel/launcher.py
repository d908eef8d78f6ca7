"""Starting the ranks of a tensor-parallel engine; rank 0 is always the calling process.

* ``launch(config)``: followers as local processes (forkserver), one per GPU (``cuda:r``) or
  CPU rank (gloo). Standalone use and CI.
* ``launch(config, placement_group=pg)``: followers as Ray actors in bundles 1..n-1 of the
  replica's STRICT_PACK placement group; rank 0 (the replica actor) holds bundle 0. Each
  actor sees its own bundle's GPU as ``cuda:0``.
* ``torchrun_engine(config)``: under ``torchrun`` (``python -m dgserve.engine.parallel``);
  returns rank 0's engine, or None on the other ranks once rank 0 shuts down.

Each returns rank 0's engine (a plain :class:`Engine` at tensor_parallel_size 1).
``tensor_parallel_size`` is checked before any rank starts (power of two, <= devices, divides
the heads and the split dimensions), with a ConfigError naming the values.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..config import EngineConfig, ModelConfig
from ..engine import Engine
from ..errors import ConfigError, DGServeError, EngineDeadError
from .driver import TPEngine, WorkerHandle, describe_exit, describe_failure
from .group import STARTUP_TIMEOUT, join
from .sharding import MAX_CPU_RANKS, check_tensor_parallel
from .worker import WorkerSpec, local_pid, pid_alive, pid_key, process_main, serve

STARTUP_TIMEOUT_S = STARTUP_TIMEOUT.total_seconds()  # reach the rendezvous (imports, CUDA init)
COLLECTIVE_TIMEOUT_S = 300.0  # a collective waits at most this for a live but stuck peer


def launch(config: EngineConfig, *, placement_group: Any = None, progress: bool = False,
           collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Engine:
    """Starts ``config.tensor_parallel_size`` ranks and returns rank 0's engine (this process).
    Call ``engine.shutdown()`` to stop the followers."""
    if config.tensor_parallel_size == 1:  # the single-device engine, whatever the placement
        return Engine(config, progress=progress)
    cfg = ModelConfig.from_dir(config.model)
    timeouts = dict(collective_timeout_s=collective_timeout_s, startup_timeout_s=startup_timeout_s)
    if placement_group is not None:
        from .placement import launch_in_placement_group

        return launch_in_placement_group(config, cfg, placement_group, progress, **timeouts)
    return _launch_local(config, cfg, progress, **timeouts)


# -- local processes ---------------------------------------------------------------------------
def _local_devices(config: EngineConfig, size: int) -> tuple[list[str], int, str]:
    """Per-rank devices, how many are visible, and what they are called (for the error)."""
    want = config.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return ["cpu"] * size, MAX_CPU_RANKS, "CPU ranks allowed"
    if want in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {want!r} requested but CUDA is not available")
        return [f"cuda:{r}" for r in range(size)], torch.cuda.device_count(), "CUDA devices visible"
    raise ConfigError(f"device {want!r} names one device; with tensor_parallel_size {size} use 'cuda' (ranks take "
                      f"cuda:0..{size - 1}; choose them with CUDA_VISIBLE_DEVICES) or 'cpu'")


class ProcessWorker:
    def __init__(self, rank: int, process: mp.process.BaseProcess) -> None:
        self.rank = rank
        self.process = process

    def exit_status(self) -> str | None:
        return describe_exit(self.process.exitcode)

    def stop(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(5.0)


def _launch_local(config: EngineConfig, cfg: ModelConfig, progress: bool, *, collective_timeout_s: float,
                  startup_timeout_s: float) -> Engine:
    size = config.tensor_parallel_size
    devices, visible, kind = _local_devices(config, size)
    check_tensor_parallel(cfg, size, devices=visible, device_kind=kind)
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=startup_timeout_s))
    ctx = mp.get_context("forkserver")  # children fork from a clean server that already imported torch
    ctx.set_forkserver_preload(["dgserve.engine.parallel.worker"])
    workers: list[WorkerHandle] = []
    try:
        for rank in range(1, size):
            spec = WorkerSpec(config.model_dump(), rank, size, host, store.port, devices[rank], collective_timeout_s,
                              startup_timeout_s, threads=1 if devices[rank] == "cpu" else None)
            proc = ctx.Process(target=process_main, args=(spec,), name=f"dgserve-tp-rank{rank}", daemon=True)
            proc.start()
            workers.append(ProcessWorker(rank, proc))
    except BaseException:
        for w in workers:
            w.stop(0.0)
        raise
    return start_rank0(config, store, torch.device(devices[0]), workers, progress, collective_timeout_s,
                        startup_timeout_s)


# -- rank 0 ------------------------------------------------------------------------------------
def start_rank0(config: EngineConfig, store: dist.Store, device: torch.device, workers: list[WorkerHandle],
                 progress: bool, collective_timeout_s: float, startup_timeout_s: float) -> TPEngine:
    group = None
    try:
        _await_followers(store, workers, startup_timeout_s)
        group = join(store, rank=0, size=config.tensor_parallel_size, device=device,
                     collective_timeout=timedelta(seconds=collective_timeout_s))
        return TPEngine(config, tp=group, workers=workers, progress=progress)
    except BaseException as e:
        dead = {}
        if not isinstance(e, DGServeError):  # a follower's failure surfaces as a failed collective here
            deadline = time.monotonic() + 3.0
            while not dead and time.monotonic() < deadline:
                dead = {w.rank: s for w in workers if (s := w.exit_status()) is not None}
                time.sleep(0.05)
        for w in workers:
            w.stop(0.0)
        if group is not None:
            group.close()
        if isinstance(e, DGServeError) or not isinstance(e, Exception):
            raise  # the same typed error (config, context, model) every rank raised
        raise EngineDeadError(describe_failure(store, dead, e, during="start-up")) from e


def _await_followers(store: dist.Store, workers: list[WorkerHandle], timeout_s: float) -> None:
    """Wait until every follower reached the rendezvous, failing fast if one dies on the way."""
    keys = [pid_key(w.rank) for w in workers]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        dead = {w.rank: s for w in workers if (s := w.exit_status()) is not None}
        if dead:
            raise EngineDeadError(describe_failure(store, dead, None, during="start-up"))
        if time.monotonic() > deadline:
            missing = [w.rank for w, k in zip(workers, keys) if not store.check([k])]
            raise EngineDeadError(f"tensor-parallel rank(s) {missing} did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


# -- torchrun ----------------------------------------------------------------------------------
class PeerWorker:
    """A torchrun peer: torchrun owns the process; rank 0 can only watch its pid (same host)."""

    def __init__(self, rank: int, store: dist.Store) -> None:
        self.rank, self.store = rank, store
        self.pid: int | None = None

    def exit_status(self) -> str | None:
        if self.pid is None:  # published once the follower starts
            self.pid = local_pid(self.store, self.rank)
        return "process gone" if self.pid is not None and not pid_alive(self.pid) else None

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def torchrun_engine(config: EngineConfig, *, progress: bool = False,
                    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Engine | None:
    """Call on every rank under ``torchrun --nproc-per-node N``: rank 0 gets its engine; the other
    ranks follow it and get None once it shuts down."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if size != config.tensor_parallel_size:
        raise ConfigError(f"torchrun started {size} ranks; tensor_parallel_size is {config.tensor_parallel_size}")
    cfg = ModelConfig.from_dir(config.model)
    devices, visible, kind = _local_devices(config, int(os.environ.get("LOCAL_WORLD_SIZE", size)))
    check_tensor_parallel(cfg, size, devices=visible, device_kind=kind)
    device = torch.device(devices[local])
    store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timedelta(seconds=STARTUP_TIMEOUT_S)))
    if rank > 0:
        serve(store, config=config, rank=rank, size=size, device=device,
              collective_timeout=timedelta(seconds=collective_timeout_s))
        return None
    workers: list[WorkerHandle] = [PeerWorker(r, store) for r in range(1, size)]
    return start_rank0(config, store, device, workers, progress, collective_timeout_s, STARTUP_TIMEOUT_S)

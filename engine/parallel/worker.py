"""A follower rank: builds its shard of the engine, then replays rank 0's commands until
``Shutdown``. Started as a local process, a Ray actor, or by ``torchrun``."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..config import EngineConfig
from ..engine import Engine
from . import channel
from .channel import AddRequest, Shutdown
from .group import TPGroup, failure_key, join

log = logging.getLogger(__name__)


def pid_key(rank: int) -> str:
    return f"dgserve/tp/pid/{rank}"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


def local_pid(store: dist.Store, rank: int) -> int | None:
    """The follower's pid if it runs on this host (it publishes "host pid" at start)."""
    try:
        if store.check([pid_key(rank)]):
            host, pid = store.get(pid_key(rank)).decode().split()
            return int(pid) if host == socket.gethostname() else None
    except Exception:
        pass
    return None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a follower needs, picklable (crosses process and Ray boundaries)."""

    config: dict[str, Any]  # EngineConfig.model_dump()
    rank: int
    size: int
    host: str  # rendezvous store (hosted by rank 0)
    port: int
    device: str  # this rank's device: "cpu" or "cuda:N"
    collective_timeout_s: float
    startup_timeout_s: float
    threads: int | None = None  # torch CPU threads (CPU ranks share the machine's cores)


def follow(engine: Engine) -> None:
    """The command loop: apply rank 0's ops, schedule, prove the step is rank 0's, run it."""
    tp = engine.tp
    assert tp is not None and tp.rank > 0
    while True:
        cmd = channel.receive(tp.control)
        if isinstance(cmd, Shutdown):
            return
        for op in cmd.ops:
            if isinstance(op, AddRequest):
                engine.scheduler.add(engine.make_sequence(op.request))
            else:
                engine.scheduler.abort(op.request_id)
        plan = engine.scheduler.schedule()
        if channel.plan_digest(plan) != cmd.digest:
            raise RuntimeError(f"tensor-parallel rank {tp.rank}: the scheduled step differs from rank 0's "
                               f"(requests {[it.seq.request_id for it in plan]}): ranks diverged")
        engine.scheduler.postprocess(plan, engine.runner.run(plan))


def serve(store: dist.Store, *, config: EngineConfig, rank: int, size: int, device: torch.device,
          collective_timeout: timedelta) -> None:
    """Join the group, build this rank's engine, follow until Shutdown. On failure the reason is
    left in the store (rank 0 names it in its error) and the exception propagates."""
    store.set(pid_key(rank), f"{socket.gethostname()} {os.getpid()}")
    group: TPGroup | None = None
    try:
        group = join(store, rank=rank, size=size, device=device, collective_timeout=collective_timeout)
        follow(Engine(config, progress=False, tp=group))
    except BaseException as e:
        try:
            store.set(failure_key(rank), f"{type(e).__name__}: {e}")
        except Exception:  # rank 0 (the store's host) is gone too
            pass
        raise
    group.close()


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a spawned rank (process or Ray actor method)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    store = dist.TCPStore(spec.host, spec.port, spec.size, is_master=False,
                          timeout=timedelta(seconds=spec.startup_timeout_s))
    serve(store, config=EngineConfig.model_validate(spec.config), rank=spec.rank, size=spec.size,
          device=torch.device(spec.device), collective_timeout=timedelta(seconds=spec.collective_timeout_s))


def process_main(spec: WorkerSpec) -> None:
    """Target of a local worker process: exit code 0 after Shutdown, 1 on any failure (without
    waiting on interpreter teardown, which could block on a broken process group)."""
    try:
        run_worker(spec)
    except BaseException:
        log.exception("tensor-parallel rank %d failed", spec.rank)
        logging.shutdown()
        os._exit(1)

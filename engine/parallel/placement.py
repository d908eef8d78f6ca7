"""Follower ranks as Ray actors in the bundles of a replica's placement group.

The Serve replica (rank 0) holds bundle 0 of its STRICT_PACK placement group; ranks 1..n-1 are
actors pinned to bundles 1..n-1 with those bundles' CPU/GPU. Each actor sees its own bundle's
GPU as ``cuda:0`` (Ray sets CUDA_VISIBLE_DEVICES); NCCL connects them through the rendezvous
store that rank 0 hosts on the node's IP. Without GPUs in the bundles the ranks use gloo.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..config import EngineConfig, ModelConfig
from ..engine import Engine
from ..errors import ConfigError
from .driver import WorkerHandle
from .launcher import start_rank0
from .sharding import MAX_CPU_RANKS, check_tensor_parallel
from .worker import WorkerSpec, local_pid, pid_alive, run_worker


class _RankActor:
    """A follower rank inside a Ray actor (one bundle of the replica's placement group)."""

    def run(self, spec: WorkerSpec) -> None:
        run_worker(spec)


class RayWorker:
    """A follower actor: dead when its ``run`` call ended or its process (same node) is gone."""

    def __init__(self, rank: int, actor: Any, ref: Any, store: dist.Store) -> None:
        self.rank, self.actor, self.ref, self.store = rank, actor, ref, store
        self.pid: int | None = None

    def exit_status(self) -> str | None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if ready:
            try:
                ray.get(self.ref)
                return "exit code 0"
            except ray.exceptions.RayActorError:
                return "actor died"
            except Exception as e:
                return f"failed ({type(e).__name__})"
        if self.pid is None:  # published once the follower starts
            self.pid = local_pid(self.store, self.rank)
        return "process gone" if self.pid is not None and not pid_alive(self.pid) else None

    def stop(self, timeout: float) -> None:
        import ray

        try:
            ray.get(self.ref, timeout=timeout)
        except Exception:
            pass
        ray.kill(self.actor)


def launch_in_placement_group(config: EngineConfig, cfg: ModelConfig, pg: Any, progress: bool, *,
                              collective_timeout_s: float, startup_timeout_s: float) -> Engine:
    """Rank 0 is the calling process (bundle 0); ranks 1..n-1 start as actors in bundles 1..n-1."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    size = config.tensor_parallel_size
    bundles = pg.bundle_specs
    if len(bundles) < size:
        raise ConfigError(f"tensor_parallel_size {size} needs one placement-group bundle per rank; the group has "
                          f"{len(bundles)}")
    gpus = [float(b.get("GPU", 0)) for b in bundles[:size]]
    cuda = config.device != "cpu" and all(gpus)
    if config.device == "cuda" and not cuda:
        no_gpu = [i for i, g in enumerate(gpus) if not g]
        raise ConfigError(f"device 'cuda' with tensor_parallel_size {size}: bundles {no_gpu} of the placement group "
                          f"have no GPU")
    visible = sum(1 for b in bundles if b.get("GPU")) if cuda else MAX_CPU_RANKS
    check_tensor_parallel(cfg, size, devices=visible, device_kind="GPU bundles" if cuda else "CPU ranks allowed")
    device = "cuda:0" if cuda else "cpu"  # an actor sees its bundle's GPU as device 0
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=startup_timeout_s))
    actor_cls = ray.remote(_RankActor)
    workers: list[WorkerHandle] = []
    try:
        for rank in range(1, size):
            b = bundles[rank]
            actor = actor_cls.options(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=rank),
            ).remote()
            spec = WorkerSpec(config.model_dump(), rank, size, host, store.port, device, collective_timeout_s,
                              startup_timeout_s, threads=1 if not cuda else None)
            workers.append(RayWorker(rank, actor, actor.run.remote(spec), store))
    except BaseException:
        for w in workers:
            w.stop(0.0)
        raise
    return start_rank0(config, store, torch.device(device), workers, progress, collective_timeout_s,
                        startup_timeout_s)

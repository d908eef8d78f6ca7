"""Tensor parallelism: one engine across the GPUs of a node (NCCL), or CPU ranks (gloo).

    from dgserve.engine.parallel import launch
    engine = launch(EngineConfig(model=..., tensor_parallel_size=4))            # local ranks
    engine = launch(config, placement_group=ray.util.get_current_placement_group())  # Ray bundles

Rank 0 (the calling process) runs the scheduler and returns an :class:`Engine`; the other
ranks follow its commands (``worker.py``). ``python -m dgserve.engine.parallel`` runs under
``torchrun``. Modules: ``group`` (process groups, collectives), ``sharding`` (who holds
what, start-up checks), ``layers`` (column/row/vocabulary-parallel layers), ``channel``
(commands), ``worker`` (the follower loop), ``driver`` (rank 0's engine, watchdog),
``launcher`` (starting ranks: local processes, torchrun), ``placement`` (Ray actors in placement-group bundles).
"""

from __future__ import annotations

from typing import Any

from .group import TPGroup
from .sharding import check_tensor_parallel

__all__ = ["TPGroup", "check_tensor_parallel", "launch", "launch_async", "torchrun_engine"]


def __getattr__(name: str) -> Any:  # the launchers import the engine, which imports this package's layers
    if name in ("launch", "launch_async", "torchrun_engine"):
        from . import launcher as _launcher

        return getattr(_launcher, name)
    raise AttributeError(name)

"""One rank's view of its tensor-parallel group: who it is, its device, and the collectives
the layers use.

Two process groups per engine:

* ``data``: NCCL on CUDA, gloo on the CPU. Activations: the all-reduce after each
  row-parallel layer, the vocabulary all-gather of the logits, the broadcast of rank 0's
  sampling result. Its timeout is short (``collective_timeout``): a step never waits long
  for a peer.
* ``control``: always gloo, CPU objects only: rank 0's commands and start-up agreements.
  Idle ranks wait on it for the next command, so its timeout is effectively infinite (a
  rank 0 that dies closes its sockets, which ends the wait at once); rank 0's sends carry
  the short timeout, so a stopped follower cannot block it.

The default process group of ``torch.distributed`` is the data group, so one process hosts
at most one tensor-parallel engine (rank 0 of a replica, or one worker rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..sampler import StepResult

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=3650)
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(seconds=300)
STARTUP_TIMEOUT = timedelta(seconds=600)  # start-up agreements wait for the slowest rank's weights

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    data: dist.ProcessGroup
    control: dist.ProcessGroup
    store: dist.Store  # rendezvous store: workers report failures here (``failure_key``)
    collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT  # data collectives and command sends

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def shard(self, n: int) -> slice:
        """This rank's contiguous 1/size share of ``n`` (divisibility is checked at start-up)."""
        assert n % self.size == 0, f"{n} is not divisible by tensor_parallel_size {self.size}"
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    # -- data plane ------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.data)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(R, n) per rank -> (R, size * n): the ranks' shards side by side along the last dim."""
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # (size*R, n)
        _all_gather(out, x.contiguous(), group=self.data)
        return out.view(self.size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], -1)  # (R, size*n)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src, group=self.data)
        return x

    def share_step_result(self, res: StepResult) -> None:
        """Overwrite this rank's sampling decisions with rank 0's (canvas, argmax, accepted, mean entropy).

        Every rank samples the same gathered logits with the same noise, so they agree anyway on
        deterministic kernels; this one small broadcast (B x C ids) makes rank 0 authoritative,
        so no thread count or kernel choice can ever make two ranks' schedulers diverge. (The
        probabilities are not shared: each rank only needs its vocabulary slice of them, and
        the all-reduce of the self-conditioning product is identical on every rank.)
        """
        b, c = res.canvas.shape
        packed = torch.cat([res.canvas.reshape(-1), res.argmax.reshape(-1), res.accepted.reshape(-1).long(),
                            res.mean_entropy.float().view(torch.int32).long()])  # (3*B*C + B,)
        self.broadcast(packed)
        if self.rank:
            canvas, argmax, accepted, mean_h = packed.split([b * c, b * c, b * c, b])
            res.canvas = canvas.view(b, c).to(res.canvas.dtype)
            res.argmax = argmax.view(b, c).to(res.argmax.dtype)
            res.accepted = accepted.view(b, c).bool()
            res.mean_entropy = mean_h.int().view(torch.float32).to(res.mean_entropy.dtype)

    # -- control plane ---------------------------------------------------------------------
    def agree_min(self, value: int, timeout: timedelta = STARTUP_TIMEOUT) -> int:
        """The smallest ``value`` over all ranks (e.g. the KV budget of the fullest device). Called
        after loading, so ``timeout`` covers the slowest rank's load."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        opts.timeout = timeout
        self.control.allreduce([t], opts).wait()
        return int(t.item())

    def abort(self) -> None:
        """Make collectives blocked on a dead peer return (NCCL waits for its timeout otherwise;
        gloo already fails as soon as the peer's sockets close)."""
        if self.backend == "nccl":
            try:
                dist.distributed_c10d._abort_process_group(self.data)
            except Exception:  # best effort: the process is going down anyway
                log.exception("could not abort the NCCL process group")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def failure_key(rank: int) -> str:
    return f"dgserve/tp/failure/{rank}"


def join(store: dist.Store, *, rank: int, size: int, device: torch.device,
         collective_timeout: timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> TPGroup:
    """Every rank calls this with the same store; returns when all ``size`` ranks have joined."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.PrefixStore("dgserve/pg", store), rank=rank, world_size=size,
                            timeout=collective_timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank=rank, size=size, device=device, data=dist.group.WORLD, control=control, store=store,
                   collective_timeout=collective_timeout)

"""The command channel from rank 0 to the other ranks: a narrow, replayable protocol.

Every rank runs the same scheduler over the same requests. Rank 0 sends, once per step, the
requests added and aborted since the previous step (``AddRequest`` carries the request with
its seed resolved, so each rank builds an identically seeded generator) and a digest of the
step it scheduled. A follower applies the ops, schedules, and checks the digest before
running the forward: the initial canvas, sampling uniforms and renoise ids all come from the
per-request generators, so equal digests prove that every rank drew the same randomness,
and a mismatch stops the engine instead of letting ranks drift apart. ``Shutdown`` ends the
followers' loops.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..scheduler import Scheduled
from ..types import GenerationRequest


@dataclass(frozen=True)
class AddRequest:
    request: GenerationRequest  # params.seed is always set


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Step:
    ops: tuple[AddRequest | Abort, ...]
    digest: bytes


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Step | Shutdown


def _broadcast(group: dist.ProcessGroup, t: torch.Tensor, timeout: timedelta | None) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    if timeout is not None:
        opts.timeout = timeout
    group.broadcast([t], opts).wait()


def send(group: dist.ProcessGroup, command: Command, timeout: timedelta) -> None:
    """Rank 0: a follower that does not take the command within ``timeout`` (stopped, stuck)
    fails the send, instead of blocking rank 0 for the control group's unbounded timeout."""
    payload = torch.frombuffer(bytearray(pickle.dumps(command)), dtype=torch.uint8)
    _broadcast(group, torch.tensor([payload.numel()], dtype=torch.int64), timeout)
    _broadcast(group, payload, timeout)


def receive(group: dist.ProcessGroup) -> Command:
    """Followers: wait for the next command as long as it takes (an idle engine sends nothing)."""
    size = torch.zeros(1, dtype=torch.int64)
    _broadcast(group, size, None)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    _broadcast(group, payload, None)
    return pickle.loads(payload.numpy().tobytes())


def plan_digest(plan: list[Scheduled]) -> bytes:
    """What a step does and which random numbers it uses (CPU data only: no device sync)."""
    h = hashlib.blake2b(digest_size=16)
    for item in plan:
        s = item.seq
        h.update(repr((s.request_id, s.slot, s.cache_len, s.steps, s.canvas_index, item.with_canvas,
                       item.new_tokens)).encode())
        if item.uniforms is not None:
            h.update(item.uniforms.numpy().tobytes())
            h.update(item.renoise.numpy().tobytes())
    return h.digest()

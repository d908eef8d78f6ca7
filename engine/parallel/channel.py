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
from dataclasses import dataclass

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


def send(group: dist.ProcessGroup, command: Command) -> None:
    dist.broadcast_object_list([command], src=0, group=group)


def receive(group: dist.ProcessGroup) -> Command:
    box: list[Command | None] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    assert box[0] is not None
    return box[0]


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

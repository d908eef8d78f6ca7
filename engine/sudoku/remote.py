"""``dgserve sudoku --server HOST:PORT``: solve through a running dgserve stack (gRPC API
``dgserve.v1``), with the given cells pinned and ``DIFFUSION_ONLY`` routing (an autoregressive
fallback cannot honour pins and would not solve the puzzle anyway)."""

from __future__ import annotations

from collections.abc import Sequence

from .modelcfg import CANVAS
from .solve import pinned_cells
from .tokenizer import VOCAB, ids_grid, prompt_ids


def build_request(puzzle: Sequence[int], steps: int = 32, seed: int = 0):
    from dgserve.v1 import dgserve_pb2 as pb

    prompt = "".join(VOCAB[t] for t in prompt_ids(puzzle))  # "<bos>" + one character per cell
    return pb.GenerateRequest(
        prompt=prompt, max_new_tokens=CANVAS, seed=seed,
        sampling=pb.SamplingOverrides(max_denoising_steps=steps),
        pinned=[pb.PinnedToken(position=p, token_id=t) for p, t in pinned_cells(puzzle)],
        routing=pb.GenerateRequest.DIFFUSION_ONLY, request_id=f"sudoku-{seed}",
    )


def solve_remote(address: str, puzzle: Sequence[int], steps: int = 32, seed: int = 0,
                 timeout: float = 120.0) -> tuple[int, ...]:
    """Send one puzzle; return the 81 digits of the response (0 where a token is not a digit).
    gRPC errors propagate as ``grpc.RpcError`` with the server's status code and details."""
    import grpc

    from dgserve.v1 import dgserve_pb2_grpc as rpc

    with grpc.insecure_channel(address) as channel:
        stub = rpc.DGServeStub(channel)
        resp = stub.Generate(build_request(puzzle, steps, seed), timeout=timeout)
    ids = list(resp.token_ids)[:CANVAS]
    if len(ids) < CANVAS:
        raise ValueError(f"server returned {len(ids)} tokens, expected {CANVAS} (one per cell)")
    return ids_grid(ids)

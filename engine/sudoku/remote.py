"""``dgserve sudoku --server HOST:PORT``: solve through a running dgserve stack (gRPC API
``dgserve.v1``, through ``dgserve.serving.client``), with the given cells pinned and
``DIFFUSION_ONLY`` routing (an autoregressive fallback cannot honour pins)."""

from __future__ import annotations

from collections.abc import Sequence

from .modelcfg import CANVAS
from .solve import pinned_cells
from .tokenizer import VOCAB, ids_grid, prompt_ids


def prompt_text(puzzle: Sequence[int]) -> str:
    """The prompt as text: ``<bos>`` + one character per cell ('.' for a blank); the
    checkpoint's tokenizer maps it back to exactly ``prompt_ids(puzzle)``."""
    return "".join(VOCAB[t] for t in prompt_ids(puzzle))


def build_request(puzzle: Sequence[int], steps: int = 32, seed: int = 0):
    from dgserve.serving.client import make_request

    return make_request(prompt_text(puzzle), max_new_tokens=CANVAS, seed=seed, routing="diffusion",
                        pinned=pinned_cells(puzzle), request_id=f"sudoku-{seed}", max_denoising_steps=steps)


def solve_remote(address: str, puzzle: Sequence[int], steps: int = 32, seed: int = 0,
                 timeout: float = 120.0) -> tuple[int, ...]:
    """Send one puzzle; return the 81 digits of the response (0 where a token is not a digit).
    gRPC errors propagate as ``grpc.RpcError`` with the server's status code and details."""
    from dgserve.serving.client import Client

    with Client(address) as client:
        resp = client.generate(build_request(puzzle, steps, seed), timeout=timeout)
    ids = list(resp.token_ids)[:CANVAS]
    if len(ids) < CANVAS:
        raise ValueError(f"server returned {len(ids)} tokens, expected {CANVAS} (one per cell)")
    return ids_grid(ids)


# Test puzzle 0 at 40 blanks (``data.eval_set("test", 40, 1)``): ``dgserve demo`` sends it.
DEMO_PUZZLE = ".75.194.3..9...7.234.....81.5.2..6.7.6875.....2...68.5732.68549..1..5.7858....21."

"""``dgserve sudoku --server``: the shipped checkpoint behind a real local stack (Ray Serve, gRPC
router, diffusion replica running our engine; fallback disabled), given cells pinned,
DIFFUSION_ONLY. Same seed, same grid as the in-process engine."""

from __future__ import annotations

import pytest

from dgserve.engine.sudoku import data, grid
from dgserve.engine.sudoku.solve import EngineSolver, default_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_sudoku_through_a_running_stack(capsys):
    from dgserve.cli import main
    from dgserve.serving import local
    from dgserve.serving.config import AppConfig

    puz, _ = data.eval_set("test", 40, 2)
    cpu = {"num_cpus": 0.1}
    cfg = AppConfig.model_validate({
        "promised_context_length": 2048,
        "diffusion": {"engine": {"model": str(default_checkpoint()), "max_batch": 2, "device": "cpu"},
                      "actor_options": cpu},
        "fallback": {"enabled": False},
        "router": {"grpc_port": local.free_port(), "actor_options": cpu},
        "security": {"allow_plaintext": True, "listen_host": "127.0.0.1"},
    })
    codes, remote = [], []
    with local.local_stack(cfg, startup_timeout_s=300) as target:
        capsys.readouterr()
        for p in puz:  # the command's stdout, per call: Ray's own log lines may follow the stack's shutdown
            codes.append(main(["sudoku", grid.format_grid(p), "--server", target, "--seed", "7"]))
            last = capsys.readouterr().out.strip().splitlines()[-1]
            assert len(last) == 81 and last.isdigit(), last
            remote.append(grid.parse(last))
    solver = EngineSolver(default_checkpoint())
    local_grids = [solver.solve([p], steps=32, seed=7)[0].grid for p in puz]
    assert remote == local_grids  # pinned, seeded: the stack's replica computes exactly what the engine does
    for code, g, p in zip(codes, remote, puz):
        assert (code == 0) == grid.is_valid_solution(g, tuple(int(v) for v in p))
        assert all(g[i] == v for i, v in enumerate(p) if v)

"""``dgserve`` subcommands of the Sudoku reference model: ``sudoku-data``, ``train``,
``sudoku-eval`` and ``sudoku``. ``register(subparsers)`` adds them to the ``dgserve`` CLI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from dgserve.paths import state_dir


def _sudoku_dir() -> Path:
    d = state_dir() / "sudoku"
    d.mkdir(parents=True, exist_ok=True)
    return d


def register(subparsers) -> None:
    p = subparsers.add_parser("sudoku", help="solve a Sudoku with the bundled diffusion checkpoint",
                              description="Solve a Sudoku (81 characters, digits 1-9 with '.' or '0' for "
                              "blanks). The last line printed is the solved grid as 81 digits.")
    p.add_argument("puzzle", help="81 characters, row by row")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled one)")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="solve through a running dgserve stack")
    p.add_argument("--steps", type=int, default=32, help="denoising steps cap (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("engine", "reference"), default="engine",
                   help="in-process back end: our engine (default) or transformers' reference generate")
    p.set_defaults(func=_cmd_sudoku)

    p = subparsers.add_parser("sudoku-data", help="generate the reproducible Sudoku train/val/test splits")
    p.add_argument("--out", default=None, help="data directory (default: $DGSERVE_STATE_DIR/sudoku/data)")
    p.add_argument("--train", type=int, default=6000, help="training carvings (grids with removal orders)")
    p.add_argument("--val", type=int, default=200, help="validation puzzles per blank count")
    p.add_argument("--test", type=int, default=1000, help="test puzzles per blank count (30, 40, 50)")
    p.set_defaults(func=_cmd_data)

    p = subparsers.add_parser("train", help="train the Sudoku diffusion model or its autoregressive twin")
    p.add_argument("--kind", choices=("diffusion", "ar"), default="diffusion")
    p.add_argument("--out", default=None, help="output directory (default: $DGSERVE_STATE_DIR/sudoku/<kind>)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--background", action="store_true",
                   help="detach (nohup-like) and log to $DGSERVE_STATE_DIR/sudoku/train-<kind>.log")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("sudoku-eval", help="evaluate Sudoku checkpoints and write docs/sudoku.md's numbers")
    p.add_argument("--model", default=None, help="diffusion checkpoint (default: the bundled one)")
    p.add_argument("--ar-model", default=None, help="autoregressive twin checkpoint (skipped when absent)")
    p.add_argument("--n", type=int, default=1000, help="test puzzles per blank count")
    p.add_argument("--steps", default="32", help="denoising step caps, comma separated (first one is the main)")
    p.add_argument("--sweep-blanks", type=int, default=40, help="blank count of the steps/entropy sweeps")
    p.add_argument("--sweep-n", type=int, default=1000, help="puzzles in each sweep point")
    p.add_argument("--record", action="store_true",
                   help="store the solve rates in the checkpoint's dgserve_sudoku.json (read by the tests)")
    p.add_argument("--backend", choices=("engine", "reference"), default="engine")
    p.add_argument("--ar-only", action="store_true",
                   help="keep the diffusion numbers of <out>/sudoku_results.json, run only --ar-model, redraw the plot")
    p.add_argument("--out", default="docs", help="where sudoku_results.json and the plots go")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_eval)


def _cmd_sudoku(args: argparse.Namespace) -> int:
    from . import grid

    try:
        puzzle = grid.parse(args.puzzle)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.server:
        from .remote import solve_remote

        solved = solve_remote(args.server, puzzle, steps=args.steps, seed=args.seed)
    else:
        from .solve import EngineSolver, ReferenceSolver

        solver = EngineSolver(args.model) if args.backend == "engine" else ReferenceSolver(args.model)
        solved = solver.solve([puzzle], steps=args.steps, seed=args.seed)[0].grid
    ok = grid.is_valid_solution(solved, puzzle)
    print("solved: all rows, columns and boxes hold 1-9 once, givens kept" if ok
          else "not solved: the model's grid breaks a constraint or a given", file=sys.stderr)
    print(grid.format_grid(solved, blank="0"))
    return 0 if ok else 1


def _cmd_data(args: argparse.Namespace) -> int:
    from . import data

    out = Path(args.out) if args.out else _sudoku_dir() / "data"
    out.mkdir(parents=True, exist_ok=True)
    for b in data.EVAL_BLANKS:
        data.eval_set("val", b, args.val, out)
        data.eval_set("test", b, args.test, out)
    path = out / "train_carvings.npz"
    if not path.exists():
        data.save_carvings(data.make_carvings(args.train, data.SPLIT_SEEDS["train"], progress=True), path)
    print(out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.background:
        log = _sudoku_dir() / f"train-{args.kind}.log"
        argv = [a for a in sys.argv[1:] if a != "--background"]
        with open(log, "ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "dgserve.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        print(f"training in the background: pid {proc.pid}, log {log}")
        return 0
    from .train import TrainConfig, train

    cfg = TrainConfig(kind=args.kind, out=args.out or str(_sudoku_dir() / args.kind),
                      data_dir=args.data_dir or str(_sudoku_dir() / "data"), threads=args.threads)
    names = {f.name for f in fields(TrainConfig)}
    for name in ("steps", "minutes", "batch", "lr", "seed"):
        value = getattr(args, name)
        if value is not None and name in names:
            setattr(cfg, name, value)
    print(train(cfg))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_evaluation

    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    run_evaluation(model=args.model, ar_model=args.ar_model, n=args.n, steps=steps, sweep_blanks=args.sweep_blanks,
                   backend=args.backend, out=Path(args.out), threads=args.threads,
                   data_dir=_sudoku_dir() / "data", sweep_n=args.sweep_n, record=args.record,
                   diffusion=not args.ar_only)
    return 0

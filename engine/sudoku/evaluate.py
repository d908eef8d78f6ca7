"""Evaluation of the Sudoku checkpoints on the held-out test split, and the figures of
docs/sudoku.md. A puzzle counts as solved when the returned grid is a valid Sudoku (every row,
column and box holds 1..9 once) that keeps every given cell; with unique-solution puzzles
that is the same as equal to the stored solution, which is checked as well."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import data, grid


def score(puzzles: np.ndarray, solutions: np.ndarray, results) -> dict:
    solved = 0
    for p, s, r in zip(puzzles, solutions, results):
        p_t, s_t = tuple(int(v) for v in p), tuple(int(v) for v in s)
        if grid.is_valid_solution(r.grid, p_t) and r.grid == s_t:
            solved += 1
    blanks = (puzzles == 0).sum(1)
    steps = np.array([r.steps for r in results], float)
    return {
        "n": len(results), "solved": solved, "solve_rate": solved / max(1, len(results)),
        "mean_steps": float(steps.mean()), "mean_tokens_per_step": float(np.mean([81 / s for s in steps])),
        "mean_blank_cells_per_step": float(np.mean(blanks / steps)),
        "blank_cell_accuracy": _cell_accuracy(puzzles, solutions, results),
    }


def _default_dir() -> Path:
    from .solve import default_checkpoint

    return default_checkpoint()


def _solver(backend: str, model: str | None, threads: int):
    from .solve import EngineSolver, ReferenceSolver

    if backend == "engine":
        return EngineSolver(model, threads=threads)
    return ReferenceSolver(model, threads=threads)


def run_evaluation(model: str | None, ar_model: str | None, n: int, steps: Sequence[int], sweep_blanks: int,
                   backend: str, out: Path, threads: int, data_dir: Path, sweep_n: int = 1000,
                   entropy_bounds: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0), record: bool = False,
                   diffusion: bool = True) -> dict:
    """Solve rates at 30/40/50 blanks (diffusion with the first step cap, AR greedy) on ``n``
    puzzles each, the step-cap and entropy-bound sweeps on the first ``sweep_n`` puzzles at
    ``sweep_blanks``; writes ``sudoku_results.json`` and the plot. ``record`` also stores the
    solve rates in the checkpoint's ``dgserve_sudoku.json`` (the tests read them from there).
    ``diffusion=False`` keeps the diffusion numbers of an earlier run's ``sudoku_results.json``
    and only (re)runs the autoregressive twin, then redraws the plot."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    sets = {b: data.eval_set("test", b, n, data_dir) for b in data.EVAL_BLANKS}
    if not diffusion:
        res = json.loads((out / "sudoku_results.json").read_text())
        if ar_model:
            res["ar"] = _run_ar(ar_model, sets, threads, tqdm)
            res["ar_n_per_level"] = n
        (out / "sudoku_results.json").write_text(json.dumps(res, indent=2) + "\n")
        plot_results(res, out / "sudoku_solve_rate.png")
        plot_training(data_dir.parent, out / "sudoku_training.png")
        return res
    res: dict = {"machine": f"{platform.machine()} CPU, torch threads={threads}", "n_per_level": n,
                 "sweep_n": sweep_n, "sweep_blanks": sweep_blanks,
                 "backend": backend, "diffusion": {}, "ar": {}, "steps_sweep": [], "entropy_sweep": []}
    solver = _solver(backend, model, threads)
    main = steps[0]
    for b, (puz, sol) in tqdm(sets.items(), desc="diffusion"):
        t0 = time.time()
        r = score(puz, sol, solver.solve(list(puz), steps=main, seed=b))
        r["seconds"] = round(time.time() - t0, 1)
        r["max_denoising_steps"] = main
        res["diffusion"][str(b)] = r
    puz, sol = sets[sweep_blanks]
    puz, sol = puz[:sweep_n], sol[:sweep_n]
    for s in tqdm(steps, desc="steps sweep"):
        r = score(puz, sol, solver.solve(list(puz), steps=s, seed=1000 + s))
        res["steps_sweep"].append({"max_denoising_steps": s, **r})
    for eb in tqdm(entropy_bounds, desc="entropy sweep"):
        r = score(puz, sol, solver.solve(list(puz), steps=main, seed=2000, entropy_bound=eb))
        res["entropy_sweep"].append({"entropy_bound": eb, "max_denoising_steps": main, **r})
    if ar_model:
        res["ar"] = _run_ar(ar_model, sets, threads, tqdm)
    (out / "sudoku_results.json").write_text(json.dumps(res, indent=2) + "\n")
    plot_results(res, out / "sudoku_solve_rate.png")
    picture_puzzle, picture_solution = sets[sweep_blanks][0][0], sets[sweep_blanks][1][0]
    frames = trace_denoising(model or _default_dir(), [int(v) for v in picture_puzzle], steps=main, seed=0)
    plot_denoising([int(v) for v in picture_puzzle], frames, out / "sudoku_denoising.png",
                   title=f"One canvas, test puzzle 0 at {sweep_blanks} blanks, max_denoising_steps={main}: "
                         "black = given (pinned), blue = accepted this step (red: wrong), grey = renoised",
                   solution=[int(v) for v in picture_solution])
    (out / "sudoku_denoising.txt").write_text(
        format_denoising_text([int(v) for v in picture_puzzle], frames, [int(v) for v in picture_solution]))
    plot_training(data_dir.parent, out / "sudoku_training.png")
    if record:
        from .solve import default_checkpoint

        meta_path = Path(model or default_checkpoint()) / "dgserve_sudoku.json"
        meta = json.loads(meta_path.read_text())
        meta.setdefault("evaluation", {})[backend] = {
            k: {kk: v[kk] for kk in ("n", "solve_rate", "mean_steps", "max_denoising_steps")}
            for k, v in res["diffusion"].items()}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return res


def _run_ar(ar_model: str, sets: dict, threads: int, tqdm) -> dict:
    from .solve import ARSolver

    ar = ARSolver(ar_model, threads=threads)
    out = {}
    for b, (puz, sol) in tqdm(sets.items(), desc="autoregressive"):
        t0 = time.time()
        results = ar.solve(list(puz))
        r = score(puz, sol, results)
        r["seconds"] = round(time.time() - t0, 1)
        out[str(b)] = r
    return out


def _cell_accuracy(puzzles: np.ndarray, solutions: np.ndarray, results) -> float:
    """Fraction of blank cells filled with the right digit."""
    right = total = 0
    for p, s, r in zip(puzzles, solutions, results):
        for i in range(81):
            if not p[i]:
                total += 1
                right += int(r.grid[i] == int(s[i]))
    return right / max(1, total)


def format_denoising_text(puzzle: Sequence[int], frames: list[dict], solution: Sequence[int] | None = None) -> str:
    """The frames of :func:`trace_denoising` as text, one 9x9 grid per step: given cells and
    cells kept (accepted) after the step as digits, renoised cells as ``_``; the header counts
    the kept blank cells and, given ``solution``, how many of them are wrong."""
    blocks = []
    for fr in frames:
        rows = []
        wrong = 0
        for r in range(9):
            cells = []
            for c in range(9):
                i = 9 * r + c
                tok = int(fr["canvas"][i])
                digit = tok - data.DIGIT0 if data.DIGIT0 < tok <= data.DIGIT0 + 9 else 0
                if puzzle[i] or fr["accepted"][i]:
                    cells.append(str(digit) if digit else "?")
                    if not puzzle[i] and solution is not None and digit != int(solution[i]):
                        wrong += 1
                else:
                    cells.append("_")
                if c in (2, 5):
                    cells.append("|")
            rows.append(" ".join(cells))
            if r in (2, 5):
                rows.append("------+-------+------")
        kept = sum(1 for i in range(81) if fr["accepted"][i] and not puzzle[i])
        blanks = sum(1 for v in puzzle if not v)
        head = f"step {fr['step']}: {kept}/{blanks} blank cells kept" + (
            f", {wrong} of them wrong" if solution is not None else "")
        blocks.append(head + "\n" + "\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def plot_training(sudoku_dir: Path, path: Path) -> None:
    """Loss and validation curves of the runs whose ``loss.csv`` is in ``sudoku_dir/{diffusion,ar}``
    (nothing when neither is)."""
    import csv

    runs = {k: sudoku_dir / k / "loss.csv" for k in ("diffusion", "ar")}
    runs = {k: v for k, v in runs.items() if v.exists()}
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, f in runs.items():
        rows = list(csv.DictReader(f.open()))
        minutes = np.array([float(r["seconds"]) for r in rows]) / 60
        loss = np.array([float(r["loss"]) for r in rows])
        k = 50
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) > k else loss
        label = "diffusion" if kind == "diffusion" else "autoregressive twin"
        a.plot(minutes[len(minutes) - len(smooth):], smooth, label=label)
        val = [(float(r["seconds"]) / 60, float(r["val_acc_40"])) for r in rows if r["val_acc_40"]]
        if val:
            b.plot(*zip(*val), "o-", label=label)
    a.set_xlabel("minutes (2-core CPU, 1 torch thread)")
    a.set_ylabel("training loss incl. probes (mean of 50 steps)")
    a.set_yscale("log")
    a.legend()
    b.set_xlabel("minutes")
    b.set_ylabel("blank-cell accuracy (200 val puzzles, 40 blanks)")
    b.set_title("one pass: diffusion from a fully noised canvas, AR teacher-forced", fontsize=9)
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    levels = list(res["diffusion"])
    x = np.arange(len(levels))
    bars = [("diffusion", res["diffusion"], -0.2)]
    if res.get("ar"):
        bars.append(("autoregressive twin", res["ar"], 0.2))
    for label, table, dx in bars:
        rates = [100 * table[k]["solve_rate"] for k in levels]
        a.bar(x + dx, rates, 0.4, label=label)
        for xi, r in zip(x, rates):
            a.annotate(f"{r:.1f}", (xi + dx, r), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                       textcoords="offset points")
    a.set_xticks(x, [f"{k} blanks" for k in levels])
    a.set_ylabel("solved (%)")
    a.set_ylim(0, 105)
    a.set_title(f"Solve rate, {res['n_per_level']} test puzzles per level")
    a.legend(loc="upper right")
    sw = sorted(res["steps_sweep"], key=lambda r: r["max_denoising_steps"])
    caps = [r["max_denoising_steps"] for r in sw]
    b.plot(caps, [100 * r["solve_rate"] for r in sw], "o-", label="solved (%)")
    b.set_xscale("log", base=2)
    b.set_xlabel("max_denoising_steps (step cap)")
    b.set_ylabel("solved (%)")
    b.set_ylim(0, 100)
    b2 = b.twinx()
    b2.plot(caps, [r["mean_blank_cells_per_step"] for r in sw], "s--", color="tab:orange")
    b2.set_ylabel("blank cells committed per step (mean)", color="tab:orange")
    b.set_title(f"Step cap sweep ({res['sweep_blanks']} blanks, {res['sweep_n']} puzzles)")
    es = sorted(res["entropy_sweep"], key=lambda r: r["entropy_bound"])
    bounds = [r["entropy_bound"] for r in es]
    c.plot(bounds, [100 * r["solve_rate"] for r in es], "o-")
    c.set_xscale("log")
    c.set_xlabel("entropy bound (max_denoising_steps %d)" % es[0]["max_denoising_steps"] if es else "entropy bound")
    c.set_ylabel("solved (%)")
    c.set_ylim(0, 100)
    c2 = c.twinx()
    c2.plot(bounds, [r["mean_blank_cells_per_step"] for r in es], "s--", color="tab:orange")
    c2.set_ylabel("blank cells committed per step (mean)", color="tab:orange")
    c2.set_ylim(0, max(20.0, max((r["mean_blank_cells_per_step"] for r in es), default=0) * 1.2))
    c.set_title(f"Entropy-bound sweep ({res['sweep_blanks']} blanks, {res['sweep_n']} puzzles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_denoising(puzzle: Sequence[int], frames: list[dict], path: Path, title: str = "",
                   solution: Sequence[int] | None = None) -> None:
    """One canvas step by step. ``frames``: dicts with ``canvas`` (81 token ids on the canvas
    after the step), ``accepted`` (81 bools) and ``step``. Given cells black, accepted cells
    blue (red when ``solution`` says the digit is wrong), renoised cells grey (their random
    token shown small)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tokenizer import VOCAB

    cols = min(6, len(frames))
    rows = (len(frames) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, fr in zip(axes.flat, frames):
        ax.set_xlim(0, 9)
        ax.set_ylim(9, 0)
        for k in range(10):
            lw = 1.6 if k % 3 == 0 else 0.4
            ax.plot([k, k], [0, 9], "k", lw=lw)
            ax.plot([0, 9], [k, k], "k", lw=lw)
        for i in range(81):
            r, cc = divmod(i, 9)
            tok = VOCAB[int(fr["canvas"][i])].replace("\n", "\\n")
            if puzzle[i]:
                ax.text(cc + 0.5, r + 0.55, tok, ha="center", va="center", fontsize=8, color="black",
                        weight="bold")
            elif fr["accepted"][i]:
                wrong = solution is not None and int(fr["canvas"][i]) != data.DIGIT0 + int(solution[i])
                ax.text(cc + 0.5, r + 0.55, tok, ha="center", va="center", fontsize=8,
                        color="tab:red" if wrong else "tab:blue")
            else:
                ax.add_patch(plt.Rectangle((cc, r), 1, 1, color="0.85", lw=0))
                ax.text(cc + 0.5, r + 0.55, tok if len(tok) == 1 else "·", ha="center", va="center",
                        fontsize=5, color="0.45")
        n_acc = sum(1 for i in range(81) if fr["accepted"][i] and not puzzle[i])
        ax.set_title(f"step {fr['step']}: {n_acc}/{sum(1 for v in puzzle if not v)} blanks kept", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_denoising(model_dir: str | Path, puzzle: Sequence[int], steps: int = 32, seed: int = 0,
                    entropy_bound: float = 0.1, t_min: float = 0.4, t_max: float = 0.8,
                    confidence: float = 0.005, stability: int = 1) -> list[dict]:
    """Every step of one canvas: transformers' reference forward for the logits, our engine's
    pure sampler functions (``dgserve.engine.sampler``) for the step, given cells pinned.
    Returns frames with the canvas after the step, the accepted mask and the argmax canvas."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    from dgserve.engine.sampler import StepNoise, denoise_step, is_converged, temperature

    from .tokenizer import VOCAB_SIZE

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    puz = np.asarray([puzzle], dtype=np.int64)
    pinned = torch.from_numpy(puz != 0)
    pin_ids = torch.from_numpy(data.to_grid_ids(puz))
    canvas = torch.where(pinned, pin_ids, torch.randint(0, VOCAB_SIZE, pinned.shape, generator=g))
    frames = [{"step": 0, "canvas": canvas[0].tolist(), "accepted": pinned[0].tolist()}]
    history: list = []
    with torch.no_grad():
        cache = hf.model.encoder(input_ids=torch.from_numpy(data.to_prompt_ids(puz)),
                                 cache=DynamicCache(config=hf.config.text_config)).cache
        sc = None
        for s in range(steps):
            logits = hf(cache=cache, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
            temp = temperature(s, steps, t_min, t_max).reshape(1)
            noise = StepNoise(torch.rand(canvas.shape, generator=g, dtype=torch.float64),
                              torch.randint(0, VOCAB_SIZE, canvas.shape, generator=g))
            res = denoise_step(logits, canvas, pinned, pin_ids, temp, torch.tensor([entropy_bound]), noise)
            sc = logits / temp
            canvas = res.canvas
            frames.append({"step": s + 1, "canvas": canvas[0].tolist(), "accepted": res.accepted[0].tolist(),
                           "argmax": res.argmax[0].tolist()})
            done, history = is_converged(history, res.argmax[0], float(res.mean_entropy[0]), s + 1, steps,
                                         stability, confidence)
            if done:
                break
    return frames

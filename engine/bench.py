"""``dgserve bench engine``: our engine next to transformers' reference, in one run.

On the "bench" tiny config (6 layers, hidden 256, MoE 8x128, vocab 4096, canvas 256) that it
creates: 64-token prompts, 512 new tokens, 16 fixed denoising steps (early stop and EOS off on
both sides), batch 1 and 8. Reports tokens/s of both and their ratio; our wall time over the
time spent in the model forward alone (the overhead ratio); per-canvas time with the exact KV
cache vs recomputing the prompt every step at a 2,048-token prompt; KV bytes per token
measured from the allocated cache vs the config formula.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dgserve.paths import state_dir

from .config import EngineConfig
from .engine import Engine
from .kv_cache import KVCache
from .tiny import make_tiny_model
from .types import GenerationRequest, SamplingParams

PROMPT, NEW, STEPS = 64, 512, 16


def bench_model(path: Path | None = None) -> Path:
    path = path or state_dir() / "models" / "bench"
    if not (path / "model.safetensors").exists():
        make_tiny_model(path, preset="bench", seed=0)
        gen = json.loads((path / "generation_config.json").read_text())
        gen["eos_token_id"] = []  # generate exactly max_new_tokens on both sides
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def prompts(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, PROMPT), generator=g)


def time_reference(hf, ids: torch.Tensor, new: int) -> float:
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new, max_denoising_steps=STEPS, confidence_threshold=1e-9)
    dt = time.perf_counter() - t
    assert out.sequences.shape[1] == ids.shape[1] + new, out.sequences.shape
    return dt


def time_ours(engine: Engine, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """Wall seconds, and seconds inside the model: the forward and the self-conditioning matmul
    (which the reference runs inside its forward)."""
    model = engine.model
    spent = [0.0]

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    model.forward, model.soft_embeddings = timed(model.forward), timed(model.soft_embeddings)
    try:
        reqs = [GenerationRequest(f"b{i}", tuple(row.tolist()), SamplingParams(
            max_new_tokens=new, max_denoising_steps=STEPS, confidence_threshold=0.0, seed=i)) for i, row in enumerate(ids)]
        t = time.perf_counter()
        res = engine.generate_batch(reqs)
        dt = time.perf_counter() - t
    finally:
        del model.forward, model.soft_embeddings  # back to the class methods
    assert all(len(r.token_ids) == new for r in res), [len(r.token_ids) for r in res]
    return dt, spent[0]


def cache_speedup(engine: Engine, prompt_len: int = 2048, reps: int = 2) -> dict[str, float]:
    """Per-canvas time (STEPS denoise steps) reading the exact cache vs recomputing the prompt each step."""
    cfg, model = engine.model_config, engine.model
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g)
    canvas = torch.randint(10, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    cache = KVCache(cfg, 1, prompt_len + cfg.canvas_length, prompt_len, engine.dtype, engine.device)
    model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")

    def with_cache():
        for _ in range(STEPS):
            model.forward_one(cache, slot=0, cache_len=prompt_len, canvas_ids=canvas)

    def recompute():
        for _ in range(STEPS):
            fresh = KVCache(cfg, 1, prompt_len + cfg.canvas_length, prompt_len, engine.dtype, engine.device)
            model.forward_one(fresh, slot=0, cache_len=0, new_ids=prompt, canvas_ids=canvas)

    out = {}
    for name, fn in (("cached_canvas_s", with_cache), ("recompute_canvas_s", recompute)):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    out["speedup"] = out["recompute_canvas_s"] / out["cached_canvas_s"]
    return out


def kv_bytes(path: Path) -> dict[str, float]:
    """Bytes per context token: measured from two allocated caches vs the config formula."""
    from .config import ModelConfig

    cfg = ModelConfig.from_dir(path)
    sizes = {}
    for ctx in (4096, 8192):
        sizes[ctx] = KVCache(cfg, 1, ctx, 2048, torch.float32, torch.device("cpu")).nbytes
    measured = (sizes[8192] - sizes[4096]) / 4096
    return {"measured_bytes_per_token": measured, "formula_bytes_per_token": cfg.kv_bytes_per_token(4),
            "bf16_formula_bytes_per_token": cfg.kv_bytes_per_token(2)}


def run_engine_bench(out: Path | None = None, quick: bool = False, threads: int | None = None) -> dict:
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    transformers.logging.set_verbosity_error()
    if threads is not None:
        torch.set_num_threads(threads)
    path = bench_model()
    new = 256 if quick else NEW
    reps = 1 if quick else 3
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = Engine(EngineConfig(model=str(path), max_batch=8, context_length=4096, device="cpu"), progress=False)
    vocab = engine.model_config.vocab_size
    # warm up both (first calls allocate and pick kernels)
    time_reference(hf, prompts(1, vocab), 256)
    time_ours(engine, prompts(1, vocab), 256)
    results: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                f"torch {torch.__version__}, transformers {transformers.__version__}",
                     "config": "bench preset: 6 layers, hidden 256, MoE 8x128 top-2, vocab 4096, canvas 256",
                     "workload": f"prompt {PROMPT}, {new} new tokens, {STEPS} fixed steps, fp32, CPU", "batches": {}}
    for batch in (1, 8):
        ids = prompts(batch, vocab, seed=batch)
        ref_t, ours_t, fwd_t = [], [], []
        for _ in range(reps):  # interleaved, so a busy machine slows both alike
            ref_t.append(time_reference(hf, ids, new))
            wall, fwd = time_ours(engine, ids, new)
            ours_t.append(wall)
            fwd_t.append(fwd)
        ref, ours = statistics.median(ref_t), statistics.median(ours_t)
        i = ours_t.index(ours)
        tokens = batch * new
        results["batches"][batch] = {
            "reference_tok_s": tokens / ref, "ours_tok_s": tokens / ours, "ratio": ref / ours,
            "overhead_ratio": ours_t[i] / fwd_t[i], "reference_s": ref_t, "ours_s": ours_t,
        }
    results["cache"] = cache_speedup(engine, reps=1 if quick else 2)
    results["kv"] = kv_bytes(path)
    print(format_results(results))
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    return results


def format_results(r: dict) -> str:
    lines = [f"machine: {r['machine']}", f"config: {r['config']}", f"workload: {r['workload']}", "",
             "batch | reference tok/s | ours tok/s | ratio | overhead (wall / forward)"]
    for b, v in r["batches"].items():
        lines.append(f"{b:>5} | {v['reference_tok_s']:>15.1f} | {v['ours_tok_s']:>10.1f} | {v['ratio']:>4.2f}x | "
                     f"{v['overhead_ratio']:.3f}")
    c, k = r["cache"], r["kv"]
    lines += ["", f"per-canvas time at a 2048-token prompt ({STEPS} steps): exact cache {c['cached_canvas_s']:.3f} s, "
                  f"recompute {c['recompute_canvas_s']:.3f} s, speedup {c['speedup']:.1f}x",
              f"KV bytes/token (fp32, full-attention layers): measured {k['measured_bytes_per_token']:.0f}, "
              f"formula {k['formula_bytes_per_token']}"]
    return "\n".join(lines)

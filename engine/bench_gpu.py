"""GPU benchmark, one call: our engine next to transformers' reference on a bigger random config.

    python -m dgserve.engine.bench_gpu --out bench_gpu.json            # on a GPU machine
    python -m dgserve.engine.bench_gpu --shapes tiny --device cpu ...  # smoke run of the script
    python -m dgserve.engine.bench_gpu --invariance --layers 2         # batch invariance only

Config ("real" shapes): the published DiffusionGemma-26B-A4B layer shapes (hidden 2816, 16
heads, 8/2 KV heads, head_dim 256/512, dense MLP 2112, 128 experts x 704 top-8, vocabulary
262144, canvas 256) with fewer layers (``--layers``, default 6 = 5 sliding + 1 full, about 5.6B
parameters, 11 GiB in bf16), random weights written once as an official-format checkpoint
(the same file loads in both implementations). bf16, one GPU (``--tensor-parallel-size`` > 1
runs our engine over that many local GPUs instead).

Measures, with early stop and EOS off (every canvas runs ``--steps`` steps):
* canvas time: ours, the median wall time of one canvas's steps (each step synchronises the
  device; canvases after the first, which also carries the prefill); the reference, its
  generate wall time divided by the number of canvases (prefill included);
* tokens/s at batch 1 and 8: new tokens / wall time of the whole generation (prefill included),
  median of ``--reps`` runs after a warm-up, the two implementations interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .config import EngineConfig, ModelConfig
from .loader import DECODER, ENCODER
from .model import DiffusionGemma
from .tiny import make_config
from .types import CanvasEvent, GenerationRequest, SamplingParams

REAL_SHAPES = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                   sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                   canvas_length=256, max_position_embeddings=262144)


def write_checkpoint(path: Path, shapes: str, layers: int, device: torch.device, seed: int = 0) -> Path:
    """config.json, generation_config.json (EOS off) and random bf16 weights with the official names."""
    overrides = {**(REAL_SHAPES if shapes == "real" else {}), "num_hidden_layers": layers}
    config = make_config("bench" if shapes == "real" else "tiny", **overrides)
    config["dtype"] = config["text_config"]["dtype"] = "bfloat16"
    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        shapes_of = {n: (tuple(p.shape), p.dim()) for n, p in DiffusionGemma(cfg).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, (shape, dim) in shapes_of.items():  # drawn on the device: seconds, not minutes, for 5B numbers
        if name.endswith("layer_scalar"):
            t = 0.5 + torch.rand(shape, generator=g, device=device)
        elif name == "embed_tokens.weight":
            t = torch.randn(shape, generator=g, device=device) * 0.3
        elif dim == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) * (0.5 / math.sqrt(shape[-1]))
        tensors[DECODER + name] = t.to(torch.bfloat16).cpu()
    for i in range(layers):
        tensors[f"{ENCODER}layers.{i}.layer_scalar"] = tensors[f"{DECODER}layers.{i}.layer_scalar"].clone()
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({
        "max_new_tokens": 256, "max_denoising_steps": 16, "t_min": 0.4, "t_max": 0.8,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [], "pad_token_id": 0}, indent=2))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(engine, ids: torch.Tensor, new: int, steps: int) -> tuple[float, list[float]]:
    """Wall seconds of the whole generation, and the seconds of each canvas of request 0 after the
    first (the first one also carries the prompt's prefill; the others carry their commit)."""
    for i, row in enumerate(ids):
        engine.add_request(GenerationRequest(f"b{i}", tuple(row.tolist()), SamplingParams(
            max_new_tokens=new, max_denoising_steps=steps, confidence_threshold=0.0, seed=i)))
    canvases, current = [], 0.0
    sync(engine.device)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        events = engine.step()  # returns once the step's results reached the host
        current += time.perf_counter() - t
        if any(isinstance(ev, CanvasEvent) and ev.request_id == "b0" for ev in events):
            canvases.append(current)
            current = 0.0
    sync(engine.device)
    return time.perf_counter() - t0, canvases[1:] or canvases


def time_reference(hf, ids: torch.Tensor, new: int, steps: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids.to(device), max_new_tokens=new, max_denoising_steps=steps, confidence_threshold=1e-9)
    sync(device)
    dt = time.perf_counter() - t
    assert out.sequences.shape[1] == ids.shape[1] + new, out.sequences.shape
    return dt


def _reference_logits(hf, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    with torch.no_grad():
        cache = DynamicCache(config=hf.config.get_text_config(decoder=True))
        hf.model.encoder(input_ids=prompt[None].to(device), cache=cache)
        return hf(cache=cache, decoder_input_ids=canvas[None].to(device)).logits[0].float()


def check_logits(engine, hf, path: Path | None = None, prompt_len: int = 256) -> dict:
    """Decoder logits of one canvas after a prompt, ours vs the reference, both in the benchmark's
    dtype on its device: max and mean absolute difference and argmax agreement. With ``path``, also
    both against the reference in float32 (loaded from ``path``): in bf16 two correct
    implementations differ by rounding, and what matters is that ours is as close to the fp32
    result as the reference is."""
    from .kv_cache import KVCache

    cfg, model, device = engine.model_config, engine.model, engine.device
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g)  # ours takes host ids
    canvas = torch.randint(10, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    cache = KVCache(cfg, 1, prompt_len + cfg.canvas_length, prompt_len, engine.dtype, device)
    with torch.no_grad():
        model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
        got = model.forward_one(cache, slot=0, cache_len=prompt_len, canvas_ids=canvas).float()
    want = _reference_logits(hf, prompt, canvas)

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
        d = (a - b).abs()
        return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(),
                "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

    out = {"prompt": prompt_len, "logit_scale": want.abs().mean().item(), "ours_vs_reference": compare(got, want)}
    if path is not None:
        from transformers import DiffusionGemmaForBlockDiffusion

        hf32 = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        exact = _reference_logits(hf32, prompt, canvas)
        del hf32
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["ours_vs_reference_fp32"] = compare(got, exact)
        out["reference_vs_reference_fp32"] = compare(want, exact)
    return out


def run(args: argparse.Namespace) -> dict:
    from .layers import Experts
    from .parallel import launch

    Experts.grouped = {"auto": None, "loop": False, "grouped": True}[args.experts]
    device = torch.device(args.device)
    t = time.perf_counter()
    path = write_checkpoint(Path(args.dir or tempfile.mkdtemp(prefix="dgbench-")) / "model", args.shapes,
                            args.layers, device)
    setup = {"write_checkpoint_s": time.perf_counter() - t}
    print(f"checkpoint written in {setup['write_checkpoint_s']:.1f} s", flush=True)
    cfg = ModelConfig.from_dir(path)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    t = time.perf_counter()
    engine = launch(EngineConfig(model=str(path), dtype=dtype, device=args.device, max_batch=8,
                                 context_length=args.prompt + args.new_tokens + cfg.canvas_length,
                                 tensor_parallel_size=args.tensor_parallel_size))
    setup["load_ours_s"] = time.perf_counter() - t
    if args.invariance:
        try:
            return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "versions": f"torch {torch.__version__}", "layers": args.layers, "dtype": dtype, "setup": setup,
                    "batch_invariance": check_batch_invariance(engine, cfg, args)}
        finally:
            engine.shutdown()
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    transformers.logging.set_verbosity_error()
    t = time.perf_counter()
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device).eval()
    setup["load_reference_s"] = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "config": {"shapes": args.shapes, "layers": args.layers, "params": sum(
            p.numel() for p in hf.model.decoder.parameters()), "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "experts": f"{cfg.num_experts}x{cfg.moe_intermediate_size} top-{cfg.top_k_experts}",
            "canvas": cfg.canvas_length, "dtype": dtype, "tensor_parallel_size": args.tensor_parallel_size},
        "workload": {"prompt": args.prompt, "new_tokens": args.new_tokens, "steps": args.steps},
        "setup": setup, "batches": {},
    }
    try:
        if args.tensor_parallel_size == 1:
            results["logits_check"] = check_logits(engine, hf, path if args.accuracy else None)
            print("logits check:", results["logits_check"], flush=True)
        warm = torch.randint(10, cfg.vocab_size, (1, args.prompt), generator=g)
        time_ours(engine, warm, cfg.canvas_length, args.steps)
        time_reference(hf, warm, cfg.canvas_length, args.steps, device)
        for batch in (1, 8):
            ids = torch.randint(10, cfg.vocab_size, (batch, args.prompt), generator=g)
            ours, ref, canvas = [], [], []
            for _ in range(args.reps):  # interleaved, so drift slows both alike
                wall, canvases = time_ours(engine, ids, args.new_tokens, args.steps)
                ours.append(wall)
                canvas += canvases
                ref.append(time_reference(hf, ids, args.new_tokens, args.steps, device))
            tokens = batch * args.new_tokens
            n_canvas = math.ceil(args.new_tokens / cfg.canvas_length)
            results["batches"][batch] = {
                "ours_tok_s": tokens / statistics.median(ours), "reference_tok_s": tokens / statistics.median(ref),
                "ours_canvas_ms": 1e3 * statistics.median(canvas),
                "reference_canvas_ms": 1e3 * statistics.median(ref) / n_canvas,
                "ours_s": ours, "reference_s": ref,
            }
            print(f"batch {batch}:", results["batches"][batch], flush=True)
        if args.profile:
            results["profile"] = profile_ours(engine, cfg, args, g)
    finally:
        engine.shutdown()
    return results


def _generate(engine, requests: list[GenerationRequest], join_after: int = 0) -> dict[str, tuple[int, ...]]:
    """Run ``requests`` to the end and return each one's output tokens. The first request starts
    alone; the others join after ``join_after`` engine steps (0: all in the first step)."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    engine.add_request(requests[0])
    pending, steps = list(requests[1:]), 0
    while engine.has_unfinished() or pending:
        if pending and steps >= join_after:
            for r in pending:
                engine.add_request(r)
            pending = []
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                out[ev.request_id] += ev.token_ids
        steps += 1
    return {k: tuple(v) for k, v in out.items()}


def compare_outputs(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> dict:
    """How many of ``got``'s requests match ``want`` token for token, and where each other one first differs."""
    first_diff = {k: next((i for i, (x, y) in enumerate(zip(want[k], v)) if x != y), min(len(want[k]), len(v)))
                  for k, v in got.items() if want[k] != v}
    return {"identical": len(got) - len(first_diff), "of": len(got), "first_differing_position": first_diff}


def check_batch_invariance(engine, cfg, args: argparse.Namespace) -> dict:
    """Does a seeded request give the same tokens alone as in a full batch? Eight requests, each
    run alone (twice: run-to-run determinism), then all eight at once, then request 0 alone for two
    steps with the other seven joining (the batch changes under it). Reports, per comparison, how
    many requests came out token-identical and the first differing position of each that did not.

    Random weights give near-uniform logits, so a last-bit difference flips an argmax far more
    easily than with a trained model: a difference here bounds the real one from above."""
    g = torch.Generator().manual_seed(1)
    prompts = [tuple(torch.randint(10, cfg.vocab_size, (args.prompt,), generator=g).tolist()) for _ in range(8)]

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest(f"b{i}", p, SamplingParams(max_new_tokens=args.new_tokens,
                                                             max_denoising_steps=args.steps,
                                                             confidence_threshold=0.0, seed=100 + i))
                for i, p in enumerate(prompts)]

    alone = {k: v for r in requests() for k, v in _generate(engine, [r]).items()}
    again = {k: v for r in requests() for k, v in _generate(engine, [r]).items()}
    full = _generate(engine, requests())
    staggered = _generate(engine, requests(), join_after=2)
    return {"new_tokens": args.new_tokens, "steps": args.steps, "prompt": args.prompt,
            "alone_vs_alone_again": compare_outputs(alone, again), "alone_vs_full_batch": compare_outputs(alone, full),
            "alone_vs_joined_mid_canvas": compare_outputs(alone, {"b0": staggered["b0"]})}


def profile_ours(engine, cfg, args: argparse.Namespace, g: torch.Generator) -> str:
    """torch.profiler over one batch-1 generation of ours: the top operators by self device time
    and by self host time (where a step's wall time goes)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(10, cfg.vocab_size, (1, args.prompt), generator=g)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        time_ours(engine, ids, args.new_tokens, args.steps)
    ev = prof.key_averages()
    sort = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    text = ev.table(sort_by=sort, row_limit=20) + "\n" + ev.table(sort_by="self_cpu_time_total", row_limit=15)
    print(text, flush=True)
    return text


def format_results(r: dict) -> str:
    c, w = r["config"], r["workload"]
    lines = [f"device: {r['device']} ({r['versions']})",
             f"config: {c['shapes']} shapes, {c['layers']} layers, {c['params'] / 1e9:.2f}B parameters, hidden "
             f"{c['hidden']}, vocab {c['vocab']}, experts {c['experts']}, canvas {c['canvas']}, {c['dtype']}, "
             f"TP {c['tensor_parallel_size']}",
             f"workload: prompt {w['prompt']}, {w['new_tokens']} new tokens, {w['steps']} fixed steps per canvas", "",
             "batch | ours tok/s | reference tok/s | ratio | ours canvas ms | reference canvas ms (wall / canvases)"]
    for b, v in r["batches"].items():
        lines.append(f"{b:>5} | {v['ours_tok_s']:>10.1f} | {v['reference_tok_s']:>15.1f} | "
                     f"{v['ours_tok_s'] / v['reference_tok_s']:>4.2f}x | {v['ours_canvas_ms']:>14.1f} | "
                     f"{v['reference_canvas_ms']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgserve.engine.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=["real", "tiny"], default="real")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="profile one batch-1 generation of ours at the end")
    p.add_argument("--accuracy", action="store_true",
                   help="also compare both implementations with the reference in float32 (loads it once more)")
    p.add_argument("--invariance", action="store_true",
                   help="only check batch invariance of our engine (no reference, no timing)")
    p.add_argument("--experts", choices=["auto", "loop", "grouped"], default="auto",
                   help="our MoE path: auto (grouped GEMM on CUDA), or force the padded per-expert loop or grouped")
    p.add_argument("--dir", default=None, help="where to write the random checkpoint (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    results = run(args)
    print(json.dumps(results["batch_invariance"], indent=2) if args.invariance else format_results(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

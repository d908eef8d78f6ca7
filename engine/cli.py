"""Engine subcommands: generate (in-process), make-tiny-model, check-context, bench engine, demo."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dgserve.paths import state_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a local model directory (or --server, see serving)")
    p.add_argument("--model", help="Hugging Face-format DiffusionGemma directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true", help="print text, token ids and stats as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("make-tiny-model", help="write a tiny random checkpoint in the official format")
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="no experts (dense MLP only)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("check-context", help="exit 0 if the model can serve --context tokens, else say why")
    p.add_argument("--model", required=True)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV budget in bytes (default: device rule)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_check_context)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("engine", help="our engine vs transformers' reference on a tiny config (CPU)")
    b.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: torch's). On a shared machine use 1: with more threads "
                        "than free cores every parallel region waits for a descheduled thread")
    b.set_defaults(func=cmd_bench_engine)

    # `dgserve demo` (the README's first command) is registered by dgserve.serving.cli: it starts the
    # local stack. cmd_demo below is the in-process variant, kept callable for engine-only use.
    __import__("dgserve.engine.sudoku.cli", fromlist=["register"]).register(sub)  # train, sudoku, sudoku-eval


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _engine(model: str, **kw):
    from dgserve.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=model, **{k: v for k, v in kw.items() if v is not None}))


def cmd_generate(args: argparse.Namespace) -> int:
    from dgserve.engine import DGServeError, GenerationRequest, SamplingParams

    if not args.model:
        print("dgserve generate: --model DIR is required (or use --server with a running stack)", file=sys.stderr)
        return 2
    try:
        eng = _engine(args.model, context_length=args.context_length, device=args.device, dtype=args.dtype,
                      max_batch=1)
        if eng.tokenizer is None:
            raise DGServeError(f"{args.model} has no tokenizer files: cannot encode a text prompt")
        ids = (eng.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat
               else eng.tokenizer.encode(args.prompt))
        params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed, max_denoising_steps=args.steps)
        res = eng.generate_batch([GenerationRequest("cli", tuple(ids), params)])[0]
    except DGServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
                          "stats": asdict(res.stats)}, indent=2))
    else:
        print(res.text)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from dgserve.engine.tiny import make_tiny_model

    overrides = {"num_experts": None} if args.dense else {}
    path = make_tiny_model(args.dir, preset=args.preset, seed=args.seed, **overrides)
    print(path)
    return 0


def cmd_check_context(args: argparse.Namespace) -> int:
    from dgserve.engine.check import check_context
    from dgserve.engine.errors import DGServeError

    try:
        report = check_context(args.model, context=args.context, max_batch=args.max_batch,
                               kv_cache_memory_bytes=args.kv_cache_memory, dtype=args.dtype, device=args.device)
    except DGServeError as e:
        print(f"cannot serve: {e}", file=sys.stderr)
        return 1
    print(f"ok: context {args.context} is servable; {report.describe()}")
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from dgserve.engine.bench import run_engine_bench

    run_engine_bench(out=args.out, quick=args.quick, threads=args.threads)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dgserve.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
    from dgserve.engine.tiny import make_tiny_model

    path = state_dir() / "models" / "tiny-random"
    if not (path / "model.safetensors").exists():
        make_tiny_model(path)
    eng = Engine(EngineConfig(model=str(path), max_batch=1, context_length=1024))
    ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Hello, DiffusionGemma!"}])
    res = eng.generate_batch([GenerationRequest("demo", tuple(ids), SamplingParams(max_new_tokens=64, seed=0))])[0]
    print(f"model {path} (random weights: the text is noise)")
    print(json.dumps({"token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
                      "stats": asdict(res.stats)}, indent=2))
    return 0

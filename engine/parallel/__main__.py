"""Standalone tensor-parallel generation under torchrun (every rank runs this; rank 0 prints):

    torchrun --standalone --nproc-per-node 4 -m dgserve.engine.parallel --model DIR --prompt "Hello"

CUDA ranks use NCCL (rank r on cuda:LOCAL_RANK), CPU ranks gloo (``--device cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import EngineConfig
from ..errors import DGServeError
from ..types import GenerationRequest, SamplingParams
from .launcher import torchrun_engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dgserve.engine.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face-format DiffusionGemma directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--json", action="store_true", help="print text, token ids and stats as JSON")
    args = p.parse_args(argv)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_batch=1,
                          context_length=args.context_length,
                          tensor_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        engine = torchrun_engine(config)
        if engine is None:  # a follower: rank 0 has shut down
            return 0
        try:
            ids = engine.tokenizer.encode(args.prompt)
            params = SamplingParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, seed=args.seed)
            res = engine.generate_batch([GenerationRequest("torchrun", tuple(ids), params)])[0]
        finally:
            engine.shutdown()
    except DGServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
                          "steps_per_canvas": list(res.stats.steps_per_canvas)}))
    else:
        print(res.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The other two ways to start ranks, each generating like one rank (CPU, gloo; slow to start):

* the serving path: rank 0 inside a Ray actor that holds bundle 0 of a STRICT_PACK placement
  group (as a Serve replica does) launches its followers as Ray actors in the other bundles;
* standalone ``torchrun --nproc-per-node 2 -m dgserve.engine.parallel``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from dgserve.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

FEW_STEPS = dict(max_new_tokens=64, max_denoising_steps=4, confidence_threshold=1e-9)


@pytest.mark.slow
def test_ranks_in_placement_group_bundles_generate_like_one_rank(tiny_dir):
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    config = dict(model=str(tiny_dir), max_batch=2, context_length=512)
    reqs = [GenerationRequest("a", tuple(range(2, 30)), SamplingParams(seed=4, **FEW_STEPS)),
            GenerationRequest("b", (2, 5), SamplingParams(seed=5, **FEW_STEPS))]
    want = [r.token_ids for r in Engine(EngineConfig(**config), progress=False).generate_batch(reqs)]

    class Replica:  # defined here so that Ray ships it by value
        def generate(self, config, reqs):
            import ray

            from dgserve.engine import AsyncEngine, EngineConfig

            # the serving replica's call: its engine factory gets the current placement group
            eng = AsyncEngine(EngineConfig(**config), placement_group=ray.util.get_current_placement_group())
            try:
                kinds = [type(w).__name__ for w in eng.engine.workers]
                return kinds, [r.token_ids for r in eng.engine.generate_batch(reqs)]
            finally:
                eng.shutdown()

    started = not ray.is_initialized()
    if started:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="dgtp-ray-"))
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=60)
        replica = ray.remote(Replica).options(
            num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote()
        kinds, got = ray.get(replica.generate.remote({**config, "tensor_parallel_size": 2}, reqs), timeout=300)
    finally:
        remove_placement_group(pg)
        if started:
            ray.shutdown()
    assert kinds == ["RayWorker"]  # rank 1 ran as a Ray actor in bundle 1
    assert got == want


@pytest.mark.slow
def test_torchrun_ranks_generate_like_one_rank(tiny_dir):
    args = ["--model", str(tiny_dir), "--prompt", "Hello there", "--device", "cpu", "--max-new-tokens", "40",
            "--steps", "4", "--seed", "7", "--context-length", "512", "--json"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dgserve.engine.parallel", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=1, context_length=512), progress=False)
    want = eng.generate_batch([GenerationRequest("torchrun", tuple(eng.tokenizer.encode("Hello there")),
                                                 SamplingParams(seed=7, max_new_tokens=40, max_denoising_steps=4))])[0]
    assert got["token_ids"] == list(want.token_ids)
    assert got["steps_per_canvas"] == list(want.stats.steps_per_canvas)

"""Tensor parallelism on CPU ranks (gloo) equals one rank, for 2 and 4 ranks, dense and MoE: the
model's logits in both modes, the self-conditioning product and the KV cache after a commit
(every rank a real process running the real sharded model); whole generations through the real
launcher and command channel; a rank killed mid-generation becomes a clean EngineDeadError
naming it within seconds; unusable tensor_parallel_size values are refused with the reason.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dgserve.engine import (
    AsyncEngine,
    CanvasEvent,
    ConfigError,
    DraftEvent,
    Engine,
    EngineConfig,
    EngineDeadError,
    GenerationRequest,
    SamplingParams,
)
from dgserve.engine.config import ModelConfig
from dgserve.engine.kv_cache import KVCache
from dgserve.engine.loader import load_model
from dgserve.engine.parallel import check_tensor_parallel, launch
from dgserve.engine.parallel.channel import plan_digest
from dgserve.engine.parallel.driver import TPEngine
from dgserve.engine.parallel.group import join
from dgserve.engine.parallel.sharding import kv_head_shard, shard_config
from dgserve.engine.tiny import make_config, make_tiny_model

TOL = 1e-4
CPU = torch.device("cpu")
PROMPT, COMMIT_AT = 40, 20  # prompts longer than the sliding window (16)


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """MoE: 4 heads, 2/1 KV heads (sliding/full): at 4 ranks every KV head is replicated.
    Dense: 8 heads, 4/2 KV heads: at 4 ranks sliding KV heads split, full ones replicated."""
    dense = make_tiny_model(tmp_path_factory.mktemp("tp") / "dense8", seed=3, num_experts=None,
                            num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2)
    return {"moe": tiny_dir, "dense": dense}


def scenario(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The same forwards on every rank (and on the reference): encoder logits of a prompt,
    decoder logits with and without self-conditioning, then a commit fused with the next canvas."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    committed = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    probs = (torch.randn(cfg.canvas_length, cfg.vocab_size, generator=g) * 3).softmax(-1)
    cache = KVCache(cfg_for_cache(model, cfg), 1, 512, 256, torch.float32, CPU)
    out = {"encoder": model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")}
    out["decoder"] = model.forward_one(cache, slot=0, cache_len=PROMPT, canvas_ids=canvas)
    out["soft"] = model.soft_embeddings(probs)
    out["decoder_sc"] = model.forward_one(cache, slot=0, cache_len=PROMPT, canvas_ids=canvas, soft=out["soft"])
    out["commit"] = model.forward_one(cache, slot=0, cache_len=PROMPT, new_ids=committed, canvas_ids=canvas)
    total = PROMPT + cfg.canvas_length
    for i, spec in enumerate(cfg.layers):
        n = min(total, cfg.sliding_window - 1) if spec.sliding else total
        k, v = cache.read(i, 0, total - n, total)  # (1, local KV heads, n, D)
        out[f"k{i}"], out[f"v{i}"] = k[0].clone(), v[0].clone()
    return out


def cfg_for_cache(model, cfg: ModelConfig) -> ModelConfig:
    return cfg if model.tp is None else shard_config(cfg, model.tp.size)


def rank_main(rank: int, size: int, port: int, dirs: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=120))
    tp = join(store, rank=rank, size=size, device=CPU, collective_timeout=timedelta(seconds=60))
    results = {}
    for name, path in dirs.items():
        cfg = ModelConfig.from_dir(path)
        model = load_model(path, cfg, dtype=torch.float32, device=CPU, progress=False, tp=tp)
        results[name] = scenario(model, cfg)
        results[name]["numel"] = torch.tensor(sum(p.numel() for p in model.parameters()))
    torch.save(results, f"{out}/rank{rank}.pt")
    tp.close()


def run_ranks(size: int, dirs: dict[str, str], out) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, size + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("forkserver")  # the launcher's context: children fork from a server with torch loaded
    ctx.set_forkserver_preload(["dgserve.engine.parallel.worker", __name__])
    procs = [ctx.Process(target=rank_main, args=(r, size, store.port, dirs, str(out)), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * size
    return [torch.load(out / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def references(models):
    refs = {}
    for name, path in models.items():
        cfg = ModelConfig.from_dir(path)
        refs[name] = scenario(load_model(path, cfg, dtype=torch.float32, device=CPU, progress=False), cfg), cfg
    return refs


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_model_equals_one_rank(models, references, size, tmp_path):
    ranks = run_ranks(size, {k: str(v) for k, v in models.items()}, tmp_path)
    for name, (ref, cfg) in references.items():
        for key in ("encoder", "decoder", "soft", "decoder_sc", "commit"):
            for r, got in enumerate(ranks):  # whole logits (and soft embeddings) on every rank
                diff = (got[name][key] - ref[key]).abs().max().item()
                assert diff <= TOL, f"{name} {key} rank {r}: max abs diff {diff}"
        assert not torch.equal(ref["decoder"], ref["decoder_sc"])  # self-conditioning was exercised
        full = sum(p.numel() for p in load_model(models[name], cfg, dtype=torch.float32, device=CPU,
                                                 progress=False).parameters())
        for got in ranks:  # sharded while loading: only the norms, router, self-conditioning are whole
            assert got[name]["numel"].item() < full / size * 1.5
        for i, spec in enumerate(cfg.layers):  # each rank holds its KV heads (split or replicated)
            for r, got in enumerate(ranks):
                heads = kv_head_shard(spec.num_kv_heads, r, size)
                for kv in "kv":
                    want = ref[f"{kv}{i}"][heads]
                    assert got[name][f"{kv}{i}"].shape == want.shape
                    diff = (got[name][f"{kv}{i}"] - want).abs().max().item()
                    assert diff <= TOL, f"{name} layer {i} {kv} rank {r}: max abs diff {diff}"


# -- the engine: generations, commands, failures ----------------------------------------------
# Exact token equality and its limit (measured on the tiny models, fp32): one rank and N ranks
# differ by the summation order of the row-parallel all-reduces (ulp level: 4e-7 after the first
# o_proj, up to 7e-5 on the logits after 6 layers). Within a canvas the self-conditioning loop
# roughly doubles any difference every denoising step (1e-4 after one step, 5e-2 after ten), and
# the very same growth follows from a one-ulp perturbation of the self-conditioning input on a
# single rank: it is the tiny random model's dynamics, not the sharding. A commit resets it (the
# clean argmax canvas re-enters the cache). So generations are compared at a few steps per canvas
# (differences stay near 1e-4, far below the sampler's decision margins), over several canvases.
FEW_STEPS = dict(max_new_tokens=96, max_denoising_steps=4, confidence_threshold=1e-9)


def generation_requests() -> list[GenerationRequest]:
    return [
        GenerationRequest("a", tuple(range(2, 40)), SamplingParams(seed=1, **FEW_STEPS)),
        GenerationRequest("b", (2, 9, 7), SamplingParams(seed=2, **{**FEW_STEPS, "max_new_tokens": 50})),
        # early stop: always confident and stable, so every canvas commits after one step
        GenerationRequest("c", tuple(range(5, 25)), SamplingParams(seed=3, max_new_tokens=96, max_denoising_steps=12,
                                                                   confidence_threshold=50.0, stability_threshold=0,
                                                                   entropy_bound=0.5)),
    ]


def tp_config(path, size: int, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), max_batch=4, context_length=512, tensor_parallel_size=size, **kw)


@pytest.mark.parametrize("size,model", [(2, "moe"), (4, "dense")])
def test_generations_equal_one_rank(models, size, model):
    reqs = generation_requests()
    want = Engine(tp_config(models[model], 1), progress=False).generate_batch(reqs)
    eng = launch(tp_config(models[model], size))
    try:
        assert isinstance(eng, TPEngine) and eng.info().tensor_parallel_size == size
        got = eng.generate_batch(reqs)
    finally:
        eng.shutdown()
    for a, b in zip(want, got):
        assert b.token_ids == a.token_ids, f"request {a.request_id}"
        assert (b.stats.steps_per_canvas, b.finish_reason) == (a.stats.steps_per_canvas, a.finish_reason)
    assert want[2].stats.steps_per_canvas == (1, 1, 1)
    assert [w.process.exitcode for w in eng.workers] == [0] * (size - 1)  # clean exits after Shutdown


def test_killed_rank_between_steps_is_a_clean_error_naming_it(models):
    eng = launch(tp_config(models["moe"], 4))
    try:
        eng.add_request(GenerationRequest("long", (2, 3, 4), SamplingParams(
            seed=0, max_new_tokens=256, max_denoising_steps=50, confidence_threshold=0.0)))
        eng.step()
        eng.step()
        victim = eng.workers[1]
        assert victim.rank == 2
        os.kill(victim.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank 2 died .*rank 2 killed by SIGKILL"):
            for _ in range(100):
                eng.step()
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(EngineDeadError, match="rank 2"):
            eng.check_health()
        for w in eng.workers:  # no follower is left behind
            w.process.join(5.0)
            assert w.process.exitcode is not None
    finally:
        eng.shutdown()


def test_async_engine_over_tp_streams_and_fails_fast_when_a_rank_dies(models):
    reqs = generation_requests()
    want = Engine(tp_config(models["moe"], 1), progress=False).generate_batch(reqs[:1])[0]
    eng = AsyncEngine(tp_config(models["moe"], 2))  # no placement group: local follower processes

    async def scenario():
        tokens = [t async for ev in eng.generate(reqs[0]) if isinstance(ev, CanvasEvent) for t in ev.token_ids]
        assert tuple(tokens) == want.token_ids
        long = GenerationRequest("long", (2, 3), SamplingParams(seed=0, max_new_tokens=400, max_denoising_steps=100,
                                                                 confidence_threshold=0.0), stream_drafts=True)
        t0 = None
        with pytest.raises(EngineDeadError, match="rank 1"):
            async for ev in eng.generate(long):
                if t0 is None and isinstance(ev, DraftEvent) and ev.step == 2:
                    os.kill(eng.engine.workers[0].process.pid, signal.SIGKILL)  # mid-generation, steps running
                    t0 = time.monotonic()
        assert t0 is not None and time.monotonic() - t0 < 5.0

    try:
        asyncio.run(scenario())
        with pytest.raises(EngineDeadError, match="rank 1"):
            eng.check_health()
    finally:
        eng.shutdown()


def test_stuck_rank_times_out_instead_of_hanging(models):
    eng = launch(tp_config(models["moe"], 2), collective_timeout_s=1.0)
    try:
        eng.add_request(GenerationRequest("x", (2, 3, 4), SamplingParams(seed=0, max_new_tokens=64)))
        eng.step()
        os.kill(eng.workers[0].process.pid, signal.SIGSTOP)  # alive but never answers
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="tensor-parallel step failed on rank 0"):
            for _ in range(100):
                eng.step()
        assert time.monotonic() - t0 < 10.0
    finally:
        eng.shutdown()  # kills the stopped rank
    assert eng.workers[0].process.exitcode == -signal.SIGKILL


def test_plan_digest_covers_the_steps_randomness(engine):
    """What followers check before each step: same plan and draws -> same digest, any draw differs -> not."""
    engine.add_request(GenerationRequest("d", (2, 3, 4), SamplingParams(seed=9, max_new_tokens=32)))
    plan = engine.scheduler.schedule()
    digest = plan_digest(plan)
    assert plan_digest(plan) == digest
    plan[0].uniforms = plan[0].uniforms.clone()
    plan[0].uniforms[5] += 1e-12
    assert plan_digest(plan) != digest
    engine.abort("d")


# -- start-up checks ----------------------------------------------------------------------------
def test_tensor_parallel_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two.*got 3"):
        EngineConfig(model="m", tensor_parallel_size=3)


@pytest.mark.parametrize("overrides,size,devices,reason", [
    ({}, 8, 8, "does not divide num_attention_heads 4"),
    ({}, 4, 2, "only 2 CUDA devices visible"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "num_global_key_value_heads": 3}, 2, 8,
     "3 key/value heads can be neither split nor replicated over 2 ranks"),
    ({"vocab_size": 510}, 4, 8, "does not divide vocab_size 510"),
    ({"moe_intermediate_size": 30}, 4, 8, "does not divide moe_intermediate_size 30"),
])
def test_unusable_tensor_parallel_size_is_refused_with_the_reason(overrides, size, devices, reason):
    cfg = ModelConfig.from_dict(make_config("tiny", **overrides))
    with pytest.raises(ConfigError, match=f"tensor_parallel_size {size} is not usable: .*{reason}"):
        check_tensor_parallel(cfg, size, devices=devices, device_kind="CUDA devices visible")
    check_tensor_parallel(cfg, 1, devices=1, device_kind="CUDA devices visible")  # one rank always fits


def test_launch_refuses_before_starting_any_rank(models):
    with pytest.raises(ConfigError, match="tensor_parallel_size 8 is not usable: it does not divide "
                                          "num_attention_heads 4"):
        launch(tp_config(models["moe"], 8))
    with pytest.raises(ConfigError, match="CUDA is not available"):
        launch(tp_config(models["moe"], 2, device="cuda"))
    with pytest.raises(ConfigError, match="tensor_parallel_size 2 needs that many ranks.*parallel.launch"):
        Engine(tp_config(models["moe"], 2), progress=False)
    assert not dist.is_initialized()

"""Scheduler and engine behaviour users rely on: batch invariance, seeds, no batch-wide barrier,
joining/leaving at any step, streaming, cancellation, pinned positions, chunked prefill."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dgserve.engine import (
    AsyncEngine,
    CanvasEvent,
    DraftEvent,
    Engine,
    EngineConfig,
    EngineDeadError,
    GenerationRequest,
    SamplingParams,
)


def req(rid, prompt=(2, 40, 41, 42), **params):
    pinned = params.pop("pinned", ())
    drafts = params.pop("stream_drafts", False)
    params.setdefault("max_new_tokens", 40)
    params.setdefault("max_denoising_steps", 6)
    # Seeded: an unseeded request draws its own noise, and the random tiny model then samples EOS
    # (which always stops a request) often enough to make canvas-count assertions flaky.
    params.setdefault("seed", 1234)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**params), pinned=tuple(pinned), stream_drafts=drafts)


def run_to_end(engine: Engine) -> list:
    events = []
    while engine.has_unfinished():
        events.append(engine.step())
    return events


def test_same_seed_same_output_alone_or_in_a_full_batch(engine):
    probe = req("probe", prompt=range(2, 30), seed=1234, max_new_tokens=70)
    alone = engine.generate_batch([probe])[0]
    others = [req(f"o{i}", prompt=range(3, 3 + 5 * i + 1), seed=i, max_new_tokens=20 + 9 * i,
                  max_denoising_steps=3 + i) for i in range(7)]
    crowded = engine.generate_batch(others[:3] + [probe] + others[3:])[3]
    assert crowded.token_ids == alone.token_ids
    assert crowded.stats.steps_per_canvas == alone.stats.steps_per_canvas


def test_seed_is_honoured_and_different_seeds_differ(engine):
    a, b, c = engine.generate_batch([req("a", seed=5), req("b", seed=5), req("c", seed=6)])
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_no_batch_wide_barrier_requests_commit_and_join_independently(engine):
    engine.add_request(req("fast", max_denoising_steps=2, max_new_tokens=96, confidence_threshold=0.0))
    engine.add_request(req("slow", max_denoising_steps=9, max_new_tokens=32, confidence_threshold=0.0))
    steps = []
    joined_at = None
    step = 0
    while engine.has_unfinished():
        step += 1
        for ev in engine.step():
            if isinstance(ev, CanvasEvent):
                steps.append((step, ev.request_id, ev.canvas_index))
        if step == 3:  # a request joins while the others are mid-canvas
            engine.add_request(req("late", max_denoising_steps=2, max_new_tokens=32, confidence_threshold=0.0))
            joined_at = step
    fast = [s for s, r, _ in steps if r == "fast"]
    slow = [s for s, r, _ in steps if r == "slow"]
    late = [s for s, r, _ in steps if r == "late"]
    assert fast == [2, 4, 6]  # commits every 2 steps (the commit rides on the next canvas's first step)
    assert slow == [9]  # while the slow one keeps denoising its first canvas
    assert late == [joined_at + 2]  # the late request started on the very next step


def test_streaming_events_and_drafts(engine):
    engine.add_request(req("s", max_new_tokens=70, max_denoising_steps=4, confidence_threshold=0.0,
                           stream_drafts=True))
    events = [ev for batch in run_to_end(engine) for ev in batch]
    canvases = [e for e in events if isinstance(e, CanvasEvent)]
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    assert [c.canvas_index for c in canvases] == [0, 1, 2]  # 70 tokens = 3 canvases of 32
    assert canvases[-1].finished and canvases[-1].finish_reason == "length"
    assert not any(c.finished for c in canvases[:-1])
    assert sum(len(c.token_ids) for c in canvases) == 70 == canvases[-1].stats.completion_tokens
    assert len(drafts) == 12 and [d.step for d in drafts[:4]] == [1, 2, 3, 4]
    assert all(c.converged_by == "step_cap" and c.started_at <= c.committed_at for c in canvases)


def test_canvas_events_say_why_a_canvas_committed(engine):
    engine.add_request(req("early", max_new_tokens=64, max_denoising_steps=8, confidence_threshold=100.0,
                           stability_threshold=0))
    canvases = [ev for batch in run_to_end(engine) for ev in batch if isinstance(ev, CanvasEvent)]
    assert [(c.steps, c.converged_by) for c in canvases] == [(1, "stable"), (1, "stable")]
    assert all(c.mean_entropy > 0 for c in canvases)
    assert "".join(c.text_delta for c in canvases) == engine.tokenizer.decode(
        [t for c in canvases for t in c.token_ids])


def test_pinned_positions_appear_unchanged_across_canvases(engine):
    pins = ((0, 65), (5, 66), (31, 67), (32, 68), (50, 69))  # across the first two canvases
    res = engine.generate_batch([req("pin", max_new_tokens=60, pinned=pins, seed=3)])[0]
    out = res.token_ids
    assert len(out) == 60
    for pos, tok in pins:
        assert out[pos] == tok


def test_stop_token_ends_generation(engine):
    # a pinned stop id at position 10: generation must stop there and not emit it
    res = engine.generate_batch([req("stop", max_new_tokens=60, pinned=((10, 77),), stop_token_ids=(77,))])[0]
    assert res.finish_reason == "stop"
    assert len(res.token_ids) <= 10 and 77 not in res.token_ids


def test_abort_frees_the_slot_for_a_waiting_request(tiny_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=2, context_length=512), progress=False)
    for rid in ("a", "b", "c"):
        eng.add_request(req(rid, max_new_tokens=200, max_denoising_steps=50, confidence_threshold=0.0))
    eng.step()
    assert [s.request_id for s in eng.scheduler.running] == ["a", "b"]
    assert eng.abort("a")
    eng.step()
    assert [s.request_id for s in eng.scheduler.running] == ["b", "c"]
    assert not eng.abort("a")  # idempotent


def test_chunked_prefill_gives_the_same_canvas_logits(tiny_dir):
    from dgserve.engine.kv_cache import KVCache

    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=2, context_length=512), progress=False)
    cfg, model = eng.model_config, eng.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (150,), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    whole = KVCache(cfg, 1, 512, 256, torch.float32, torch.device("cpu"))
    one = model.forward_one(whole, slot=0, cache_len=0, new_ids=prompt, canvas_ids=canvas)
    cache = KVCache(cfg, 2, 512, 64, torch.float32, torch.device("cpu"))
    for lo in range(0, 150, 64):  # 64-token chunks through a sliding buffer sized for 64
        chunk = prompt[lo:lo + 64]
        last = lo + 64 >= 150
        out = model.forward_one(cache, slot=1, cache_len=lo, new_ids=chunk, canvas_ids=canvas if last else None,
                                logits_for="canvas" if last else "new")
    assert (out - one).abs().max().item() <= 1e-4


def test_long_prompt_is_prefilled_in_chunks_and_other_requests_keep_going(tiny_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=2, context_length=1024, prefill_chunk_size=64),
                 progress=False)
    eng.add_request(req("short", max_new_tokens=32, max_denoising_steps=3, confidence_threshold=0.0))
    eng.add_request(req("long", prompt=[2] + list(range(10, 310)), max_new_tokens=32, max_denoising_steps=3,
                        confidence_threshold=0.0))
    done = {}
    step = 0
    while eng.has_unfinished():
        step += 1
        for ev in eng.step():
            if isinstance(ev, CanvasEvent) and ev.finished:
                done[ev.request_id] = step
    # step 1: the short prompt takes 4 of the 64-token budget, so the long prompt's first 64-token
    # chunk waits (chunks never shrink: their boundaries depend on the request alone); steps 2-6:
    # 301 tokens in 5 chunks, the 5th fused with the first canvas step; steps 7-8: two more steps.
    # Meanwhile the short request denoises and finishes at step 3.
    assert done == {"short": 3, "long": 8}


def test_dense_only_config_generates(dense_dir):
    eng = Engine(EngineConfig(model=str(dense_dir), max_batch=2, context_length=512), progress=False)
    assert not eng.model_config.is_moe
    assert not any(hasattr(layer, "experts") for layer in eng.model.layers)
    res = eng.generate_batch([req("d", max_new_tokens=50, seed=0)])[0]
    assert len(res.token_ids) == 50 or res.finish_reason == "stop"


def test_async_engine_streams_cancels_and_reports_death(tiny_dir):
    eng = AsyncEngine(EngineConfig(model=str(tiny_dir), max_batch=2, context_length=512))

    async def scenario():
        got = [ev async for ev in eng.generate(req("x", max_new_tokens=64))]
        assert isinstance(got[-1], CanvasEvent) and got[-1].finished

        async def consume(rid):
            async for _ in eng.generate(req(rid, max_new_tokens=500, max_denoising_steps=200,
                                            confidence_threshold=0.0)):
                pass

        task = asyncio.create_task(consume("long"))
        for _ in range(200):  # wait until it occupies a slot
            await asyncio.sleep(0.01)
            if eng.engine.scheduler.running:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not eng.engine.scheduler.running:
                break
        assert eng.engine.scheduler.running == [] and eng.num_in_flight() == 0

        # the engine dies mid-request: the stream and the health check both say so
        def boom(plan):
            raise RuntimeError("simulated device failure")

        eng.engine.runner.run = boom
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate(req("doomed")):
                pass
        with pytest.raises(EngineDeadError):
            eng.check_health()

    asyncio.run(scenario())
    eng.shutdown()

"""Tensor parallelism on CPU ranks (gloo) equals one rank: the model's logits in both modes, the
self-conditioning product and the KV cache after a commit, for 2 and 4 ranks, dense and MoE.

Every rank of a group is a real process (forkserver) running the real sharded model over gloo;
the single-rank reference runs in the test process. Engine-level behaviour (generations,
commands, failures) is in test_engine_tp_engine.py.
"""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dgserve.engine.config import ModelConfig
from dgserve.engine.kv_cache import KVCache
from dgserve.engine.loader import load_model
from dgserve.engine.parallel.group import join
from dgserve.engine.parallel.sharding import kv_head_shard
from dgserve.engine.tiny import make_tiny_model

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
    from dgserve.engine.parallel.sharding import shard_config

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
        for i, spec in enumerate(cfg.layers):  # each rank holds its KV heads (split or replicated)
            for r, got in enumerate(ranks):
                heads = kv_head_shard(spec.num_kv_heads, r, size)
                for kv in "kv":
                    want = ref[f"{kv}{i}"][heads]
                    assert got[name][f"{kv}{i}"].shape == want.shape
                    diff = (got[name][f"{kv}{i}"] - want).abs().max().item()
                    assert diff <= TOL, f"{name} layer {i} {kv} rank {r}: max abs diff {diff}"

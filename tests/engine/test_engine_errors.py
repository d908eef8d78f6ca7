"""Bad input gets a typed error naming the value and the limit; the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest

from dgserve.engine import (
    ConfigError,
    ContextLengthExceededError,
    ContextVerificationError,
    Engine,
    EngineConfig,
    GenerationRequest,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
)
from dgserve.engine.check import check_context
from dgserve.engine.config import ModelConfig


def R(prompt=(2, 3, 4), pinned=(), rid="bad", **params):
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**params), pinned=tuple(pinned))


BAD_REQUESTS = [
    (R(prompt=()), InvalidRequestError, "prompt is empty"),
    (R(prompt=(2, 99999)), InvalidRequestError, "99999"),
    (R(prompt=(-1,)), InvalidRequestError, "-1"),
    (R(max_new_tokens=0), InvalidRequestError, "max_new_tokens"),
    (R(max_new_tokens=-5), InvalidRequestError, "-5"),
    (R(max_new_tokens=10**9), ContextLengthExceededError, "1024"),
    (R(prompt=(2,) * 1000, max_new_tokens=100), ContextLengthExceededError, "1100"),
    (R(max_denoising_steps=0), InvalidRequestError, "max_denoising_steps"),
    (R(max_denoising_steps=10**6), InvalidRequestError, "4096"),
    (R(entropy_bound=0.0), InvalidRequestError, "entropy_bound"),
    (R(entropy_bound=float("nan")), InvalidRequestError, "entropy_bound"),
    (R(t_min=0.9, t_max=0.5), InvalidRequestError, "t_min=0.9"),
    (R(t_min=-0.1), InvalidRequestError, "t_min"),
    (R(t_min=0.0, t_max=0.0), InvalidRequestError, "t_max"),
    (R(confidence_threshold=-1.0), InvalidRequestError, "confidence_threshold"),
    (R(stability_threshold=-1), InvalidRequestError, "stability_threshold"),
    (R(stop_token_ids=(512,)), InvalidRequestError, "512"),
    (R(seed=-3), InvalidRequestError, "seed"),
    (R(max_new_tokens=40, pinned=((40, 5),)), InvalidRequestError, "pinned position 40"),
    (R(max_new_tokens=40, pinned=((-1, 5),)), InvalidRequestError, "pinned position -1"),
    (R(max_new_tokens=40, pinned=((3, 600),)), InvalidRequestError, "600"),
    (R(max_new_tokens=40, pinned=((3, 5), (3, 6))), InvalidRequestError, "two different tokens"),
    (GenerationRequest("", (2,)), InvalidRequestError, "request_id"),
]


@pytest.mark.parametrize("request_, error, text", BAD_REQUESTS, ids=[t for _, _, t in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_typed_error(engine, request_, error, text):
    with pytest.raises(error) as info:
        engine.add_request(request_)
    assert text in str(info.value)
    assert not engine.has_unfinished()


def test_a_bad_request_never_harms_the_others(engine):
    engine.add_request(R(rid="good", max_new_tokens=40, seed=1))
    with pytest.raises(InvalidRequestError):
        engine.add_request(R(rid="good", max_new_tokens=40))  # duplicate id in flight
    with pytest.raises(InvalidRequestError):
        engine.add_request(R(rid="worse", max_new_tokens=-1))
    results = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if getattr(ev, "finished", False):
                results[ev.request_id] = ev
    assert list(results) == ["good"] and results["good"].stats.completion_tokens == 40


def test_context_length_error_carries_both_numbers(engine):
    with pytest.raises(ContextLengthExceededError) as info:
        engine.add_request(R(prompt=(2,) * 1000, max_new_tokens=100))
    assert (info.value.requested, info.value.limit) == (1100, 1024)


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(model="x", max_batch=9)
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(model="x", max_batch=0)
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(model="x", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="extra"):
        EngineConfig(model="x", max_bacth=4)  # typo: unknown keys are refused


def test_prefill_chunk_smaller_than_canvas_is_refused(tiny_dir):
    with pytest.raises(ConfigError, match="prefill_chunk_size 16"):
        Engine(EngineConfig(model=str(tiny_dir), prefill_chunk_size=16), progress=False)


# -- model directories -----------------------------------------------------------------

def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(EngineConfig(model=str(tmp_path / "nope")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Engine(EngineConfig(model=str(tmp_path / "empty")), progress=False)


def test_corrupt_safetensors(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b"\xff" * 16 + blob[16:200])
    with pytest.raises(ModelLoadError, match="safetensors"):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelLoadError):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)


def edit_config(d, **text_changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].update(text_changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_weights_that_do_not_match_the_config(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    edit_config(d, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"mlp.*shape \(128, 64\) in the checkpoint, \(96, 64\) expected"):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)


def test_missing_and_unexpected_tensors(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "more_layers")
    edit_config(d, num_hidden_layers=7, layer_types=["sliding_attention"] * 6 + ["full_attention"])
    with pytest.raises(ModelLoadError, match="lacks"):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)
    d = copy_model(tiny_dir, tmp_path / "dense_claim")
    edit_config(d, num_experts=None, top_k_experts=None, moe_intermediate_size=None)
    with pytest.raises(ModelLoadError, match="does not describe"):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)


@pytest.mark.parametrize("change, text", [
    ({"num_attention_heads": 3}, "not a multiple"),
    ({"hidden_size": 0}, "hidden_size must be positive"),
    ({"top_k_experts": 9}, "top_k_experts"),
    ({"head_dim": 15}, "head_dim"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4}}}, "yarn"),
])
def test_impossible_config_shapes(tiny_dir, tmp_path, change, text):
    d = copy_model(tiny_dir, tmp_path / "m")
    edit_config(d, **change)
    with pytest.raises(ModelLoadError, match=text):
        ModelConfig.from_dir(d)


def test_sharded_checkpoint_with_index_loads(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_model(tiny_dir, tmp_path / "sharded")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    eng = Engine(EngineConfig(model=str(d), max_batch=1, context_length=256), progress=False)
    ref = Engine(EngineConfig(model=str(tiny_dir), max_batch=1, context_length=256), progress=False)
    params = SamplingParams(max_new_tokens=20, seed=9)
    assert eng.generate_batch([GenerationRequest("a", (2, 3), params)])[0].token_ids == \
        ref.generate_batch([GenerationRequest("a", (2, 3), params)])[0].token_ids
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="do not exist"):
        Engine(EngineConfig(model=str(d), context_length=256), progress=False)


# -- start-up verification of the context length ------------------------------------------

def test_context_beyond_max_position_embeddings_fails_start_up_with_both_numbers(tiny_dir):
    with pytest.raises(ContextVerificationError) as info:
        Engine(EngineConfig(model=str(tiny_dir), context_length=262144), progress=False)
    e = info.value
    assert (e.requested, e.served, e.cause) == (262144, 4096, "max_position_embeddings")
    assert "262144" in str(e) and "4096" in str(e)


def test_rope_settings_limit_the_context(tiny_dir, tmp_path):
    """The 8,192-instead-of-256K failure: the config claims 256K but RoPE covers 8K."""
    d = copy_model(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 262144
    cfg["text_config"]["rope_parameters"]["full_attention"]["original_max_position_embeddings"] = 8192
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ContextVerificationError, match="serves at most 8192") as info:
        check_context(d, context=262144, kv_cache_memory_bytes=1 << 40)
    assert info.value.cause == "rope"
    assert check_context(d, context=8192, kv_cache_memory_bytes=1 << 40).served == 8192


def test_kv_memory_for_max_batch_limits_the_context(tiny_dir):
    cfg = ModelConfig.from_dir(tiny_dir)
    per_token = cfg.kv_bytes_per_token(4)
    assert per_token == 2 * 1 * 32 * 4  # one full layer: K and V, 1 KV head of 32 dims, fp32
    budget = 8 * (per_token * (3000 + 32) + cfg.sliding_bytes_per_token(4) * (15 + 2048 + 32))
    assert check_context(tiny_dir, context=3000, max_batch=8, kv_cache_memory_bytes=budget,
                         device="cpu").served == 3000
    with pytest.raises(ContextVerificationError, match="max_batch=8") as info:
        check_context(tiny_dir, context=3001, max_batch=8, kv_cache_memory_bytes=budget, device="cpu")
    assert info.value.cause == "kv_memory" and info.value.served == 3000
    # the same memory serves a longer context to fewer sequences
    assert check_context(tiny_dir, context=4000, max_batch=4, kv_cache_memory_bytes=budget, device="cpu")


def test_info_reports_what_is_served_and_the_kv_memory_matches_the_plan(tiny_dir):
    from dgserve.engine.kv_cache import KVCache

    eng = Engine(EngineConfig(model=str(tiny_dir), max_batch=3, context_length=700), progress=False)
    info = eng.info()
    assert (info.served_context_length, info.max_batch, info.canvas_length) == (700, 3, 32)
    assert info.context_limits["max_position_embeddings"] == 4096 and info.context_limits["kv_memory"] > 700
    assert info.context_binding_limit == "max_position_embeddings"  # of the largest servable context
    assert info.kv_cache_bytes == KVCache.plan_bytes(eng.model_config, 3, 700, 2048, 4)
    unset = Engine(EngineConfig(model=str(tiny_dir), max_batch=1), progress=False)
    assert unset.info().served_context_length == 4096  # the largest the config allows

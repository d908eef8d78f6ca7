"""Our engine against transformers' reference DiffusionGemmaForBlockDiffusion (the oracle),
on a tiny random checkpoint in the official format (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers.models.diffusion_gemma.generation_diffusion_gemma as hf_gen
from transformers import DynamicCache

from dgserve.engine import GenerationRequest, SamplingParams
from dgserve.engine.config import ModelConfig
from dgserve.engine.kv_cache import KVCache
from dgserve.engine.loader import load_model
from dgserve.engine.sampler import sample_from_probs

TOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ours(tiny_dir):
    cfg = ModelConfig.from_dir(tiny_dir)
    return load_model(tiny_dir, cfg, dtype=torch.float32, device=CPU, progress=False), cfg


def new_cache(cfg, slots=2):
    return KVCache(cfg, slots, 512, 256, torch.float32, CPU)


def hf_encode(hf, ids, cache=None):
    cache = cache if cache is not None else DynamicCache(config=hf.config.get_text_config(decoder=True))
    with torch.no_grad():
        out = hf.model.encoder(input_ids=ids[None], cache=cache)
        logits = hf.lm_head(out.last_hidden_state).float()[0]
    cap = hf.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap, cache


# prompts longer than the sliding window (16) exercise the window on both sides
@pytest.mark.parametrize("prompt_len", [5, 40])
def test_encoder_logits_and_prefill_kv_match_reference(ours, hf_model, prompt_len):
    model, cfg = ours
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len))
    cache = new_cache(cfg)
    got = model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
    want, hf_cache = hf_encode(hf_model, prompt)
    assert (got - want).abs().max().item() <= TOL
    for i, spec in enumerate(cfg.layers):
        hk, hv = hf_cache.layers[i].keys[0], hf_cache.layers[i].values[0]  # (H, n, D); sliding keeps window-1
        n = hk.shape[1]
        assert n == (min(prompt_len, cfg.sliding_window - 1) if spec.sliding else prompt_len)
        k, v = cache.read(i, 0, prompt_len - n, prompt_len)
        assert (k[0] - hk).abs().max().item() <= TOL
        assert (v[0] - hv).abs().max().item() <= TOL


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_decoder_logits_match_reference(ours, hf_model, self_conditioning, grouped, monkeypatch):
    """Both expert paths: one grouped GEMM per projection (CUDA's) and the padded per-expert loop
    (CPU's); CI has no GPU, so the grouped path is forced here, where torch's grouped_mm runs too."""
    from dgserve.engine.layers import Experts

    monkeypatch.setattr(Experts, "grouped", grouped)
    model, cfg = ours
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    sc_logits = torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g) * 3
    cache = new_cache(cfg)
    model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
    soft = model.soft_embeddings(sc_logits[0].softmax(-1)) if self_conditioning else None
    got = model.forward_one(cache, slot=0, cache_len=40, canvas_ids=canvas, soft=soft)
    _, hf_cache = hf_encode(hf_model, prompt)
    with torch.no_grad():
        want = hf_model(cache=hf_cache, decoder_input_ids=canvas[None],
                        self_conditioning_logits=sc_logits if self_conditioning else None).logits[0]
    assert (got - want).abs().max().item() <= TOL
    # the decoder reads the cache but never writes it: a second identical pass gives the same logits
    again = model.forward_one(cache, slot=0, cache_len=40, canvas_ids=canvas, soft=soft)
    assert torch.equal(got, again)


def test_fused_prefill_and_canvas_equal_separate_passes(ours):
    """Prefill + first denoise step run as one forward; the canvas must not notice."""
    model, cfg = ours
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (37,), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    cache = new_cache(cfg)
    model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
    separate = model.forward_one(cache, slot=0, cache_len=37, canvas_ids=canvas)
    fused = model.forward_one(cache, slot=1, cache_len=0, new_ids=prompt, canvas_ids=canvas)
    assert torch.equal(separate, fused)


def test_committed_kv_equals_reference_and_plain_causal_forward(ours, hf_model):
    """Commit (causal pass over the clean canvas, fused with the next canvas) writes exactly the KV
    that one causal forward over prompt + canvas writes, and what the reference's encoder writes."""
    model, cfg = ours
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=g)
    committed = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    nxt = torch.randint(0, cfg.vocab_size, (cfg.canvas_length,), generator=g)
    cache = new_cache(cfg)
    model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, canvas_ids=nxt)  # prefill + a canvas step
    model.forward_one(cache, slot=0, cache_len=20, new_ids=committed, canvas_ids=nxt)  # commit + next canvas
    total = 20 + cfg.canvas_length
    model.forward_one(cache, slot=1, cache_len=0, new_ids=torch.cat([prompt, committed]), logits_for="new")
    _, hf_cache = hf_encode(hf_model, prompt)
    hf_encode(hf_model, committed, hf_cache)  # the reference commits by encoding the canvas
    for i, spec in enumerate(cfg.layers):
        n = min(total, cfg.sliding_window - 1) if spec.sliding else total
        k0, v0 = cache.read(i, 0, total - n, total)
        k1, v1 = cache.read(i, 1, total - n, total)
        # chunked vs one-shot causal attention may round differently in the last bits
        assert (k0 - k1).abs().max().item() <= TOL and (v0 - v1).abs().max().item() <= TOL, f"layer {i}"
        assert (k0[0] - hf_cache.layers[i].keys[0]).abs().max().item() <= TOL
        assert (v0[0] - hf_cache.layers[i].values[0]).abs().max().item() <= TOL


def hf_generate(hf, prompt: list[int], seed: int, **kwargs) -> tuple[list[int], int]:
    """The reference's generate with its randomness replaced by the request's own stream: the same
    initial canvas, renoise ids and sampling uniforms our engine draws (in the same order)."""
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def initialize_canvas(self, batch_size, device):
        return torch.randint(0, self.vocab_size, (self.canvas_length,), generator=gen)[None].to(device)

    def multinomial(probs, num_samples):
        calls.append(1)
        return sample_from_probs(probs, torch.rand(probs.shape[0], generator=gen, dtype=torch.float64))[:, None]

    saved = hf_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial
    hf_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial = initialize_canvas, multinomial
    try:
        out = hf.generate(torch.tensor([prompt]), **kwargs)
    finally:
        hf_gen.EntropyBoundSampler.initialize_canvas, torch.multinomial = saved
    return out.sequences[0, len(prompt):].tolist(), len(calls)


GENERATIONS = [
    # fixed step count (early stop effectively off)
    dict(max_new_tokens=64, max_denoising_steps=10, confidence_threshold=1e-9),
    # early stop: always confident and (k=0) always stable, so every canvas commits after one step
    # and the next canvas starts from fresh noise (exercises commit after an early stop)
    dict(max_new_tokens=96, max_denoising_steps=12, confidence_threshold=50.0, stability_threshold=0,
         entropy_bound=0.5),
]


@pytest.mark.parametrize("kwargs", GENERATIONS, ids=["fixed-steps", "early-stop"])
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_generation_matches_reference(engine, hf_model, kwargs, seed):
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    hf_kwargs = dict(kwargs)
    if "entropy_bound" in hf_kwargs:
        hf_kwargs["sampler_config"] = hf_gen.EntropyBoundSamplerConfig(entropy_bound=hf_kwargs.pop("entropy_bound"))
    want, hf_steps = hf_generate(hf_model, prompt, seed, **hf_kwargs)
    res = engine.generate_batch([GenerationRequest(f"p{seed}", tuple(prompt), SamplingParams(seed=seed, **kwargs))])[0]
    assert list(res.token_ids) == want[:len(res.token_ids)]
    assert len(res.token_ids) == kwargs["max_new_tokens"] or res.finish_reason == "stop"
    assert sum(res.stats.steps_per_canvas) == hf_steps  # same number of denoising steps
    if kwargs.get("stability_threshold") == 0:
        assert set(res.stats.steps_per_canvas) == {1}, "expected every canvas to stop early"




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference_at_the_same_dtype(tiny_dir, dtype):
    """bf16/fp16 round at the same points as the reference (norms in fp32, logits in fp32)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    cfg = ModelConfig.from_dir(tiny_dir)
    model = load_model(tiny_dir, cfg, dtype=dtype, device=CPU, progress=False)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(str(tiny_dir), dtype=dtype).eval()
    prompt, canvas = torch.arange(2, 40), torch.arange(100, 100 + cfg.canvas_length)
    cache = KVCache(cfg, 1, 256, 256, dtype, CPU)
    enc = model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
    dec = model.forward_one(cache, slot=0, cache_len=len(prompt), canvas_ids=canvas)
    want_enc, hf_cache = hf_encode(hf, prompt)
    with torch.no_grad():
        want_dec = hf(cache=hf_cache, decoder_input_ids=canvas[None]).logits[0]
    assert enc.dtype == dec.dtype == torch.float32
    assert (enc - want_enc).abs().max().item() <= 1e-2
    assert (dec - want_dec).abs().max().item() <= 1e-2

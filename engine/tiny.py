"""Tiny random DiffusionGemma checkpoints in the official Hugging Face format.

Nothing can be downloaded here, so tests, benchmarks and the demo make their own model:
config.json (``model_type`` diffusion_gemma, ``text_config`` with ``global_head_dim`` /
``num_global_key_value_heads`` like the published config, a tiny vision config so that
transformers can instantiate the reference), generation_config.json with the published
sampler defaults, model.safetensors with the official tensor names (``model.decoder.*``
plus the encoder's ``layer_scalar`` copies), and a byte-level tokenizer with a Gemma-style
chat template (``<|turn>user ... <turn|>``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .loader import DECODER, ENCODER
from .model import DiffusionGemma

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: milliseconds per forward
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 sliding_window=16, num_experts=4, top_k_experts=2, moe_intermediate_size=32, canvas_length=32,
                 max_position_embeddings=4096),
    # the benchmark config of DESIGN.md: 6 layers, hidden 256, MoE 8x128, vocab 4096, canvas 256
    "bench": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                  sliding_window=512, num_experts=8, top_k_experts=2, moe_intermediate_size=128, canvas_length=256,
                  max_position_embeddings=16384),
}

SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}" + TURN_OPEN + "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}" + TURN_CLOSE + "\n{% endfor %}{% if add_generation_prompt %}" + TURN_OPEN + "model\n{% endif %}"
)


def make_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = {**PRESETS[preset], **overrides}
    canvas = p.pop("canvas_length")
    dense = p.get("num_experts") in (None, 0)
    text = {
        "model_type": "diffusion_gemma_text", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention"
                        for i in range(p["num_hidden_layers"])],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        "use_bidirectional_attention": None, "initializer_range": 0.02, **p,
    }
    if dense:
        text.update(num_experts=None, top_k_experts=None, moe_intermediate_size=None)
    vision = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 64}
    return {"model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "canvas_length": canvas, "tie_word_embeddings": True, "dtype": "float32",
            "text_config": text, "vision_config": vision}


def random_weights(model: DiffusionGemma, seed: int) -> None:
    """Random init with enough spread that outputs are not uniform noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name == "embed_tokens.weight":
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif t.dim() == 1:  # norm weights and router scales: around 1
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 / math.sqrt(fan_in))
        for layer in model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=g))


def write_tokenizer(path: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer (no merges) padded to ``vocab_size``; returns the ``<turn|>`` id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", TURN_OPEN, TURN_CLOSE]
    if vocab_size < len(specials) + len(byte_chars):
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer "
                         f"({len(specials) + len(byte_chars)} needed)")
    vocab = {tok: i for i, tok in enumerate(specials[:4])}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    extra = specials[4:] + [f"<unused{i}>" for i in range(vocab_size - len(vocab) - len(specials[4:]))]
    tok.add_special_tokens(extra)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast.convert_tokens_to_ids(TURN_CLOSE)


def make_tiny_model(path: str | Path, *, preset: str = "tiny", seed: int = 0, max_denoising_steps: int = 16,
                    **overrides: Any) -> Path:
    """Writes a random checkpoint in the official format to ``path`` and returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = make_config(preset, **overrides)
    turn_close = write_tokenizer(path, config["text_config"]["vocab_size"])
    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(seed)
    model = DiffusionGemma(cfg)
    random_weights(model, seed)
    tensors = {DECODER + k: v.contiguous() for k, v in model.state_dict().items()}
    for i, layer in enumerate(model.layers):  # the encoder's tied copy, as in the published checkpoint
        tensors[f"{ENCODER}layers.{i}.layer_scalar"] = layer.layer_scalar.clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "max_new_tokens": 256, "max_denoising_steps": max_denoising_steps,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
        "eos_token_id": [1, turn_close], "pad_token_id": 0, "bos_token_id": 2,
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path

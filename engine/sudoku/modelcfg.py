"""Model configurations of the Sudoku reference checkpoint and its autoregressive twin.

The diffusion model is transformers' own ``DiffusionGemmaForBlockDiffusion`` at small scale,
so ``save_pretrained`` writes the official layout (config.json with model_type
``diffusion_gemma``, ``model.decoder.*`` tensor names, generation_config.json). The twin is a
``Gemma3ForCausalLM`` of matching width/depth (dense MLP sized to the MoE's active + total
parameters, see ``ar_config``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tokenizer import BOS, EOS, PAD, VOCAB_SIZE

CANVAS = 81
PROMPT_LEN = 82  # <bos> + 81 cells
# RoPE has no learned positions, so the context is a config value; 4096 lets the local stack
# (which promises 2048 tokens) serve this checkpoint. Training only ever sees positions < 163.
MAX_POSITIONS = 4096


@dataclass(frozen=True)
class ModelSize:
    """Shapes shared by the diffusion model and its autoregressive twin."""

    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 256  # the dense MLP beside the MoE (and the self-conditioning MLP)
    experts: int = 4
    top_k: int = 2
    moe_intermediate: int = 128
    full_every: int = 3  # every 3rd layer full attention (and the last), the others sliding
    # RoPE: theta 315 puts the second frequency at 2*pi/9 (one Sudoku row): cells of one column
    # are 9k apart, so column and row structure are a phase away (theta**(-2/32) = 0.698 rad).
    rope_theta: float = 315.0
    full_rope_theta: float = 315.0
    full_partial_rotary: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def layer_types(size: ModelSize) -> list[str]:
    return ["full_attention" if (i + 1) % size.full_every == 0 or i == size.layers - 1 else "sliding_attention"
            for i in range(size.layers)]


def rope_parameters(size: ModelSize) -> dict:
    return {"sliding_attention": {"rope_type": "default", "rope_theta": size.rope_theta},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": size.full_partial_rotary,
                               "rope_theta": size.full_rope_theta}}


def diffusion_config(size: ModelSize):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig, Gemma4VisionConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, global_head_dim=size.head_dim, num_global_key_value_heads=size.kv_heads,
        max_position_embeddings=MAX_POSITIONS, sliding_window=256, layer_types=layer_types(size),
        num_experts=size.experts, top_k_experts=size.top_k, moe_intermediate_size=size.moe_intermediate,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=True,
        rope_parameters=rope_parameters(size),
    )
    # The reference always builds a vision tower; a minimal one keeps the checkpoint small.
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1, head_dim=16, position_embedding_size=16, patch_size=4)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS,
                                tie_word_embeddings=True)


def generation_config(max_denoising_steps: int = 32):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig, EntropyBoundSamplerConfig)

    return DiffusionGemmaGenerationConfig(
        max_new_tokens=CANVAS, max_denoising_steps=max_denoising_steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1), t_min=0.4, t_max=0.8,
        stability_threshold=1, confidence_threshold=0.005, eos_token_id=[EOS], pad_token_id=PAD, bos_token_id=BOS)


def ar_config(size: ModelSize):
    """A Gemma 3 causal LM of the same width, depth, heads and RoPE. Its dense MLP is as wide
    as the diffusion layer's dense MLP plus *all* its experts, so both models hold about the
    same number of parameters (the twin spends more FLOPs per token than the MoE's top-k)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=size.hidden,
        intermediate_size=size.intermediate + size.experts * size.moe_intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, max_position_embeddings=MAX_POSITIONS, sliding_window=256,
        layer_types=layer_types(size), pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
        tie_word_embeddings=True, query_pre_attn_scalar=size.head_dim,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": size.rope_theta},
                         "full_attention": {"rope_type": "default", "rope_theta": size.full_rope_theta}},
    )

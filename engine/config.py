"""Configuration: the engine's own settings (``EngineConfig``) and the model's shapes
(``ModelConfig``, read from a Hugging Face ``config.json`` + ``generation_config.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ModelLoadError

DEFAULT_EOS = (1,)


class EngineConfig(BaseModel):
    """Everything the block-diffusion engine needs to start. Validated once, passed everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Path to a Hugging Face-format DiffusionGemma directory "
                       "(config.json, safetensors, tokenizer files).")
    model_name: str | None = Field(default=None, description="Name reported to clients; defaults to the directory name.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Compute dtype; auto = checkpoint dtype on GPU, float32 on CPU.")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_batch: int = Field(default=8, ge=1, le=8, description="Requests in flight at once (1-8: "
                           "block diffusion is fastest at small batches).")
    context_length: int | None = Field(default=None, ge=1, description="Context (prompt + generated tokens) "
                                       "every slot must hold. None: the largest that the config and KV memory allow.")
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1, description="KV cache budget in bytes. "
                                              "None: gpu_memory_utilization of free GPU memory, or 25% of RAM on CPU.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="Share of free GPU memory "
                                          "(after weights) that the KV cache may use when kv_cache_memory_bytes is unset.")
    prefill_chunk_size: int = Field(default=2048, ge=16, description="Prompt tokens per forward; longer prompts "
                                    "are prefilled in chunks so one request never stalls the batch for long.")
    decoder_sliding_window: Literal["reference", "symmetric"] = Field(
        default="reference", description="Sliding layers in decoder mode: 'reference' (transformers/MLX: the canvas "
        "sees the last window-1 cached tokens and the whole canvas) or 'symmetric' (vLLM: |q-k| < window).")
    tensor_parallel_size: int = Field(default=1, ge=1, le=8, description="GPUs (or CPU ranks) one replica spans.")
    max_denoising_steps: int | None = Field(default=None, ge=1, le=4096, description="Default step cap per canvas "
                                            "for requests that set none (None: the checkpoint's generation_config).")
    entropy_bound: float | None = Field(default=None, gt=0.0, le=1e6, description="Default entropy-bound budget "
                                        "(None: the checkpoint's generation_config, published 0.1).")
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1e6, description="Default mean entropy "
                                               "under which a stable canvas commits early; 0 disables early stopping "
                                               "(None: the checkpoint's generation_config).")

    @field_validator("tensor_parallel_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"tensor_parallel_size must be a power of two (1, 2, 4, 8), got {v}")
        return v


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's generation_config.json, with the published defaults where absent."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = DEFAULT_EOS
    pad_token_id: int = 0

    @classmethod
    def from_dir(cls, path: Path, text: dict[str, Any]) -> GenerationDefaults:
        eos = text.get("eos_token_id", 1)
        data: dict[str, Any] = {}
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            data = _read_json(gen_path)
        sampler = data.get("sampler_config") or {}
        eos = data.get("eos_token_id", eos)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        d = cls()
        return cls(
            max_new_tokens=int(data.get("max_new_tokens") or d.max_new_tokens),
            max_denoising_steps=int(data.get("max_denoising_steps") or d.max_denoising_steps),
            entropy_bound=float(sampler.get("entropy_bound", d.entropy_bound)),
            t_min=float(data.get("t_min", d.t_min) if data.get("t_min") is not None else d.t_min),
            t_max=float(data.get("t_max", d.t_max) if data.get("t_max") is not None else d.t_max),
            stability_threshold=int(data.get("stability_threshold") if data.get("stability_threshold") is not None
                                    else d.stability_threshold),
            confidence_threshold=float(data.get("confidence_threshold") if data.get("confidence_threshold")
                                       is not None else d.confidence_threshold),
            eos_token_ids=eos_ids,
            pad_token_id=int(data.get("pad_token_id", text.get("pad_token_id", 0)) or 0),
        )


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one attention layer (sliding and full layers differ)."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # full layers: no v_proj, V is the raw k_proj output
    rope_type: str  # "default" or "proportional" (+ scaling types that only divide frequencies)
    rope_theta: float
    rope_partial: float  # partial_rotary_factor
    rope_factor: float  # frequency scaling factor (1.0 = none)


@dataclass(frozen=True)
class ModelConfig:
    """DiffusionGemma text shapes, parsed from config.json (top level + ``text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    max_position_embeddings: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    num_experts: int  # 0 = dense-only
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    rope_context_limit: int | None = None  # from original_max_position_embeddings (x factor), if present
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
        return cls.from_dict(_read_json(cfg_path))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        text = cfg.get("text_config", cfg)
        if not isinstance(text, dict):
            raise ModelLoadError("config.json: text_config must be an object")
        try:
            hidden = int(text["hidden_size"])
            n_layers = int(text["num_hidden_layers"])
            n_heads = int(text["num_attention_heads"])
            n_kv = int(text["num_key_value_heads"])
            head_dim = int(text.get("head_dim") or hidden // n_heads)
            vocab = int(text["vocab_size"])
            inter = int(text["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json: missing or invalid text field: {e}") from e
        global_head_dim = int(text.get("global_head_dim") or head_dim)
        n_global_kv = text.get("num_global_key_value_heads")
        k_eq_v = bool(text.get("attention_k_eq_v", True))
        layer_types = text.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)
        ]
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise ModelLoadError(f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers")
        layer_types[-1] = "full_attention"  # the reference forces the last layer to full attention
        # transformers writes per-layer overrides ({"5": {"head_dim": 512, "num_key_value_heads": 2}});
        # the published config states them as global_head_dim / num_global_key_value_heads.
        overrides = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
        rope = text.get("rope_parameters") or {}
        rope_sliding = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
        rope_full = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1_000_000.0}
        layers = []
        for i, lt in enumerate(layer_types):
            if lt not in ("sliding_attention", "full_attention"):
                raise ModelLoadError(f"config.json: unknown layer type {lt!r} at layer {i}")
            sliding = lt == "sliding_attention"
            hd, kv = head_dim, n_kv
            if not sliding:
                hd = global_head_dim
                if k_eq_v and n_global_kv is not None:
                    kv = int(n_global_kv)
            if i in overrides:
                hd = int(overrides[i].get("head_dim", hd))
                kv = int(overrides[i].get("num_key_value_heads", kv))
            rp = rope_sliding if sliding else rope_full
            layers.append(LayerSpec(
                sliding=sliding, head_dim=hd, num_kv_heads=kv, k_eq_v=(not sliding) and k_eq_v,
                rope_type=str(rp.get("rope_type", "default")), rope_theta=float(rp.get("rope_theta", 10_000.0)),
                rope_partial=float(rp.get("partial_rotary_factor", 1.0)), rope_factor=float(rp.get("factor", 1.0)),
            ))
        n_experts = int(text.get("num_experts") or 0)
        rope_limit = None  # context the RoPE settings were trained/extended for, when they say so
        for rp in (rope_sliding, rope_full):
            if rp.get("original_max_position_embeddings"):
                limit = int(rp["original_max_position_embeddings"])
                if rp.get("rope_type", "default") not in ("default", "proportional"):
                    limit = int(limit * float(rp.get("factor", 1.0)))  # an extension method scales it
                rope_limit = limit if rope_limit is None else min(rope_limit, limit)
        eos = text.get("eos_token_id", 1)
        mc = cls(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=n_layers,
            num_heads=n_heads, layers=tuple(layers), sliding_window=int(text.get("sliding_window") or 512),
            max_position_embeddings=int(text.get("max_position_embeddings") or 131072),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            num_experts=n_experts, top_k_experts=int(text.get("top_k_experts") or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
            canvas_length=int(cfg.get("canvas_length") or 256),
            pad_token_id=int(text.get("pad_token_id") or 0), bos_token_id=text.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
            torch_dtype=str(text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype")
                            or cfg.get("torch_dtype") or "bfloat16"),
            rope_context_limit=rope_limit, raw=cfg,
        )
        mc.validate()
        return mc

    def validate(self) -> None:
        """Refuse impossible shapes with the offending value."""
        def bad(msg: str) -> None:
            raise ModelLoadError(f"config.json: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "canvas_length", "sliding_window"):
            v = getattr(self, name)
            if v <= 0:
                bad(f"{name} must be positive, got {v}")
        if self.intermediate_size <= 0:
            bad(f"intermediate_size must be positive, got {self.intermediate_size}")
        for i, ls in enumerate(self.layers):
            if ls.num_kv_heads <= 0 or self.num_heads % ls.num_kv_heads:
                bad(f"layer {i}: num_attention_heads {self.num_heads} is not a multiple of "
                    f"{ls.num_kv_heads} key/value heads")
            if ls.head_dim <= 0 or ls.head_dim % 2:
                bad(f"layer {i}: head_dim must be positive and even, got {ls.head_dim}")
            if ls.rope_type not in ("default", "proportional", "linear"):
                bad(f"layer {i}: rope_type {ls.rope_type!r} is not supported (default, proportional, linear)")
        if self.num_experts:
            if not 0 < self.top_k_experts <= self.num_experts:
                bad(f"top_k_experts must be in 1..num_experts={self.num_experts}, got {self.top_k_experts}")
            if self.moe_intermediate_size <= 0:
                bad(f"moe_intermediate_size must be positive with experts, got {self.moe_intermediate_size}")
        if self.pad_token_id >= self.vocab_size:
            bad(f"pad_token_id {self.pad_token_id} >= vocab_size {self.vocab_size}")

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV bytes one context token costs on full-attention layers (K and V are stored
        separately even where V comes from k_proj: they differ after k_norm/RoPE vs v_norm)."""
        return sum(2 * ls.num_kv_heads * ls.head_dim * dtype_bytes for ls in self.layers if not ls.sliding)

    def sliding_bytes_per_token(self, dtype_bytes: int) -> int:
        return sum(2 * ls.num_kv_heads * ls.head_dim * dtype_bytes for ls in self.layers if ls.sliding)

    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


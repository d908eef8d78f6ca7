"""The block-diffusion engine: DiffusionGemma model, entropy-bound sampler, exact KV cache,
a scheduler without batch-wide barriers, and start-up context verification.

    from dgserve.engine import Engine, AsyncEngine, EngineConfig
"""

from .async_engine import AsyncEngine
from .config import EngineConfig, ModelConfig
from .engine import Engine
from .errors import (
    ConfigError,
    ContextLengthExceededError,
    ContextVerificationError,
    DGServeError,
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
)
from .types import (
    CanvasEvent,
    DraftEvent,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    GenerationStats,
    SamplingParams,
)

__all__ = [
    "AsyncEngine", "CanvasEvent", "ConfigError", "ContextLengthExceededError", "ContextVerificationError",
    "DGServeError", "DraftEvent", "Engine", "EngineConfig", "EngineDeadError", "EngineInfo", "GenerationRequest",
    "GenerationResult", "GenerationStats", "InvalidRequestError", "ModelConfig", "ModelLoadError", "SamplingParams",
]

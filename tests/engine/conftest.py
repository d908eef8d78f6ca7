"""Tiny checkpoints made once per test session (nothing can be downloaded here)."""

from __future__ import annotations

import pytest
import torch

from dgserve.engine import Engine, EngineConfig
from dgserve.engine.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """MoE tiny model: 6 layers (5 sliding, window 16 + 1 full), canvas 32, vocab 512."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "moe", seed=0)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "dense", seed=1, num_experts=None)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    return Engine(EngineConfig(model=str(tiny_dir), max_batch=8, context_length=1024), progress=False)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """transformers' reference DiffusionGemmaForBlockDiffusion on the same directory (the oracle)."""
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    transformers.logging.set_verbosity_error()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()

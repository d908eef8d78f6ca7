"""Loads a Hugging Face-format DiffusionGemma checkpoint into :class:`DiffusionGemma`.

Tensor names are the official ones (``model.decoder.layers.N.self_attn.q_proj.weight``,
``...experts.gate_up_proj``...). The encoder's copies (``model.encoder.language_model.*``,
tied to the decoder) are accepted where the decoder's are absent; the vision tower and
``lm_head`` (tied to the embedding) are ignored. Single files and sharded checkpoints
(``model.safetensors.index.json``) both load, one tensor at a time, straight into the
preallocated parameters (the model is built on the meta device first). Under tensor
parallelism (``tp``) the model's own ``load_shard`` narrows each tensor to the rank's shard
while reading (safetensors slices read only those bytes), so no rank holds the full model;
``shard_fn`` overrides it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import ModelConfig
from .errors import ModelLoadError
from .model import DiffusionGemma
from .parallel.group import TPGroup

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
IGNORED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.", "lm_head.")

ShardFn = Callable[[str, object], torch.Tensor]  # (param name, safetensors slice) -> tensor


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Maps each tensor name to the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise ModelLoadError(f"{path}: index names shard(s) that do not exist: {missing}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, "pt") as st:
                for name in st.keys():
                    out[name] = f
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: not a valid safetensors file ({e})") from e
    return out


def load_model(path: str | Path, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device,
               decoder_sliding_window: str = "reference", shard_fn: ShardFn | None = None,
               progress: bool = True, tp: TPGroup | None = None) -> DiffusionGemma:
    path = Path(path)
    with torch.device("meta"):
        model = DiffusionGemma(cfg, decoder_sliding_window, tp)
    if shard_fn is None and tp is not None:
        shard_fn = model.load_shard
    model = model.to_empty(device=device).to(dtype)
    params = dict(model.named_parameters())
    params.update((n, b) for n, b in model.named_buffers())
    files = checkpoint_files(path)

    # resolve each of our tensors to a checkpoint name (decoder first, encoder copy as fallback)
    plan: dict[str, str] = {}
    for name in params:
        for prefix in (DECODER, ENCODER):
            if prefix + name in files:
                plan[name] = prefix + name
                break
    missing = sorted(set(params) - set(plan))
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config requires, "
                             f"e.g. {[DECODER + m for m in missing[:3]]}")
    known = {DECODER + n for n in params} | {ENCODER + n for n in params}
    unexpected = sorted(n for n in files if n not in known and not n.startswith(IGNORED_PREFIXES))
    if unexpected:
        raise ModelLoadError(f"{path}: checkpoint has {len(unexpected)} tensor(s) this config does not "
                             f"describe (config and weights mismatch?), e.g. {unexpected[:3]}")

    by_file: dict[Path, list[str]] = {}
    for name, ckpt_name in plan.items():
        by_file.setdefault(files[ckpt_name], []).append(name)
    bar = tqdm(total=len(plan), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    try:
        for f, names in by_file.items():
            try:
                with safe_open(f, "pt", device="cpu") as st:
                    for name in names:
                        _copy(name, plan[name], st, params[name], shard_fn)
                        bar.update()
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{f}: cannot read tensors ({e})") from e
    finally:
        bar.close()
    return model.eval()


def _copy(name: str, ckpt_name: str, st, target: torch.Tensor, shard_fn: ShardFn | None) -> None:
    sl = st.get_slice(ckpt_name)
    tensor = shard_fn(name, sl) if shard_fn is not None else sl[:]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ModelLoadError(f"tensor {ckpt_name}: shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(target.shape)} expected from config.json")
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))
    if target.is_floating_point() and not torch.isfinite(target).all():  # on the target device: fast on GPU
        raise ModelLoadError(f"tensor {ckpt_name}: contains NaN or infinite values")

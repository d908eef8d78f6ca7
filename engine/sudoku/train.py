"""Training recipes: the DiffusionGemma Sudoku model and its autoregressive twin.

Both read the same batches (same seeds, same carvings, same symmetries) and see the same
tokens per step: a prompt of 82 tokens (``<bos>`` + the puzzle) and 81 solution tokens.

Diffusion objective (uniform-state, matching the entropy-bound sampler): the solution canvas
is corrupted at a noise level t ~ U(0, 1) per example, each blank cell replaced with
probability t by a uniformly random token of the whole vocabulary; given cells stay clean
(the sampler pins them). The model predicts the clean grid at every canvas position
(cross-entropy). Self-conditioning: on a random half of the steps, a first no-grad decoder
pass gives logits, tempered by T ~ U(t_min, t_max) like the sampler's processed logits, and the
second pass gets them as ``self_conditioning_logits``; the other steps run with a zero signal,
like the first denoising step of a canvas.

Autoregressive twin: a causal Gemma 3 of the same width and depth on ``<bos> puzzle solution``,
cross-entropy on the 81 solution tokens (cells left to right).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .modelcfg import CANVAS, ModelSize, ar_config, diffusion_config, generation_config
from .tokenizer import VOCAB_SIZE, save_tokenizer


@dataclass
class TrainConfig:
    kind: str = "diffusion"  # or "ar"
    out: str = ".dgserve/sudoku/diffusion"
    data_dir: str = ".dgserve/sudoku/data"
    steps: int = 6500
    minutes: float = 62.0  # hard wall-clock cap (stops early, keeps the last checkpoint)
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 150
    weight_decay: float = 0.01
    min_blanks: int = 20
    max_blanks: int = 64
    self_cond_prob: float = 0.5
    noise_power: float = 1.0  # t = u ** noise_power
    # Auxiliary probes (training only, dropped from the checkpoint): a linear read-out of each
    # token's (row, column, box) after layer ``aux_pos_layer`` and of each cell's candidate
    # digits (those no given peer holds) after layer ``aux_cand_layer``. Weight 0 disables.
    aux_pos_weight: float = 0.5
    aux_pos_layer: int = 1
    aux_cand_weight: float = 1.0
    aux_cand_layer: int = 3
    t_min: float = 0.4
    t_max: float = 0.8
    seed: int = 0
    threads: int = 1
    eval_every: int = 400
    save_every: int = 500
    size: ModelSize = field(default_factory=ModelSize)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# --- the two objectives -------------------------------------------------------------------

CELL_ROW = np.arange(81) // 9
CELL_COL = np.arange(81) % 9
CELL_BOX = (np.arange(81) // 27) * 3 + (np.arange(81) % 9) // 3


def candidates(puz: np.ndarray) -> np.ndarray:
    """(B, 81) digits -> (B, 81, 9) float: digit d+1 allowed in a blank cell (no given peer holds
    it); a given cell's only candidate is its own digit."""
    onehot = np.eye(10, dtype=bool)[puz][..., 1:]  # (B, 81, 9)
    b = len(puz)
    rows = onehot.reshape(b, 9, 9, 9).any(2)  # (B, row, digit)
    cols = onehot.reshape(b, 9, 9, 9).any(1)  # (B, col, digit)
    boxes = np.zeros((b, 9, 9), bool)
    for k in range(9):
        boxes[:, k] = onehot[:, CELL_BOX == k].any(1)
    used = rows[:, CELL_ROW] | cols[:, CELL_COL] | boxes[:, CELL_BOX]  # (B, 81, 9)
    return np.where((puz != 0)[..., None], onehot, ~used).astype(np.float32)


class AuxProbes(torch.nn.Module):
    """Linear probes on intermediate hidden states, fed by forward hooks on the shared layers
    (encoder and decoder run the same weights, so both modes are probed)."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        h = cfg.size.hidden
        self.cfg = cfg
        self.pos = torch.nn.Linear(h, 27)
        self.cand = torch.nn.Linear(h, 9)
        self.captured: dict[str, torch.Tensor] = {}
        if cfg.kind == "diffusion":
            # decoder: canvas token i is cell i; encoder: prompt token i + 1 is cell i
            stacks = (("dec", model.model.decoder.layers), ("enc", model.model.encoder.language_model.layers))
            self.slices = {"dec": ("dec", slice(0, 81), slice(0, 81)), "enc": ("enc", slice(1, 82), slice(0, 81))}
        else:
            # one causal stack over <bos> puzzle solution[:-1]: token i + 1 reads cell i of the puzzle
            # (cells 0..79; token 81 is both the last puzzle cell and the one predicting cell 0),
            # token 81 + i predicts solution cell i
            stacks = (("dec", model.model.layers),)
            self.slices = {"sol": ("dec", slice(81, 162), slice(0, 81)), "puz": ("dec", slice(1, 81), slice(0, 80))}
        for mode, layers in stacks:
            for name, idx in (("pos", cfg.aux_pos_layer), ("cand", cfg.aux_cand_layer)):
                layers[idx].register_forward_hook(self._hook(f"{mode}_{name}"))

    def _hook(self, key: str):
        def hook(module, args, output):
            if self.training:
                self.captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def loss(self, puz: np.ndarray) -> torch.Tensor:
        pos_t = torch.from_numpy(np.stack([CELL_ROW, 9 + CELL_COL, 18 + CELL_BOX]))  # (3, 81)
        cand_t = torch.from_numpy(candidates(puz))  # (B, 81, 9)
        total = torch.zeros(())
        for mode, tokens, cells in self.slices.values():
            if self.cfg.aux_pos_weight:
                logits = self.pos(self.captured[f"{mode}_pos"][:, tokens])  # (B, n, 27)
                for k in range(3):
                    part = logits[..., 9 * k: 9 * k + 9].reshape(-1, 9)
                    target = (pos_t[k, cells] - 9 * k).repeat(len(puz))
                    total = total + self.cfg.aux_pos_weight * F.cross_entropy(part, target) / 3
            if self.cfg.aux_cand_weight:
                logits = self.cand(self.captured[f"{mode}_cand"][:, tokens])  # (B, n, 9)
                total = total + self.cfg.aux_cand_weight * F.binary_cross_entropy_with_logits(
                    logits, cand_t[:, cells])
        self.captured.clear()
        return total


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.kind == "diffusion":
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion(diffusion_config(cfg.size))
        model.generation_config = generation_config()
        return model
    if cfg.kind == "ar":
        from transformers import Gemma3ForCausalLM

        return Gemma3ForCausalLM(ar_config(cfg.size))
    raise ValueError(f"kind must be 'diffusion' or 'ar', got {cfg.kind!r}")


def diffusion_logits(model, prompt: torch.Tensor, canvas: torch.Tensor, sc_logits: torch.Tensor | None = None,
                     cache=None):
    """One decoder pass over ``canvas`` (B, 81) after encoding ``prompt`` (B, 82) -> logits (B, 81, V)."""
    from transformers.cache_utils import DynamicCache

    if cache is None:
        cache = model.model.encoder(input_ids=prompt,
                                    cache=DynamicCache(config=model.config.text_config)).cache
    out = model(cache=cache, decoder_input_ids=canvas, self_conditioning_logits=sc_logits)
    return out.logits, cache


def diffusion_step_loss(model, cfg: TrainConfig, puz: np.ndarray, sol: np.ndarray, rng: np.random.Generator,
                        probes: AuxProbes | None = None):
    from transformers.cache_utils import DynamicCache

    prompt = torch.from_numpy(data.to_prompt_ids(puz))
    canvas_np, _ = data.corrupt(sol, puz, rng, cfg.noise_power)
    canvas = torch.from_numpy(canvas_np)
    target = torch.from_numpy(data.to_grid_ids(sol))
    cache = model.model.encoder(input_ids=prompt, cache=DynamicCache(config=model.config.text_config)).cache
    enc_pos = enc_cand = None
    if probes is not None:
        enc_pos, enc_cand = probes.captured.get("enc_pos"), probes.captured.get("enc_cand")
    sc = None
    if rng.random() < cfg.self_cond_prob:
        with torch.no_grad():
            first, _ = diffusion_logits(model, prompt, canvas, cache=cache)
        temp = torch.from_numpy(rng.uniform(cfg.t_min, cfg.t_max, (len(puz), 1, 1))).float()
        sc = first / temp
    if probes is not None:
        probes.captured.clear()  # keep the gradient-carrying passes only (encoder + second decoder pass)
        probes.captured["enc_pos"], probes.captured["enc_cand"] = enc_pos, enc_cand
    logits, _ = diffusion_logits(model, prompt, canvas, sc, cache=cache)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), target.reshape(-1))
    if probes is not None:
        loss = loss + probes.loss(puz)
    blank = torch.from_numpy(puz == 0)
    acc = (logits.argmax(-1) == target)[blank].float().mean().item()
    return loss, acc


def ar_step_loss(model, cfg: TrainConfig, puz: np.ndarray, sol: np.ndarray, rng: np.random.Generator,
                 probes=None):
    ids = torch.from_numpy(np.concatenate([data.to_prompt_ids(puz), data.to_grid_ids(sol)], axis=1))  # (B, 163)
    if probes is not None:
        probes.captured.clear()
    logits = model(input_ids=ids[:, :-1]).logits[:, -CANVAS:]  # predictions of the 81 solution tokens
    target = ids[:, -CANVAS:]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), target.reshape(-1))
    if probes is not None:
        loss = loss + probes.loss(puz)
    blank = torch.from_numpy(puz == 0)
    acc = (logits.argmax(-1) == target)[blank].float().mean().item()
    return loss, acc


@torch.no_grad()
def quick_val(model, cfg: TrainConfig, puz: np.ndarray, sol: np.ndarray) -> float:
    """Blank-cell accuracy of one pass: the diffusion model from a fully noised canvas (the
    sampler's first step), the AR model teacher-forced. A cheap progress signal only."""
    model.eval()
    rng = np.random.default_rng(12345)
    if cfg.kind == "diffusion":
        canvas = np.where(puz == 0, rng.integers(0, VOCAB_SIZE, puz.shape), data.to_grid_ids(sol))
        logits, _ = diffusion_logits(model, torch.from_numpy(data.to_prompt_ids(puz)), torch.from_numpy(canvas))
    else:
        ids = torch.from_numpy(np.concatenate([data.to_prompt_ids(puz), data.to_grid_ids(sol)], axis=1))
        logits = model(input_ids=ids[:, :-1]).logits[:, -CANVAS:]
    model.train()
    pred = logits.argmax(-1).numpy()
    blank = puz == 0
    return float((pred == data.to_grid_ids(sol))[blank].mean())


# --- checkpoints --------------------------------------------------------------------------

def save_checkpoint(model, cfg: TrainConfig, path: Path, meta: dict) -> None:
    """HF format: config.json, generation_config.json (diffusion), model.safetensors (bf16, the
    official dtype), tokenizer files, and ``dgserve_sudoku.json`` with the recipe."""
    path.mkdir(parents=True, exist_ok=True)
    shipped = copy.deepcopy(model).to(torch.bfloat16)
    shipped.save_pretrained(str(path))
    save_tokenizer(path)
    rec = {"recipe": {k: v for k, v in asdict(cfg).items() if k != "size"}, "size": cfg.size.to_dict(), **meta}
    (path / "dgserve_sudoku.json").write_text(json.dumps(rec, indent=2) + "\n")


# --- the loop -----------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir)
    carvings_path = data_dir / "train_carvings.npz"
    if not carvings_path.exists():
        raise FileNotFoundError(f"{carvings_path} is missing: run `dgserve sudoku-data` first")
    carvings = data.load_carvings(carvings_path)
    val_puz, val_sol = data.eval_set("val", 40, 200, data_dir)
    model = build_model(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    probes = None
    if cfg.aux_pos_weight or cfg.aux_cand_weight:
        probes = AuxProbes(model, cfg)
        probes.train()
    params = list(model.named_parameters()) + (list(probes.named_parameters()) if probes is not None else [])
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    step_loss = diffusion_step_loss if cfg.kind == "diffusion" else ar_step_loss
    rng = np.random.default_rng(cfg.seed)  # the batch stream: identical for both kinds
    obj_rng = np.random.default_rng(cfg.seed + 1)  # noise and self-conditioning draws
    log = open(out / "loss.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "seconds", "lr", "loss", "blank_acc", "val_acc_40"])
    start = time.time()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.kind} ({n_params / 1e6:.2f}M params)", mininterval=30)
    ema = None
    step = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        puz, sol = data.sample_batch(carvings, cfg.batch, rng, cfg.min_blanks, cfg.max_blanks)
        loss, acc = step_loss(model, cfg, puz, sol, obj_rng, probes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        val = ""
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = f"{quick_val(model, cfg, val_puz, val_sol):.4f}"
        writer.writerow([step + 1, f"{time.time() - start:.1f}", f"{lr_at(cfg, step):.2e}", f"{loss.item():.4f}",
                         f"{acc:.4f}", val])
        log.flush()
        bar.set_postfix(loss=f"{ema:.3f}", acc=f"{acc:.3f}", val=val or "-", refresh=False)
        if (step + 1) % cfg.save_every == 0:
            save_checkpoint(model, cfg, out / "checkpoint", {"steps": step + 1, "seconds": time.time() - start})
        if time.time() - start > cfg.minutes * 60:
            bar.write(f"wall-clock cap of {cfg.minutes} min reached at step {step + 1}")
            break
    seconds = time.time() - start
    meta = {"steps": step + 1, "seconds": round(seconds, 1), "params": n_params,
            "examples": (step + 1) * cfg.batch, "tokens_per_example": 82 + CANVAS}
    save_checkpoint(model, cfg, out / "checkpoint", meta)
    log.close()
    bar.write(f"done: {meta}")
    return out / "checkpoint"

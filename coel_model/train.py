"""Training the bundled tiny MoE: AdamW, warmup + cosine LR, a small load-balance loss.

The schedule runs on *progress* = max(step / steps, elapsed / time budget), so a run with a
time budget still decays its learning rate to the end of the budget, and a run with only a
step count is fully deterministic (seeded init, seeded batch sampling, fixed thread count).
The load-balance coefficient stays small (1e-3) on purpose: CoEL needs routing that is visibly
non-uniform, otherwise popularity-aware quantization and placement have nothing to exploit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from coel_model.checkpoint import save_model
from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from coel_model.model import MoEModel, RoutingRecorder, init_weights, load_balance_loss

TRAIN_LOG_FILE = "train_log.json"


def default_model_config(vocab_size: int = 2048, eos_token_id: int = 0) -> MoEConfig:
    """The bundled tiny-moe shape: ~7.9 M parameters, 89% of them in 32 routed experts."""
    return MoEConfig(vocab_size=vocab_size, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                     n_experts=8, top_k=2, expert_hidden=384, norm_topk_prob=True,
                     rope_theta=10000.0, max_seq_len=1024, tie_embeddings=True,
                     bos_token_id=-1, eos_token_id=eos_token_id)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100_000  # upper bound on optimizer steps (the time budget usually ends first)
    time_budget_s: float = 0.0  # wall-clock budget in seconds; 0 = steps only (deterministic)
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not norms)
    grad_clip: float = 1.0
    aux_loss_coef: float = 1e-3  # load-balance loss weight; small keeps routing skewed
    seed: int = 0
    threads: int = 2
    eval_every: int = 100  # steps between held-out loss checks
    eval_batches: int = 4

    def __post_init__(self) -> None:
        problems = [f"{f.name} must be > 0 (got {getattr(self, f.name)})"
                    for f in fields(self) if f.name in ("steps", "batch_size", "seq_len", "lr", "threads",
                                                         "eval_every", "eval_batches")
                    and getattr(self, f.name) <= 0]
        if self.time_budget_s < 0:
            problems.append(f"time_budget_s must be >= 0 (got {self.time_budget_s})")
        if not 0 <= self.aux_loss_coef < 1:
            problems.append(f"aux_loss_coef must be in [0, 1) (got {self.aux_loss_coef})")
        if problems:
            raise ConfigError("invalid TrainConfig: " + "; ".join(problems))


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr*min_lr_ratio over progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len+1 tokens: inputs (B, T) and next-token targets (B, T)."""
    if tokens.numel() <= seq_len + 1:
        raise ConfigError(f"training stream has {tokens.numel()} tokens, fewer than seq_len+1 = {seq_len + 1}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=gen)
    win = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return win[:, :-1], win[:, 1:]


@torch.no_grad()
def eval_loss(model: MoEModel, tokens: torch.Tensor, seq_len: int, batches: int, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) on fixed, evenly spaced windows of `tokens`."""
    model.eval()
    n_windows = min(batches * batch_size, max(1, (tokens.numel() - 1) // seq_len))
    starts = torch.linspace(0, tokens.numel() - seq_len - 1, n_windows).long().tolist()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        win = torch.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]])
        logits = model(win[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += win[:, 1:].numel()
    model.train()
    return total / count


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    wall_time_s: float
    final_train_loss: float
    final_eval_loss: float | None
    log: list[dict] = field(default_factory=list)


def train(model: MoEModel, train_tokens: torch.Tensor, cfg: TrainConfig,
          eval_tokens: torch.Tensor | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train in place; returns the per-step log (loss, aux, lr, tokens, elapsed)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    log: list[dict] = []
    t0 = time.monotonic()
    step, tokens_seen, loss_ema, last_eval = 0, 0, None, None
    while step < cfg.steps:
        elapsed = time.monotonic() - t0
        progress = step / cfg.steps
        if cfg.time_budget_s > 0:
            progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                break
        lr = lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample_batch(train_tokens, cfg.batch_size, cfg.seq_len, gen)
        routings = RoutingRecorder()
        logits = model(x, observer=routings)  # (B, T, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = load_balance_loss(routings.routings, model.cfg.n_experts)
        loss = ce + cfg.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        ce_v = ce.item()
        loss_ema = ce_v if loss_ema is None else 0.95 * loss_ema + 0.05 * ce_v
        rec = {"step": step, "loss": round(ce_v, 5), "aux": round(aux.item(), 5), "lr": lr,
               "grad_norm": round(float(gnorm), 4), "tokens": tokens_seen,
               "elapsed_s": round(time.monotonic() - t0, 2)}
        if eval_tokens is not None and (step % cfg.eval_every == 0):
            last_eval = eval_loss(model, eval_tokens, cfg.seq_len, cfg.eval_batches, cfg.batch_size)
            rec["eval_loss"] = round(last_eval, 5)
        log.append(rec)
        if on_step is not None:
            on_step(rec)
    if eval_tokens is not None:
        last_eval = eval_loss(model, eval_tokens, cfg.seq_len, cfg.eval_batches, cfg.batch_size)
    model.eval()
    return TrainResult(step, tokens_seen, time.monotonic() - t0, loss_ema if loss_ema is not None else float("nan"),
                       last_eval, log)


def save_trained(model: MoEModel, out_dir: str | Path, tokenizer, result: TrainResult, cfg: TrainConfig,
                 extra: dict | None = None) -> Path:
    """fp16 checkpoint in our own format + tokenizer.json + train_log.json."""
    out = save_model(model, out_dir, dtype=torch.float16)
    if tokenizer is not None:
        tokenizer.save(out)
    counts = model.cfg.param_counts()
    log = {"train_config": asdict(cfg), "param_counts": counts, "steps": result.steps,
           "tokens_seen": result.tokens_seen, "wall_time_s": round(result.wall_time_s, 1),
           "final_train_loss_ema": result.final_train_loss, "final_eval_loss": result.final_eval_loss,
           "torch": torch.__version__, **(extra or {}),
           "log": result.log}
    (out / TRAIN_LOG_FILE).write_text(json.dumps(log) + "\n")
    return out

"""Greedy and sampled generation with a KV cache (prefill once, then one token per step)."""
from __future__ import annotations

from typing import Callable

import torch

from coel_model.model import ExpertExecutor, KVCache, MoEModel


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """Pick the next token from logits (vocab,): argmax when temperature == 0."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: MoEModel, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             executor: ExpertExecutor | None = None, stop_at_eos: bool = True,
             on_token: Callable[[int, int], None] | None = None) -> list[int]:
    """Return the new tokens; `on_token(step, token)` is called as each one is produced."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    cfg = model.cfg
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len ({cfg.max_seq_len})")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(cfg, batch=1, max_len=total)
    logits = model(torch.tensor([prompt]), cache=cache, executor=executor)[0, -1]
    out: list[int] = []
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(tok)
        if on_token is not None:
            on_token(step, tok)
        if stop_at_eos and cfg.eos_token_id >= 0 and tok == cfg.eos_token_id:
            break
        if step + 1 < max_new_tokens:
            logits = model(torch.tensor([[tok]]), cache=cache, executor=executor)[0, -1]
    return out

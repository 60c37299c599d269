"""The decode loop: prefill once, then one token per step with a KV cache.

Every server that generates runs this loop (`coel generate`, `coel serve-local`, the entry);
what differs is handed in: the expert executor and observer reach `MoEModel.forward`, and the
`step` hook wraps each forward pass (the entry retries a failed step there).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from coel_model.model import ExpertExecutor, Observer

StepHook = Callable[[Callable[[], torch.Tensor]], torch.Tensor]  # hook(run_forward) -> logits (vocab,)


class DecodeModel(Protocol):
    """What the loop needs of a model: MoEModel, or a pipeline of stages that acts like one."""
    cfg: MoEConfig

    def new_cache(self, max_len: int) -> Any: ...

    def __call__(self, tokens: torch.Tensor, cache: Any = None, executor: ExpertExecutor | None = None,
                 observer: Observer | None = None) -> torch.Tensor: ...


def check_prompt(cfg: MoEConfig, prompt: list[int], max_new_tokens: int) -> None:
    """The one check of a request's length and token ids against the model."""
    if not prompt:
        raise ConfigError("the prompt holds no tokens; give a non-empty prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids {bad[:4]} outside the vocabulary (0..{cfg.vocab_size - 1})")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                          f"exceeds the model's max_seq_len ({cfg.max_seq_len})")


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
def generate(model: DecodeModel, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             executor: ExpertExecutor | None = None, observer: Observer | None = None,
             stop_at_eos: bool = True, on_token: Callable[[int, int], None] | None = None,
             step: StepHook | None = None) -> list[int]:
    """Return the new tokens; `on_token(step, token)` is called as each one is produced.

    A forward pass only advances the cache when it completes, so a `step` hook may run its
    argument again after a failure and get the same logits.
    """
    cfg = model.cfg
    check_prompt(cfg, prompt, max_new_tokens)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = model.new_cache(len(prompt) + max_new_tokens)

    def forward(tokens: list[int]) -> torch.Tensor:
        run = lambda: model(torch.tensor([tokens]), cache=cache, executor=executor,  # noqa: E731
                            observer=observer)[0, -1]
        return run() if step is None else step(run)

    logits = forward(prompt)
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(tok)
        if on_token is not None:
            on_token(i, tok)
        if stop_at_eos and cfg.eos_token_id >= 0 and tok == cfg.eos_token_id:
            break
        if i + 1 < max_new_tokens:
            logits = forward([tok])
    return out

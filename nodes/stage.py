"""Pipeline stages: the backbone of layers [l0, l1) running where the plan puts it.

Division of labour: `coel_model.model.BackboneSlice` is the slice's weights and its part of
`MoEModel.forward`; `StageCaches` keeps one KV cache per request on the stage, within a byte
bound, evicting the least recently used (a request whose cache was evicted or lost is replayed
by its entry); `StageRunner` is one stage: slice + caches + the expert executor (the stage's own
experts in place, the others through a Coordinator). `Pipeline` is the decode loop's model for
a plan with stages: the entry keeps the request and sampling state and hands each step's input
to the first stage through `send` (in-process in tests, over ZeroMQ in the runtime).
No sockets here.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from coel_model.config import MoEConfig
from coel_model.model import BackboneSlice, ExpertExecutor, KVCache, Observer


class StageError(Exception):
    """A stage cannot run this step (its cache of the request is gone or out of step)."""


class StageCaches:
    """KV caches of one stage, one per request id, at most `max_bytes` in total (LRU eviction)."""

    def __init__(self, model: BackboneSlice, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self.caches: OrderedDict[str, KVCache] = OrderedDict()
        self.evicted = 0

    @property
    def used_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    def get(self, request: str, pos: int, max_len: int) -> KVCache:
        """The request's cache holding exactly `pos` tokens; a new one when pos == 0."""
        where = f"layers [{getattr(self.model, 'l0', 0)}, {getattr(self.model, 'l1', self.model.cfg.n_layers)})"
        if pos == 0:
            self.caches.pop(request, None)
            cache = self.model.new_cache(max_len)
            need = cache.nbytes()
            if need > self.max_bytes:
                raise StageError(f"a KV cache of {max_len} tokens for {where} needs {need} bytes; this "
                                 f"stage's cache bound is {self.max_bytes}")
            while self.caches and self.used_bytes + need > self.max_bytes:
                self.caches.popitem(last=False)
                self.evicted += 1
            self.caches[request] = cache
            return cache
        cache = self.caches.get(request)
        if cache is None or cache.length != pos:
            have = "none" if cache is None else f"{cache.length} tokens"
            raise StageError(f"stage {where} has no cache of request {request} at position {pos} "
                             f"(have {have}): replay from the prompt")
        self.caches.move_to_end(request)
        return cache

    def release(self, request: str) -> bool:
        return self.caches.pop(request, None) is not None


@dataclass
class StageRunner:
    """One stage: runs a request's step through layers [l0, l1) of its slice."""
    model: BackboneSlice
    caches: StageCaches
    executor: ExpertExecutor | None = None
    observer: Observer | None = None
    steps: int = 0

    @torch.inference_mode()
    def run(self, request: str, x: torch.Tensor, pos: int, max_len: int) -> torch.Tensor:
        """x: token ids (1, T) on the first stage, else hidden states (1, T, d) -> hidden states
        (1, T, d) for the next stage (a whole MoEModel, the entry's fallback, returns logits)."""
        cache = self.caches.get(request, pos, max_len)
        out = self.model(x, cache, self.executor, self.observer)
        self.steps += 1
        return out

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The coordinator's last step: hidden states (1, T, d) -> logits (1, T, vocab)."""
        return self.model.head(h)


Send = Callable[[str, torch.Tensor, int, int], torch.Tensor]  # (request, ids, pos, max_len) -> last logits


@dataclass
class PipelineCache:
    """The entry's side of one request: its id on the stages and how many tokens they hold."""
    request: str
    max_len: int
    length: int = 0
    history: list[int] = field(default_factory=list)  # every token fed so far (for a replay)


class Pipeline:
    """A DecodeModel over stages: step inputs go to `send` (which runs every stage and returns
    the last one's logits); the cache is the request's position, the KV caches live on the stages.

    Every step carries the position it starts at; a stage whose cache of the request is not at
    that position (evicted, restarted, a new plan put the layers elsewhere, or a step that failed
    half-way) answers StageError, and the step is replayed: prompt + tokens so far as one
    prefill from position 0, so the logits are those of an unbroken run.
    """

    def __init__(self, cfg: MoEConfig, send: Send, request_prefix: str = "req"):
        self.cfg = cfg
        self.send = send
        self.prefix = request_prefix
        self._n = 0
        self._open: list[str] = []
        self.replays = 0

    def new_cache(self, max_len: int) -> PipelineCache:
        self._n += 1
        cache = PipelineCache(f"{self.prefix}-{self._n}-{time.monotonic_ns() % 10**9}", max_len)
        self._open.append(cache.request)
        return cache

    def finished(self) -> list[str]:
        """Ids of the requests started since the last call (their stage caches may be released)."""
        out, self._open = self._open, []
        return out

    def __call__(self, tokens: torch.Tensor, cache: PipelineCache | None = None,
                 executor: ExpertExecutor | None = None, observer: Observer | None = None) -> torch.Tensor:
        """tokens (1, T) -> logits (1, 1, vocab) of the last position (all the decode loop reads)."""
        if cache is None:
            raise StageError("a pipeline needs the request's PipelineCache")
        new = tokens[0].tolist()
        try:
            logits = self.send(cache.request, torch.tensor([new]), cache.length, cache.max_len)
        except StageError:
            self.replays += 1
            replay = cache.history + tokens[0].tolist()
            logits = self.send(cache.request, torch.tensor([replay]), 0, cache.max_len)
            cache.history, cache.length = replay, len(replay)
            return logits
        if cache.length == 0:
            cache.history = new
        else:
            cache.history.extend(new)
        cache.length = len(cache.history)
        return logits


def local_chain(runners: list[StageRunner]) -> Send:
    """`send` for stages in this process: each runner's output is the next one's input; the
    first (the coordinator, holding the ends) embeds the ids and computes the logits at the end."""
    def send(request: str, x: torch.Tensor, pos: int, max_len: int) -> torch.Tensor:
        for r in runners:
            x = r.run(request, x, pos, max_len)
        return runners[0].head(x)[:, -1:]  # the whole step, as MoEModel.forward computes it
    return send

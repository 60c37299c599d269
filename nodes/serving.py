"""The entry's in-process request interface: what an API front needs from a serving backend.

An HTTP front (nodes.http_front) must drive the entry's own request path (its worker pool, decode
loop, expert fail-over and placement-wait retries), not a copy of it. This module is that seam,
kept small so the decode loop behind it can change freely:

    backend.submit(GenerationRequest, sink)    queue a request; returns at once
    sink.token(index, token_id)                called from a worker thread as each token is made
    sink.done(info) / sink.error(code, reason) exactly one of them ends the request
    sink.cancelled()                           polled between decode steps: True stops the request
    backend.health() -> (ok, reason)           can a request be served right now, and if not why

`nodes.entry.EntryService` implements `ServingBackend`; the ZeroMQ clients' replies go through a
sink too, so metrics and cancellation see every request the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from coel_model.errors import ConfigError


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt ids plus sampling parameters (the GENERATE message's fields)."""
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    trace_id: str | None = None
    slo_class: str = "default"

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError("the prompt holds no tokens")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {self.temperature}, "
                              f"{self.top_k}, {self.top_p})")

    def body(self) -> dict[str, Any]:
        """The GENERATE body the entry's request path reads (the prompt travels as a tensor)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                               "top_k": int(self.top_k), "top_p": float(self.top_p), "seed": self.seed,
                               "stop_at_eos": self.stop_at_eos, "class": self.slo_class}
        return out


class TokenSink(Protocol):
    """Where one request's results go; called from the worker thread that serves it."""

    def token(self, index: int, token_id: int) -> None: ...

    def done(self, info: dict[str, Any]) -> None: ...

    def error(self, code: str, reason: str) -> None: ...

    def cancelled(self) -> bool: ...


class ServingBackend(Protocol):
    model_dir: str

    def submit(self, req: GenerationRequest, sink: TokenSink, api: str = "local") -> None: ...

    def health(self) -> tuple[bool, str]: ...


class RequestCancelled(Exception):
    """Raised inside the decode loop when the request's sink says it was cancelled."""

"""The OpenAI-compatible HTTP front of an entry server (Starlette app served by uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or Server-Sent Events with
"stream": true), GET /v1/models, GET /health (200 serving, 503 + reason), GET /metrics
(Prometheus text). Request meaning and answer shapes live in nodes.openai_api; this module only
moves bytes and drives the backend (nodes.serving.ServingBackend: the entry's own worker pool
and decode loop) through a sink whose tokens cross from the worker thread to the event loop.

A client that closes its connection cancels its request: the sink says "cancelled" and the
decode loop stops at its next token. A stop string ends the request the same way. Errors before
the first token are answered with their HTTP status (4xx bad input, 503 no placement / no
expert holder, 500 a bug), never by dropping the connection; nothing else in flight is affected.

Runs in its own thread with its own event loop (`HttpFront.start`), next to the entry's ZeroMQ
loop in the same process, so a request travels no extra hop.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coel_model.errors import ConfigError
from nodes import openai_api as A
from nodes.serving import GenerationRequest, ServingBackend


class _LoopSink:
    """TokenSink whose events land in an asyncio.Queue of the front's event loop."""
    __slots__ = ("loop", "queue", "_cancel", "cancel_outcome")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.cancel_outcome = "cancelled"

    def _put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server stopping): stop the request
            self._cancel.set()

    def token(self, index: int, token_id: int) -> None:
        self._put(("token", token_id))

    def done(self, info: dict[str, Any]) -> None:
        self._put(("done", info))

    def error(self, code: str, reason: str) -> None:
        self._put(("error", (code, reason)))

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, outcome: str = "cancelled") -> None:
        self.cancel_outcome = outcome
        self._cancel.set()


def parse_listen(spec: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with an error that says what is wrong."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--http {spec!r} must look like HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


class HttpFront:
    """The app plus its uvicorn server thread. `served_model` is the id clients pass as 'model'."""

    def __init__(self, backend: ServingBackend, model_cfg: Any, metrics: Any, tokenizer: Any = None,
                 served_model: str | None = None):
        self.backend = backend
        self.cfg = model_cfg
        self.metrics = metrics
        if tokenizer is None:
            from coel_model.evaluate import base_model_dir, find_tokenizer
            tokenizer = find_tokenizer(backend.model_dir, base_model_dir(backend.model_dir))
        self.tok = tokenizer
        self.model_id = served_model or Path(backend.model_dir).resolve().name
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ])
        self.server = None
        self.thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # ---------------- routes ----------------
    def _count(self, route: str, code: int) -> None:
        self.metrics.http.labels(route, str(code)).inc()

    async def models(self, request: Request) -> Response:
        self._count("/v1/models", 200)
        return JSONResponse(A.models_body((self.model_id,), self.created))

    async def health(self, request: Request) -> Response:
        ok, reason = self.backend.health()
        code = 200 if ok else 503
        self._count("/health", code)
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason, "model": self.model_id},
                            status_code=code)

    async def metrics_text(self, request: Request) -> Response:
        from nodes.metrics import CONTENT_TYPE
        self._count("/metrics", 200)
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion", "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat", "/v1/chat/completions")

    def _error(self, route: str, exc: A.ApiError) -> Response:
        self._count(route, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    def _prepare(self, kind: str, raw: bytes) -> tuple[A.ApiRequest, GenerationRequest]:
        req = A.parse_request(kind, A.parse_json(raw), (self.model_id,))
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise A.bad(f"prompt token ids {bad[:4]} are outside the vocabulary (0..{self.cfg.vocab_size - 1})",
                            "prompt", "invalid_value")
        else:
            ids = self.tok.encode(req.prompt_text)
            if not ids:
                raise A.bad("the prompt encodes to no tokens", "prompt", "invalid_value")
        budget = A.generation_budget(req, len(ids), self.cfg.max_seq_len)
        gen = GenerationRequest(tuple(ids), budget, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                seed=req.seed, stop_at_eos=not req.ignore_eos,
                                trace_id=f"http-{uuid.uuid4().hex[:12]}")
        return req, gen

    async def _generate(self, request: Request, kind: str, route: str) -> Response:
        try:
            req, gen = self._prepare(kind, await request.body())
        except A.ApiError as exc:
            return self._error(route, exc)
        sink = _LoopSink(asyncio.get_running_loop())
        try:
            self.backend.submit(gen, sink, api="http")
        except Exception as exc:  # the entry is stopping
            return self._error(route, A.ApiError(503, str(exc), code="unavailable"))
        # wait for the first event while watching for the client going away
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        getter = asyncio.ensure_future(sink.queue.get())
        try:
            done, _ = await asyncio.wait({watcher, getter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            sink.cancel()
            raise
        finally:
            watcher.cancel()
        if getter not in done:
            getter.cancel()
            sink.cancel()
            self._count(route, 499)
            return Response(status_code=499)
        first = getter.result()
        if first[0] == "error":
            code, reason = first[1]
            status = A.STATUS_OF_ENTRY_ERROR.get(code, 500)
            return self._error(route, A.ApiError(status, reason, code=code))
        rid, created = A.new_id(kind), int(time.time())
        text = A.TextStream(self.tok.decode, self.cfg.eos_token_id if gen.stop_at_eos else -1, req.stop)
        if req.stream:
            self._count(route, 200)
            return StreamingResponse(self._stream(req, gen, sink, text, rid, created, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(route, req, gen, sink, text, rid, created, first, request)

    async def _collect(self, route: str, req: A.ApiRequest, gen: GenerationRequest, sink: _LoopSink,
                       text: A.TextStream, rid: str, created: int, first: tuple, request: Request) -> Response:
        ids: list[int] = []
        parts: list[str] = [req.prompt_text or ""] if req.echo else []
        event = first
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while True:
                kind, val = event
                if kind == "token":
                    if not text.stopped:
                        ids.append(val)
                        parts.append(text.push(val))
                        if text.stopped:
                            sink.cancel("ok")
                elif kind == "done":
                    break
                else:
                    code, reason = val
                    return self._error(route, A.ApiError(A.STATUS_OF_ENTRY_ERROR.get(code, 500), reason, code=code))
                getter = asyncio.ensure_future(sink.queue.get())
                done, _ = await asyncio.wait({watcher, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    sink.cancel()
                    self._count(route, 499)
                    return Response(status_code=499)
                event = getter.result()
        except asyncio.CancelledError:
            sink.cancel()
            raise
        finally:
            watcher.cancel()
        parts.append(text.flush())
        finish = text.finish_reason or ("length" if len(ids) >= gen.max_new_tokens else "stop")
        self._count(route, 200)
        return JSONResponse(A.completion_body(req, rid, created, "".join(parts), finish, len(gen.prompt_ids), ids))

    async def _stream(self, req: A.ApiRequest, gen: GenerationRequest, sink: _LoopSink, text: A.TextStream,
                      rid: str, created: int, first: tuple):
        n = 0
        event = first
        try:
            if req.kind == "chat":
                yield A.sse(A.chunk_body(req, rid, created, "", first=True))
            elif req.echo and req.prompt_text:
                yield A.sse(A.chunk_body(req, rid, created, req.prompt_text))
            while True:
                kind, val = event
                if kind == "token":
                    if not text.stopped:
                        n += 1
                        delta = text.push(val)
                        if text.stopped:
                            sink.cancel("ok")
                        yield A.sse(A.chunk_body(req, rid, created, delta, token_id=val))  # one per token
                elif kind == "done":
                    break
                else:  # the stream has begun: report the error in-band, as OpenAI-compatible servers do
                    code, reason = val
                    yield A.sse(A.ApiError(A.STATUS_OF_ENTRY_ERROR.get(code, 500), reason, code=code).body())
                    yield A.sse("[DONE]")
                    return
                event = await sink.queue.get()
            tail = text.flush()
            finish = text.finish_reason or ("length" if n >= gen.max_new_tokens else "stop")
            yield A.sse(A.chunk_body(req, rid, created, tail, finish_reason=finish))
            if req.include_usage:
                yield A.sse(A.usage_chunk(req, rid, created, len(gen.prompt_ids), n))
            yield A.sse("[DONE]")
        finally:
            if not text.stopped and event[0] == "token":
                sink.cancel()  # the client went away mid-stream (the generator was closed)

    # ---------------- server ----------------
    def start(self, listen: str, timeout_s: float = 10.0) -> tuple[str, int]:
        """Bind HOST:PORT (errors raised here), serve in a daemon thread; returns the bound address."""
        import uvicorn
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--http {listen}: cannot bind: {exc}") from None
        sock.listen(128)
        sock.set_inheritable(True)
        self.address = sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http-front",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"--http {listen}: the HTTP server did not start")
            time.sleep(0.01)
        self._sock = sock
        return self.address

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
        if getattr(self, "_sock", None) is not None:
            self._sock.close()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return

"""Pipeline stages on the wire: the stage role of an agent and the entry's end of a pipeline.

Division of labour: `nodes.stage` computes (slice, KV caches, replay); this module moves its
messages. A step travels one way: the entry sends STAGE_STEP (ids) to the first stage (the
coordinator: it holds the embedding and lm_head, as the cost model places them) with the rest of
the route; each stage runs its layers and sends STAGE_STEP (hidden state) to the next; the last
stage hops the hidden state back to the coordinator (route entry [coordinator, L, L]: the head),
which sends STAGE_RESULT (last-position logits) to the entry's `reply_to` ROUTER.
Any stage that cannot run the step answers ERROR to `reply_to` instead (STAGE_CACHE: replay).
Nobody waits on a downstream stage, so stages that also serve each other's experts never wait
in a cycle. `StageServer` runs in its own thread in the agent, so the agent's loop keeps serving
expert calls (its own stage's included) while a step computes.

Trace spans: stage_hop (sender's send -> receipt; attrs src, dst, bytes), stage_queue,
stage_compute (attrs layers, pos, tokens) on the stage host, stage_wait on the entry.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Any

import torch
import zmq

from coel_model.config import MoEConfig
from coel_model.model import BackboneSlice, hold_half
from nodes import protocol as P
from nodes.security import KeyDir, secure_client, secure_server
from nodes.stage import StageCaches, StageError, StageRunner
from nodes.transport import (DelayHook, HeldInbox, NodeError, endpoint_host, peer_address, send_frames,
                             split_envelope)

STAGE_CALL_TIMEOUT_S = 2.0  # a stage's expert calls: one attempt before failing over
STAGE_LAYER_DEADLINE_S = 4.0


def stage_tensors(model: Any, l0: int, l1: int, ends: bool) -> dict[str, torch.Tensor]:
    """The slice's tensors as sent: fp16 when every weight is exactly an fp16 value (an fp16
    checkpoint), else as held; the agent keeps them in that dtype."""
    from coel_model.model import slice_state
    state = {k: v.detach().contiguous() for k, v in slice_state(model, l0, l1, ends).items()}
    half = {k: v.half() for k, v in state.items()}
    if all(torch.equal(half[k].float(), v.float()) for k, v in state.items()):
        return half
    return state


class RemoteStageError(NodeError):
    """A pipeline step got no result in time, or a stage answered an error other than STAGE_CACHE."""


class _Dealers:
    """One DEALER per peer endpoint, opened lazily (owned by one thread)."""

    def __init__(self, ctx: zmq.Context, keys: KeyDir | None):
        self.ctx, self.keys = ctx, keys
        self.socks: dict[str, zmq.Socket] = {}

    def send(self, ep: str, frames: list[Any]) -> int:
        s = self.socks.get(ep)
        if s is None:
            s = self.socks[ep] = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            secure_client(s, self.keys)
            s.connect(ep)
        try:
            return send_frames(s, frames, zmq.NOBLOCK)
        except zmq.Again:  # the peer's queue is full (gone): the entry's timeout notices
            return 0

    def reset(self, ep: str) -> None:
        s = self.socks.pop(ep, None)
        if s is not None:
            s.close(linger=0)

    def close(self) -> None:
        for ep in list(self.socks):
            self.reset(ep)


class _StoreExperts:
    """What the Coordinator needs of a model for the stage's LOCAL experts: the agent's shards."""

    def __init__(self, cfg: MoEConfig, store: Any):
        self.cfg, self.store = cfg, store

    def expert(self, layer: int, e: int):
        shard, _ = self.store.get((layer, e))  # resident, or loaded on demand from storage
        if shard is None:
            from nodes.coordinator import RemoteExpertError
            raise RemoteExpertError(f"expert (layer {layer}, expert {e}) is placed here but not loaded")
        return shard.module


class StageServer:
    """The stage role of an agent: LOAD_STAGE / STAGE_STEP / STAGE_RELEASE, steps in a thread."""

    def __init__(self, name: str, endpoint: str, store: Any, keys: KeyDir | None, ctx: zmq.Context,
                 delay_of: Any = lambda: None, tracer: Any = None):
        self.name, self.endpoint, self.store = name, endpoint, store
        self.keys, self.ctx, self.delay_of, self.tracer = keys, ctx, delay_of, tracer  # delay_of: the agent's hook now
        self.runner: StageRunner | None = None  # owned by the stage thread
        self.coord = None
        self._pending_model: BackboneSlice | None = None  # the slice of the last load (loop thread's view)
        self._pending_caches: StageCaches | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.counters: dict[str, int] = {"steps": 0, "stage_errors": 0, "released": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- called from the agent's loop ----
    def load(self, body: dict, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Build the slice, check the budget, then swap it in (make-before-break); raises ValueError."""
        from nodes.coordinator import LOCAL, Coordinator, CoordinatorConfig, _settings
        cfg = MoEConfig.from_dict(body["config"], "LOAD_STAGE config")
        l0, l1 = body["l0"], body["l1"]
        if l1 > cfg.n_layers:
            raise ValueError(f"stage layers [{l0}, {l1}) exceed the model's {cfg.n_layers} layers")
        ends = bool(body.get("ends", False))
        held = self._pending_model
        if not tensors and held is not None and (held.l0, held.l1, held.ends) == (l0, l1, ends):
            model = held  # same slice, new expert holders: keep the weights (and the requests' caches)
        elif not tensors:
            raise ValueError(f"stage [{l0}, {l1}): no tensors, and this agent holds no such slice to re-route")
        else:
            model = BackboneSlice(cfg, l0, l1, ends).eval()
            missing, unexpected = model.load_state_dict(tensors, strict=False)  # copies: frames are read-only
            if missing or unexpected:
                raise ValueError(f"stage [{l0}, {l1}): tensors missing {missing[:4]} unexpected {unexpected[:4]}")
            if all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point()):
                hold_half(model)  # held as sent (fp16), computed in fp32
        nbytes = model.nbytes()
        old = self.store.backbone_bytes
        after = self.store.used_bytes - old + nbytes
        if after > self.store.budget_bytes:
            raise OverflowError(f"the backbone of layers [{l0}, {l1}) needs {nbytes} bytes: {after} in total, "
                                f"budget {self.store.budget_bytes}; nothing was loaded")
        holders = {}
        for l, e, eps in body["holders"]:
            holders[(l, e)] = [LOCAL if ep == self.endpoint else ep for ep in eps]
        missing_h = [(l, e) for l in range(l0, l1) for e in range(cfg.n_experts) if (l, e) not in holders]
        if missing_h:
            raise ValueError(f"stage [{l0}, {l1}): no holder for {len(missing_h)} experts, e.g. {missing_h[:3]}")
        coord = Coordinator(_StoreExperts(cfg, self.store), holders, self.keys,
                            CoordinatorConfig(call_timeout_s=STAGE_CALL_TIMEOUT_S,
                                              layer_deadline_s=STAGE_LAYER_DEADLINE_S, name=self.name),
                            delay=self.delay_of(), ctx=self.ctx,
                            compression={ep: _settings(c) for ep, c in (body.get("compression") or {}).items()})
        coord.tracer = self.tracer
        caches = self._pending_caches if model is held else StageCaches(model, body["kv_cache_bytes"])
        self._pending_model, self._pending_caches = model, caches
        self.jobs.put(("swap", (StageRunner(model, caches, coord, coord.observer), coord)))
        self.store.backbone_bytes = nbytes
        self._ensure_thread()
        return {"stage": [l0, l1], "backbone_bytes": nbytes, "memory_used_bytes": self.store.used_bytes}

    def unload(self) -> None:
        """Drop the slice and its caches (the plan no longer runs a stage here)."""
        self._pending_model = self._pending_caches = None
        self.store.backbone_bytes = 0
        if self._thread is not None:
            self.jobs.put(("swap", (None, None)))

    def submit(self, msg: P.Message, t_recv_ns: int) -> None:
        self._ensure_thread()
        self.jobs.put(("step", (msg, t_recv_ns)))

    def release(self, requests: list[str]) -> None:
        self.jobs.put(("release", requests))

    def stop(self) -> None:
        self._stop.set()
        self.jobs.put(("stop", None))
        if self._thread is not None:
            self._thread.join(5)

    def stats(self) -> dict[str, Any]:
        r = self.runner
        if r is None:
            return {}
        return {"stage": [r.model.l0, r.model.l1], "backbone_bytes": self.store.backbone_bytes,
                "kv_cache_bytes": r.caches.used_bytes, "kv_requests": len(r.caches.caches),
                "kv_evicted": r.caches.evicted, **self.counters}

    # ---- the stage thread ----
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"stage-{self.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        out = _Dealers(self.ctx, self.keys)
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    kind, arg = self.jobs.get()
                    if kind == "stop":
                        return
                    if kind == "swap":
                        old = self.coord
                        self.runner, self.coord = arg
                        if old is not None:
                            old.close()
                    elif kind == "release":
                        if self.runner is not None:
                            self.counters["released"] += sum(self.runner.caches.release(r) for r in arg)
                    else:
                        self._step(out, *arg)
        finally:
            out.close()
            if self.coord is not None:
                self.coord.close()

    def _fail(self, out: _Dealers, body: dict, code: P.ErrorCode, reason: str, trace: str | None) -> None:
        self.counters["stage_errors"] += 1
        out.send(body["reply_to"], P.error_frames(body["reply_id"], code, f"stage {self.name}: {reason}", self.name))

    def _step(self, out: _Dealers, msg: P.Message, t_recv: int) -> None:
        from nodes.coordinator import RemoteExpertError
        body, r = msg.body, self.runner
        if r is None or body["l0"] not in (r.model.l0, r.model.cfg.n_layers):
            have = "nothing" if r is None else f"layers [{r.model.l0}, {r.model.l1})"
            return self._fail(out, body, P.ErrorCode.STAGE_CACHE, f"holds {have}, asked for layer {body['l0']}",
                              msg.trace)
        route = body["route"]
        n_layers = r.model.cfg.n_layers
        head = body["l0"] == n_layers and not route
        nxt = route[0] if route else None
        if head and not r.model.ends:
            return self._fail(out, body, P.ErrorCode.MALFORMED, "asked for the head, holds no lm_head", msg.trace)
        if not head and (nxt is None or nxt[1] != r.model.l1):
            return self._fail(out, body, P.ErrorCode.MALFORMED,
                              f"route {route} does not continue layers [{r.model.l0}, {r.model.l1})", msg.trace)
        x = msg.tensors["x"]
        x = x.float() if x.is_floating_point() else x.long()
        t0 = time.monotonic_ns()
        self.coord.trace_id = msg.trace
        try:
            y = r.head(x)[0, -1:] if head else r.run(body["request"], x, body["pos"], body["max_len"])
        except StageError as exc:
            return self._fail(out, body, P.ErrorCode.STAGE_CACHE, str(exc), msg.trace)
        except (RemoteExpertError, NodeError) as exc:
            return self._fail(out, body, P.ErrorCode.UNAVAILABLE, str(exc), msg.trace)
        t1 = time.monotonic_ns()
        self.counters["steps"] += 1
        hops = list(body.get("hops", [])) + [[self.name, t_recv - t0, t1 - t0]]
        if nxt is not None:
            fwd = {**body, "l0": nxt[1], "route": route[1:], "hops": hops}
            frames = P.encode(P.MsgType.STAGE_STEP, msg.req_id, fwd, {"x": y.contiguous()}, trace=msg.trace,
                              src=self.name)
            nbytes = out.send(nxt[0], frames)
            dst = nxt[0]
        else:
            res = {"request": body["request"], "hops": hops}
            frames = P.encode(P.MsgType.STAGE_RESULT, body["reply_id"], res, {"logits": y.contiguous()},
                              trace=msg.trace, src=self.name)
            nbytes = out.send(body["reply_to"], frames)
            dst = body["reply_to"]
        if self.tracer is not None and msg.trace:
            attrs = {"layers": "head" if head else [r.model.l0, r.model.l1], "pos": body["pos"], "tokens": int(x.shape[1]),
                     "request": body["request"]}
            self.tracer.span(msg.trace, "stage_hop", msg.sent_ns, t_recv, src=msg.src, dst=self.name,
                             bytes=msg.nbytes, **attrs)
            self.tracer.span(msg.trace, "stage_queue", t_recv, t0, **attrs)
            self.tracer.span(msg.trace, "stage_compute", t0, t1, next=dst, out_bytes=nbytes, **attrs)


class StageClient:
    """The entry's end of a pipeline: each step goes to the first stage of `route`, the result
    comes back to this client's own ROUTER. Owned by one thread (one per entry worker)."""

    def __init__(self, route: list[tuple[str, int, int]], keys: KeyDir | None, ctx: zmq.Context, bind_host: str,
                 delay: DelayHook | None = None, timeout_s: float = 10.0, name: str = "entry", tracer: Any = None):
        self.set_route(route)
        self.keys, self.ctx, self.timeout_s, self.name, self.tracer = keys, ctx, timeout_s, name, tracer
        self.inbox = HeldInbox(delay)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        secure_server(self.router, keys)
        port = self.router.bind_to_random_port(f"tcp://{bind_host}")
        self.reply_to = f"tcp://{bind_host}:{port}"
        self.out = _Dealers(ctx, keys)
        self._ids = itertools.count(1)
        self.trace_id: str | None = None
        self.steps = 0
        self.bytes_sent = 0

    def set_route(self, stages: list[tuple[str, int, int]]) -> None:
        """The plan's stages; the route adds the hop back to the first stage (the coordinator),
        which holds the ends and computes the logits."""
        self.route = [tuple(r) for r in stages]
        if stages:
            self.route.append((stages[0][0], stages[-1][2], stages[-1][2]))

    def send(self, request: str, x: torch.Tensor, pos: int, max_len: int) -> torch.Tensor:
        """One step (ids (1, T)) through every stage and back to the coordinator -> logits
        (1, 1, vocab) of its last position."""
        first, rest = self.route[0], self.route[1:]
        rid = next(self._ids)
        body = {"request": request, "pos": pos, "max_len": max_len, "l0": first[1],
                "route": [list(r) for r in rest], "reply_to": self.reply_to, "reply_id": rid}
        t0 = time.monotonic_ns()
        self.bytes_sent += self.out.send(first[0], P.encode(P.MsgType.STAGE_STEP, rid, body, {"x": x},
                                                            trace=self.trace_id, src=self.name))
        deadline = time.monotonic() + self.timeout_s
        while True:
            for msg in self._poll(deadline - time.monotonic()):
                if msg.req_id != rid:
                    continue  # a late answer to an abandoned step
                t1 = time.monotonic_ns()
                if self.tracer is not None and self.trace_id:
                    self.tracer.span(self.trace_id, "stage_wait", t0, t1, request=request, pos=pos,
                                     tokens=int(x.shape[1]), stages=len(self.route) - 1, src=msg.src)
                if msg.type == P.MsgType.STAGE_RESULT:
                    self.steps += 1
                    return msg.tensors["logits"].float().unsqueeze(0)  # (1, 1, vocab)
                if msg.type == P.MsgType.ERROR and msg.body.get("code") == P.ErrorCode.STAGE_CACHE.value:
                    raise StageError(msg.body.get("reason", ""))
                raise RemoteStageError(f"pipeline {[r[0] for r in self.route]}: "
                                       f"{msg.body.get('code')}: {msg.body.get('reason', '')[:300]}")
            if time.monotonic() >= deadline:
                self.out.reset(first[0])
                raise RemoteStageError(f"pipeline {[f'{r[0]}[{r[1]}:{r[2]}]' for r in self.route[:-1]]}: no result "
                                       f"within {self.timeout_s:.1f} s (step at position {pos})")

    def release(self, requests: list[str]) -> None:
        """Tell every stage to drop these requests' KV caches (fire and forget)."""
        if requests:
            for ep in dict.fromkeys(r[0] for r in self.route):  # (the head hop's server is the first's)
                self.out.send(ep, P.encode(P.MsgType.STAGE_RELEASE, 0, {"requests": requests}, src=self.name))

    def _poll(self, wait_s: float) -> list[P.Message]:
        ready = self.inbox.pop_ready()
        if ready:
            return ready
        if wait_s > 0 and self.router.poll(self.inbox.timeout_ms(wait_s * 1e3)):
            while True:
                try:
                    frames = self.router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = P.decode(split_envelope(frames)[1])
                except P.ProtocolError:
                    continue  # garbage from a peer never becomes a result
                if self.inbox.admit(msg, lambda: peer_address(frames[0], endpoint_host(self.reply_to)), msg.sent_ns,
                                    msg.nbytes):
                    ready.append(msg)
        return ready + self.inbox.pop_ready()

    def close(self) -> None:
        self.out.close()
        self.router.close(linger=0)


class _RequestCache:
    """One request's state in RoutedModel: a KV cache here, or its Pipeline position and history."""
    __slots__ = ("max_len", "kv", "pipe")

    def __init__(self, max_len: int):
        self.max_len, self.kv, self.pipe = max_len, None, None


class RoutedModel:
    """The decode loop's model on an entry. A request whose first step finds no pipeline in the
    placement runs as before: the whole backbone here, the experts on the agents (`coord`). One
    that finds stages runs them (nodes.stage.Pipeline); if the placement later drops the stages,
    its steps come back here, to a local StageRunner of the whole model, and are replayed."""

    def __init__(self, model: Any, coord: Any, stages_now: Any, client_factory: Any, local_cache_bytes: int):
        from nodes.stage import Pipeline
        self.model, self.cfg, self.coord = model, model.cfg, coord
        self.stages_now = stages_now  # () -> [(endpoint, l0, l1), ...] of the placement in force
        self._client_factory = client_factory
        self.client: StageClient | None = None
        self.local = StageRunner(model, StageCaches(model, local_cache_bytes), coord, None)
        self.pipe = Pipeline(self.cfg, self._send, request_prefix=getattr(coord.cfg, "name", "entry"))

    def new_cache(self, max_len: int) -> _RequestCache:
        return _RequestCache(max_len)

    def __call__(self, tokens: torch.Tensor, cache: _RequestCache | None = None, executor: Any = None,
                 observer: Any = None) -> torch.Tensor:
        if cache.kv is None and cache.pipe is None:
            if self.stages_now():
                cache.pipe = self.pipe.new_cache(cache.max_len)
            else:
                cache.kv = self.model.new_cache(cache.max_len)
        if cache.kv is not None:
            return self.model(tokens, cache.kv, executor, observer)
        return self.pipe(tokens, cache.pipe)

    def _send(self, request: str, x: torch.Tensor, pos: int, max_len: int) -> torch.Tensor:
        stages = self.stages_now()
        if not stages:  # the plan no longer has a pipeline: the whole backbone here
            self.local.observer = self.coord.observer
            return self.local.run(request, x, pos, max_len)
        if self.client is None:
            self.client = self._client_factory()
        self.client.set_route(stages)
        self.client.trace_id = self.coord.trace_id
        return self.client.send(request, x, pos, max_len)

    @property
    def replays(self) -> int:
        return self.pipe.replays

    def finish(self) -> None:
        """Release the finished requests' KV caches, here and on the stages."""
        done = self.pipe.finished()
        for r in done:
            self.local.caches.release(r)
        if self.client is not None and done:
            self.client.release(done)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

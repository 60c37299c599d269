"""The entry service (`coel entry`): the server-side front door for client requests.

Division of labour: the `Coordinator` (nodes.coordinator) runs the backbone and scatters expert
work to the agents of the current placement; this module owns the sockets around it. One ROUTER
serves clients (GENERATE -> a TOKEN per generated token, then DONE, or one ERROR) and the
controller (PLACEMENT, STATUS, PROBE, SHUTDOWN); the controller link (nodes.ctrllink, shared with
the agent: register, heartbeat and reconnect from its own thread) starts once the service is warm
and bound. A small pool of worker threads, each with its own
Coordinator (own sockets, own trace id) sharing one read-only model, runs the requests; their
replies reach the ROUTER through an inproc PUSH/PULL pair, so only the loop thread touches it.

Placement updates swap atomically between decode steps. When an expert call fails (its agent
crashed or is cut off) the Coordinator first fails over to another replica; if none answers,
the step is retried once the controller's next placement arrives (or a short back-off passes),
bounded by `placement_wait_s`: then the client gets ERROR "unavailable" naming the expert.
The KV cache only advances when a forward pass completes, so retrying a step is exact.
"""
from __future__ import annotations

import argparse
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import psutil
import torch
import zmq

from nodes.background import start_in_thread, stop_on_signals

from coel_model.errors import CoelError, ConfigError
from nodes import protocol as P
from nodes.serving import GenerationRequest, RequestCancelled, TokenSink
from nodes.security import KeyDir, load_keys, start_authenticator
from nodes.transport import DelayHook, HeldInbox, bind_router, peer_address, split_envelope

STOP_JOB = None  # sentinel in the work queue


@dataclass(frozen=True)
class EntryConfig:
    name: str  # server name (as in the topology); the controller keys its placement by it
    listen: str  # ROUTER endpoint clients and the controller connect to, e.g. tcp://10.0.0.4:7200
    model_dir: str  # checkpoint; the entry holds the backbone, experts live on the agents
    controller: str | None = None  # controller ROUTER endpoint for REGISTER/HEARTBEAT
    keys_dir: str | None = None  # CURVE keys (nodes.security); None = plain text
    trace_path: str | None = None
    workers: int = 2  # concurrent requests in service (2 cores on this machine)
    threads: int = 1  # torch intra-op threads
    heartbeat_s: float = 0.2
    liveness: int = 4  # controller silent this many heartbeats -> reconnect and re-register
    call_timeout_s: float = 1.5  # one expert call attempt before failing over to a replica
    layer_deadline_s: float = 4.0  # one layer's scatter/gather, all replicas included
    placement_wait_s: float = 10.0  # a failing step waits at most this long for a new placement
    first_placement_wait_s: float = 30.0  # a request arriving before any placement waits this long
    http: str | None = None  # HOST:PORT of the OpenAI-compatible HTTP front (nodes.http_front); None = none
    perceive: bool = False  # measure the backbone and messages (nodes/perception.py) before registering

    def __post_init__(self) -> None:
        if "://" not in self.listen:
            raise ConfigError(f"entry {self.name}: --listen {self.listen!r} must look like tcp://IP:PORT")
        for f in ("heartbeat_s", "call_timeout_s", "layer_deadline_s", "placement_wait_s"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"entry {self.name}: {f} must be > 0 (got {getattr(self, f)})")
        if self.workers < 1 or self.threads < 1 or self.liveness < 1:
            raise ConfigError(f"entry {self.name}: workers, threads and liveness must be >= 1")


class RequestFailed(CoelError):
    """A request that cannot finish within its bounded time."""


class NoPlacement(CoelError):
    """A request arrived and no placement came from the controller in time."""


class _WireSink:
    """TokenSink of a ZeroMQ client's request: TOKEN / DONE / ERROR frames through the worker's
    PUSH socket to the ROUTER loop (a ZeroMQ client cannot cancel)."""
    __slots__ = ("push", "envelope", "req_id", "name", "trace")

    def __init__(self, push: zmq.Socket, envelope: list[bytes], req_id: int, name: str, trace: str | None):
        self.push, self.envelope, self.req_id, self.name, self.trace = push, envelope, req_id, name, trace

    def _send(self, frames: list[Any]) -> None:
        self.push.send_multipart(self.envelope + frames, copy=False)

    def token(self, index: int, token_id: int) -> None:
        self._send(P.encode(P.MsgType.TOKEN, self.req_id, {"index": index, "token": token_id},
                            trace=self.trace, src=self.name))

    def done(self, info: dict[str, Any]) -> None:
        self._send(P.encode(P.MsgType.DONE, self.req_id, info, trace=self.trace, src=self.name))

    def error(self, code: str, reason: str) -> None:
        self._send(P.error_frames(self.req_id, P.ErrorCode(code), reason, self.name))

    @staticmethod
    def cancelled() -> bool:
        return False


@dataclass(frozen=True)
class RoutingState:
    """One placement as received from the controller (immutable; replaced as a whole)."""
    version: int
    placement: Any  # nodes.coordinator.Placement
    compression: dict[str, dict]  # endpoint -> CompressionSettings header
    stages: tuple[tuple[str, int, int], ...] = ()  # the plan's pipeline (endpoint, l0, l1); () = backbone here


class EntryService:
    def __init__(self, cfg: EntryConfig, delay_factory=None, ctx: zmq.Context | None = None):
        from coel_model.checkpoint import load_model
        from nodes.coordinator import RemoteExpertStub
        self.cfg = cfg
        self.delay_factory = delay_factory or (lambda: None)
        self.model = load_model(cfg.model_dir)
        mc = self.model.cfg
        for l in range(mc.n_layers):  # the experts live on the agents: hold no expert weights here
            for e in range(mc.n_experts):
                self.model.set_expert(l, e, RemoteExpertStub(l, e))
        self._tokenizer = None
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.keys: KeyDir | None = load_keys(cfg.keys_dir) if cfg.keys_dir else None
        self.tracer = None
        if cfg.trace_path:
            from common.tracing import TraceWriter
            self.tracer = TraceWriter(cfg.trace_path, cfg.name)
        self.inbox = HeldInbox(self.delay_factory())
        self.jobs: queue.Queue = queue.Queue()
        self._routing: RoutingState | None = None
        self._routing_cv = threading.Condition()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.counters: dict[str, int] = defaultdict(int)
        self.active = 0
        self.coords: list[Any] = []
        self._lock = threading.Lock()
        self.proc = psutil.Process()
        self.proc.cpu_percent()
        self._blocked: dict[str, float] = {}  # trace id -> monotonic time its step began waiting for a placement
        self.placement_updates = 0  # placements received after the first
        from nodes.metrics import EntryMetrics
        self.metrics = EntryMetrics(cfg.name, self.metrics_snapshot)
        self.http_front = None  # nodes.http_front.HttpFront when --http is given
        self.perception: dict | None = None  # nodes/perception.py report, sent with REGISTER

    # ---------------- routing state ----------------
    def apply_placement(self, body: dict) -> int:
        """Validate and swap in a PLACEMENT body; older versions are ignored. Returns the version in force."""
        from nodes.coordinator import Placement, _settings
        holders = {(int(l), int(e)): tuple(eps) for l, e, eps in body["holders"]}
        mc = self.model.cfg
        missing = [(l, e) for l in range(mc.n_layers) for e in range(mc.n_experts) if (l, e) not in holders]
        if missing:
            raise ConfigError(f"placement v{body['version']} names no holder for {len(missing)} experts, "
                              f"e.g. (layer, expert) {missing[:3]}")
        placement = Placement.of(holders)
        comp = {ep: dict(c) for ep, c in (body.get("compression") or {}).items()}
        for ep, c in comp.items():
            _settings(c)  # raises ConfigError naming the bad settings
        with self._routing_cv:
            if self._routing is not None and body["version"] <= self._routing.version:
                return self._routing.version
            if self._routing is not None:
                self.placement_updates += 1
            stages = tuple((str(ep), int(l0), int(l1)) for ep, l0, l1 in body.get("stages") or ())
            self._routing = RoutingState(int(body["version"]), placement, comp, stages)
            for coord in self.coords:
                self._install(coord, self._routing)
            self._routing_cv.notify_all()
        if self.tracer is not None:
            self.tracer.event("placement", version=int(body["version"]), experts=len(holders),
                              endpoints=sorted({ep for eps in holders.values() for ep in eps}),
                              compression=comp,  # endpoint -> settings now in force (fp32 where absent)
                              stages=[list(st) for st in self._routing.stages])
        return int(body["version"])

    @staticmethod
    def _install(coord: Any, rs: RoutingState) -> None:
        from nodes.coordinator import _settings
        coord.set_placement(rs.placement)
        coord.compression = {ep: _settings(c) for ep, c in rs.compression.items()}

    def routing_version(self) -> int:
        rs = self._routing
        return rs.version if rs is not None else -1

    def wait_routing(self, newer_than: int, timeout_s: float) -> bool:
        """Block until a placement with version > newer_than is in force (or timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._routing_cv:
            while self.routing_version() <= newer_than and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._routing_cv.wait(left)
        return self.routing_version() > newer_than

    # ---------------- main loop ----------------
    def stop(self) -> None:
        self._stop.set()
        with self._routing_cv:
            self._routing_cv.notify_all()

    def run(self) -> None:
        router = ctrl = pull = None
        auth = None
        workers: list[threading.Thread] = []
        try:
            if self.keys is not None:
                auth = start_authenticator(self.ctx, self.keys)
            router = bind_router(self.ctx, self.cfg.listen, self.keys, f"entry {self.cfg.name}")
            pull = self.ctx.socket(zmq.PULL)
            pull.linger = 0
            self._out_addr = f"inproc://entry-out-{id(self)}"
            pull.bind(self._out_addr)
            if self.cfg.perceive:
                from nodes.perception import perceive
                mc = self.model.cfg
                self.perception = perceive(self.model, (mc.d_model, mc.expert_hidden))
                if self.tracer is not None:
                    self.tracer.event("perception", **{k: v for k, v in self.perception.items() if k != "expert"})
            for i in range(self.cfg.workers):
                th = threading.Thread(target=self._worker, args=(i,), name=f"entry-worker-{i}", daemon=True)
                th.start()
                workers.append(th)
            if self.cfg.http:
                from nodes.http_front import HttpFront
                self.http_front = HttpFront(self, self.model.cfg, self.metrics)
                self.http_front.start(self.cfg.http)
            self.ready.set()
            self._loop(router, pull)
        finally:
            self._stop.set()
            if self.http_front is not None:
                self.http_front.stop()
            for _ in workers:
                self.jobs.put(STOP_JOB)
            for th in workers:
                th.join(5)
            if getattr(self, "_link", None) is not None:
                self._link.stop()
            for s in (router, pull):
                if s is not None:
                    s.close(linger=0)
            if auth is not None:
                auth.stop()
            if self.tracer is not None:
                self.tracer.close()
            self.ready.set()
            if self._own_ctx:
                self.ctx.term()

    def _register_body(self) -> dict[str, Any]:
        """What REGISTER carries (read from the link thread)."""
        return {"endpoint": self.cfg.listen, "memory_budget_bytes": 0, "pid": os.getpid(), "role": "entry",
                "workers": self.cfg.workers, "placement_version": self.routing_version(),
                **({"perception": self.perception} if self.perception else {})}

    def _start_link(self) -> None:
        """Warm up (kernels loaded: never compiled here, see coel_model.kernels), then register."""
        from coel_model import kernels
        from nodes.ctrllink import ControllerLink, LinkConfig
        kernels.status()
        self._link = ControllerLink(LinkConfig(self.cfg.controller, self.cfg.name, self.cfg.heartbeat_s,
                                               self.cfg.liveness), self.keys, self.ctx, self._register_body,
                                    self.stats, self.delay_factory).start()

    @staticmethod
    def _send_nb(sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # peer unreachable: the liveness counter notices

    def _loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        if self.cfg.controller:
            self._start_link()
        while not self._stop.is_set():
            events = dict(poller.poll(self.inbox.timeout_ms(100.0)))
            if events.get(pull):
                while True:
                    try:
                        frames = pull.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._send_nb(router, frames)
            if events.get(router):
                self._drain_router(router)
            for ident, envelope, msg in self.inbox.pop_ready():
                self._handle(router, envelope, msg)

    def _drain_router(self, router: zmq.Socket, max_msgs: int = 256) -> None:
        for _ in range(max_msgs):
            try:
                frames = router.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, rest = split_envelope(frames)
            ident = envelope[0]
            try:
                msg = P.decode(rest)
            except P.ProtocolError as exc:
                self.counters["malformed"] += 1
                self._send_nb(router, envelope + P.error_frames(exc.req_id, P.ErrorCode.MALFORMED, exc.reason,
                                                                self.cfg.name))
                continue
            if self.inbox.admit((ident, envelope, msg), lambda: peer_address(frames[0]) or msg.src, msg.sent_ns,
                                 msg.nbytes):
                self._handle(router, envelope, msg)

    def _handle(self, router: zmq.Socket, envelope: list[bytes], msg: P.Message) -> None:
        T = P.MsgType
        reply = lambda frames: self._send_nb(router, envelope + frames)  # noqa: E731
        try:
            if msg.type == T.GENERATE:
                self.counters["requests"] += 1
                self.jobs.put((envelope, msg, time.monotonic_ns(), "zmq"))
            elif msg.type == T.PLACEMENT:
                v = self.apply_placement(msg.body)
                reply(P.encode(T.OK, msg.req_id, {"version": v}, src=self.cfg.name))
            elif msg.type == T.STATUS:
                reply(P.encode(T.STATUS, msg.req_id, self.status(), src=self.cfg.name))
            elif msg.type == T.PROBE:
                reply(P.encode(T.PROBE, msg.req_id, {"echo": msg.body.get("echo")}, dict(msg.tensors),
                               src=self.cfg.name))
            elif msg.type == T.SHUTDOWN:
                reply(P.encode(T.OK, msg.req_id, {}, src=self.cfg.name))
                self.stop()
            else:
                reply(P.error_frames(msg.req_id, P.ErrorCode.UNSUPPORTED,
                                     f"{msg.type.name} is not a request an entry serves", self.cfg.name))
        except ConfigError as exc:
            reply(P.error_frames(msg.req_id, P.ErrorCode.MALFORMED, str(exc), self.cfg.name))
        except Exception as exc:  # the entry must outlive any bad request
            self.counters["internal_errors"] += 1
            reply(P.error_frames(msg.req_id, P.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", self.cfg.name))

    # ---------------- workers ----------------
    def _worker(self, idx: int) -> None:
        from nodes.coordinator import Coordinator, CoordinatorConfig
        torch.set_num_threads(self.cfg.threads)
        push = self.ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(self._out_addr)
        ccfg = CoordinatorConfig(call_timeout_s=self.cfg.call_timeout_s, layer_deadline_s=self.cfg.layer_deadline_s,
                                 name=self.cfg.name)
        coord = Coordinator(self.model, {}, self.keys, ccfg, delay=self.delay_factory(), ctx=self.ctx)
        coord.tracer = self.tracer
        routed = self._routed_model(coord)
        with self._routing_cv:
            if self._routing is not None:
                self._install(coord, self._routing)
            self.coords.append(coord)
        try:
            while True:
                job = self.jobs.get()
                if job is STOP_JOB or self._stop.is_set():
                    return
                target, msg, t_recv, api = job
                if isinstance(target, list):  # a ZeroMQ client's reply envelope; else a local sink
                    target = _WireSink(push, target, msg.req_id, self.cfg.name, msg.trace)
                with self._lock:
                    self.active += 1
                try:
                    self._serve(coord, self.metrics.wrap(target, api, t_recv), msg, t_recv, routed)
                finally:
                    with self._lock:
                        self.active -= 1
        finally:
            with self._routing_cv:
                self.coords.remove(coord)
            for ep in list(coord.socks):
                coord._reset_sock(ep)
            routed.close()
            push.close(linger=0)

    def _routed_model(self, coord: Any) -> Any:
        """This worker's decode model: the backbone here, or the plan's pipeline (nodes.pipeline)."""
        from nodes.pipeline import RoutedModel, StageClient
        from nodes.transport import endpoint_host
        host = endpoint_host(self.cfg.listen)
        host = "127.0.0.1" if host in ("*", "0.0.0.0") else host
        return RoutedModel(self.model, coord, lambda: self._routing.stages if self._routing is not None else (),
                           lambda: StageClient([], self.keys, self.ctx, host, self.delay_factory(),
                                               timeout_s=self.cfg.layer_deadline_s, name=self.cfg.name,
                                               tracer=self.tracer),
                           local_cache_bytes=4 * self.model.new_cache(self.model.cfg.max_seq_len).nbytes())

    def _prompt_ids(self, msg: P.Message) -> list[int]:
        """The request's prompt as token ids (generate checks them against the model)."""
        if "prompt" in msg.tensors:
            ids = msg.tensors["prompt"].tolist()  # a few hundred ints at most, once per request
        else:
            if self._tokenizer is None:
                from coel_model.evaluate import base_model_dir, find_tokenizer
                self._tokenizer = find_tokenizer(self.cfg.model_dir, base_model_dir(self.cfg.model_dir))
            ids = self._tokenizer.encode(msg.body["prompt_text"])
        if "max_prompt_tokens" in msg.body:
            ids = ids[:msg.body["max_prompt_tokens"]]
        return ids

    def _serve(self, coord: Any, sink: TokenSink, msg: P.Message, t_recv: int, routed: Any = None) -> None:
        """One request through coel_model.generate.generate, with `_step` as its step hook, on
        `routed` (the worker's RoutedModel: backbone here or the plan's stages) or the model."""
        from coel_model.generate import generate
        body = msg.body
        trace_id = msg.trace or uuid.uuid4().hex[:16]
        coord.trace_id = trace_id
        stats = {"retries": 0, "waited_s": 0.0}
        out: list[int] = []
        ok, err = False, None
        t_first = None
        prompt: list[int] = []
        replays_before = routed.replays if routed is not None else 0

        def on_token(i: int, tok: int) -> None:
            nonlocal t_first
            out.append(tok)
            if t_first is None:
                t_first = time.monotonic_ns()
            sink.token(i, tok)
            if sink.cancelled():
                raise RequestCancelled(f"cancelled by the client after {len(out)} token(s)")

        def done_info() -> dict[str, Any]:
            return {"new_tokens": len(out), "prompt_tokens": len(prompt), "retries": stats["retries"],
                    "waited_s": round(stats["waited_s"], 4), "placement_version": self.routing_version()}
        try:
            prompt = self._prompt_ids(msg)
            generate(routed or self.model, prompt, body["max_new_tokens"], temperature=float(body.get("temperature", 0.0)),
                     top_k=int(body.get("top_k", 0)), top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"),
                     stop_at_eos=bool(body.get("stop_at_eos", True)), executor=coord, observer=coord.observer,
                     on_token=on_token, step=lambda run: self._step(run, stats, trace_id))
            sink.done(done_info())
            ok = True
            self.counters["served"] += 1
        except RequestCancelled as exc:  # the sink asked to stop (client gone, or a stop string matched)
            ok = True
            self.counters["cancelled"] += 1
            sink.done({**done_info(), "cancelled": str(exc)})
        except (ConfigError, NoPlacement, RequestFailed) as exc:  # bad request / no placement yet / gave up
            err = str(exc)
            code = (P.ErrorCode.MALFORMED if isinstance(exc, ConfigError) else P.ErrorCode.BUSY
                    if isinstance(exc, NoPlacement) else P.ErrorCode.UNAVAILABLE)
            if isinstance(exc, RequestFailed):
                self.counters["failed"] += 1
            sink.error(code.value, err)
        except Exception as exc:  # a bug must fail this request only, never the service
            err = f"{type(exc).__name__}: {exc}"
            self.counters["failed"] += 1
            sink.error(P.ErrorCode.INTERNAL.value, err)
        finally:
            self._blocked.pop(trace_id, None)
            replays = 0
            if routed is not None:
                replays = routed.replays - replays_before
                routed.finish()
            if self.tracer is not None:
                attrs: dict[str, Any] = {"ok": ok, "prompt_tokens": len(prompt), "new_tokens": len(out),
                                         "retries": stats["retries"], "waited_s": round(stats["waited_s"], 4)}
                if replays:  # what a check against an unbroken run needs (greedy requests)
                    attrs.update(replays=replays, prompt_ids=prompt, tokens=list(out),
                                 temperature=float(body.get("temperature", 0.0)))
                if t_first is not None:
                    attrs["ttft_ms"] = round((t_first - t_recv) / 1e6, 3)
                if err:
                    attrs["error"] = err[:300]
                self.tracer.span(trace_id, "serve", t_recv, time.monotonic_ns(), **attrs)

    def _step(self, run: Callable[[], torch.Tensor], stats: dict, trace_id: str | None = None) -> torch.Tensor:
        """The entry's step hook: one forward pass (`run`); a request arriving before any placement
        waits for the first one; on an expert that no holder serves, wait for a new placement and
        retry. Bounded: after placement_wait_s without success the request fails with the last reason."""
        from nodes.coordinator import RemoteExpertError
        from nodes.stage import StageError
        from nodes.transport import NodeError
        if self._routing is None and not self.wait_routing(-1, self.cfg.first_placement_wait_s):
            raise NoPlacement(f"entry {self.cfg.name} has no expert placement from the controller after "
                              f"{self.cfg.first_placement_wait_s:.0f} s")
        first_fail = None
        while True:
            version = self.routing_version()
            try:
                logits = run()
                if first_fail is not None:
                    self._blocked.pop(trace_id, None)
                return logits
            except (RemoteExpertError, NodeError, StageError) as exc:  # StageError: even the replay missed
                now = time.monotonic()
                first_fail = first_fail or now
                self._blocked.setdefault(trace_id, first_fail)
                stats["retries"] += 1
                self.counters["step_retries"] += 1
                left = self.cfg.placement_wait_s - (now - first_fail)
                if left <= 0 or self._stop.is_set():
                    raise RequestFailed(f"entry {self.cfg.name}: gave up after {stats['retries']} attempt(s) in "
                                        f"{now - first_fail:.1f} s (placement v{version}): {exc}") from None
                if self.tracer is not None:
                    self.tracer.event("step_retry", trace_id=trace_id, placement_version=version,
                                      reason=str(exc)[:300])
                t0 = time.monotonic()
                # a new placement usually follows within ~1 s of a failure; retry anyway after a
                # short pause (a banned replica may be back, or the failure was transient)
                self.wait_routing(version, min(left, 0.5))
                stats["waited_s"] += time.monotonic() - t0

    # ---------------- in-process requests (nodes.serving) ----------------
    @property
    def model_dir(self) -> str:
        return self.cfg.model_dir

    def submit(self, req: GenerationRequest, sink: TokenSink, api: str = "local") -> None:
        """Queue a request on the same worker pool and decode path as the ZeroMQ clients'."""
        if self._stop.is_set():
            raise RequestFailed(f"entry {self.cfg.name} is stopping")
        msg = P.Message(P.MsgType.GENERATE, 0, req.body(),
                        {"prompt": torch.tensor(req.prompt_ids, dtype=torch.int64)}, trace=req.trace_id,
                        src=self.cfg.name)
        with self._lock:
            self.counters["requests"] += 1
        self.jobs.put((sink, msg, time.monotonic_ns(), api))

    def health(self) -> tuple[bool, str]:
        """(True, "serving") when a request could be served now, else (False, why not)."""
        if self._stop.is_set():
            return False, f"entry {self.cfg.name} is stopping"
        if not self.ready.is_set():
            return False, f"entry {self.cfg.name} is starting"
        rs = self._routing
        if rs is None:
            return False, f"entry {self.cfg.name} has no expert placement from the controller yet"
        blocked = dict(self._blocked)
        if blocked:
            since = min(blocked.values())
            return False, (f"re-deployment in progress: {len(blocked)} request(s) wait for a new placement "
                           f"(expert holders of placement v{rs.version} unreachable for "
                           f"{time.monotonic() - since:.1f} s)")
        return True, f"serving (placement v{rs.version})"

    def metrics_snapshot(self) -> dict[str, Any]:
        """What nodes.metrics reads at scrape time: per-peer expert traffic and the routing state."""
        peers: dict[str, dict[str, Any]] = {}
        failovers = 0
        for coord in list(self.coords):
            failovers += coord.failovers
            for ep, st in list(coord.peer_stats.items()):
                p = peers.setdefault(ep, {"calls": 0, "bytes_sent": 0, "bytes_received": 0, "rtt_ms": None})
                for k in ("calls", "bytes_sent", "bytes_received"):
                    p[k] += st[k]
                rtt = coord.chooser.rtt_ms.get(ep)
                if rtt is not None:
                    p["rtt_ms"] = rtt if p["rtt_ms"] is None else min(rtt, p["rtt_ms"])
        return {"peers": peers, "failovers": failovers, "step_retries": self.counters["step_retries"],
                "placement_updates": self.placement_updates, "placement_version": self.routing_version(),
                "blocked": len(self._blocked), "queued": self.jobs.qsize(), "healthy": self.health()[0]}

    # ---------------- reporting ----------------
    def stats(self) -> dict[str, Any]:
        rtt: dict[str, float] = {}
        failovers = 0
        for coord in list(self.coords):
            failovers += coord.failovers
            for ep, v in list(coord.chooser.rtt_ms.items()):
                rtt[ep] = round(min(v, rtt.get(ep, v)), 3)
        return {"role": "entry", "cpu_percent": self.proc.cpu_percent(), "rss_bytes": self.proc.memory_info().rss,
                "active": self.active, "queued": self.jobs.qsize(), "served": self.counters["served"],
                "failed": self.counters["failed"], "requests": self.counters["requests"],
                "failovers": failovers, "placement_version": self.routing_version(), "expert_rtt_ms": rtt,
                "t_ns": time.monotonic_ns()}

    def status(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "endpoint": self.cfg.listen, "role": "entry", "pid": os.getpid(),
                "protocol": P.PROTOCOL_VERSION, "stats": self.stats(), "counters": dict(self.counters)}


def serve_in_thread(cfg: EntryConfig, delay_factory=None) -> tuple[EntryService, threading.Thread]:
    """Start an entry service in a daemon thread (tests); waits until bound."""
    svc = EntryService(cfg, delay_factory)
    return svc, start_in_thread(svc.run, svc.ready, f"entry-{cfg.name}", timeout_s=30)


def add_entry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="server name (as in the topology)")
    p.add_argument("--listen", required=True, help="ROUTER endpoint to bind, e.g. tcp://10.0.0.4:7200")
    p.add_argument("--controller", default=None, help="controller endpoint to register and heartbeat with")
    p.add_argument("--model", required=True, help="checkpoint directory (the entry runs its backbone)")
    p.add_argument("--keys", default=None, help="CURVE key directory (default: plain text)")
    p.add_argument("--trace", default=None, help="append spans/events (JSONL)")
    p.add_argument("--workers", type=int, default=2, help="requests served concurrently")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    p.add_argument("--call-timeout-s", type=float, default=1.5, help="one expert call before failover")
    p.add_argument("--placement-wait-s", type=float, default=10.0,
                   help="how long a failing request waits for the controller's new placement")
    p.add_argument("--delay-file", default=None, help="emulated path delays (default $COEL_DELAY_FILE)")
    p.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP API and /health, /metrics here (docs/http-api.md)")
    p.add_argument("--no-perceive", dest="perceive", action="store_false",
                   help="do not measure the backbone and messages before registering (nodes/perception.py)")


def cmd_entry(args: argparse.Namespace) -> int:
    from nodes.delayqueue import delay_hook_from_env
    cfg = EntryConfig(name=args.name, listen=args.listen, model_dir=args.model, controller=args.controller,
                      keys_dir=args.keys, trace_path=args.trace, workers=args.workers, threads=args.threads,
                      heartbeat_s=args.heartbeat_s, call_timeout_s=args.call_timeout_s,
                      placement_wait_s=args.placement_wait_s, http=args.http, perceive=args.perceive)
    torch.set_num_threads(cfg.threads)
    svc = EntryService(cfg, lambda: delay_hook_from_env(args.delay_file))
    stop_on_signals(svc.stop)
    svc.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m nodes.entry ...` = `coel entry ...` (tests start it this way)."""
    ap = argparse.ArgumentParser(prog="nodes.entry")
    add_entry_args(ap)
    return cmd_entry(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

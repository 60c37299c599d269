"""The coordinator: the entry-server role that runs the backbone and scatters expert work.

Division of labour: the MoE model (coel_model.model) knows how to route and combine; the
`Placement` says which agents hold each (layer, expert); `ReplicaChooser` picks a holder by
measured latency (EWMA) and in-flight load and bans failing ones for a while; `Coordinator`
owns one DEALER per agent, sends every remote expert's token group concurrently, runs local
experts in place while the remote ones are in flight, fails over to another replica on timeout
or ERROR, and raises `RemoteExpertError` within a bounded time when nobody answers (never hangs).
Placement swaps are atomic between layer calls (one reference assignment), so a live migration
can switch routes while requests keep flowing.

The coordinator does not run a model of its own: it is the `ExpertExecutor` and supplies a
`ForwardObserver` to `MoEModel.forward` (through `coel_model.generate.generate`).
Trace spans (JSONL, monotonic ns): request, backbone, encode, wire (with the remote queue and
compute times as attrs; the agent writes remote_queue/remote_compute itself), decode,
local_compute, combine.
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
import zmq

from coel_model.errors import ConfigError
from coel_model.generate import StepHook, generate
from coel_model.model import ForwardObserver, MoEModel, Routing, expert_inputs
from nodes import protocol as P
from nodes.security import KeyDir, secure_client
from nodes.compression.codec import decode_activations
from nodes.transport import (DelayHook, HeldInbox, NodeError, send_frames,
                             endpoint_host, peer_address, recv_decoded)

LOCAL = "local"  # placement entry meaning "run on this server"

PlacementMap = Mapping[tuple[int, int], Iterable[str]]


def _settings(v: Any):
    """CompressionSettings from a settings object, a header dict or None."""
    from nodes.compression.settings import NONE, CompressionSettings
    if v is None:
        return NONE
    if isinstance(v, CompressionSettings):
        return v
    try:
        return CompressionSettings.from_header(v)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"compression settings {v!r}: {exc}") from None


class RemoteExpertError(NodeError):
    """No holder of an expert answered in time; carries every attempt."""


class RemoteExpertStub(nn.Module):
    """Stands in for an expert whose weights live on other servers: holds nothing."""

    nbytes = 0

    def __init__(self, layer: int, expert: int):
        super().__init__()
        self.layer, self.expert = layer, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RemoteExpertError(f"expert (layer {self.layer}, expert {self.expert}) is remote; "
                                f"run the model with the coordinator's executor")


@dataclass(frozen=True)
class Placement:
    """(layer, expert) -> holders (endpoints or LOCAL), validated and immutable."""
    holders: dict[tuple[int, int], tuple[str, ...]]

    @staticmethod
    def of(mapping: PlacementMap) -> "Placement":
        out = {}
        for key, eps in mapping.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ConfigError(f"placement key {key!r} must be (layer, expert)")
            eps = tuple(dict.fromkeys(eps))
            if not eps:
                raise ConfigError(f"placement of (layer {key[0]}, expert {key[1]}) lists no holder")
            for ep in eps:
                if ep != LOCAL and "://" not in ep:
                    raise ConfigError(f"placement of {key}: holder {ep!r} is not an endpoint or 'local'")
            out[(int(key[0]), int(key[1]))] = eps
        return Placement(out)

    def endpoints(self) -> set[str]:
        return {ep for eps in self.holders.values() for ep in eps if ep != LOCAL}


@dataclass(frozen=True)
class CoordinatorConfig:
    call_timeout_s: float = 2.0  # one attempt at one replica before failing over
    layer_deadline_s: float = 10.0  # bound on one layer's scatter/gather, all retries included
    ewma_alpha: float = 0.3  # weight of the newest RTT in the latency estimate
    ban_s: float = 5.0  # a replica that failed is avoided this long (Petals-style ban)
    default_rtt_ms: float = 1.0  # prior for replicas never measured
    name: str = "coordinator"
    trace_path: str | None = None

    def __post_init__(self) -> None:
        if self.call_timeout_s <= 0 or self.layer_deadline_s <= 0:
            raise ConfigError("call_timeout_s and layer_deadline_s must be > 0")
        if not 0 < self.ewma_alpha <= 1:
            raise ConfigError(f"ewma_alpha must be in (0, 1] (got {self.ewma_alpha})")


class ReplicaChooser:
    """Latency EWMA + in-flight count per endpoint; lowest ewma*(1+inflight) wins (ties: name)."""

    def __init__(self, alpha: float, ban_s: float, default_rtt_ms: float):
        self.alpha, self.ban_s, self.default = alpha, ban_s, default_rtt_ms
        self.rtt_ms: dict[str, float] = {}
        self.inflight: dict[str, int] = {}
        self.banned_until: dict[str, float] = {}

    def choose(self, holders: Iterable[str], exclude: set[str], now: float) -> str | None:
        cands = [h for h in holders if h not in exclude]
        if not cands:
            return None
        ok = [h for h in cands if self.banned_until.get(h, 0.0) <= now] or cands
        return min(ok, key=lambda h: (self.rtt_ms.get(h, self.default) * (1 + self.inflight.get(h, 0)), h))

    def observe(self, ep: str, rtt_ms: float) -> None:
        old = self.rtt_ms.get(ep)
        self.rtt_ms[ep] = rtt_ms if old is None else (1 - self.alpha) * old + self.alpha * rtt_ms

    def fail(self, ep: str, now: float) -> None:
        self.banned_until[ep] = now + self.ban_s


@dataclass
class _Call:
    expert: int
    x: torch.Tensor  # (n, d) float32
    tok: torch.Tensor | None = None  # (n,) token index of each row (for protected tokens)
    prefer: str | None = None  # replica chosen before pruning (its link's settings pruned this call)
    group: Any = None  # nodes.compression.CompressedGroup of the attempt in flight (merge map)
    tried: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, why it failed)
    endpoint: str = ""
    req_id: int = 0
    t_send_ns: int = 0
    deadline: float = 0.0


class Coordinator:
    """Runs the backbone of `model` and sends routed-expert work to agents per the placement.

    Not thread-safe (it owns ZeroMQ sockets): use one Coordinator per thread; several may share
    one read-only model.
    """

    def __init__(self, model: MoEModel, placement: PlacementMap | Placement, keys: KeyDir | None = None,
                 cfg: CoordinatorConfig | None = None, delay: DelayHook | None = None,
                 compression: Mapping[str, dict] | None = None, ctx: zmq.Context | None = None):
        self.model = model
        self.cfg = cfg or CoordinatorConfig()
        self.keys = keys
        self.ctx = ctx or zmq.Context.instance()
        self.inbox = HeldInbox(delay)
        self.compression = {ep: _settings(v) for ep, v in (compression or {}).items()}  # endpoint -> settings
        self.raw_bytes = 0  # what the same calls would carry as fp32 rows both ways, no compression
        self.pruned_assignments = 0
        self.chooser = ReplicaChooser(self.cfg.ewma_alpha, self.cfg.ban_s, self.cfg.default_rtt_ms)
        self.socks: dict[str, zmq.Socket] = {}
        self._by_sock: dict[zmq.Socket, str] = {}  # socket -> endpoint, kept with self.socks
        self.poller = zmq.Poller()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.failovers = 0
        self.peer_stats: dict[str, dict[str, int]] = {}  # endpoint -> calls, bytes_sent, bytes_received
        self._ids = itertools.count(1)
        self.trace_id: str | None = None
        self.tracer = None
        if self.cfg.trace_path:
            from common.tracing import TraceWriter
            self.tracer = TraceWriter(self.cfg.trace_path, self.cfg.name)
        self._placement = placement if isinstance(placement, Placement) else Placement.of(placement)
        self._spans = ForwardSpans(self)

    # ---------------- placement ----------------
    @property
    def placement(self) -> Placement:
        return self._placement

    def set_placement(self, placement: PlacementMap | Placement) -> None:
        """Atomic swap; the next layer call uses the new routes. Sockets open lazily."""
        self._placement = placement if isinstance(placement, Placement) else Placement.of(placement)

    def strip_remote_experts(self) -> int:
        """Replace experts with no LOCAL holder by weightless stubs; returns bytes freed."""
        freed = 0
        cfg = self.model.cfg
        for l in range(cfg.n_layers):
            for e in range(cfg.n_experts):
                if LOCAL not in self._placement.holders.get((l, e), ()):
                    m = self.model.expert(l, e)
                    if not isinstance(m, RemoteExpertStub):
                        freed += int(getattr(m, "nbytes", 0))
                        self.model.set_expert(l, e, RemoteExpertStub(l, e))
        return freed

    # ---------------- sockets ----------------
    def _sock(self, ep: str) -> zmq.Socket:
        s = self.socks.get(ep)
        if s is None:
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            secure_client(s, self.keys)
            s.connect(ep)
            self.socks[ep] = s
            self._by_sock[s] = ep
            self.poller.register(s, zmq.POLLIN)
        return s

    def _reset_sock(self, ep: str) -> None:
        s = self.socks.pop(ep, None)
        if s is not None:
            self._by_sock.pop(s, None)
            self.poller.unregister(s)
            s.close(linger=0)

    def close(self) -> None:
        for ep in list(self.socks):
            self._reset_sock(ep)
        if self.tracer is not None:
            self.tracer.close()

    def _span(self, name: str, t0: int, t1: int, **attrs: Any) -> None:
        if self.tracer is not None and self.trace_id:
            self.tracer.span(self.trace_id, name, t0, t1, **attrs)

    # ---------------- the executor ----------------
    def __call__(self, layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
        """ExpertExecutor: e -> output (n_e, d) for every expert in routing.groups."""
        placement = self._placement  # one snapshot per layer call
        outputs: dict[int, torch.Tensor] = {}
        local: list[int] = []
        inflight: dict[int, _Call] = {}
        start = time.monotonic()
        layer_deadline = start + self.cfg.layer_deadline_s
        prefer: dict[int, str] = {}
        for e in routing.groups:
            holders = placement.holders.get((layer, e))
            if not holders:
                raise RemoteExpertError(f"layer {layer} expert {e}: the placement names no holder "
                                        f"({len(placement.holders)} experts placed)")
            if LOCAL in holders:
                local.append(e)
            else:
                prefer[e] = self.chooser.choose(holders, set(), start)
        prot = self._prune(routing, h, prefer) if self.compression else {}
        xs = expert_inputs(routing, h)
        try:
            for e, x in xs.items():
                if e in local:
                    continue
                call = _Call(e, x, routing.groups[e][0], prefer[e])
                self._dispatch(layer, call, placement.holders[(layer, e)], inflight, layer_deadline, prot)
            if local:
                t0 = time.monotonic_ns()
                for e in local:
                    outputs[e] = self.model.expert(layer, e)(xs[e])
                self._span("local_compute", t0, time.monotonic_ns(), layer=layer, experts=local)
            while inflight:
                now = time.monotonic()
                wait_s = min(min(c.deadline for c in inflight.values()), layer_deadline) - now
                msgs = self._poll(max(0.0, wait_s)) if wait_s > 0 else []
                t_recv = time.monotonic_ns()  # arrival (after any emulated delay)
                for ep, msg in msgs:
                    call = inflight.get(msg.req_id)
                    if call is None or call.endpoint != ep:
                        continue  # a late answer to an abandoned attempt
                    del inflight[msg.req_id]
                    self.chooser.inflight[ep] -= 1
                    why = None
                    if msg.type == P.MsgType.EXPERT_REPLY and "y" in msg.tensors:
                        try:
                            outputs[call.expert] = self._finish(layer, call, msg, t_recv)
                        except (ValueError, RemoteExpertError) as exc:  # undecodable or mis-shaped
                            why = f"bad reply: {exc}"
                    else:
                        why = (f"{msg.body.get('code')}: {msg.body.get('reason', '')[:200]}"
                               if msg.type == P.MsgType.ERROR else f"unexpected {msg.type.name}")
                    if why is not None:
                        self._retry(layer, call, why, placement, inflight, layer_deadline, prot)
                now = time.monotonic()
                expired = {c.endpoint for c in inflight.values() if now >= c.deadline or now >= layer_deadline}
                for ep in expired:  # ban them all first so no retry lands on another silent one
                    self.chooser.fail(ep, now)
                for ep in sorted(expired):
                    # Lazy Pirate: recreate the socket (dropping what is queued to the silent peer) and
                    # move every call still waiting on it, not only the one that timed out
                    self._reset_sock(ep)
                    limit = min(self.cfg.call_timeout_s, self.cfg.layer_deadline_s)
                    for rid, call in [(r, c) for r, c in inflight.items() if c.endpoint == ep]:
                        del inflight[rid]
                        self.chooser.inflight[ep] -= 1
                        why = (f"no reply within {limit:.2f} s" if now >= call.deadline or now >= layer_deadline
                               else f"abandoned: {ep} went silent on another call")
                        self._retry(layer, call, why, placement, inflight, layer_deadline, prot)
        except BaseException:
            for call in inflight.values():  # keep the load estimate honest
                self.chooser.inflight[call.endpoint] -= 1
            raise
        return outputs

    def _prune(self, routing: Routing, h: torch.Tensor, prefer: dict[int, str]) -> dict[float, torch.Tensor]:
        """Apply each link's pruning to the experts bound for it (rewrites routing in place).

        Returns the protected-token masks by protect fraction, reused by fusion at dispatch.
        """
        from nodes.compression.pruning import prune_links
        by_settings: dict[Any, list[int]] = {}
        for e, ep in prefer.items():
            s = self.compression.get(ep)
            if s is not None and (s.prunes or s.fuses):
                by_settings.setdefault(s, []).append(e)
        if not by_settings:
            return {}
        before = sum(int(routing.groups[e][0].numel()) for e in prefer)
        prot = prune_links(routing, h, by_settings)
        self.pruned_assignments += before - sum(int(routing.groups[e][0].numel())
                                                for e in prefer if e in routing.groups)
        return prot

    def _dispatch(self, layer: int, call: _Call, holders: Iterable[str], inflight: dict[int, _Call],
                  layer_deadline: float, prot: dict[float, torch.Tensor]) -> None:
        now = time.monotonic()
        tried = {ep for ep, _ in call.tried}
        if call.prefer is not None and call.prefer not in tried and now < layer_deadline:
            ep = call.prefer
        else:
            ep = self.chooser.choose(holders, tried, now) if now < layer_deadline else None
        if ep is None:
            waited = now - (layer_deadline - self.cfg.layer_deadline_s)
            attempts = "; ".join(f"{e}: {why}" for e, why in call.tried) or "none"
            raise RemoteExpertError(
                f"layer {layer} expert {call.expert}: no holder answered ({len(call.tried)} attempt(s) "
                f"in {waited:.2f} s, holders {list(holders)}): {attempts}")
        t0 = time.monotonic_ns()
        body: dict[str, Any] = {"layer": layer, "expert": call.expert}
        s = self.compression.get(ep)
        call.group = None
        if s is not None and not s.is_identity:
            from nodes.compression.fusion import compress_group
            mask = prot.get(s.protect_top_frac)
            call.group = compress_group(call.x, s, None if mask is None or call.tok is None else mask[call.tok])
            tensors = call.group.wire.to_tensors("x")
            body["compression"] = s.to_header()
        else:
            tensors = {"x": call.x}
        rid = next(self._ids)
        frames = P.encode(P.MsgType.EXPERT_CALL, rid, body, tensors, trace=self.trace_id, src=self.cfg.name)
        t1 = time.monotonic_ns()
        nbytes = send_frames(self._sock(ep), frames)
        self.bytes_sent += nbytes
        ps = self.peer_stats.get(ep)
        if ps is None:
            ps = self.peer_stats[ep] = {"calls": 0, "bytes_sent": 0, "bytes_received": 0}
        ps["calls"] += 1
        ps["bytes_sent"] += nbytes
        self.raw_bytes += 2 * call.x.shape[0] * call.x.shape[1] * 4
        self.calls += 1
        if self.tracer is not None:  # no span arguments built when tracing is off
            self._span("encode", t0, t1, layer=layer, expert=call.expert, endpoint=ep, tokens=int(call.x.shape[0]))
        call.endpoint, call.req_id, call.t_send_ns = ep, rid, t1
        call.deadline = min(time.monotonic() + self.cfg.call_timeout_s, layer_deadline)
        self.chooser.inflight[ep] = self.chooser.inflight.get(ep, 0) + 1
        inflight[rid] = call

    def _retry(self, layer: int, call: _Call, why: str, placement: Placement, inflight: dict[int, _Call],
               layer_deadline: float, prot: dict[float, torch.Tensor]) -> None:
        call.tried.append((call.endpoint, why))
        self.chooser.fail(call.endpoint, time.monotonic())
        self.failovers += 1
        if self.tracer is not None:
            self.tracer.event("expert_call_failed", layer=layer, expert=call.expert, endpoint=call.endpoint,
                              reason=why, trace_id=self.trace_id)
        self._dispatch(layer, call, placement.holders.get((layer, call.expert), ()), inflight, layer_deadline,
                       prot)

    def _poll(self, wait_s: float) -> list[tuple[str, P.Message]]:
        """Replies that have arrived (after emulated delay) within wait_s; [] on timeout."""
        out = [(ep, m) for ep, m in self.inbox.pop_ready()]
        if out:
            return out
        events = self.poller.poll(self.inbox.timeout_ms(wait_s * 1e3))
        by_sock = self._by_sock
        for s, _ in events:
            ep = by_sock.get(s)
            if ep is None:
                continue
            for frames, msg in recv_decoded(s):
                self.bytes_received += msg.nbytes
                ps = self.peer_stats.get(ep)
                if ps is not None:
                    ps["bytes_received"] += msg.nbytes
                if self.inbox.admit((ep, msg), lambda: peer_address(frames[0], endpoint_host(ep)), msg.sent_ns,
                                    msg.nbytes):
                    out.append((ep, msg))
        return out + [(ep, m) for ep, m in self.inbox.pop_ready()]

    def _finish(self, layer: int, call: _Call, msg: P.Message, t_recv: int) -> torch.Tensor:
        t0 = time.monotonic_ns()
        y, _meta = decode_activations(msg.tensors, msg.body.get("compression"), "y")
        if call.group is not None:
            from nodes.compression.fusion import unmerge
            y = unmerge(y, call.group)
        t1 = time.monotonic_ns()
        rtt_ns = t_recv - call.t_send_ns
        q, c = msg.body["queue_ns"], msg.body["compute_ns"]
        self.chooser.observe(call.endpoint, rtt_ns / 1e6)
        if self.tracer is not None:
            self._span("wire", call.t_send_ns, t_recv, layer=layer, expert=call.expert, endpoint=call.endpoint,
                       rtt_ns=rtt_ns, remote_queue_ns=q, remote_compute_ns=c, net_ns=rtt_ns - q - c,
                       batch=msg.body.get("batch", 1), attempt=len(call.tried) + 1)
            self._span("decode", t0, t1, layer=layer, expert=call.expert)
        if y.shape != call.x.shape:
            raise RemoteExpertError(f"layer {layer} expert {call.expert}: {call.endpoint} returned "
                                    f"{tuple(y.shape)}, expected {tuple(call.x.shape)}")
        return y

    # ---------------- the request ----------------
    @property
    def observer(self) -> "ForwardSpans | None":
        """What MoEModel.forward reports its seams to: timing spans when tracing, else nothing."""
        return self._spans if self.tracer is not None else None

    def generate(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                 trace_id: str | None = None, on_token: Callable[[int, int], None] | None = None,
                 step: StepHook | None = None) -> list[int]:
        """coel_model.generate.generate with this executor and observer; one trace id and one
        `request` span per request."""
        self.trace_id = trace_id or uuid.uuid4().hex[:16]
        t_req = time.monotonic_ns()
        out: list[int] = []  # filled as tokens come, so a failed request's span counts what it produced

        def produced(i: int, tok: int) -> None:
            out.append(tok)
            if on_token is not None:
                on_token(i, tok)
        try:
            generate(self.model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, stop_at_eos=stop_at_eos, on_token=produced, executor=self,
                     observer=self.observer, step=step)
        finally:
            self._span("request", t_req, time.monotonic_ns(), prompt_tokens=len(prompt), new_tokens=len(out))
        return out


class ForwardSpans(ForwardObserver):
    """The coordinator's timing spans of one forward pass: `backbone` (embedding or the previous
    combine up to routing, per layer; layer -1 = final norm and lm_head) and `combine`."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        self.t_ns = 0  # end of the last span written
        self.t_experts_ns = 0
        self.n_tokens = 0

    def begin(self, n_tokens: int) -> None:
        self.n_tokens, self.t_ns = n_tokens, time.monotonic_ns()

    def routed(self, layer: int, routing: Routing) -> None:
        t = time.monotonic_ns()
        self.coord._span("backbone", self.t_ns, t, layer=layer, tokens=self.n_tokens)

    def experts_done(self, layer: int) -> None:
        self.t_experts_ns = time.monotonic_ns()

    def layer_done(self, layer: int) -> None:
        self.t_ns = time.monotonic_ns()
        self.coord._span("combine", self.t_experts_ns, self.t_ns, layer=layer)

    def end(self) -> None:
        self.coord._span("backbone", self.t_ns, time.monotonic_ns(), layer=-1, part="lm_head")

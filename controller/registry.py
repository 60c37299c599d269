"""The controller's registry thread: REGISTER/HEARTBEAT of agents and entries, answered at once
(their reconnect logic depends on it), and the controller's side of SWIM indirect probes.

One ROUTER on --listen (CURVE). Per peer it keeps a liveness record (controller.liveness) that
survives re-registrations: the heartbeat period the peer agreed in REGISTER and its gap history.
Verdicts are not made here: the main loop runs the policy on these records under `lock`; this
thread only records arrivals (liveness.heard) and passes notable ones to `notices`:
  ("registered" | "reregistered", role, name, restarted, t_ns)   restarted: a new process (pid)
  ("heard_again", role, name, False, t_ns)                        a lost peer spoke: on probation
  ("refuted", role, name, False, t_ns)                            a suspect's heartbeat arrived
Indirect probes: the main loop queues (helper agent, target endpoint, timeout) with
ask_indirect(); the request goes to the helper over its controller link (the DEALER whose
identity this ROUTER saw last) and the helper's PROBE_PEER answer lands in `peer_probe_results`.
The thread also measures its own lateness (poll overshoot) into `lags_s` (self-awareness).
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from coel_model.errors import ConfigError
from controller import liveness as L
from nodes import protocol as P
from nodes.background import ThreadedLoop
from nodes.security import KeyDir, secure_server
from nodes.transport import HeldInbox, peer_address

POLL_MS = 20


@dataclass
class Peer:
    name: str
    role: str  # "agent" | "entry"
    endpoint: str
    pid: int = 0
    registered_ns: int = 0
    stats: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)
    cpu_hist: list = field(default_factory=list)
    registers: int = 0
    ident: bytes = b""  # ROUTER identity of its controller link (for PROBE_PEER requests)
    live: L.PeerLiveness = field(default_factory=lambda: L.PeerLiveness(period_s=L.LivenessConfig().default_period_s))
    perception: dict = field(default_factory=dict)  # nodes/perception.py report (REGISTER, later a HEARTBEAT)

    @property
    def alive(self) -> bool:
        """Counted as a live server: alive or merely suspect (not lost, not on probation)."""
        return self.live.state in (L.ALIVE, L.SUSPECT)

    @property
    def last_seen_ns(self) -> int:
        return self.live.last_heard_ns


class Registry(ThreadedLoop):
    """ROUTER thread; shared state (`peers`) under `lock`."""

    thread_name = "registry"

    def __init__(self, listen: str, keys: KeyDir | None, ctx: zmq.Context, delay: Any = None,
                 lcfg: L.LivenessConfig | None = None):
        self.listen, self.keys, self.ctx = listen, keys, ctx
        self.lcfg = lcfg or L.LivenessConfig()
        self.inbox = HeldInbox(delay)
        self.lock = threading.Lock()
        self.peers: dict[tuple[str, str], Peer] = {}
        self.notices: queue.Queue = queue.Queue()
        self.peer_probe_results: queue.Queue = queue.Queue()  # (target, suspicion, helper, reached, rtt_ms)
        self.lags_s: collections.deque = collections.deque(maxlen=100)  # (t_ns, lateness s)
        self._outbox: queue.Queue = queue.Queue()
        self._pending_peer_probes: dict[int, tuple[str, int, str]] = {}  # req id -> (target, suspicion, helper)
        self._ids = itertools.count(1)
        super().__init__()

    # ---------------- for the main loop ----------------
    def ask_indirect(self, helper: str, target: str, suspicion: int, target_endpoint: str, timeout_s: float) -> bool:
        """Queue a PROBE_PEER to `helper` about `target`; False when the helper has no link to us."""
        with self.lock:
            p = self.peers.get(("agent", helper))
            if p is None or not p.ident or not p.alive:
                return False
            ident = p.ident
        self._outbox.put((ident, helper, target, suspicion, target_endpoint, timeout_s))
        return True

    def snapshot(self) -> dict[tuple[str, str], Peer]:
        with self.lock:
            return {k: replace(v, stats=dict(v.stats), cpu_hist=list(v.cpu_hist),
                               live=replace(v.live, gaps_s=list(v.live.gaps_s))) for k, v in self.peers.items()}

    # ---------------- the thread ----------------
    def _run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        secure_server(sock, self.keys)
        try:
            try:
                sock.bind(self.listen)
            except zmq.ZMQError as exc:
                self.error = ConfigError(f"controller: cannot bind --listen {self.listen}: {exc}")
                return
            finally:
                self.ready.set()
            while not self._stop.is_set():
                timeout = self.inbox.timeout_ms(POLL_MS)
                t_poll = time.monotonic()
                got = sock.poll(timeout)
                now = time.monotonic()
                if not got:  # a poll that timed out should wake on time: the overshoot is our own lateness
                    self.lags_s.append((time.monotonic_ns(), max(0.0, now - t_poll - timeout / 1e3)))
                if got:
                    while True:
                        try:
                            frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        ident = frames[0].bytes
                        try:
                            msg = P.decode(frames[1:])
                        except P.ProtocolError as exc:
                            self._send(sock, ident, P.error_frames(exc.req_id, P.ErrorCode.MALFORMED, exc.reason,
                                                                   "controller"))
                            continue
                        if self.inbox.admit((ident, msg), peer_address(frames[0]) or msg.src, msg.sent_ns,
                                            msg.nbytes):
                            self._handle(sock, ident, msg)
                for ident, msg in self.inbox.pop_ready():
                    self._handle(sock, ident, msg)
                self._flush_outbox(sock)
        finally:
            sock.close(linger=0)

    def _flush_outbox(self, sock: zmq.Socket) -> None:
        while True:
            try:
                ident, helper, target, suspicion, endpoint, timeout_s = self._outbox.get_nowait()
            except queue.Empty:
                return
            rid = next(self._ids)
            if len(self._pending_peer_probes) >= 1024:  # answers that never came (helper lost meanwhile)
                for old in sorted(self._pending_peer_probes)[:512]:
                    del self._pending_peer_probes[old]
            self._pending_peer_probes[rid] = (target, suspicion, helper)
            self._send(sock, ident, P.encode(P.MsgType.PROBE_PEER, rid, {"target": endpoint,
                                                                          "timeout_ms": round(timeout_s * 1e3, 1)},
                                             src="controller"))

    @staticmethod
    def _send(sock: zmq.Socket, ident: bytes, frames: list) -> None:
        try:
            sock.send_multipart([ident] + frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _handle(self, sock: zmq.Socket, ident: bytes, msg: P.Message) -> None:
        now = time.monotonic_ns()
        T = P.MsgType
        if msg.type == T.REGISTER:
            self._register(ident, msg.body, now)
            self._send(sock, ident, P.encode(T.OK, msg.req_id, {"registered": msg.body["name"]}, src="controller"))
        elif msg.type == T.HEARTBEAT:
            name = msg.body.get("name") or msg.src
            stats = msg.body.get("stats") or {}
            role = "entry" if stats.get("role") == "entry" else "agent"
            note = None
            with self.lock:
                p = self.peers.get((role, name))
                if p is not None:
                    p.ident = ident
                    p.stats = stats
                    if msg.body.get("perception"):  # measured again after a resource change
                        p.perception = dict(msg.body["perception"])
                    if "cpu_percent" in stats:
                        p.cpu_hist = (p.cpu_hist + [float(stats["cpu_percent"])])[-64:]
                    note = L.heard(p.live, now, self.lcfg)
            if note is not None:
                self.notices.put((note, role, name, False, now))
            self._send(sock, ident, P.encode(T.HEARTBEAT, msg.req_id, {"known": p is not None}, src="controller"))
        elif msg.type == T.PROBE_PEER:
            asked = self._pending_peer_probes.pop(msg.req_id, None)
            if asked is not None:
                self.peer_probe_results.put((*asked, bool(msg.body.get("reached")), msg.body.get("rtt_ms")))
        else:
            self._send(sock, ident, P.error_frames(msg.req_id, P.ErrorCode.UNSUPPORTED,
                                                   f"the controller's --listen takes REGISTER/HEARTBEAT/PROBE_PEER, "
                                                   f"not {msg.type.name}", "controller"))

    def _register(self, ident: bytes, b: dict, now: int) -> None:
        role = "entry" if b.get("role") == "entry" else "agent"
        key = (role, b["name"])
        pid = int(b.get("pid", 0))
        period = b.get("heartbeat_s")
        with self.lock:
            old = self.peers.get(key)
            if old is None:
                live = L.new_peer(period, now, self.lcfg)
                note = None
            else:  # the same record: agreed period and gap history survive the re-registration
                live = old.live
                if period:
                    live.period_s = float(period)
                if old.pid != pid:
                    live.new_process = True
                note = L.heard(live, now, self.lcfg)
            self.peers[key] = Peer(b["name"], role, b["endpoint"], pid, now, dict(old.stats) if old else {},
                                   list(b.get("shards", [])), list(old.cpu_hist) if old else [],
                                   (old.registers if old else 0) + 1, ident, live,
                                   dict(b.get("perception") or (old.perception if old else {})))
        restarted = old is not None and old.pid != pid
        self.notices.put(("registered" if old is None else "reregistered", role, b["name"], restarted, now))
        if note is not None:
            self.notices.put((note, role, b["name"], False, now))

"""The controller link of agents and entries: register, heartbeat, reconnect; one module for both.

Runs in its own thread with its own DEALER socket, so nothing the process does on its serving
path (expert compute, shard loading, a long torch call) can delay a heartbeat: the controller
convicted healthy servers whose heartbeats shared a loop with 4-second shard loads (issue 12).

  * REGISTER tells the controller the heartbeat period (`heartbeat_s`) this peer keeps, so the
    controller judges each peer by its own agreed pace (agents beat every 1 s while the controller
    expected 0.2 s: every link_up ended in flapping);
  * HEARTBEAT every heartbeat_s with the owner's stats; the controller answers each one, and says
    {"known": false} when it does not know us (it restarted, or we were dropped): we re-register;
  * no answer for `liveness` periods: close the socket (dropping the backlog queued towards a dead
    path) and register afresh on a new one; reconnects are spaced by a backoff that doubles from
    RECONNECT_INITIAL_S up to RECONNECT_MAX_S (any answer resets it), and heartbeats never pause;
  * PROBE_PEER from the controller (SWIM indirect probe): probe the named endpoint with a PROBE
    from a worker thread (its own sockets, CURVE like every client) and answer with the outcome,
    so the controller can tell "I cannot reach it" from "nobody can".
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from coel_model.errors import ConfigError
from nodes import protocol as P
from nodes.security import KeyDir, secure_client


@dataclass(frozen=True)
class LinkConfig:
    controller: str  # controller ROUTER endpoint (its --listen)
    name: str
    heartbeat_s: float = P.HEARTBEAT_INTERVAL_S
    liveness: int = P.HEARTBEAT_LIVENESS  # periods without a controller answer before reconnecting
    reconnect_initial_s: float = P.RECONNECT_INITIAL_S
    reconnect_max_s: float = P.RECONNECT_MAX_S

    def __post_init__(self) -> None:
        if "://" not in self.controller:
            raise ConfigError(f"{self.name}: controller endpoint {self.controller!r} must look like tcp://IP:PORT")
        if not 0 < self.heartbeat_s <= 10 or self.liveness < 1:
            raise ConfigError(f"{self.name}: heartbeat period must be in (0, 10] s and liveness >= 1 "
                              f"(got {self.heartbeat_s}, {self.liveness})")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ConfigError(f"{self.name}: need 0 < reconnect_initial_s <= reconnect_max_s")


class ControllerLink:
    """Registers `register_body()` and heartbeats `stats()` (both called from the link thread, so
    they must only read the owner's state) until stop()."""

    POLL_MS = 20.0  # upper bound on how late a heartbeat or an indirect-probe answer can go out

    def __init__(self, cfg: LinkConfig, keys: KeyDir | None, ctx: zmq.Context,
                 register_body: Callable[[], dict[str, Any]], stats: Callable[[], dict[str, Any]],
                 delay_factory: Callable[[], Any] | None = None):
        self.cfg, self.keys, self.ctx = cfg, keys, ctx
        self.register_body, self.stats = register_body, stats
        self.delay_factory = delay_factory or (lambda: None)
        self.counters = {"registers": 0, "heartbeats": 0, "reconnects": 0, "answers": 0, "peer_probes": 0,
                         "stats_errors": 0}
        self.registered = threading.Event()  # set once the controller answered a REGISTER
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_jobs: queue.Queue = queue.Queue()
        self._probe_done: queue.Queue = queue.Queue()
        self._prober: threading.Thread | None = None
        self._answered_register = False
        self._once: dict[str, Any] = {}  # body fields for the next heartbeat only (send_once)
        self._once_lock = threading.Lock()

    def send_once(self, key: str, value: Any) -> None:
        """Add a field to the next heartbeat's body (e.g. a new perception report)."""
        with self._once_lock:
            self._once[key] = value

    # ---------------- lifecycle ----------------
    def start(self) -> "ControllerLink":
        self._thread = threading.Thread(target=self._run, name=f"ctrl-link-{self.cfg.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._probe_jobs.put(None)
        for th in (self._thread, self._prober):
            if th is not None:
                th.join(5)

    # ---------------- the link thread ----------------
    def _socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = 16  # a short backlog while (re)connecting; older beats are worthless anyway
        secure_client(s, self.keys)
        s.connect(self.cfg.controller)
        return s

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        try:
            sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False  # not connected / queue full: the liveness count notices

    def _register(self, sock: zmq.Socket) -> None:
        self._answered_register = False
        body = dict(self.register_body())
        body.update(name=self.cfg.name, heartbeat_s=self.cfg.heartbeat_s)
        self.counters["registers"] += 1
        self._send(sock, P.encode(P.MsgType.REGISTER, 0, body, src=self.cfg.name))

    def _heartbeat_body(self) -> dict[str, Any]:
        try:
            stats = self.stats()
        except Exception:  # the owner's state changed under us (a load in flight): beat without stats
            self.counters["stats_errors"] += 1
            stats = {}
        with self._once_lock:
            once, self._once = self._once, {}
        return {"name": self.cfg.name, "stats": stats, **once}

    def _run(self) -> None:
        cfg = self.cfg
        sock = self._socket()
        self._register(sock)
        silent = 0  # heartbeat periods since the last answer
        backoff = cfg.reconnect_initial_s
        no_reconnect_before = 0.0
        next_hb = time.monotonic() + cfg.heartbeat_s
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if sock.poll(min(self.POLL_MS, max(0.0, (next_hb - now) * 1e3))):
                    while True:
                        try:
                            frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        silent, backoff = 0, cfg.reconnect_initial_s
                        self.counters["answers"] += 1
                        self._on_message(sock, frames)
                while True:  # indirect probes finished by the worker
                    try:
                        frames = self._probe_done.get_nowait()
                    except queue.Empty:
                        break
                    self._send(sock, frames)
                now = time.monotonic()
                if now < next_hb:
                    continue
                if silent >= cfg.liveness and now >= no_reconnect_before:
                    # controller silent: a fresh socket (the old one's backlog towards a dead path is
                    # dropped, and a new TCP connect does not wait out the old one's retransmission
                    # backoff) and a REGISTER; heartbeats go on meanwhile, so the controller never
                    # sees a gap of our making
                    self.counters["reconnects"] += 1
                    sock.close(linger=0)
                    sock = self._socket()
                    self._register(sock)
                    silent = 0
                    no_reconnect_before = now + backoff
                    backoff = min(backoff * 2, cfg.reconnect_max_s)
                if not self._answered_register and silent:  # the REGISTER went unanswered: again
                    self._register(sock)
                self._send(sock, P.encode(P.MsgType.HEARTBEAT, 0, self._heartbeat_body(), src=cfg.name))
                self.counters["heartbeats"] += 1
                silent += 1
                next_hb = max(next_hb + cfg.heartbeat_s, now)  # keep the grid after a late wake-up
        finally:
            sock.close(linger=0)

    def _on_message(self, sock: zmq.Socket, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError:
            return
        T = P.MsgType
        if msg.type == T.OK:  # the answer to REGISTER
            self._answered_register = True
            self.registered.set()
        elif msg.type == T.HEARTBEAT and msg.body.get("known") is False:
            self._register(sock)  # the controller does not know us (restarted, or dropped us)
        elif msg.type == T.PROBE_PEER:
            self._start_prober()
            self._probe_jobs.put(msg)

    # ---------------- indirect probes (SWIM) ----------------
    def _start_prober(self) -> None:
        if self._prober is None:
            self._prober = threading.Thread(target=self._probe_worker, name=f"peer-prober-{self.cfg.name}",
                                            daemon=True)
            self._prober.start()

    def _probe_worker(self) -> None:
        from nodes.transport import AgentClient, NodeError
        clients: dict[str, AgentClient] = {}
        try:
            while True:
                msg = self._probe_jobs.get()
                if msg is None or self._stop.is_set():
                    return
                target = msg.body["target"]
                timeout_s = float(msg.body.get("timeout_ms", 500)) / 1e3
                c = clients.get(target)
                if c is None:
                    c = clients[target] = AgentClient(target, self.keys, self.ctx, name=self.cfg.name,
                                                      delay=self.delay_factory())
                t0 = time.monotonic_ns()
                body: dict[str, Any] = {"target": target, "reached": False, "rtt_ms": None}
                try:
                    c.call(P.MsgType.PROBE, {"echo": 1}, timeout_s=timeout_s)
                    body.update(reached=True, rtt_ms=round((time.monotonic_ns() - t0) / 1e6, 3))
                except NodeError as exc:
                    body["error"] = str(exc)[:200]
                self.counters["peer_probes"] += 1
                self._probe_done.put(P.encode(P.MsgType.PROBE_PEER, msg.req_id, body, src=self.cfg.name))
        finally:
            for c in clients.values():
                c.close()

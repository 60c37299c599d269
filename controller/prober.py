"""The controller's probing threads.

Prober: adaptive RTT/goodput probes of every live agent (controller.monitor decides what they
mean). SuspectProber: the direct probe of a suspect peer (controller.liveness), one small PROBE
with a short timeout from its own thread and sockets, so a suspicion is settled in a few hundred
ms whatever the Prober is busy with.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

import zmq

from controller import monitor as M
from nodes import protocol as P
from nodes.background import ThreadedLoop
from nodes.security import KeyDir
from nodes.transport import AgentClient, NodeError, next_req_id


class Prober(ThreadedLoop):
    """Thread: adaptive probes to every live agent; results (name, t_ns, rtt_ms, full goodput or
    None, error, quick goodput) go to `results`. Each round: RTT + a quick payload; a full
    goodput payload follows only when `need_full(name, rtt, quick)` says so. Each agent has its
    own due time: probe_interval_s after its last round, or only probe_recheck_s when
    `suspect(name, rtt, goodput)` says the full sample looks changed (the confirmation of a
    drop comes ~0.2 s later; nothing extra is sent while nothing changes)."""

    thread_name = "prober"

    def __init__(self, registry: Any, keys: KeyDir | None, cfg: M.MonitorConfig, ctx: zmq.Context,
                 delay_factory: Any, payload_for: Any = None, suspect: Any = None, need_full: Any = None,
                 quick_for: Any = None):
        super().__init__()
        self.registry, self.keys, self.cfg, self.ctx = registry, keys, cfg, ctx
        self.delay_factory = delay_factory
        self.payload_for = payload_for or (lambda name: None)  # agent -> goodput payload bytes
        self.quick_for = quick_for or (lambda name: cfg.quick_probe_bytes)  # agent -> quick payload bytes
        self.suspect = suspect or (lambda name, rtt, gp: False)  # agent, full sample -> re-probe soon?
        self.need_full = need_full or (lambda name, rtt, quick: True)  # agent, quick sample -> full probe now?
        self.bytes_sent = 0  # probe payload bytes sent (each is echoed back: 2x on the wire)
        self.results: queue.Queue = queue.Queue()
        self.paused = threading.Event()

    def probe_once(self, client: AgentClient, payload_bytes: int | None = None) -> tuple[float, float]:
        """(RTT ms, goodput Mbit/s) of one small and one payload-carrying PROBE."""
        t0 = time.monotonic_ns()
        client.call(P.MsgType.PROBE, {"echo": 1}, timeout_s=self.cfg.probe_timeout_s)
        rtt = (time.monotonic_ns() - t0) / 1e6
        return rtt, self.payload_once(client, rtt, payload_bytes)

    def payload_once(self, client: AgentClient, rtt: float, payload_bytes: int | None = None) -> float:
        """Goodput (Mbit/s) of a packet pair: a PROBE carrying payload_bytes each way and a tiny
        PROBE sent right behind it. The lower of two estimates: the payload's round trip beyond the
        small RTT, and the pair's arrival dispersion at the agent (monitor.train_goodput_mbit)."""
        import numpy as np
        nb = payload_bytes or self.cfg.probe_bytes
        self.bytes_sent += nb
        rid_p, rid_q = next_req_id(), next_req_id()
        timeout_ms = self.cfg.probe_timeout_s * 1e3
        t1 = time.monotonic_ns()
        client.send(P.encode(P.MsgType.PROBE, rid_p, {"echo": 2}, {"payload": np.zeros(nb, np.uint8)},
                             src=client.name))
        client.send(P.encode(P.MsgType.PROBE, rid_q, {"echo": 3}, src=client.name))
        got: dict[int, tuple[P.Message, int]] = {}
        while len(got) < 2:
            left_ms = timeout_ms - (time.monotonic_ns() - t1) / 1e6
            m = client.recv(left_ms) if left_ms > 0 else None
            if m is None:
                # the agent answers small probes but not this payload in time: the path is at most this fast
                # (recording it lets the window fill, so the next payload is sized down instead of timing out again)
                client.reconnect()
                return M.goodput_mbit(0.0, timeout_ms, nb, self.cfg.min_transfer_ms)
            if m.req_id in (rid_p, rid_q):
                got[m.req_id] = (m, time.monotonic_ns())
        gp = M.goodput_mbit(rtt, (got[rid_p][1] - t1) / 1e6, nb, self.cfg.min_transfer_ms)
        rp, rq = got[rid_p][0].body.get("recv_ns"), got[rid_q][0].body.get("recv_ns")
        if isinstance(rp, int) and isinstance(rq, int) and (rq - rp) / 1e6 > self.cfg.min_transfer_ms:
            # a dispersion below min_transfer_ms measures nothing (a fast path): the round trip decides
            gp = min(gp, M.train_goodput_mbit(nb, (rq - rp) / 1e6, self.cfg.min_transfer_ms))
        return gp

    def _run(self) -> None:
        self.ready.set()
        clients: dict[str, AgentClient] = {}
        due: dict[str, float] = {}  # agent -> monotonic time of its next probe
        rechecks: dict[str, int] = {}  # agent -> quick re-probes in a row
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                peers = [p for p in self.registry.snapshot().values() if p.role == "agent" and p.alive
                         and due.get(p.name, now) <= now]
                if not peers or self.paused.is_set():
                    self._stop.wait(0.01)
                    continue
                for p in sorted(peers, key=lambda p: due.get(p.name, now)):
                    due[p.name] = time.monotonic() + self.cfg.probe_interval_s
                    c = clients.get(p.name)
                    if c is None or c.endpoint != p.endpoint:
                        if c is not None:
                            c.close()
                        c = clients[p.name] = AgentClient(p.endpoint, self.keys, self.ctx, name="controller",
                                                          delay=self.delay_factory())
                    try:
                        rtt, quick = self.probe_once(c, self.quick_for(p.name))
                        gp = None
                        if rechecks.get(p.name, 0) or self.need_full(p.name, rtt, quick):
                            gp = self.payload_once(c, rtt, self.payload_for(p.name))
                        self.results.put((p.name, time.monotonic_ns(), rtt, gp, None, quick))
                        # at most probe_window quick re-probes in a row: a link that keeps looking odd
                        # without a verdict (hovering at a threshold) goes back to the normal pace
                        if gp is not None and self.suspect(p.name, rtt, gp) and \
                                rechecks.get(p.name, 0) < self.cfg.probe_window:
                            rechecks[p.name] = rechecks.get(p.name, 0) + 1
                            due[p.name] = time.monotonic() + self.cfg.probe_recheck_s
                        else:
                            rechecks[p.name] = 0
                    except NodeError as exc:
                        self.results.put((p.name, time.monotonic_ns(), None, None, str(exc), None))
        finally:
            for c in clients.values():
                c.close()


def nominal_rates(topo: Any) -> dict[str, float]:
    """Bottleneck rate (Mbit/s) of the topology path controller -> each server (probe sizing, caps)."""
    from topologies import bottleneck_bw_mbit, shortest_path
    out = {}
    for s in topo.servers:
        path = shortest_path(topo, topo.controller.name, s.name)
        bw = bottleneck_bw_mbit(topo, path) if path else None
        if bw:
            out[s.name] = float(bw)
    return out


class SuspectProber:
    """Thread: direct PROBEs of suspects; results (name, suspicion id, reached, rtt_ms or None) go
    to `results`."""

    def __init__(self, keys: KeyDir | None, ctx: zmq.Context, delay_factory: Any):
        self.keys, self.ctx, self.delay_factory = keys, ctx, delay_factory
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> "SuspectProber":
        self._thread = threading.Thread(target=self._run, name="suspect-prober", daemon=True)
        self._thread.start()
        return self

    def probe(self, name: str, suspicion: int, endpoint: str, timeout_s: float) -> None:
        self.jobs.put((name, suspicion, endpoint, timeout_s))

    def stop(self) -> None:
        self.jobs.put(None)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        clients: dict[str, AgentClient] = {}
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                name, suspicion, endpoint, timeout_s = job
                c = clients.get(endpoint)
                if c is None:
                    c = clients[endpoint] = AgentClient(endpoint, self.keys, self.ctx, name="controller",
                                                        delay=self.delay_factory())
                t0 = time.monotonic_ns()
                try:
                    c.call(P.MsgType.PROBE, {"echo": 1}, timeout_s=timeout_s)
                    self.results.put((name, suspicion, True, round((time.monotonic_ns() - t0) / 1e6, 3)))
                except NodeError:
                    self.results.put((name, suspicion, False, None))
        finally:
            for c in clients.values():
                c.close()

"""The controller link (nodes.ctrllink) of a real in-process agent against a scripted controller:
heartbeats keep their pace while the agent's loop is busy for seconds, the period is told in
REGISTER, an unknown peer re-registers, and PROBE_PEER (SWIM indirect probe) is answered."""
from __future__ import annotations

import time

import pytest
import zmq

from nodes import protocol as P
from nodes.agent import Agent, AgentConfig, serve_in_thread
from nodes.local import free_port

pytestmark = pytest.mark.integration


def _ep() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class ScriptedController:
    """A ROUTER that answers REGISTER with OK and HEARTBEAT with {"known": known}; records arrivals."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.known = True
        self.seen: list[tuple[float, P.Message]] = []
        self.ident = b""

    def pump(self, seconds: float, until=None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            if self.sock.poll(20):
                ident, *frames = self.sock.recv_multipart()
                m = P.decode(frames)
                self.seen.append((time.monotonic(), m))
                self.ident = ident
                if m.type == P.MsgType.REGISTER:
                    self.sock.send_multipart([ident] + P.encode(P.MsgType.OK, m.req_id, {"registered": m.body["name"]}))
                elif m.type == P.MsgType.HEARTBEAT:
                    self.sock.send_multipart([ident] + P.encode(P.MsgType.HEARTBEAT, m.req_id, {"known": self.known}))

    def of(self, mtype):
        return [(t, m) for t, m in self.seen if m.type == mtype]

    def close(self):
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def ctl():
    c = ScriptedController()
    yield c
    c.close()


def _agent(ctl, period=0.05) -> tuple[Agent, object]:
    return serve_in_thread(AgentConfig(_ep(), 1 << 20, controller=ctl.endpoint, name="a1", heartbeat_interval_s=period))


def test_heartbeats_keep_their_pace_while_the_serving_loop_is_busy(ctl, monkeypatch):
    a, th = _agent(ctl)
    try:
        ctl.pump(0.5)
        reg = ctl.of(P.MsgType.REGISTER)[0][1]
        assert reg.body["heartbeat_s"] == 0.05 and reg.body["warmup_ms"] > 0  # period agreed; warm before ready

        def long_load(it):  # a 1.5 s shard load holding the GIL most of the time, like a real one
            end = time.monotonic() + 1.5
            x = 0
            while time.monotonic() < end:
                x += 1
            a._ok(it)
        monkeypatch.setattr(a, "_handle_control", long_load)
        client = ctl.ctx.socket(zmq.DEALER)
        client.linger = 0
        client.connect(a.cfg.endpoint)
        client.send_multipart(P.encode(P.MsgType.STATUS, 7))
        t0 = time.monotonic()
        ctl.pump(2.5, until=lambda: client.poll(0))
        assert client.poll(100), "the busy handler never answered"
        busy = [t for t, _ in ctl.of(P.MsgType.HEARTBEAT) if t >= t0]
        gaps = [b - a_ for a_, b in zip(busy, busy[1:])]
        assert len(busy) >= 20 and max(gaps) < 0.25, gaps  # 1.5 s of beats at 0.05 s, none late by 4 periods
        client.close()
    finally:
        a.stop()
        th.join(5)


def test_an_unknown_peer_registers_again(ctl):
    a, th = _agent(ctl)
    try:
        ctl.pump(0.3)
        ctl.known = False  # the controller restarted and forgot us
        ctl.pump(0.3)
        assert len(ctl.of(P.MsgType.REGISTER)) >= 2
    finally:
        a.stop()
        th.join(5)


def test_probe_peer_is_answered_with_reachability(ctl):
    a, th = _agent(ctl)
    b, thb = serve_in_thread(AgentConfig(_ep(), 1 << 20, name="b"))
    try:
        ctl.pump(0.3)
        for rid, target in ((11, b.cfg.endpoint), (12, _ep())):  # a live agent, then nobody
            ctl.sock.send_multipart([ctl.ident] + P.encode(P.MsgType.PROBE_PEER, rid, {"target": target,
                                                                                       "timeout_ms": 300}))
        ctl.pump(2.0, until=lambda: len(ctl.of(P.MsgType.PROBE_PEER)) >= 2)
        got = {m.req_id: m.body for _, m in ctl.of(P.MsgType.PROBE_PEER)}
        assert got[11]["reached"] is True and got[11]["rtt_ms"] > 0
        assert got[12]["reached"] is False and "no reply" in got[12]["error"]
    finally:
        for x, t in ((a, th), (b, thb)):
            x.stop()
            t.join(5)

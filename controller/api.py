"""The controller's control API: REQ/REP over an ipc:// socket in the run folder (so the
testbed runner in the root namespace reaches it), one CONTROL message per request
(nodes/protocol.py; ops in P.CONTROL_OPS), answered by OK {"result": ...} or ERROR.

    STATUS   -> {"state", "agents": {name: {...}}, "entries", "plan_summary", "redeployments", ...}
    PLAN     -> the current plan as JSON (coel-plan)
    SET_SLO  {"slo_class", "slo_ttft_ms"?, "slo_tpot_ms"?} -> {"ok": true, "classes": [...]}
    REPLAN   -> {"ok": true}: force a re-plan now
    SHUTDOWN -> {"ok": true}, then the controller exits

`ControlServer` runs the REP socket in its own thread and calls the handler the controller
gives it; `ControlClient` is what the runner, `coel inject` and tests use.
"""
from __future__ import annotations

from typing import Any, Callable

import zmq

from coel_model.errors import CoelError, ConfigError
from nodes import protocol as P
from nodes.background import ThreadedLoop


class ControlError(CoelError):
    """The controller answered ERROR, or did not answer in time."""


class ControlServer(ThreadedLoop):
    """REP socket on `endpoint`; handler(op, args) -> result (raise ConfigError for bad args)."""

    thread_name = "control-api"

    def __init__(self, endpoint: str, handler: Callable[[str, dict], Any], ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.handler = handler
        self.ctx = ctx or zmq.Context.instance()
        super().__init__()

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.REP)
        sock.linger = 0
        try:
            try:
                sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                self.error = ConfigError(f"control API: cannot bind {self.endpoint}: {exc}")
                return
            finally:
                self.ready.set()
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                try:
                    msg = P.decode(frames)
                    if msg.type != P.MsgType.CONTROL:
                        raise P.ProtocolError(f"control API takes CONTROL messages, got {msg.type.name}", msg.req_id)
                except P.ProtocolError as exc:
                    sock.send_multipart(P.error_frames(exc.req_id, P.ErrorCode.MALFORMED, exc.reason, "controller"))
                    continue
                try:
                    result = self.handler(msg.body["op"], msg.body.get("args") or {})
                    reply = P.encode(P.MsgType.OK, msg.req_id, {"result": result}, src="controller")
                except CoelError as exc:
                    reply = P.error_frames(msg.req_id, P.ErrorCode.MALFORMED, str(exc), "controller")
                except Exception as exc:  # the API must outlive a handler bug
                    reply = P.error_frames(msg.req_id, P.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}",
                                           "controller")
                try:
                    sock.send_multipart(reply)
                except (TypeError, ValueError) as exc:  # result not msgpack-able: still answer
                    sock.send_multipart(P.error_frames(msg.req_id, P.ErrorCode.INTERNAL, f"unencodable result: {exc}",
                                                       "controller"))
        finally:
            sock.close(linger=0)


class ControlClient:
    """REQ client (Lazy Pirate: a timed-out request closes and reopens the socket)."""

    def __init__(self, endpoint: str, timeout_s: float = 5.0, ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.ctx = ctx or zmq.Context.instance()
        self._ids = 0
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.sock.connect(self.endpoint)

    def call(self, op: str, timeout_s: float | None = None, **args: Any) -> Any:
        self._ids += 1
        self.sock.send_multipart(P.encode(P.MsgType.CONTROL, self._ids, {"op": op, "args": args}, src="control"))
        t = self.timeout_s if timeout_s is None else timeout_s
        if not self.sock.poll(int(t * 1000)):
            self.sock.close(linger=0)
            self._open()
            raise ControlError(f"controller at {self.endpoint}: no answer to {op} within {t:.1f} s")
        msg = P.decode(self.sock.recv_multipart(copy=False))
        if msg.type == P.MsgType.ERROR:
            raise ControlError(f"controller: {op} failed: {msg.body['code']}: {msg.body['reason']}")
        return msg.body.get("result")

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

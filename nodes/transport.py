"""Sockets around the wire protocol: a request client for one agent, and the delay hook.

Division of labour: `protocol` turns messages into frames and back; this module moves frames
(DEALER clients with CURVE, matching replies to requests by id, bounded waits) and, on kernels
without netem, holds each received message until its send time + the current one-way path delay
(`DelayHook`, implemented by nodes.delayqueue). Without a hook nothing is delayed.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Callable, Iterator, Protocol

import zmq

from coel_model.errors import CoelError, ConfigError
from nodes import protocol as P
from nodes.security import KeyDir, secure_client, secure_server


class DelayHook(Protocol):
    """Emulated link delay: absolute monotonic ns before which a received message is not seen."""

    def hold_until_ns(self, peer_addr: str, sent_ns: int, nbytes: int) -> int: ...


class NodeError(CoelError):
    """A remote node answered ERROR, or did not answer in time."""


class RemoteError(NodeError):
    def __init__(self, endpoint: str, code: str, reason: str):
        super().__init__(f"{endpoint}: {code}: {reason}")
        self.endpoint, self.code, self.reason = endpoint, code, reason


class NodeTimeout(NodeError):
    pass


def peer_address(frame: Any, fallback: str = "") -> str:
    """IP address of the peer that sent a zmq.Frame (libzmq 'Peer-Address'), else `fallback`."""
    try:
        return frame.get("Peer-Address") or fallback
    except (AttributeError, zmq.ZMQError):
        return fallback


def endpoint_host(endpoint: str) -> str:
    """'tcp://10.0.0.2:5555' -> '10.0.0.2'."""
    rest = endpoint.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0]


def send_frames(sock: zmq.Socket, frames: list[Any], flags: int = 0) -> int:
    """Send a message with copy=False: pyzmq then copies frames under its copy_threshold (64 KiB)
    itself, cheaply, and sends larger ones zero-copy (copy=True on a memoryview is ~3x slower)."""
    sock.send_multipart(frames, copy=False, flags=flags)
    return P.frames_nbytes(frames)


def split_envelope(frames: list[Any]) -> tuple[list[bytes], list[Any]]:
    """ROUTER frames -> (reply envelope, message frames): the peer identity, plus the empty
    delimiter of a REQ-style peer, which the reply must carry back."""
    envelope = [frames[0].bytes]
    rest = frames[1:]
    if rest and len(rest[0]) == 0:
        envelope.append(b"")
        rest = rest[1:]
    return envelope, rest


def recv_decoded(sock: zmq.Socket) -> Iterator[tuple[list[Any], P.Message]]:
    """Every message already waiting on `sock` (non-blocking) with its frames, decoded; a message
    that does not decode is skipped (garbage from a peer never becomes a reply)."""
    while True:
        try:
            frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = P.decode(frames)
        except P.ProtocolError:
            continue
        yield frames, msg


class HeldInbox:
    """Messages received but not yet 'arrived' under the emulated path delay (a min-heap)."""

    def __init__(self, hook: DelayHook | None):
        self.hook = hook
        self._heap: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()

    def admit(self, item: Any, peer: str | Callable[[], str], sent_ns: int, nbytes: int) -> bool:
        """True when `item` may be handled now; otherwise it is held until its release time.

        `peer` may be a callable: the peer address is only looked up when a delay hook exists.
        """
        if self.hook is None:
            return True
        release = self.hook.hold_until_ns(peer() if callable(peer) else peer, sent_ns, nbytes)
        if release <= time.monotonic_ns():
            return True
        heapq.heappush(self._heap, (release, next(self._seq), item))
        return False

    def pop_ready(self) -> list[Any]:
        now = time.monotonic_ns()
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def timeout_ms(self, default_ms: float) -> float:
        """Poll timeout so that the next held message is released on time (spin the last 0.2 ms)."""
        if not self._heap:
            return default_ms
        wait_ms = (self._heap[0][0] - time.monotonic_ns()) / 1e6
        return max(0.0, min(default_ms, wait_ms - 0.2))

    def __len__(self) -> int:
        return len(self._heap)


_req_ids = itertools.count(1)


def next_req_id() -> int:
    return next(_req_ids)


class AgentClient:
    """Request/reply client of one agent (for the controller, serve-local and tests).

    One DEALER socket; replies are matched to requests by id, so a late reply to an abandoned
    request is dropped instead of being taken for the answer to the next one. Not thread-safe.
    """

    def __init__(self, endpoint: str, keys: KeyDir | None = None, ctx: zmq.Context | None = None,
                 name: str = "client", delay: DelayHook | None = None,
                 server_public: bytes | None = None):
        self.endpoint = endpoint
        self.name = name
        self.ctx = ctx or zmq.Context.instance()
        self.keys = keys
        self.server_public = server_public
        self.inbox = HeldInbox(delay)
        self._host = endpoint_host(endpoint)
        self._ready: list[P.Message] = []  # released by the delay queue, not yet returned
        self._open()

    def _open(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        secure_client(self.sock, self.keys, self.server_public)
        self.sock.connect(self.endpoint)
        self.poller = zmq.Poller()  # kept: Socket.poll() builds a new Poller on every call
        self.poller.register(self.sock, zmq.POLLIN)

    def reconnect(self) -> None:
        """Drop the socket (and anything queued in it) and connect afresh (Lazy Pirate)."""
        self._ready.clear()
        self.sock.close(linger=0)
        self._open()

    def send(self, frames: list[Any]) -> int:
        return send_frames(self.sock, frames)

    def recv(self, timeout_ms: float) -> P.Message | None:
        """Next decoded message within timeout_ms (after any emulated delay), else None."""
        deadline = time.monotonic() + timeout_ms / 1e3
        inbox = self.inbox
        while True:
            if self._ready:
                return self._ready.pop(0)
            if len(inbox):
                ready = inbox.pop_ready()
                if ready:  # several may come due at once: keep the rest for the next recv
                    self._ready.extend(ready[1:])
                    return ready[0]
            left_ms = (deadline - time.monotonic()) * 1e3
            if left_ms <= 0:
                return None
            if self.poller.poll(inbox.timeout_ms(left_ms)):
                frames = self.sock.recv_multipart(copy=False)
                try:
                    msg = P.decode(frames)
                except P.ProtocolError:
                    continue  # garbage from a peer never becomes a reply
                if inbox.hook is None or inbox.admit(msg, lambda: peer_address(frames[0], self._host),
                                                     msg.sent_ns, msg.nbytes):
                    return msg

    def call(self, mtype: P.MsgType, body: dict | None = None, tensors: dict | None = None,
             timeout_s: float = 10.0, trace: str | None = None) -> P.Message:
        """Send one request and wait for its reply; ERROR -> RemoteError, silence -> NodeTimeout."""
        rid = next_req_id()
        self.sock.send_multipart(P.encode(mtype, rid, body, tensors, trace=trace, src=self.name), copy=False)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            msg = self.recv(max(0.0, left) * 1e3) if left > 0 else None
            if msg is None:
                self.reconnect()
                raise NodeTimeout(f"{self.endpoint}: no reply to {mtype.name} within {timeout_s:.1f} s")
            if msg.req_id != rid:
                continue
            if msg.type == P.MsgType.ERROR:
                raise RemoteError(self.endpoint, msg.body["code"], msg.body["reason"])
            return msg

    def close(self) -> None:
        self.sock.close(linger=0)


def bind_router(ctx: zmq.Context, endpoint: str, keys: KeyDir | None, owner: str) -> zmq.Socket:
    """The ROUTER an agent or entry serves on: a CURVE server when keys are given, messages bounded
    by the protocol's limits; a failed bind names its owner and endpoint."""
    r = ctx.socket(zmq.ROUTER)
    r.linger = 0
    r.maxmsgsize = P.MAX_MESSAGE_BYTES + P.MAX_HEADER_BYTES
    secure_server(r, keys)
    try:
        r.bind(endpoint)
    except zmq.ZMQError as exc:
        r.close()
        raise ConfigError(f"{owner}: cannot bind {endpoint}: {exc}") from None
    return r

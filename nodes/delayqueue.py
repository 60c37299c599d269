"""Receiver-side delay queue: our own emulation of link delay and jitter where the kernel has no
netem (see testbed/linkemu.py, mode "emulated").

The testbed writes, per host, run_dir/linkemu/<host>.json:
    {"mode": "emulated"|"netem", "host": "e1", "version": 3,
     "serialize_bw": false,
     "peers": {"10.0.0.2": {"host": "e2", "delay_ms": 5.0, "jitter_ms": 1.0, ...}, ...}}
with the one-way delay of the CURRENT path from each peer address to this host, replaced
atomically (temp + rename) when links or routes change. The transport stamps each message with
its send time (time.monotonic_ns(): all Mininet hosts share one kernel clock) and the receiver
holds it until `hold_until_ns(peer_ip, sent_ns, nbytes)`:
    sent + one-way delay + uniform jitter in [-jitter, +jitter]  (never before sent),
then FIFO per peer (a message never overtakes an earlier one from the same peer, like a link).
In "netem" mode the kernel already delayed the packets, so messages are delivered at once.
If "serialize_bw" is true (loopback runs with no HTB), a peer's "bw_mbit" also adds
nbytes*8/bw of serialization, queued behind the peer's earlier messages.

Pure apart from reading the file: time and randomness can be injected for tests.
"""
from __future__ import annotations

import heapq
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

SPIN_NS = 200_000            # last stretch before a deadline is busy-waited (sleep overshoots)
RELOAD_CHECK_NS = 20_000_000  # stat() the file at most every 20 ms


@dataclass
class PeerDelay:
    delay_ms: float
    jitter_ms: float = 0.0
    bw_mbit: float | None = None
    host: str = ""


class DelayTable:
    """The current one-way delays to this host, reloaded when the JSON file changes."""

    def __init__(self, path: str | os.PathLike | None, *, seed: int | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns,
                 reload_check_ns: int = RELOAD_CHECK_NS):
        self.path = os.fspath(path) if path is not None else None
        self.rng = random.Random(seed)
        self.clock_ns = clock_ns
        self.reload_check_ns = reload_check_ns
        self.mode = "none"
        self.version = -1
        self.serialize_bw = False
        self.peers: dict[str, PeerDelay] = {}
        self.last_error: str | None = None
        self._mtime_ns: int | None = None
        self._next_check_ns = 0
        self._last_deliver: dict[str, int] = {}
        self._busy_until: dict[str, int] = {}
        self.reload(force=True)

    # ---- file ----------------------------------------------------------------------------
    def reload(self, force: bool = False) -> bool:
        """Re-read the file if its mtime changed; returns True if the table changed.

        A missing file means no emulated delay; a malformed one keeps the previous table and
        records why in last_error (the writer replaces files atomically, so this is a bug)."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self._mtime_ns is not None
            self._mtime_ns, self.mode, self.peers = None, "none", {}
            return changed
        if not force and st.st_mtime_ns == self._mtime_ns:
            return False
        try:
            with open(self.path) as f:
                data = json.load(f)
            self._apply(data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.last_error = f"{self.path}: {exc}"
            return False
        self._mtime_ns = st.st_mtime_ns
        self.last_error = None
        return True

    def _apply(self, data: dict[str, Any]) -> None:
        peers = {}
        for ip, e in data.get("peers", {}).items():
            peers[ip] = PeerDelay(float(e["delay_ms"]), float(e.get("jitter_ms", 0.0)),
                                  float(e["bw_mbit"]) if e.get("bw_mbit") else None,
                                  str(e.get("host", "")))
        self.mode = str(data.get("mode", "emulated"))
        self.version = int(data.get("version", 0))
        self.serialize_bw = bool(data.get("serialize_bw", False))
        self.peers = peers

    def maybe_reload(self) -> None:
        now = self.clock_ns()
        if now >= self._next_check_ns:
            self._next_check_ns = now + self.reload_check_ns
            self.reload()

    # ---- delays --------------------------------------------------------------------------
    def lookup(self, peer_ip: str) -> PeerDelay | None:
        self.maybe_reload()
        return self.peers.get(peer_ip)

    def hold_until_ns(self, peer_ip: str, sent_ns: int, nbytes: int = 0) -> int:
        """When a message from peer_ip sent at sent_ns (monotonic) may be delivered."""
        self.maybe_reload()
        if self.mode != "emulated":
            return sent_ns
        p = self.peers.get(peer_ip)
        if p is None:  # unknown peer (e.g. loopback): no emulated path
            return sent_ns
        start = sent_ns
        if self.serialize_bw and p.bw_mbit:
            start = max(sent_ns, self._busy_until.get(peer_ip, 0))
            start += int(nbytes * 8 / (p.bw_mbit * 1e6) * 1e9)
            self._busy_until[peer_ip] = start
        d_ms = p.delay_ms
        if p.jitter_ms > 0:
            d_ms += self.rng.uniform(-p.jitter_ms, p.jitter_ms)
        deliver = start + max(0, int(d_ms * 1e6))
        deliver = max(deliver, self._last_deliver.get(peer_ip, 0))  # FIFO per peer
        self._last_deliver[peer_ip] = deliver
        return deliver


def sleep_until_ns(deadline_ns: int, spin_ns: int = SPIN_NS,
                   clock_ns: Callable[[], int] = time.monotonic_ns) -> int:
    """Sleep until deadline (monotonic ns): coarse sleep, then a short spin. Returns overshoot."""
    while True:
        now = clock_ns()
        left = deadline_ns - now
        if left <= 0:
            return -left
        if left > spin_ns:
            time.sleep((left - spin_ns) / 1e9)


def poll_timeout_ms(deadline_ns: int | None, spin_ns: int = SPIN_NS,
                    now_ns: int | None = None) -> int | None:
    """A zmq poll timeout that wakes early enough to spin to the deadline (None = forever)."""
    if deadline_ns is None:
        return None
    now = time.monotonic_ns() if now_ns is None else now_ns
    return max(0, int((deadline_ns - now - spin_ns) // 1_000_000))


@dataclass(order=True)
class _Held:
    deliver_ns: int
    seq: int
    peer_ip: str = field(compare=False)
    item: Any = field(compare=False)


class DelayQueue:
    """Messages held until their delivery time; for a transport's receive loop:
    push() on receipt, poll with poll_timeout_ms(next_deadline_ns()), then pop_ready()."""

    def __init__(self, table: DelayTable):
        self.table = table
        self._heap: list[_Held] = []
        self._seq = 0

    def push(self, peer_ip: str, sent_ns: int, nbytes: int, item: Any) -> int:
        deliver = self.table.hold_until_ns(peer_ip, sent_ns, nbytes)
        self._seq += 1
        heapq.heappush(self._heap, _Held(deliver, self._seq, peer_ip, item))
        return deliver

    def next_deadline_ns(self) -> int | None:
        return self._heap[0].deliver_ns if self._heap else None

    def pop_ready(self, now_ns: int | None = None) -> list[Any]:
        now = time.monotonic_ns() if now_ns is None else now_ns
        out = []
        while self._heap and self._heap[0].deliver_ns <= now:
            out.append(heapq.heappop(self._heap).item)
        return out

    def __len__(self) -> int:
        return len(self._heap)


def write_delay_file(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomically replace a delay file (temp file in the same folder + rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def delay_hook_from_env(path: str | None = None) -> DelayTable | None:
    """The emulated-delay table from `path` or $COEL_DELAY_FILE (the testbed sets it for every
    process it starts; $COEL_LINKEMU_FILE is accepted as an alias), else None. Agents, entries,
    the controller and clients all use it on receive."""
    path = path or os.environ.get("COEL_DELAY_FILE") or os.environ.get("COEL_LINKEMU_FILE")
    if not path:
        return None
    return DelayTable(path)

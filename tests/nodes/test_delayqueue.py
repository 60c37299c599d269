"""nodes/delayqueue: delay + jitter + FIFO per peer, reload on change, precise sleep (no root)."""
from __future__ import annotations

import os
import time

import pytest

from nodes.delayqueue import (
    DelayQueue, DelayTable, poll_timeout_ms, sleep_until_ns, write_delay_file,
)

MS = 1_000_000


def table_file(tmp_path, peers, mode="emulated", version=1, **extra):
    p = tmp_path / "e1.json"
    write_delay_file(p, {"mode": mode, "host": "e1", "version": version, "peers": peers, **extra})
    return p


def test_fixed_delay_and_unknown_peer(tmp_path):
    t = DelayTable(table_file(tmp_path, {"10.0.0.2": {"delay_ms": 7.5, "jitter_ms": 0}}))
    assert t.mode == "emulated"
    assert t.hold_until_ns("10.0.0.2", 1_000 * MS, 100) == 1_000 * MS + int(7.5 * MS)
    assert t.hold_until_ns("127.0.0.1", 5 * MS) == 5 * MS


def test_netem_mode_and_missing_file_deliver_at_once(tmp_path):
    t = DelayTable(table_file(tmp_path, {"10.0.0.2": {"delay_ms": 7.5}}, mode="netem"))
    assert t.hold_until_ns("10.0.0.2", 123) == 123
    t2 = DelayTable(tmp_path / "absent.json")
    assert t2.mode == "none" and t2.hold_until_ns("10.0.0.2", 123) == 123


def test_jitter_bounds_and_fifo(tmp_path):
    t = DelayTable(table_file(tmp_path, {"10.0.0.2": {"delay_ms": 10, "jitter_ms": 4}}), seed=1)
    delays, last = [], 0
    for i in range(2000):
        sent = i * 100_000  # 0.1 ms apart: far closer than the jitter, so FIFO must bite
        d = t.hold_until_ns("10.0.0.2", sent)
        assert d >= last, "a later message overtook an earlier one from the same peer"
        last = d
        delays.append((d - sent) / MS)
    assert min(delays) >= 6.0 - 1e-9
    assert max(delays) <= 14.0 + 0.2  # FIFO can add at most the spacing of a few messages
    # without FIFO pressure (messages far apart) the jitter spreads over [-4, 4] ms, mean ~0
    t = DelayTable(table_file(tmp_path, {"10.0.0.3": {"delay_ms": 10, "jitter_ms": 4}}), seed=2)
    spread = [(t.hold_until_ns("10.0.0.3", i * 100 * MS) - i * 100 * MS) / MS for i in range(2000)]
    assert min(spread) < 6.5 and max(spread) > 13.5
    assert sum(spread) / len(spread) == pytest.approx(10.0, abs=0.3)


def test_jitter_never_delivers_before_send(tmp_path):
    t = DelayTable(table_file(tmp_path, {"a": {"delay_ms": 1, "jitter_ms": 5}}), seed=3)
    for i in range(500):
        sent = i * 50 * MS
        assert t.hold_until_ns("a", sent) >= sent


def test_reload_on_change(tmp_path):
    now = [0]
    p = table_file(tmp_path, {"10.0.0.2": {"delay_ms": 5}})
    t = DelayTable(p, clock_ns=lambda: now[0], reload_check_ns=10 * MS)
    assert t.hold_until_ns("10.0.0.2", 0) == 5 * MS
    write_delay_file(p, {"mode": "emulated", "version": 2, "peers": {"10.0.0.2": {"delay_ms": 20}}})
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # mtime surely differs
    assert t.hold_until_ns("10.0.0.2", 1_000 * MS) == 1_005 * MS  # not re-checked yet
    now[0] = 11 * MS
    assert t.hold_until_ns("10.0.0.2", 2_000 * MS) == 2_020 * MS
    assert t.version == 2
    # a malformed file keeps the last good table and says why
    p.write_text("{not json")
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    now[0] = 30 * MS
    assert t.hold_until_ns("10.0.0.2", 3_000 * MS) == 3_020 * MS
    assert t.last_error and str(p) in t.last_error


def test_serialization_when_no_kernel_shaping(tmp_path):
    peers = {"p": {"delay_ms": 1, "bw_mbit": 8}}  # 8 Mbit/s = 1 byte per us
    t = DelayTable(table_file(tmp_path, peers, serialize_bw=True))
    a = t.hold_until_ns("p", 0, 1000)       # 1 ms tx + 1 ms delay
    b = t.hold_until_ns("p", 0, 1000)       # queued behind a: 2 ms tx end + 1 ms
    assert a == 2 * MS and b == 3 * MS


def test_delay_queue_orders_by_delivery(tmp_path):
    t = DelayTable(table_file(tmp_path, {"near": {"delay_ms": 1}, "far": {"delay_ms": 30}}))
    q = DelayQueue(t)
    q.push("far", 0, 10, "f1")
    q.push("near", 0, 10, "n1")
    q.push("near", 0, 10, "n2")
    assert q.next_deadline_ns() == 1 * MS
    assert q.pop_ready(0) == []
    assert q.pop_ready(2 * MS) == ["n1", "n2"]
    assert q.pop_ready(30 * MS) == ["f1"] and len(q) == 0 and q.next_deadline_ns() is None


def test_sleep_until_is_precise():
    overs = []
    for _ in range(20):
        deadline = time.monotonic_ns() + 2 * MS
        overs.append(sleep_until_ns(deadline))
        assert time.monotonic_ns() >= deadline
    overs.sort()
    assert overs[len(overs) // 2] < 0.5 * MS, overs  # median overshoot well under 0.5 ms


def test_poll_timeout():
    assert poll_timeout_ms(None) is None
    assert poll_timeout_ms(10 * MS, spin_ns=200_000, now_ns=0) == 9
    assert poll_timeout_ms(0, now_ns=5 * MS) == 0

"""Trace merge, Chrome export, phases, summary and plots from synthetic per-process traces."""
import json

import pytest

from testbed.report import build_report, percentile, phases_of, recovery_s, summary_table
from common.tracing import TraceWriter
from testbed.traces import merge, to_chrome

MS = 1_000_000


def _run(tmp_path, with_fault=True):
    raw = tmp_path / "raw"
    client = TraceWriter(raw / "client.jsonl", "c1")
    entry = TraceWriter(raw / "s1.jsonl", "s1")
    remote = TraceWriter(raw / "s2.jsonl", "s2")
    tb = TraceWriter(raw / "testbed.jsonl", "testbed")
    t = 1_000 * MS
    for i in range(30):
        t0 = t + i * 100 * MS
        slow = with_fault and 10 <= i < 20
        tpot = 40.0 if slow else 10.0
        ok = i != 12 or not with_fault
        tid = f"r{i}"
        entry.span(tid, "backbone", t0 + 1 * MS, t0 + 3 * MS)
        remote.span(tid, "remote_compute", t0 + 4 * MS, t0 + 6 * MS)
        entry.span(tid, "combine", t0 + 7 * MS, t0 + 8 * MS)
        client.span(tid, "request", t0, t0 + 50 * MS, ok=ok, ttft_ms=20.0, tpot_ms=tpot if ok else None,
                    prompt_tokens=16, new_tokens=8, **({} if ok else {"error": "timeout"}))
        tb.counter("link_bytes:s1-sw", 1000.0 * i, t0)
    if with_fault:
        tb.event("fault", t + 1000 * MS, kind="link_down", link="s2-sw")
        tb.event("fault", t + 2000 * MS, kind="link_up", link="s2-sw")
        tb.event("redeployment", t + 1500 * MS, trigger="link_down", detect_s=0.4, replan_s=0.01,
                 bytes_moved=1234, event_ns=t + 1000 * MS)
    for w in (client, entry, remote, tb):
        w.close()
    (tmp_path / "meta.json").write_text(json.dumps({"scenario": "synthetic", "emulation_mode": "emulated"}))
    return tmp_path


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_phases_and_summary(tmp_path):
    run = _run(tmp_path)
    summary = build_report(run)
    assert summary["requests"] == 30 and summary["lost_requests"] == 1
    assert set(summary["phases"]) == {"before", "during", "after"}
    assert summary["phases"]["during"]["tpot_ms"]["p50"] == 40.0
    assert summary["phases"]["before"]["tpot_ms"]["p50"] == 10.0
    assert summary["bytes_on_wire"] == 29000.0
    assert summary["emulation_mode"] == "emulated"
    (rd,) = summary["redeployments"]
    assert rd["trigger"] == "link_down" and rd["bytes_moved"] == 1234
    assert rd["recovery_s"] == pytest.approx(1.0, abs=0.11)
    for name in ("trace.json", "summary.csv", "summary.json", "spans.jsonl", "latency_over_time.png",
                 "latency_cdf.png", "bytes_per_link.png"):
        assert (run / name).stat().st_size > 0, name
    assert "during" in summary_table(summary)


def test_chrome_trace_has_every_event_kind(tmp_path):
    run = _run(tmp_path)
    build_report(run)
    doc = json.loads((run / "trace.json").read_text())
    phs = {e["ph"] for e in doc["traceEvents"]}
    assert {"M", "X", "s", "f", "i", "C"} <= phs
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"c1", "s1", "s2", "testbed"}
    failures = [e for e in doc["traceEvents"] if e["ph"] == "i" and e["cat"] == "failure"]
    assert failures and all(e["s"] == "g" for e in failures)


def test_no_fault_single_phase(tmp_path):
    run = _run(tmp_path, with_fault=False)
    summary = build_report(run)
    assert list(summary["phases"]) == ["before"] and summary["lost_requests"] == 0


def test_recovery_never():
    reqs = [{"t0_ns": 10, "t1_ns": 20, "attrs": {"ok": True, "tpot_ms": 50.0}}]
    assert recovery_s(reqs, 0, 10.0) is None
    assert recovery_s(reqs, 0, None) is None


def test_torn_last_line_is_skipped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"event":"x","host":"h","t_ns":1,"attrs":{}}\n{"event":"y","ho')
    tr = merge([p])
    assert len(tr.events) == 1
    assert to_chrome(tr)["traceEvents"]

"""The report's liveness audit: spurious detections, flaps and stable rejoins, from synthetic traces."""
from __future__ import annotations

import pytest

from testbed.report import isolation_intervals, liveness_audit
from common.tracing import TraceWriter
from testbed.traces import merge
from topologies import load_topology

pytestmark = pytest.mark.unit
S = 1_000_000_000


def _trace(tmp_path, events):
    raw = tmp_path / "raw"
    tb = TraceWriter(raw / "testbed.jsonl", "testbed")
    ctl = TraceWriter(raw / "ctl.jsonl", "ctl")
    for t, kind, attrs in events:
        (tb if kind == "fault" else ctl).event(kind, t, **attrs)
    tb.close()
    ctl.close()
    return merge(sorted(raw.glob("*.jsonl")))


def test_isolation_follows_link_state_and_crashes():
    topo = load_topology("edge-star-5")
    faults = [{"t_ns": 10 * S, "attrs": {"kind": "link_down", "link": "e2-hub"}},
              {"t_ns": 20 * S, "attrs": {"kind": "server_crash", "server": "e3"}},
              {"t_ns": 30 * S, "attrs": {"kind": "link_up", "link": ["e2", "hub"]}},
              {"t_ns": 35 * S, "attrs": {"kind": "bw", "link": "e4-hub", "bw_mbit": 1}}]
    iso = isolation_intervals(faults, topo, 100 * S)
    assert iso == {"e2": [[10 * S, 30 * S]], "e3": [[20 * S, 100 * S]]}


def test_audit_counts_spurious_verdicts_flaps_and_stable_rejoins(tmp_path):
    topo = load_topology("edge-star-5")
    tr = _trace(tmp_path, [
        (1 * S, "traffic_start", {}),
        (5 * S, "agent_lost", {"name": "e3"}),  # nothing cut e3 off: spurious
        (5 * S + S // 2, "agent_rejoined", {"name": "e3"}),
        (20 * S, "fault", {"kind": "link_down", "link": "e2-hub"}),
        (20 * S + S * 7 // 10, "agent_lost", {"name": "e2"}),
        (40 * S, "fault", {"kind": "link_up", "link": "e2-hub"}),
        (41 * S, "agent_rejoined", {"name": "e2"}),
        (41 * S + S * 8 // 10, "agent_lost", {"name": "e2"}),  # within the grace: caused, but a flap
        (47 * S, "agent_rejoined", {"name": "e2"}),
        (70 * S, "serving", {}),
    ])
    a = liveness_audit(tr, topo, 1 * S)
    assert a["spurious_detections"] == 1 and a["spurious"][0]["server"] == "e3"
    assert a["flaps"] == 1 and a["flap_list"][0]["t_s"] == 40.8
    (back,) = a["back"]
    assert back["server"] == "e2" and back["stayed_back"] is False and back["back_s"] is None


def test_audit_of_a_clean_run(tmp_path):
    topo = load_topology("edge-star-5")
    tr = _trace(tmp_path, [
        (1 * S, "traffic_start", {}),
        (20 * S, "fault", {"kind": "link_down", "link": "e2-hub"}),
        (20 * S + S * 7 // 10, "agent_lost", {"name": "e2"}),
        (40 * S, "fault", {"kind": "link_up", "link": "e2-hub"}),
        (41 * S, "agent_rejoined", {"name": "e2"}),
        (60 * S, "serving", {}),
    ])
    a = liveness_audit(tr, topo, 1 * S)
    assert (a["spurious_detections"], a["flaps"]) == (0, 0)
    assert a["back"][0]["back_s"] == 1.0 and a["back"][0]["stayed_back"]

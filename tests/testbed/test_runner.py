"""`coel run`: a short demo-like run in Mininet writes a complete run folder (trace.json with X
spans, flow s/f, global failure instants and C counters; summary.csv/json; the three plots), a
link-down shows in the traces, `coel inject` reaches the running testbed, and nothing is left
behind. Plus the input checks of scenarios and `coel inject` (no root needed)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.testbed.run_helpers import assert_clean, events_of, mininet_test, run, setup_dir

pytestmark = pytest.mark.timeout(300)


# ---- no root ---------------------------------------------------------------------------------
def test_event_from_dict_validates_like_scenarios():
    from coel_model.errors import ConfigError
    from testbed.faults import event_from_dict
    ev = event_from_dict({"kind": "bw", "link": ["e5", "hub"], "bw_mbit": 20})
    assert ev.kind == "bw" and ev.link == ("e5", "hub") and ev.bw_mbit == 20.0
    with pytest.raises(ConfigError, match="unknown fault kind 'explode'"):
        event_from_dict({"kind": "explode"})
    with pytest.raises(ConfigError, match="bw needs bw_mbit"):
        event_from_dict({"kind": "bw", "link": ["e5", "hub"]})
    with pytest.raises(ConfigError, match="bw_mbit=0 is out of range"):
        event_from_dict({"kind": "bw", "link": ["e5", "hub"], "bw_mbit": 0})
    with pytest.raises(ConfigError, match="unknown fields"):
        event_from_dict({"kind": "server_crash", "server": "e2", "bw_mbit": 3})
    with pytest.raises(ConfigError, match="slo needs"):
        event_from_dict({"kind": "slo", "slo_class": "interactive"})


def test_inject_refuses_a_run_that_is_not_running(tmp_path):
    from coel_model.errors import CoelError
    from testbed.runner import send_inject
    with pytest.raises(CoelError, match="not a run folder"):
        send_inject(tmp_path, {"kind": "server_crash", "server": "e2"})
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(CoelError, match="not in its traffic phase"):
        send_inject(tmp_path, {"kind": "server_crash", "server": "e2"})
    (tmp_path / "runner.pid").write_text("999999999\n")
    with pytest.raises(CoelError, match="is not running"):
        send_inject(tmp_path, {"kind": "server_crash", "server": "e2"})
    assert not (tmp_path / "inject.jsonl").exists()


def test_scenario_overrides_change_the_digest_and_late_events_are_refused():
    from coel_model.errors import ConfigError
    from testbed.runner import RunOptions, resolve_scenario
    from testbed.scenario import load_scenario
    sc = load_scenario("demo")
    st = resolve_scenario(sc, RunOptions(static=True))
    assert st.static and st.digest() != sc.digest()
    with pytest.raises(ConfigError, match="after the traffic ends"):
        resolve_scenario(sc, RunOptions(duration_s=5))


def test_bundled_scenarios_match_their_topologies():
    from testbed.scenario import SCENARIO_DIR, check_against_topology, load_scenario
    from topologies import load_topology
    names = sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))
    assert "demo" in names
    for n in names:
        sc = load_scenario(n)
        topo = load_topology(sc.topology)
        check_against_topology(sc, topo, n)
        entries = {c.entry for c in topo.clients}
        for ev in sc.events:  # an entry server's failure would lose its clients' requests by design
            if ev.kind == "link_down" or (ev.kind == "server_crash" and ev.process in (None, "entry")):
                target = ev.server or next((x for x in ev.link if x in {s.name for s in topo.servers}), None)
                assert target is None or target not in entries, f"{n}: {ev.kind} on entry server {target}"


# ---- Mininet ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tbrun")
    setup = setup_dir(tmp)
    injected: dict = {}

    def inject_later():
        from testbed.runner import send_inject
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            pids = list(Path(setup["out"]).glob("*/runner.pid"))
            if pids:
                time.sleep(8.0)  # while s3 is down (6..10 s): the phases stay those of the scenario
                try:
                    injected["result"] = send_inject(pids[0].parent, {"kind": "delay", "link": ["s4", "hub"],
                                                                      "delay_ms": 5.0})
                except Exception as exc:  # reported by the test below
                    injected["error"] = repr(exc)
                return
            time.sleep(0.2)

    th = threading.Thread(target=inject_later, daemon=True)
    th.start()
    res, log = run("tb-demo", setup, ["{at_s: 6, kind: link_down, link: [s3, hub]}",
                                      "{at_s: 10, kind: link_up, link: [s3, hub]}"], duration_s=13, drain_s=20)
    th.join(5)
    return res, log, injected


@mininet_test
def test_demo_like_run_writes_the_run_folder(demo_like):
    res, log, injected = demo_like
    run_dir = res.run_dir
    assert res.outcome == "completed" and res.error is None, (res.outcome, res.error, log[-3000:])
    for name in ("scenario.yaml", "scenario.json", "meta.json", "summary.json", "summary.csv", "trace.json",
                 "spans.jsonl", "latency_over_time.png", "latency_cdf.png", "bytes_per_link.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert run_dir.name.split("-")[-1] == json.loads((run_dir / "meta.json").read_text())["digest"]
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["emulation_mode"] in ("netem", "emulated") and meta["strategy"] == "coel"
    doc = json.loads((run_dir / "trace.json").read_text())
    phs = {e["ph"] for e in doc["traceEvents"]}
    assert {"X", "s", "f", "i", "C", "M"} <= phs, phs
    failures = [e for e in doc["traceEvents"] if e["ph"] == "i" and e.get("cat") == "failure"]
    assert any(e["name"] == "link_down" for e in failures) and all(e["s"] == "g" for e in failures)
    counters = {e["name"] for e in doc["traceEvents"] if e["ph"] == "C"}
    assert "link_bytes:s3-hub" in counters and "link_bytes:u1-hub" in counters
    ev = events_of(run_dir)
    faults = [e["attrs"] for e in ev if e["event"] == "fault"]
    assert [f["kind"] for f in faults if f["source"] == "scenario"] == ["link_down", "link_up"]
    assert all(f["ok"] for f in faults), faults
    # coel inject reached the running testbed and was recorded like a scheduled fault
    assert injected.get("result", {}).get("ok"), injected
    assert any(f["kind"] == "delay" and f["source"] == "inject" and f["link"] == ["s4", "hub"] for f in faults)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["requests"] >= 5 and s["lost_requests"] == 0, s
    assert s["bytes_per_link"]["u1-hub"] > 0 and s["bytes_on_wire"] > s["bytes_per_link"]["u1-hub"]
    assert {"before", "during", "after"} <= set(s["phases"])
    lines = (run_dir / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("trace_id,") and len(lines) == s["requests"] + 1
    down = next(f for f in s["fault_responses"] if f["kind"] == "link_down")
    assert down["target"] == "s3-hub" and down["detect_s"] is not None, down
    assert_clean(run_dir)


@mininet_test
def test_ctrl_c_stops_everything_and_still_reports(tmp_path):
    """`coel run` interrupted in its traffic phase: processes stopped, network gone, report built,
    outcome 'interrupted', the run folder on the last line."""
    import signal
    import subprocess
    import sys
    from tests.testbed.run_helpers import scenario_text
    setup = setup_dir(tmp_path)
    sc = tmp_path / "tb-interrupt.yaml"
    sc.write_text(scenario_text("tb-interrupt", setup, ["{at_s: 20, kind: server_crash, server: s2}"],
                                duration_s=40))
    p = subprocess.Popen([sys.executable, "-m", "coel", "run", str(sc), "--out", str(setup["out"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not list(Path(setup["out"]).glob("*/runner.pid")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        time.sleep(4.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    (run_dir,) = list(Path(setup["out"]).iterdir())
    assert out.strip().splitlines()[-1] == str(run_dir), (out[-1000:], err[-2000:])
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["outcome"] == "interrupted", meta.get("error")
    assert (run_dir / "summary.json").exists() and (run_dir / "trace.json").exists()
    assert not (run_dir / "runner.pid").exists()
    assert_clean(run_dir)


@mininet_test
def test_every_fault_kind_applies_in_a_run(tmp_path):
    """Each kind of event is really applied (recorded ok) in a running testbed; a crashed agent is
    noticed and its restart keeps running; the SLO change reaches the controller."""
    setup = setup_dir(tmp_path)
    res, log = run("tb-all-faults", setup, [
        "{at_s: 2, kind: cpu_squeeze, server: s3, cpu_share: 0.05}",
        "{at_s: 2.5, kind: mem_squeeze, server: s4, memory_mb: 64}",
        "{at_s: 3, kind: loss, link: [s4, hub], loss_pct: 1}",
        "{at_s: 3.5, kind: delay, link: [s4, hub], delay_ms: 3, jitter_ms: 0.5}",
        "{at_s: 4, kind: bw, link: [s4, hub], bw_mbit: 50}",
        "{at_s: 5, kind: restore, link: [s4, hub]}",
        "{at_s: 5.5, kind: slo, slo_class: interactive, slo_tpot_ms: 1500}",
        "{at_s: 6, kind: server_crash, server: s2, process: agent}",
        "{at_s: 9, kind: server_restart, server: s2}",
    ], duration_s=13)
    assert res.outcome == "completed", (res.outcome, res.error, log[-3000:])
    ev = events_of(res.run_dir)
    faults = [e["attrs"] for e in ev if e["event"] == "fault"]
    assert [f["kind"] for f in faults] == ["cpu_squeeze", "mem_squeeze", "loss", "delay", "bw", "restore", "slo",
                                           "server_crash", "server_restart"]
    bad = [f for f in faults if not f["ok"]]
    assert not bad, bad
    by = {f["kind"]: f for f in faults}
    assert sorted(by["restore"]["restored"]) == ["bw", "delay", "loss"]
    assert by["server_crash"]["killed"] == ["agent"] and by["server_restart"]["started"] == ["agent"]
    assert by["slo"]["reply"]["ok"] is True
    assert by["cpu_squeeze"]["cpu_share_before"] == 0.1
    s2 = res.meta["processes"]["s2-agent"]
    assert s2["starts"] == 2 and s2["returncode"] in (0, -15), s2  # alive until the runner stopped it
    names = [(e["event"], e["attrs"].get("name")) for e in ev if e["host"] == "ctl"]
    assert ("agent_lost", "s2") in names, names
    assert any(e["event"] in ("redeployment", "replan") and e["attrs"].get("trigger") == "slo_change" for e in ev)
    assert_clean(res.run_dir)


def test_coel_inject_cli_builds_the_event(monkeypatch, capsys):
    import testbed.runner as runner
    from coel.cli import main
    seen = []
    monkeypatch.setattr(runner, "send_inject", lambda run_dir, ev, wait_s: seen.append((run_dir, ev)) or
                        {"ok": True, "attrs": {"apply_ms": 1.0}})
    assert main(["inject", "RUN", "bw", "e5", "hub", "--bw-mbit", "20"]) == 0
    assert main(["inject", "RUN", "server_crash", "e2", "--process", "agent"]) == 0
    assert main(["inject", "RUN", "slo", "interactive", "--slo-tpot-ms", "200"]) == 0
    assert [ev for _, ev in seen] == [
        {"kind": "bw", "link": ["e5", "hub"], "bw_mbit": 20.0},
        {"kind": "server_crash", "server": "e2", "process": "agent"},
        {"kind": "slo", "slo_class": "interactive", "slo_tpot_ms": 200.0}]
    assert main(["inject", "RUN", "bw", "e5", "--bw-mbit", "20"]) == 2  # a link needs two names
    assert "needs a link" in capsys.readouterr().err

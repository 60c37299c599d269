"""Runtime tier 2: --static keeps the initial plan (monitors, never migrates), and a request that
needs a dead agent's expert fails with a clear ERROR within the entry's bounded wait."""
from __future__ import annotations

import time

import pytest

from tests.runtime_fixtures import generate_remote, make_setup, read_events, start_cluster, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_static_detects_but_never_migrates_and_fails_requests_clearly(tmp_path, procs):
    from controller.api import ControlClient
    setup = make_setup(tmp_path)
    info = start_cluster(procs, setup, static=True, extra_entry=["--placement-wait-s", "1.5"])
    st = wait_serving(info["control"], procs, timeout_s=90)
    assert st["static"] is True
    with ControlClient(info["control"]) as cc:
        plan0 = cc.call("PLAN")
    per = st["plan_summary"]["experts_per_server"]
    victim = max((s for s in per if s != "a1"), key=lambda s: (per[s], s))
    procs.kill(f"agent-{victim}")
    trace = info["raw"] / "ctl-controller.jsonl"
    deadline = time.monotonic() + 10
    ignored = []
    while time.monotonic() < deadline and not ignored:
        ignored = [e for e in read_events(trace) if e["event"] == "trigger_ignored"
                   and e["attrs"]["trigger"] == "agent_lost"]
        time.sleep(0.2)
    assert ignored, [e["event"] for e in read_events(trace)]
    with ControlClient(info["control"]) as cc:
        st = cc.call("STATUS")
        assert not st["agents"][victim]["alive"] and st["redeployments"] == 0
        assert cc.call("PLAN") == plan0
    # 40 tokens of routing over 2 layers x 8 experts reach one of the victim's 5+ experts
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="unavailable.*gave up"):
        generate_remote(info["entry"], setup["keys"], list(range(3, 40)), 60, timeout_s=30)
    assert time.monotonic() - t0 < 15
    assert not [e for e in read_events(trace) if e["event"] == "redeployment"]
    with ControlClient(info["control"]) as cc:  # SHUTDOWN answers, then the controller exits cleanly
        assert cc.call("SHUTDOWN") == {"ok": True}
    assert procs.procs["controller"].wait(10) == 0

"""Runtime tier 2: controller + 3 agents + an entry as real processes on loopback (CURVE on).

One cluster per module (start-up dominates: ~10-15 s on the shared 2-core machine); the tests
run in file order and the destructive one (kill an agent) comes last."""
from __future__ import annotations

import threading
import time

import pytest

from tests.runtime_fixtures import (Procs, generate_remote, make_setup, read_events, reference_tokens, start_cluster,
                              wait_serving)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PROMPT = [5, 17, 33, 2, 99, 100, 7, 8]


class ByteTokenizer:
    """Bytes as token ids: fits the tiny model's 256-token vocabulary, needs no tokenizer file."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    setup = make_setup(tmp)
    procs = Procs()
    try:
        from nodes.delayqueue import write_delay_file
        delay_file = tmp / "a3-delay.json"
        write_delay_file(delay_file, {"mode": "emulated", "host": "a3", "version": 1, "peers": {}})
        info = start_cluster(procs, setup, replan_interval_s=1.0, delay_files={"a3": str(delay_file)},
                             extra_ctl=["--probe-interval-s", "0.4"])
        info["a3_delay_file"] = delay_file
        info["status0"] = wait_serving(info["control"], procs, timeout_s=90)
        info.update(setup=setup, procs=procs)
        yield info
    finally:
        procs.stop_all()
        leftover = [n for n, p in procs.procs.items() if p.poll() is None]
        assert not leftover, f"processes still running: {leftover}"


def _ctl(info):
    from controller.api import ControlClient
    return ControlClient(info["control"], timeout_s=5.0)


def test_plan_spreads_experts_and_tokens_equal_single_process(cluster):
    st = cluster["status0"]
    assert st["state"] == "serving"
    assert set(st["agents"]) == {"a1", "a2", "a3"} and all(a["alive"] for a in st["agents"].values())
    used = st["plan_summary"]["experts_per_server"]
    assert len(used) >= 2, f"the tiny budgets should force an inter-server plan, got {used}"
    with _ctl(cluster) as cc:
        plan = cc.call("PLAN")
    toks, done = generate_remote(cluster["entry"], cluster["setup"]["keys"], PROMPT, 12)
    assert done["new_tokens"] == 12 and done["prompt_tokens"] == len(PROMPT)
    assert toks == reference_tokens(cluster["setup"]["model"], plan, PROMPT, 12)


def test_control_api_status_set_slo_and_bad_input(cluster):
    from controller.api import ControlError
    with _ctl(cluster) as cc:
        deadline = time.monotonic() + 5
        while True:  # heartbeats (0.2 s) report the shards' bytes; allow a re-registration to settle
            st = cc.call("STATUS")
            bad = [(n, a) for n, a in st["agents"].items() if n in st["plan_summary"]["experts_per_server"]
                   and not ((a["memory_used_bytes"] or 0) > 0 and a["shards"] > 0)]
            if not bad or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert not bad, bad
        for name, a in st["agents"].items():
            assert a["rtt_ms"] is not None and a["rtt_ms"] > 0, name
            assert a["goodput_mbit"] > 0, name
        assert st["entries"]["a1"]["alive"]
        assert cc.call("SET_SLO", slo_class="interactive", slo_tpot_ms=1500.0) == {"ok": True, "classes": ["u1"]}
        reqs = cc.call("STATUS")["requirements"]["classes"]
        assert reqs[0]["token_slo_ms"] == 1500.0
        with pytest.raises(ControlError, match="no request class 'nope'"):
            cc.call("SET_SLO", slo_class="nope", slo_tpot_ms=10)
        with pytest.raises(ControlError, match="must be a number > 0"):
            cc.call("SET_SLO", slo_class="u1", slo_tpot_ms=-3)
    # a prompt longer than the model's context gets a clear ERROR, and the entry keeps serving
    with pytest.raises(RuntimeError, match="max_seq_len"):
        generate_remote(cluster["entry"], cluster["setup"]["keys"], [1] * 120, 20)
    toks, _ = generate_remote(cluster["entry"], cluster["setup"]["keys"], PROMPT, 3)
    assert len(toks) == 3


def test_client_sends_heldout_text_the_entry_tokenizes(cluster):
    """Without a tokenizer the client sends prompt text; the entry cuts it to --prompt-tokens."""
    from nodes.client import ClientConfig, run_client
    trace = cluster["raw"] / "u9-client.jsonl"
    cfg = ClientConfig(name="u9", entry=cluster["entry"], rate_rps=6.0, prompt_tokens=10, max_new_tokens=4,
                       duration_s=1.0, drain_s=20.0, seed=3, keys_dir=cluster["setup"]["keys"], trace_path=str(trace),
                       slo_class="interactive")
    out = run_client(cfg)
    assert out["sent"] >= 1 and out["ok"] == out["sent"] and out["lost"] == 0, out
    from testbed.traces import merge
    reqs = merge([trace]).requests()
    assert len(reqs) == out["sent"]
    for r in reqs:
        a = r["attrs"]
        assert a["ok"] and a["prompt_tokens"] == 10 and a["new_tokens"] == 4 and a["class"] == "interactive"
        assert a["ttft_ms"] > 0 and a["tpot_ms"] > 0 and a["entry"] == "a1"


def test_scheduled_replan_with_nothing_changed_moves_nothing(cluster):
    ctl_trace = cluster["raw"] / "ctl-controller.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sched = [e for e in read_events(ctl_trace) if e["event"] in ("replan", "redeployment")
                 and "scheduled" in str(e["attrs"].get("reasons"))]
        if len(sched) >= 2:
            break
        time.sleep(0.3)
    assert len(sched) >= 2, "no scheduled re-plan within 30 s (interval 1 s)"
    assert all(e["event"] == "replan" and e["attrs"]["actions"] == 0 and e["attrs"]["bytes_moved"] == 0
               for e in sched), sched
    assert not [e for e in read_events(ctl_trace) if e["event"] == "redeployment"]
    with _ctl(cluster) as cc:
        assert cc.call("STATUS")["redeployments"] == 0


def test_bandwidth_drop_into_an_agent_is_observed_and_replanned(cluster):
    """The controller is not told: it sees the goodput of its probes to a3 fall ~100x."""
    from nodes.delayqueue import write_delay_file
    ctl_trace = cluster["raw"] / "ctl-controller.jsonl"
    t0 = time.monotonic_ns()
    write_delay_file(cluster["a3_delay_file"], {"mode": "emulated", "host": "a3", "version": 2, "serialize_bw": True,
                                                "peers": {"127.0.0.1": {"delay_ms": 0.0, "bw_mbit": 5.0}}})
    try:
        deadline = time.monotonic() + 20
        got = []
        while time.monotonic() < deadline and not got:
            got = [e for e in read_events(ctl_trace) if e["event"] in ("replan", "redeployment")
                   and e["attrs"]["trigger"] == "bw" and e["t_ns"] > t0]
            time.sleep(0.2)
        assert got, [e["event"] for e in read_events(ctl_trace) if e["t_ns"] > t0]
        deg = [e for e in read_events(ctl_trace) if e["event"] == "link_degraded" and e["t_ns"] > t0]
        assert deg[0]["attrs"]["server"] == "a3" and "goodput" in deg[0]["attrs"]["reason"]
        assert any("a3-hub" in r for r in got[0]["attrs"]["reasons"]), got[0]["attrs"]["reasons"]
        # the plan's compression of the entry-a3 pair was re-negotiated on the measured route (the
        # entries of this cluster run --no-compression: test_runtime_linkchange checks the push)
        if got[0]["event"] == "redeployment":
            assert [c["link"] for c in got[0]["attrs"]["compression_changes"]] == ["a1|a3"], got[0]["attrs"]
        toks, _ = generate_remote(cluster["entry"], cluster["setup"]["keys"], PROMPT, 4)  # still serving
        assert len(toks) == 4
    finally:
        write_delay_file(cluster["a3_delay_file"], {"mode": "emulated", "host": "a3", "version": 3, "peers": {}})


def test_killed_agent_is_detected_rehomed_and_no_request_is_lost(cluster):
    from nodes.client import ClientConfig, run_client
    with _ctl(cluster) as cc:
        per = cc.call("STATUS")["plan_summary"]["experts_per_server"]
    victim = max((s for s in per if s != "a1"), key=lambda s: (per[s], s))
    ccfg = ClientConfig(name="u1", entry=cluster["entry"], rate_rps=4.0, prompt_tokens=8, max_new_tokens=24,
                        duration_s=4.0, drain_s=30.0, seed=7, keys_dir=cluster["setup"]["keys"],
                        trace_path=str(cluster["raw"] / "u1-client.jsonl"), request_timeout_s=30.0)
    out: dict = {}
    th = threading.Thread(target=lambda: out.update(run_client(ccfg, tokenizer=ByteTokenizer())))
    th.start()
    time.sleep(1.5)
    t_kill = time.monotonic_ns()
    cluster["procs"].kill(f"agent-{victim}")
    th.join(90)
    assert not th.is_alive()
    assert out["sent"] >= 6 and out["lost"] == 0 and out["ok"] == out["sent"], out
    events = read_events(cluster["raw"] / "ctl-controller.jsonl")
    red = [e for e in events if e["event"] == "redeployment" and e["attrs"]["trigger"] == "agent_lost"]
    assert red, [e["event"] for e in events]
    a = red[0]["attrs"]
    assert (a["detected_ns"] - t_kill) / 1e9 < 1.5 and a["detect_s"] <= 1.2, a
    assert a["bytes_moved"] > 0 and a["failed_loads"] == 0 and not a["unplaced"]
    with _ctl(cluster) as cc:
        st = cc.call("STATUS")
        plan = cc.call("PLAN")
    assert not st["agents"][victim]["alive"]
    assert victim not in st["plan_summary"]["experts_per_server"]
    assert all(victim not in reps for row in plan["placement"] for reps in row)
    # later requests use the re-homed experts: same tokens as one process with the new bits
    toks, _ = generate_remote(cluster["entry"], cluster["setup"]["keys"], PROMPT, 10)
    assert toks == reference_tokens(cluster["setup"]["model"], plan, PROMPT, 10)

"""Runtime tier 2 (loopback, real processes, compression ON): a bandwidth drop into agent a3,
emulated by a3's delay file (serialize_bw: every message into a3 is held for its size at
5 Mbit/s), is noticed by the controller's probes alone; it re-negotiates the token compression
of the entry-a3 pair on the measured route, pushes it to the entry between decode steps
(nothing moves: bytes_moved 0), and loosens it again when the link recovers. A client runs
across both changes and loses no request."""
from __future__ import annotations

import threading
import time

import pytest

from tests.runtime_fixtures import Procs, make_setup, read_events, start_cluster, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s} s")


def test_bandwidth_drop_tightens_compression_and_recovery_loosens_it(tmp_path):
    from controller.api import ControlClient
    from controller.negotiation import DEFAULT_COSTS
    from nodes.client import ClientConfig, run_client
    from nodes.delayqueue import write_delay_file
    quality = {c.name: c.quality_nats for c in DEFAULT_COSTS}
    setup = make_setup(tmp_path)
    procs = Procs()
    delay_file = tmp_path / "a3-delay.json"
    write_delay_file(delay_file, {"mode": "emulated", "host": "a3", "version": 1, "peers": {}})
    try:
        info = start_cluster(procs, setup, delay_files={"a3": str(delay_file)}, compression=True,
                             extra_ctl=["--probe-interval-s", "0.3"])
        wait_serving(info["control"], procs, timeout_s=90)
        with ControlClient(info["control"], timeout_s=5.0) as cc:
            plan0 = cc.call("PLAN")
            agents = {n: a["endpoint"] for n, a in cc.call("STATUS")["agents"].items()}
        if "a1|a3" not in plan0["compression"]:
            pytest.skip(f"the plan sends no expert traffic from a1 to a3: {plan0['compression']}")
        c0 = plan0["compression"]["a1|a3"]["name"]
        ctl_trace = info["raw"] / "ctl-controller.jsonl"
        ccfg = ClientConfig(name="u1", entry=info["entry"], rate_rps=3.0, prompt_tokens=8, max_new_tokens=8,
                            duration_s=6.0, drain_s=30.0, seed=11, keys_dir=setup["keys"],
                            trace_path=str(info["raw"] / "u1-client.jsonl"), request_timeout_s=30.0)
        out: dict = {}
        th = threading.Thread(target=lambda: out.update(run_client(ccfg, tokenizer=ByteTokenizer())))
        th.start()
        time.sleep(1.0)
        t_drop = time.monotonic_ns()
        write_delay_file(delay_file, {"mode": "emulated", "host": "a3", "version": 2, "serialize_bw": True,
                                      "peers": {"127.0.0.1": {"delay_ms": 0.0, "bw_mbit": 5.0}}})

        def redeployed_after(t0):
            return [e for e in read_events(ctl_trace) if e["event"] == "redeployment" and e["t_ns"] > t0
                    and e["attrs"]["trigger"] == "bw" and e["attrs"].get("compression_changes")]
        red = _wait(lambda: redeployed_after(t_drop), 25, "re-deployment after the drop")[0]["attrs"]
        ch = {c["link"]: c for c in red["compression_changes"]}
        assert set(ch) == {"a1|a3"}, red["compression_changes"]  # only the pair whose route changed
        tight = ch["a1|a3"]["to"]
        assert ch["a1|a3"]["from"] == c0 and quality[tight] > quality[c0], ch
        assert ch["a1|a3"]["bw_mbit"] < 50, ch  # negotiated on the measured route, not the nominal 1000
        assert red["bytes_moved"] == 0 and red["action_kinds"] == {"set_compression": 1}, red
        assert any("a3-hub" in r for r in red["reasons"]) and any("compression" in r for r in red["reasons"]), red
        # the entry has the new setting for a3's endpoint in force
        entry_trace = info["raw"] / "a1-entry.jsonl"
        placed = _wait(lambda: [e for e in read_events(entry_trace) if e["event"] == "placement"
                                and e["attrs"]["version"] == red["placement_version"]], 5, "entry placement event")
        in_force = placed[-1]["attrs"]["compression"][agents["a3"]]
        want = {k: v for k, v in plan0["compression"]["a1|a3"].items() if k != "name"}
        with ControlClient(info["control"], timeout_s=5.0) as cc:
            now = cc.call("PLAN")["compression"]["a1|a3"]
        assert now["name"] == tight and in_force != {}
        assert in_force.get("prune_beta", 0.0) == now["prune_beta"] and in_force.get("fuse_threshold", 0.0) == \
            now["fuse_threshold"], (in_force, now, want)
        # recovery: the same rule on the recovered route loosens back
        t_up = time.monotonic_ns()
        write_delay_file(delay_file, {"mode": "emulated", "host": "a3", "version": 3, "peers": {}})
        rec = _wait(lambda: redeployed_after(t_up), 25, "re-deployment after the recovery")[0]["attrs"]
        back = {c["link"]: c for c in rec["compression_changes"]}["a1|a3"]
        assert back["from"] == tight and back["to"] == c0, rec["compression_changes"]
        th.join(90)
        assert not th.is_alive()
        assert out["sent"] >= 8 and out["lost"] == 0 and out["ok"] == out["sent"], out
    finally:
        procs.stop_all()
        leftover = [n for n, p in procs.procs.items() if p.poll() is None]
        assert not leftover, f"processes still running: {leftover}"

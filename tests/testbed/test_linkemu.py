"""testbed.linkemu without root: mode choice, TCLink parameters, iptables loss rules, delay files."""
from __future__ import annotations

import json

import pytest

from coel_model.errors import ConfigError, InfeasibleError
from nodes.delayqueue import DelayTable
from testbed import linkemu
from testbed.linkemu import LinkEmulator, choose_mode
from topologies import address_plan, load_topology, parse_topology
from topologies.schema import Link


def test_mode_registry_names_valid_choices(monkeypatch):
    with pytest.raises(ConfigError, match="valid: auto, netem, emulated"):
        choose_mode("tc")
    monkeypatch.setattr(linkemu, "_probe_cache", linkemu.NetemProbe(False, "qdisc kind is unknown"))
    assert choose_mode("auto") == "emulated"
    with pytest.raises(InfeasibleError, match="qdisc kind is unknown"):
        choose_mode("netem")
    monkeypatch.setattr(linkemu, "_probe_cache", linkemu.NetemProbe(True, "ok"))
    assert choose_mode("auto") == "netem"


def test_tclink_params_per_mode(tmp_path):
    link = Link("a", "b", bw_mbit=20, delay_ms=10, jitter_ms=2, loss_pct=1.5, queue_pkts=50)
    netem = LinkEmulator("netem", tmp_path).tclink_params(link)
    assert netem == {"bw": 20, "use_htb": True, "delay": "10ms", "jitter": "2ms", "loss": 1.5,
                     "max_queue_size": 50}
    emu = LinkEmulator("emulated", tmp_path).tclink_params(link)
    assert emu == {"bw": 20, "use_htb": True}  # no netem qdisc: the kernel has none
    unlimited = LinkEmulator("emulated", tmp_path).tclink_params(Link("a", "b", bw_mbit=None))
    assert unlimited["bw"] == 1000


def test_loss_rules_cover_switch_side_on_ingress(tmp_path):
    topo = parse_topology("""
name: t
servers: [{name: e1, memory_mb: 8}, {name: e2, memory_mb: 8}]
controller: {name: ctl}
switches: [{name: s1}]
links:
  - {a: e1, b: s1, loss_pct: 5}
  - {a: e1, b: e2, loss_pct: 20}
  - {a: ctl, b: s1}
""")
    emu = LinkEmulator("emulated", tmp_path)
    intf_of = {topo.link("e1", "s1").key: "x-eth0", topo.link("e1", "e2").key: "x-eth1"}
    rules = emu.loss_rules(topo, "e1", intf_of)
    stat5 = ["-m", "statistic", "--mode", "random", "--probability", "0.050000", "-j", "DROP"]
    stat20 = ["-m", "statistic", "--mode", "random", "--probability", "0.200000", "-j", "DROP"]
    # host-switch link: egress here, and ingress for the switch's direction (no iptables there);
    # host-host link: egress only (the other host drops its own egress)
    assert rules == [["-o", "x-eth0"] + stat5, ["-i", "x-eth0"] + stat5, ["-o", "x-eth1"] + stat20]
    assert emu.loss_rules(topo, "ctl", {topo.link("ctl", "s1").key: "c-eth0"}) == []


def test_delay_files_match_paths_and_feed_the_queue(tmp_path):
    topo = load_topology("edge-star-5")
    plan = address_plan(topo)
    emu = LinkEmulator("emulated", tmp_path / "linkemu")
    v = emu.write_delay_files(topo, plan)
    data = json.loads(emu.delay_file("e1").read_text())
    assert data["mode"] == "emulated" and data["version"] == v and data["host"] == "e1"
    e4 = data["peers"][plan.primary_ip("e4")]
    assert e4["host"] == "e4"
    assert e4["delay_ms"] == topo.link("e1", "hub").delay_ms + topo.link("e4", "hub").delay_ms
    table = DelayTable(emu.delay_file("e1"), seed=0)
    held = table.hold_until_ns(plan.primary_ip("e4"), 0) / 1e6
    assert abs(held - e4["delay_ms"]) <= e4["jitter_ms"]
    # a link change rewrites atomically with a new version; no temp files stay behind
    v2 = emu.write_delay_files(topo.with_link("e4", "hub", delay_ms=30.0), plan)
    data2 = json.loads(emu.delay_file("e1").read_text())
    assert v2 == v + 1 and data2["peers"][plan.primary_ip("e4")]["delay_ms"] == 32.0
    assert not list((tmp_path / "linkemu").glob("*.tmp*"))

"""Topology schema, loader errors (file + line + field), bundled files, path/route helpers.

Pure tests: no root, no Mininet; a malformed file never gets as far as building anything.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from coel_model.errors import ConfigError
from topologies import (
    address_plan, bottleneck_bw_mbit, bundled_topologies, load_topology, path_delay_ms,
    peer_delays, shortest_path, static_routes,
)
from topologies.paths import path_jitter_ms

GOOD = textwrap.dedent("""\
    name: t
    servers:
      - {name: e1, memory_mb: 8, cpu_share: 0.2}
      - {name: e2, memory_mb: 16}
    controller: {name: ctl}
    clients:
      - {name: u1, entry: e1, workload: {rate_rps: 1.0}}
    switches:
      - {name: s1}
    links:
      - {a: e1, b: s1, bw_mbit: 20, delay_ms: 10}
      - {a: e2, b: s1, bw_mbit: 50, delay_ms: 5}
      - {a: ctl, b: s1}
      - {a: u1, b: s1}
    """)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "topo.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_topology(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:"), msg
    return msg


def test_good_file_loads(tmp_path):
    t = load_topology(write(tmp_path, GOOD))
    assert [s.name for s in t.servers] == ["e1", "e2"]
    assert t.server("e2").cpu_share == 0.25  # default
    assert t.server("e1").memory_bytes == 8 * 2**20
    assert t.cgroup_memory_mb("e1") == 8 + 700
    assert t.client("u1").workload.rate_rps == 1.0
    assert t.client("u1").workload.prompt_tokens == 32
    assert t.link("s1", "e1").bw_mbit == 20
    assert t.kind("s1") == "switch" and t.kind("ctl") == "controller"


def test_unknown_key_names_line_and_field(tmp_path):
    bad = GOOD.replace("{a: e2, b: s1, bw_mbit: 50, delay_ms: 5}",
                       "{a: e2, b: s1, bw_mbit: 50, dealy_ms: 5}")
    msg = error_of(tmp_path, bad)
    assert ":12:" in msg and "links[1].dealy_ms" in msg and "unknown key" in msg, msg


def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, GOOD + "extra_thing: 3\n")
    assert ":15:" in msg and "extra_thing" in msg, msg


def test_negative_bandwidth(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("bw_mbit: 20", "bw_mbit: -20"))
    assert ":11:" in msg and "links[0].bw_mbit" in msg and "-20" in msg, msg


def test_bandwidth_above_htb_limit(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("bw_mbit: 20", "bw_mbit: 5000"))
    assert ":11:" in msg and "bw_mbit" in msg and "1000" in msg, msg


def test_dangling_link(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{a: u1, b: s1}", "{a: u1, b: s9}"))
    assert ":14:" in msg and "links[3].b" in msg and "'s9'" in msg and "dangling" in msg, msg


def test_server_without_memory(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{name: e2, memory_mb: 16}", "{name: e2}"))
    assert ":4:" in msg and "servers[1]" in msg and "memory_mb" in msg, msg


def test_wrong_types_and_ranges(tmp_path):
    assert "cpu_share" in error_of(tmp_path, GOOD.replace("cpu_share: 0.2", "cpu_share: 1.5"))
    assert "memory_mb" in error_of(tmp_path, GOOD.replace("memory_mb: 8", "memory_mb: eight"))
    assert "loss_pct" in error_of(tmp_path, GOOD.replace("delay_ms: 10", "delay_ms: 10, loss_pct: 100"))
    msg = error_of(tmp_path, GOOD.replace("rate_rps: 1.0", "rate_rps: 0"))
    assert ":7:" in msg and "clients[0].workload.rate_rps" in msg, msg


def test_client_entry_must_be_server(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("entry: e1", "entry: ctl"))
    assert ":7:" in msg and "entry" in msg and "'ctl'" in msg, msg


def test_duplicate_names_and_keys(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{name: e2, memory_mb: 16}", "{name: e1, memory_mb: 16}"))
    assert ":4:" in msg and "already used at line 3" in msg, msg
    msg = error_of(tmp_path, GOOD.replace("name: t\n", "name: t\nname: u\n"))
    assert ":2:" in msg and "duplicate key" in msg, msg


def test_l2_loop_rejected(tmp_path):
    text = GOOD.replace("  - {name: s1}\n", "  - {name: s1}\n  - {name: s2}\n  - {name: s3}\n")
    text += "  - {a: s1, b: s2}\n  - {a: s2, b: s3}\n  - {a: s3, b: s1}\n"
    msg = error_of(tmp_path, text)
    assert "L2 loop" in msg and ":19:" in msg and "s3-s1" in msg, msg


def test_host_twice_on_segment_rejected(tmp_path):
    text = GOOD.replace("  - {name: s1}\n", "  - {name: s1}\n  - {name: s2}\n")
    text += "  - {a: s1, b: s2}\n  - {a: e1, b: s2}\n"
    msg = error_of(tmp_path, text)
    assert "second link into the L2 segment" in msg and ":17:" in msg, msg


def test_disconnected_node_rejected(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  - {a: u1, b: s1}\n", ""))
    assert "'u1'" in msg and "not connected" in msg and ":7:" in msg, msg


def test_yaml_syntax_error_has_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("controller: {name: ctl}", "controller: {name: ctl"))
    assert "YAML syntax error" in msg, msg


def test_unknown_bundled_name_lists_choices():
    with pytest.raises(ConfigError, match="edge-star-5"):
        load_topology("no-such-topology")


@pytest.mark.parametrize("name", ["single-server", "edge-star-5", "edge-cloud-3tier", "metro-ring-8"])
def test_bundled_topologies_load_and_route(name):
    t = load_topology(name)
    plan = address_plan(t)
    routes = static_routes(t, plan)
    ips = {ip for h in t.hosts for ip in plan.ips(h)}
    assert len(ips) == sum(len(plan.ips(h)) for h in t.hosts), "duplicate IP"
    for h in t.hosts:  # every host reaches every other host's every address
        assert {r.dst_ip for r in routes[h]} == ips - set(plan.ips(h))
    for c in t.clients:
        assert shortest_path(t, c.name, c.entry) is not None


def test_bundled_set_and_default_constraints():
    assert {"single-server", "edge-star-5", "edge-cloud-3tier", "metro-ring-8"} <= set(bundled_topologies())
    t = load_topology()  # default
    assert t.name == "edge-star-5" and len(t.servers) == 5
    mem = sorted(s.memory_bytes for s in t.servers)
    from coel_model.checkpoint import load_config
    from pathlib import Path
    counts = load_config(Path(__file__).resolve().parents[2] / "models" / "tiny-moe").param_counts()
    fp16_bytes = 2 * counts["total"]
    assert mem[0] < fp16_bytes, "smallest server must not hold the bundled fp16 model alone"
    assert mem[-1] < fp16_bytes, "no server holds the fp16 model: inter-server cooperation is needed"
    assert sum(mem) >= 2 * counts["experts"] + 2 * counts["backbone"], \
        "the servers together must hold the model at fp16"
    assert all(c.workload.max_loss_nats is not None for c in t.clients), "every class has a quality floor"
    cloud = load_topology("edge-cloud-3tier")
    assert any(s.kind == "cloud" for s in cloud.sites)


def test_path_helpers_star():
    t = load_topology("edge-star-5")
    p = shortest_path(t, "e1", "e4")
    assert p == ["e1", "hub", "e4"]
    assert path_delay_ms(t, p) == t.link("e1", "hub").delay_ms + t.link("e4", "hub").delay_ms
    assert bottleneck_bw_mbit(t, p) == min(t.link("e1", "hub").bw_mbit, t.link("e4", "hub").bw_mbit)
    assert path_jitter_ms(t, p) == pytest.approx(t.link("e4", "hub").jitter_ms)


def test_ring_reroutes_after_link_down():
    t = load_topology("metro-ring-8")
    p = shortest_path(t, "m1", "m2")
    assert p == ["m1", "r1", "r2", "m2"]
    down = t.with_link("r1", "r2", up=False)
    p2 = shortest_path(down, "m1", "m2")
    assert p2[:3] == ["m1", "r1", "r8"] and p2[-2:] == ["r2", "m2"]
    assert path_delay_ms(down, p2) > path_delay_ms(t, p)
    # routes and delays follow the new path
    plan = address_plan(down)
    r = {x.dst_ip: x for x in static_routes(down, plan)["r1"]}
    r8_ip_on_r1_link = next(i.ip for i in plan.ifaces["r8"] if "r1" in (i.link.a, i.link.b))
    assert r[plan.primary_ip("m2")].via_ip == r8_ip_on_r1_link
    d = peer_delays(down, plan)["m1"][plan.primary_ip("m2")]
    assert d["delay_ms"] == pytest.approx(path_delay_ms(down, p2)) and d["host"] == "m2"


def test_no_transit_through_servers():
    """A multi-homed server must not become a shortcut between routers."""
    text = textwrap.dedent("""\
        name: t
        servers: [{name: e1, memory_mb: 8}, {name: e2, memory_mb: 8}]
        controller: {name: ctl}
        routers: [{name: r1}, {name: r2}]
        links:
          - {a: e1, b: r1, delay_ms: 1}
          - {a: e1, b: r2, delay_ms: 1}
          - {a: r1, b: r2, delay_ms: 50}
          - {a: e2, b: r2, delay_ms: 1}
          - {a: ctl, b: r1, delay_ms: 1}
        """)
    from topologies import parse_topology
    t = parse_topology(text)
    assert shortest_path(t, "ctl", "e2") == ["ctl", "r1", "r2", "e2"]
    assert shortest_path(t, "e1", "e2") == ["e1", "r2", "e2"]  # e1 itself may use either link
    isolated = t.with_link("r1", "r2", up=False)
    assert shortest_path(isolated, "ctl", "e2") is None
    assert isolated.link("r1", "r2").up is False


def test_with_link_validates():
    t = load_topology("single-server")
    with pytest.raises(ConfigError, match="bw_mbit"):
        t.with_link("e1", "s1", bw_mbit=-1)
    assert t.with_link("e1", "s1", bw_mbit=5).link("e1", "s1").bw_mbit == 5

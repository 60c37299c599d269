"""Cluster and inventory files: good ones load; bad ones name file and line before anything
starts; the default placement balances servers and cuts as few links as brute force finds."""
import itertools
from collections import Counter

import pytest

from coel_model.errors import ConfigError
from testbed.cluster import (check_against_topology, cut_links, parse_cluster, place_nodes,
                             resolve_placement)
from testbed.inventory import parse_inventory
from testbed.remote import offset_from_samples
from topologies import load_topology

pytestmark = pytest.mark.unit


@pytest.fixture
def key(tmp_path):
    k = tmp_path / "id_test"
    k.write_text("not a real key; only its existence is checked\n")
    return str(k)


def _cluster(key, extra=""):
    return (f"machines:\n"
            f"  - {{name: here, address: 10.9.0.1, head: true}}\n"
            f"  - {{name: box2, address: 10.9.0.2, user: root, key: {key}}}\n" + extra)


def test_cluster_loads_and_defaults(key):
    spec = parse_cluster(_cluster(key, "placement:\n  e4: box2\n"), "c.yaml")
    assert spec.head.name == "here" and spec.machine("box2").target.key == key
    assert spec.tunnel == "ssh" and spec.placement == (("e4", "box2"),)
    with pytest.raises(Exception):
        spec.tunnel = "gre"  # frozen


@pytest.mark.parametrize("extra,needle", [
    ("bogus: 1\n", "c.yaml:4: bogus: unknown key"),
    ("  - {name: box3, address: 10.9.0.2}\n", "c.yaml:4: machines[2].address: address 10.9.0.2 already used"),
    ("  - {name: box2, address: 10.9.0.3}\n", "c.yaml:4: machines[2].name: machine name 'box2' already used"),
    ("  - {name: box3, address: 10.9.0.3, head: true}\n", "c.yaml:4: machines[2].head: two head machines"),
    ("placement:\n  e4: nowhere\n", "c.yaml:5: placement.e4: node 'e4' placed on unknown machine 'nowhere'"),
    ("  - {name: box3, address: 10.9.0.3, colour: red}\n", "c.yaml:4: machines[2].colour: unknown key"),
    ("  - {name: box3, address: 10.9.0.3, key: /nonexistent/k}\n", "c.yaml:4: machines[2].key: key file"),
    ("tunnel: carrier-pigeon\n", "c.yaml:4: tunnel: unknown tunnel"),
])
def test_bad_cluster_files_name_file_and_line(key, extra, needle):
    with pytest.raises(ConfigError) as exc:
        parse_cluster(_cluster(key, extra), "c.yaml")
    assert needle in str(exc.value)


def test_cluster_placement_checked_against_topology(key):
    topo = load_topology("edge-star-5")
    spec = parse_cluster(_cluster(key, "placement:\n  e4: box2\n  e9: box2\n"), "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:6: placement: unknown node 'e9'"):
        check_against_topology(spec, topo)
    spec = parse_cluster(_cluster(key, "placement:\n  ctl: box2\n"), "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:5: .*controller 'ctl' must run on the head"):
        check_against_topology(spec, topo)
    spec = parse_cluster(_cluster(key, "placement:\n  e1: box2\n  e2: box2\n  e3: box2\n"), "c.yaml")
    p = resolve_placement(spec, topo)
    assert [p[s] for s in ("e1", "e2", "e3")] == ["box2"] * 3 and p["ctl"] == "here"


def _brute_force_min_cut(topo, machines, head):
    """Fewest cut links over all balanced placements (controller on head)."""
    nodes = [n for n in topo.node_names if n != topo.controller.name]
    servers = {s.name for s in topo.servers}
    best = None
    for combo in itertools.product(machines, repeat=len(nodes)):
        counts = Counter(m for n, m in zip(nodes, combo) if n in servers)
        if max(counts.get(m, 0) for m in machines) - min(counts.get(m, 0) for m in machines) > 1:
            continue
        place = dict(zip(nodes, combo), **{topo.controller.name: head})
        c = len(cut_links(topo, place))
        best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("name", ["edge-star-5", "edge-cloud-3tier", "single-server"])
def test_default_placement_balances_and_matches_brute_force(name):
    topo = load_topology(name)
    machines = ["a", "b"]
    p = place_nodes(topo, machines)
    counts = Counter(p[s.name] for s in topo.servers)
    assert max(counts.values()) - min(counts.get(m, 0) for m in machines) <= 1
    assert p[topo.controller.name] == "a"
    assert len(cut_links(topo, p)) == _brute_force_min_cut(topo, machines, "a")
    assert place_nodes(topo, machines) == p  # deterministic


def test_placement_respects_fixed_nodes_and_three_machines():
    topo = load_topology("metro-ring-8")
    p = place_nodes(topo, ["a", "b", "c"], fixed={"m1": "c"})
    assert p["m1"] == "c" and set(p) == set(topo.node_names)
    counts = Counter(p[s.name] for s in topo.servers)
    assert sorted(counts.values()) == [2, 3, 3]


def _inventory(key, hosts):
    return f"name: lab\ndefaults: {{user: root, key: {key}}}\nhosts:\n" + hosts


GOOD_HOSTS = ("  - {name: ctl, address: 10.8.0.1, roles: [controller, client], entry: e1}\n"
              "  - {name: e1, address: 10.8.0.2, roles: [server], memory_mb: 6, cpu_share: 0.5}\n"
              "  - {name: e2, address: 10.8.0.3, roles: [server], memory_mb: 6, root: false,"
              " user: coel}\n")


def test_inventory_loads_and_becomes_a_star_topology(key):
    inv = parse_inventory(_inventory(key, GOOD_HOSTS), "i.yaml")
    assert [h.name for h in inv.with_role("server")] == ["e1", "e2"]
    assert inv.host("e1").root and not inv.host("e2").root and inv.host("e2").target.user == "coel"
    topo = inv.topology()
    assert topo.controller.name == "ctl-ctl" and [c.name for c in topo.clients] == ["ctl-cli"]
    assert {l.b for l in topo.links} == {"lan"} and len(topo.links) == 4
    assert set(inv.node_hosts()) == {"ctl-ctl", "ctl-cli", "e1", "e2"}


@pytest.mark.parametrize("hosts,needle", [
    (GOOD_HOSTS + "  - {name: e3, address: 10.8.0.2, roles: [server], memory_mb: 4}\n",
     "i.yaml:7: hosts[3].address: address 10.8.0.2 already used by host at line 5"),
    (GOOD_HOSTS + "  - {name: u9, address: 10.8.0.9, roles: [client], entry: e7}\n",
     "i.yaml:7: hosts[3].entry: client 'u9': entry 'e7' is not a server host"),
    (GOOD_HOSTS + "  - {name: e3, address: 10.8.0.9, roles: [server], memory_mb: 4, gpu: 1}\n",
     "i.yaml:7: hosts[3].gpu: unknown key"),
    (GOOD_HOSTS + "  - {name: e3, address: 10.8.0.9, roles: [router]}\n", "i.yaml:7: hosts[3].roles[0]: unknown role"),
    (GOOD_HOSTS + "  - {name: e3, address: 10.8.0.9, roles: [server]}\n", "i.yaml:7: hosts[3]: server 'e3' has no memory_mb"),
    (GOOD_HOSTS + "  - {name: e1, address: 10.8.0.9, roles: [client], entry: e1}\n",
     "i.yaml:7: hosts[3].name: host name 'e1' already used at line 5"),
    (GOOD_HOSTS + "  - {name: c2, address: 10.8.0.9, roles: [controller]}\n", "i.yaml:7: hosts[3]: exactly one host"),
    (GOOD_HOSTS + "  - {name: e3, address: 10.8.0.9, roles: [server], memory_mb: 4, cpu_share: 2}\n",
     "i.yaml:7: hosts[3].cpu_share: must be <= 1"),
])
def test_bad_inventories_name_file_and_line(key, hosts, needle):
    with pytest.raises(ConfigError) as exc:
        parse_inventory(_inventory(key, hosts), "i.yaml")
    assert needle in str(exc.value)


def test_inventory_key_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"i.yaml:2: defaults.key: key file /nonexistent"):
        parse_inventory(_inventory("/nonexistent/k", GOOD_HOSTS), "i.yaml")


def test_clock_offset_uses_the_shortest_round_trip():
    # remote clock = ours + 1000 ns; the 10 ns round trip wins over the 500 ns one
    off = offset_from_samples([(0, 1300, 500), (2000, 3005, 2010)])
    assert off.offset_ns == 1000 and off.uncertainty_ns == 5 and off.samples == 2

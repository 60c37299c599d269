"""Scenario files: bundled ones load and match their topologies; bad ones name file and line."""
import pytest

from coel_model.errors import ConfigError
from testbed.scenario import SCENARIO_DIR, check_against_topology, load_scenario, parse_scenario
from topologies.loader import load_topology


@pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_scenarios_load_and_match_topology(path):
    sc = load_scenario(path)
    check_against_topology(sc, load_topology(sc.topology), str(path))
    assert sc.events == tuple(sorted(sc.events, key=lambda e: e.at_s))
    assert len(sc.digest()) == 8


def test_demo_is_default_with_a_link_failure():
    sc = load_scenario("demo")
    assert sc.topology == "edge-star-5"
    assert [e.kind for e in sc.events] == ["link_down", "link_up"]


@pytest.mark.parametrize("text,needle", [
    ("name: x\nduration_s: 10\nbogus: 1\n", ":3: bogus: unknown key"),
    ("name: x\nduration_s: -1\n", ":2: duration_s: must be > 0"),
    ("name: x\nevents:\n  - {at_s: 1, kind: explode}\n", ":3: events[0].kind: unknown event kind"),
    ("name: x\nevents:\n  - {at_s: 1, kind: bw, link: [a, b]}\n", "missing required field 'bw_mbit'"),
    ("name: x\nduration_s: 5\nevents:\n  - {at_s: 9, kind: link_down, link: [a, b]}\n",
     "after the traffic ends"),
    ("name: x\nevents:\n  - {at_s: 1, kind: link_down, link: a}\n", "list of two node names"),
])
def test_bad_scenarios_name_file_and_line(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_scenario(text, source="bad.yaml")
    assert "bad.yaml:" in str(exc.value) and needle in str(exc.value)


def test_event_on_unknown_link_or_server_is_rejected():
    topo = load_topology("edge-star-5")
    sc = parse_scenario("name: x\nevents:\n  - {at_s: 1, kind: link_down, link: [e1, e2]}\n")
    with pytest.raises(ConfigError, match="no link e1-e2"):
        check_against_topology(sc, topo, "x.yaml")
    sc = parse_scenario("name: x\nevents:\n  - {at_s: 1, kind: server_crash, server: zz}\n")
    with pytest.raises(ConfigError, match="no server 'zz'"):
        check_against_topology(sc, topo, "x.yaml")

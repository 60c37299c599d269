"""`coel run --cluster`: one topology across two "machines", this one and a network namespace with
its own sshd (tests/sshns.py). Mininet Cluster Edition builds the servers placed there as remote
hosts behind ssh tap tunnels; requests cross the tunnel, the tunnelled link fails and comes
back, 0 lost, the traces of both machines are merged, and nothing is left on either side."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.testbed.sshns import SshHosts, have_sshd
from tests.testbed.run_helpers import assert_clean, mininet_test, scenario_text, setup_dir

pytestmark = pytest.mark.timeout(300)


def run(name, setup, events, cluster, **kw):
    import io
    from testbed.runner import RunOptions, run_scenario
    from testbed.scenario import parse_scenario
    sc = parse_scenario(scenario_text(name, setup, events, **kw), f"{name}.yaml")
    log = io.StringIO()
    res = run_scenario(sc, RunOptions(out_dir=setup["out"], live_progress=False, serving_timeout_s=180,
                                      cluster=cluster), stream=log)
    return res, log.getvalue()


@pytest.mark.unit
def test_bad_cluster_file_fails_before_anything_starts(tmp_path):
    from coel_model.errors import ConfigError
    from testbed.runner import RunOptions, Runner
    from testbed.scenario import parse_scenario
    setup = {"model": "models/tiny-moe", "topology": "edge-star-5"}
    sc = parse_scenario("name: x\ntopology: edge-star-5\n", "x.yaml")
    cl = tmp_path / "c.yaml"
    cl.write_text("machines:\n  - {name: here, address: 10.9.0.1}\n  - {name: b, address: 10.9.0.2}\n"
                  "placement:\n  e4: b\n  e7: b\n")
    with pytest.raises(ConfigError, match=r"c.yaml:6: placement: unknown node 'e7'"):
        Runner(sc, RunOptions(out_dir=tmp_path / "runs", cluster=str(cl)), run_dir=tmp_path / "r")
    assert not (tmp_path / "runs").exists() and setup


@mininet_test
@pytest.mark.skipif(not have_sshd(), reason="needs openssh-server (sshd)")
def test_run_across_two_machines_with_a_tunnelled_link_failure(tmp_path):
    setup = setup_dir(tmp_path)
    with SshHosts(1, tmp_path) as hosts:
        cluster = tmp_path / "cluster.yaml"
        cluster.write_text(f"machines:\n  - {{name: here, address: {hosts.gateway}, head: true}}\n"
                           f"  - {{name: box2, address: {hosts.address(0)}, key: {hosts.key}}}\n"
                           # the entry s1 on box2: every request crosses the tunnel
                           "placement: {s1: box2, s3: box2}\n")
        res, log = run("tb-cluster", setup, ["{at_s: 6, kind: link_down, link: [s3, hub]}",
                                             "{at_s: 10, kind: link_up, link: [s3, hub]}"],
                       str(cluster), duration_s=13, drain_s=20)
        run_dir = res.run_dir
        assert res.outcome == "completed" and not res.error, log + str(res.error)
        meta = json.loads((run_dir / "meta.json").read_text())
        pl = meta["placement"]
        assert pl["servers_per_machine"] == {"here": ["s2", "s4"], "box2": ["s1", "s3"]}
        assert sorted(map(sorted, pl["cut_links"])) == [["hub", "s1"], ["hub", "s3"]]
        c = meta["clocks"]["box2"]
        assert abs(c["offset_ns"]) <= c["uncertainty_ns"] + 1_000_000  # one kernel underneath
        s = res.summary
        assert s["requests"] >= 8 and s["lost_requests"] == 0, json.dumps(s)[:2000]
        ctl = [json.loads(l) for l in (run_dir / "raw" / "ctl-controller.jsonl").read_text().splitlines()]
        assert any(r.get("event") == "agent_lost" and r["attrs"]["name"] == "s3" for r in ctl)
        # the entry on box2 served every request across the tunnel; its traces came back
        entry = (run_dir / "raw" / "s1-entry.jsonl").read_text().splitlines()
        assert sum('"span"' in l for l in entry) >= s["requests"]
        spans = (run_dir / "spans.jsonl").read_text()
        assert '"host":"s1"' in spans and '"host":"u1"' in spans and "clock_offset" in spans
    assert hosts.leftovers() == []
    assert_clean(run_dir)
    left = subprocess.run(["ip", "-o", "link", "show", "tap9"], capture_output=True, text=True).stdout
    assert not left

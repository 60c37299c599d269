"""`coel deploy`: the runtime on "real hosts" reached over SSH. Here the hosts are network
namespaces with their own sshd (tests/testbed/sshns.py), at addresses inside those namespaces, with a
key made for the test. Deploy, serve, crash one agent, recover with 0 lost; clear errors for an
unreachable host, a wrong key, a missing checkout or venv; nothing left behind."""
from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.testbed.sshns import SshHosts, have_sshd
from tests.testbed.run_helpers import SMALL_MODEL

REPO = Path(__file__).resolve().parents[2]
needs_sshd = pytest.mark.skipif(not have_sshd(), reason="needs root and openssh-server (sshd)")


def _inventory(path: Path, addresses: list[str], key: str, extra_host: str = "", **top) -> Path:
    lines = [f"name: nslab", f"project_dir: {top.get('project_dir', REPO)}",
             f"python: {top.get('python', '.venv/bin/python')}", f"work_dir: {path.parent / 'remote'}",
             f"defaults: {{user: root, key: {key}}}", "agent_overhead_mb: 700", "hosts:",
             f"  - {{name: ctl, address: {addresses[0]}, roles: [controller, client], entry: s1,"
             "     workload: {rate_rps: 1.0, prompt_tokens: 16, max_new_tokens: 8, slo_ttft_ms: 5000,"
             " slo_tpot_ms: 2000, slo_class: interactive}}",
             # s1 (the entry) cannot hold the 16 experts even at the narrowest widths: s2 holds
             # some, so crashing s2's agent hits a holder of experts
             f"  - {{name: s1, address: {addresses[1]}, roles: [server], memory_mb: 0.05, cpu_share: 0.5}}",
             f"  - {{name: s2, address: {addresses[2]}, roles: [server], memory_mb: 0.6, cpu_share: 0.5}}",
             extra_host]
    path.write_text("\n".join(lines) + "\n")
    return path


def _scenario(path: Path, events: list[str], duration_s: float = 16) -> Path:
    ev = "".join(f"  - {e}\n" for e in events)
    path.write_text(f"name: nsdeploy\nduration_s: {duration_s}\ndrain_s: 20\nseed: 3\n"
                    + (f"events:\n{ev}" if ev else ""))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from testbed.runner import make_random_model
    return str(make_random_model(tmp_path_factory.mktemp("deploy-model") / "model", **SMALL_MODEL))


# ---- no root -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_dry_run_prints_what_runs_where(tmp_path, model):
    from testbed.deploy import deploy_scenario
    from testbed.inventory import load_inventory
    key = tmp_path / "k"
    key.write_text("x")
    inv = load_inventory(_inventory(tmp_path / "inv.yaml", ["10.9.9.1", "10.9.9.2", "10.9.9.3"], str(key)))
    text = deploy_scenario(inv, model, dry_run=True)
    lines = text.splitlines()
    assert any(l.split()[:1] == ["s1"] and "cpu_share=0.5 cgroup" in l for l in lines)
    for who, what in (("root@10.9.9.1:22  [ctl-ctl-controller]", "-m controller.service"),
                      ("root@10.9.9.2:22  [s1-agent]", "cgexec -g memory,cpu:/coel-"),
                      ("root@10.9.9.2:22  [s1-entry]", "-m nodes.entry"),
                      ("root@10.9.9.3:22  [s2-agent]", "--endpoint tcp://10.9.9.3:7100"),
                      ("root@10.9.9.1:22  [ctl-cli-client]", "--entry tcp://10.9.9.2:7200")):
        line = next(l for l in lines if who in l)
        assert what in line
    assert str(tmp_path / "remote") in text and not list((tmp_path / "remote").glob("*"))  # nothing started


@pytest.mark.unit
def test_link_faults_are_refused_on_hosts_without_root(tmp_path, model):
    from coel_model.errors import ConfigError
    from testbed.deploy import deploy_scenario
    from testbed.inventory import load_inventory
    from testbed.scenario import load_scenario
    key = tmp_path / "k"
    key.write_text("x")
    inv = _inventory(tmp_path / "inv.yaml", ["10.9.9.1", "10.9.9.2", "10.9.9.3"], str(key))
    inv.write_text(inv.read_text().replace("memory_mb: 0.05, cpu_share: 0.5}\n  - {name: s2",
                                           "memory_mb: 0.05, cpu_share: 0.5, root: false, user: coel}\n  - {name: s2"))
    sc = load_scenario(_scenario(tmp_path / "sc.yaml", ["{at_s: 3, kind: link_down, link: [s1, lan]}"]))
    with pytest.raises(ConfigError, match="link faults need root on host s1 .* says root: false"):
        deploy_scenario(load_inventory(inv), model, sc, dry_run=True)
    sc = load_scenario(_scenario(tmp_path / "sc.yaml", ["{at_s: 3, kind: server_crash, server: s1}"]))
    assert "[s1-agent]" in deploy_scenario(load_inventory(inv), model, sc, dry_run=True)


# ---- namespaces with sshd (root) -----------------------------------------------------------------
def _deploy(tmp_path, inv_path, model, events, duration_s=16):
    from testbed.deploy import deploy_scenario
    from testbed.inventory import load_inventory
    from testbed.runner import RunOptions
    from testbed.scenario import load_scenario
    sc = load_scenario(_scenario(tmp_path / "sc.yaml", events, duration_s))
    log = io.StringIO()
    res = deploy_scenario(load_inventory(inv_path), model, sc,
                          RunOptions(out_dir=tmp_path / "runs", live_progress=False, serving_timeout_s=120),
                          stream=log)
    return res, log.getvalue()


@needs_sshd
@pytest.mark.integration
@pytest.mark.timeout(200)
def test_deploy_on_three_ssh_hosts_crash_an_agent_and_recover(tmp_path, model):
    with SshHosts(3, tmp_path) as hosts:
        inv = _inventory(tmp_path / "inv.yaml", [hosts.address(i) for i in range(3)], hosts.key)
        res, log = _deploy(tmp_path, inv, model, ["{at_s: 5, kind: server_crash, server: s2, process: agent}",
                                                  "{at_s: 10, kind: server_restart, server: s2}"])
        assert res.outcome == "completed" and not res.error, log + str(res.error)
        run = res.run_dir
        s = res.summary
        assert s["requests"] >= 8 and s["lost_requests"] == 0, json.dumps(s, indent=1)[:3000]
        meta = json.loads((run / "meta.json").read_text())
        assert meta["emulation_mode"] == "real"
        assert meta["placement"]["nodes"] == {"ctl-ctl": "ctl", "ctl-cli": "ctl", "s1": "s1", "s2": "s2"}
        assert set(meta["clocks"]) == {"ctl", "s1", "s2"}
        for c in meta["clocks"].values():  # one kernel here: the offset is within its uncertainty
            assert abs(c["offset_ns"]) <= c["uncertainty_ns"] + 1_000_000
        assert meta["processes"]["s2-agent"]["starts"] == 2
        # every host's traces came back, shifted, with the clock record
        for name in ("ctl-ctl-controller", "s1-agent", "s2-agent", "s1-entry", "ctl-cli-client", "testbed-clocks"):
            assert (run / "raw" / f"{name}.jsonl").stat().st_size > 0, name
        ctl = [json.loads(l) for l in (run / "raw" / "ctl-ctl-controller.jsonl").read_text().splitlines()]
        assert [r["attrs"]["name"] for r in ctl if r.get("event") == "agent_lost"] == ["s2"]
        assert any(r.get("event") == "agent_reregistered" for r in ctl)
        # the budgets force s2 to hold experts: the crash hit a holder
        assert meta["initial_plan_summary"]["experts_per_server"].get("s2", 0) > 0, meta["initial_plan_summary"]
        assert (run / "trace.json").exists() and (run / "summary.csv").exists()
        assert meta["cgroups"] == {"s1": f"coel-{run.name[-8:]}-s1", "s2": f"coel-{run.name[-8:]}-s2"}
        # nothing left on the hosts: processes (agents bound to namespace-only addresses, so they
        # ran in the hosts), remote run folders, cgroups, the control socket
        assert [p for p in hosts.pids() if not _is_sshd(p)] == []
        assert not list((tmp_path / "remote").glob("*/*")), "remote run folders left behind"
        assert not list(Path("/sys/fs/cgroup/memory").glob(f"coel-{run.name[-8:]}-*"))
        assert not Path(f"/tmp/coel-{run.name[-8:]}-control.sock").exists()
    assert hosts.leftovers() == []


def _is_sshd(pid: int) -> bool:
    try:
        return "sshd" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True


@needs_sshd
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_deploy_errors_name_the_host_and_the_problem(tmp_path, model):
    with SshHosts(3, tmp_path) as hosts:
        addrs = [hosts.address(i) for i in range(3)]
        other = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        cases = [
            (_inventory(tmp_path / "i1.yaml", addrs[:2] + [f"{hosts.net}.99"], hosts.key),
             f"host s2: cannot reach root@{hosts.net}.99:22"),
            (_inventory(tmp_path / "i2.yaml", addrs, str(other)), "refused our key"),
            (_inventory(tmp_path / "i3.yaml", addrs, hosts.key, project_dir="/nonexistent/coel"),
             "has no CoEL checkout at /nonexistent/coel"),
            (_inventory(tmp_path / "i4.yaml", addrs, hosts.key, python="no-venv/bin/python"),
             "no Python at"),
        ]
        for inv, needle in cases:
            res, log = _deploy(tmp_path, inv, model, [])
            assert res.outcome == "failed" and needle in (res.error or ""), (needle, res.error)
            assert not (tmp_path / "remote").exists() or not list((tmp_path / "remote").glob("*/*/pids"))
        live = [p for p in hosts.pids() if not _is_sshd(p)]
        assert live == [], live
    assert hosts.leftovers() == []

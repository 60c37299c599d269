"""Mininet (root): configured bandwidth and delay are what traffic sees, a link-down really stalls
traffic until routes converge around it, and nothing is left behind afterwards.

Topology: e1 - r1 - r2 - e2 (20 Mbit/s, 10 ms per link) plus a longer backup path r1 - r3 - r2.
Delay is checked with ping in netem mode, or in emulated mode with the zmq echo probe of
testbed.linkemu, whose receivers hold messages with nodes.delayqueue (as the real transport does).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mnexec"),
                       reason="needs root and Mininet's mnexec"),
]

REPO = Path(__file__).resolve().parents[2]
BW_MBIT, DELAY_MS, BACKUP_DELAY_MS = 20.0, 10.0, 15.0

TOPO = textwrap.dedent(f"""\
    name: two-server-path
    convergence_ms: 2000
    servers:
      - {{name: e1, memory_mb: 8, cpu_share: 0.5}}
      - {{name: e2, memory_mb: 16, cpu_share: 0.5}}
    controller: {{name: ctl}}
    routers: [{{name: r1}}, {{name: r2}}, {{name: r3}}]
    link_defaults: {{bw_mbit: {BW_MBIT}, delay_ms: {DELAY_MS}, queue_pkts: 200}}
    links:
      - {{a: e1, b: r1}}
      - {{a: r1, b: r2}}
      - {{a: r2, b: e2}}
      - {{a: r1, b: r3, delay_ms: {BACKUP_DELAY_MS}}}
      - {{a: r3, b: r2, delay_ms: {BACKUP_DELAY_MS}}}
      - {{a: ctl, b: r1, delay_ms: 1}}
    """)

def leftovers(prefix: str, shell_pids: list[int]) -> dict:
    from testbed import cleanup as cl
    return {
        "interfaces": cl.intfs_of(prefix),
        "cgroups": [str(p) for p in cl.cgroups_of(prefix)],
        "processes": cl.processes_of(prefix, shell_pids),
        "live_shells": [p for p in shell_pids if cl._not_zombie_alive(p)],
        "state_file": (cl.STATE_DIR / f"{prefix}.json").exists(),
    }


def assert_clean(prefix: str, shell_pids: list[int]) -> None:
    left = leftovers(prefix, shell_pids)
    assert not any(left.values()), f"left behind by network {prefix}: {left}"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    from testbed.netbuild import TestbedNet
    from topologies import parse_topology
    topo = parse_topology(TOPO, "two-server-path.yaml")
    from common.tracing import TraceWriter
    run_dir = tmp_path_factory.mktemp("run")
    n = TestbedNet(topo, run_dir, signal_handlers=False,
                   trace=TraceWriter(run_dir / "traces" / "testbed-net.jsonl", "testbed"))
    try:
        n.start()
        yield n
    finally:
        n.stop()


def shells(net) -> list[int]:
    return [h.pid for h in net.net.hosts]


def echo_rtts(net, n: int, port: int) -> dict:
    """Round trips through the emulated delay with the probe in testbed.linkemu."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    addr = f"tcp://{net.ip('e2')}:{port}"
    probe = [sys.executable, "-m", "testbed.linkemu", "echo"]
    srv = net.popen("e2", probe + ["server", addr, str(n), str(net.delay_file("e2"))], env=env,
                    cwd=str(REPO))
    try:
        out = net.popen("e1", probe + ["client", addr, str(n), str(net.delay_file("e1"))],
                        env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = out.communicate(timeout=60)
        assert out.returncode == 0, stderr.decode()[-2000:]
        return json.loads(stdout.decode().strip().splitlines()[-1])
    finally:
        srv.kill()
        srv.wait()


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measured_rtt_ms(net, port: int, n: int = 15) -> float:
    if net.mode == "netem":
        r = net.run("e1", ["ping", "-c", str(n), "-i", "0.05", "-q", net.ip("e2")], timeout=60)
        return float(r.stdout.rsplit("=", 1)[1].split("/")[1])  # rtt min/AVG/max
    res = echo_rtts(net, n, port)
    assert res["peers"] == [net.ip("e2")], res  # the kernel's source address is a JSON key
    return median(res["rtt_ms"])


def test_resources_applied(net):
    from topologies.schema import MIB
    for name in ("e1", "e2"):
        mn = net.mn_name[name]
        limit = int(Path(f"/sys/fs/cgroup/memory/{mn}/memory.limit_in_bytes").read_text())
        assert limit == int(net.topo.cgroup_memory_mb(name) * MIB)
        quota = int(Path(f"/sys/fs/cgroup/cpu/{mn}/cpu.cfs_quota_us").read_text())
        period = int(Path(f"/sys/fs/cgroup/cpu/{mn}/cpu.cfs_period_us").read_text())
        assert quota / period == pytest.approx(0.5 * os.cpu_count(), rel=0.02)
    p = net.popen("e1", ["sleep", "30"])
    time.sleep(0.3)
    cg = Path(f"/proc/{p.pid}/cgroup").read_text()
    assert f"memory:/{net.mn_name['e1']}" in cg and f"cpu:/{net.mn_name['e1']}" in cg, cg
    p.kill()
    p.wait()
    mode = json.loads((Path(net.run_dir) / "linkemu" / "mode.json").read_text())
    assert mode["mode"] == net.mode and mode["mode"] in ("netem", "emulated")


def test_bandwidth_within_15pct(net):
    srv = net.popen("e2", ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = net.run("e1", ["iperf3", "-c", net.ip("e2"), "-p", "5201", "-t", "3", "-J"], timeout=30)
        data = json.loads(r.stdout)
        goodput = data["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()
    assert goodput == pytest.approx(BW_MBIT, rel=0.15), f"{goodput:.2f} Mbit/s vs {BW_MBIT}"


def test_rtt_within_15pct(net):
    from topologies import path_delay_ms, shortest_path
    one_way = path_delay_ms(net.topo, shortest_path(net.topo, "e1", "e2"))
    assert one_way == 3 * DELAY_MS
    rtt = measured_rtt_ms(net, 5600)
    assert rtt == pytest.approx(2 * one_way, rel=0.15), f"RTT {rtt:.2f} ms vs {2 * one_way} ms"


def ping_ok(net, a: str, b: str, wait_s: float = 1.0) -> bool:
    return net.run(a, ["ping", "-c", "1", "-W", str(wait_s), net.ip(b)], timeout=10).returncode == 0


def test_link_down_stalls_then_reroutes(net):
    assert ping_ok(net, "e1", "e2")
    t_down = time.monotonic()
    net.links_down("r1", "r2")
    assert not ping_ok(net, "e1", "e2", 0.3), "traffic still flows right after the link went down"
    assert time.monotonic() - t_down < net.convergence_ms / 1000, "test too slow to see the stall"
    version = net.wait_converged()
    assert ping_ok(net, "e1", "e2"), "no traffic after routes converged on the backup path"
    backup = 2 * DELAY_MS + 2 * BACKUP_DELAY_MS
    table = json.loads(net.delay_file("e1").read_text())
    assert table["version"] == version and table["peers"][net.ip("e2")]["delay_ms"] == backup
    from testbed.traces import merge
    tr = merge([Path(net.run_dir) / "traces" / "testbed-net.jsonl"])
    downs = [e for e in tr.events if e["event"] == "link_down"]
    assert [(e["attrs"]["a"], e["attrs"]["b"]) for e in downs] == [("r1", "r2")]
    assert downs[0]["t_ns"] >= int(t_down * 1e9) - 1  # monotonic clock, like every span
    conv = [e for e in tr.events if e["event"] == "routes" and e["attrs"]["version"] == version]
    assert conv and conv[0]["t_ns"] - downs[0]["t_ns"] >= net.convergence_ms * 1e6
    if net.mode == "emulated":
        rtt = median(echo_rtts(net, 7, 5601)["rtt_ms"])
        assert rtt == pytest.approx(2 * backup, rel=0.15), rtt
    # no alternative for the last hop: traffic fails for good
    net.links_down("r2", "e2")
    net.wait_converged()
    assert not ping_ok(net, "e1", "e2")
    assert net.ip("e2") not in json.loads(net.delay_file("e1").read_text())["peers"]
    net.links_up("r2", "e2")
    net.links_up("r1", "r2")
    net.wait_converged()
    assert ping_ok(net, "e1", "e2")


def test_loss_and_bw_change(net):
    net.set_loss("e1", "r1", 30.0)
    try:
        r = net.run("e1", ["ping", "-c", "40", "-i", "0.02", "-q", "-W", "1", net.ip("r1")], timeout=30)
        lost = float(r.stdout.split("% packet loss")[0].rsplit(" ", 1)[1])
        assert 25 <= lost <= 80, r.stdout  # 30% each way: ~51% of round trips lost
    finally:
        net.set_loss("e1", "r1", 0.0)
    assert ping_ok(net, "e1", "r1")
    net.set_bw("e1", "r1", 5.0)
    out = net.run("e1", ["tc", "class", "show", "dev", f"{net.mn_name['e1']}-eth0"]).stdout
    assert "rate 5Mbit" in out, out
    net.set_bw("e1", "r1", BW_MBIT)


def test_zz_stop_leaves_nothing(net):
    prefix, pids = net.prefix, shells(net)
    sleeper = net.popen("e2", ["sleep", "60"])  # a detached process Mininet would not kill
    net.stop()
    sleeper.wait(timeout=5)
    assert_clean(prefix, pids + [sleeper.pid])


def test_cleanup_when_body_fails():
    from testbed.netbuild import TestbedNet
    from topologies import load_topology
    net = TestbedNet(load_topology("single-server"), signal_handlers=False)
    with pytest.raises(RuntimeError, match="boom"):
        with net:
            net.popen("e1", ["sleep", "60"])
            prefix, pids = net.prefix, shells(net)
            raise RuntimeError("boom")
    assert_clean(prefix, pids)


def test_coel_clean_after_owner_killed(tmp_path):
    """kill -9 of the owner skips every handler; `coel clean` must still remove everything."""
    code = textwrap.dedent("""\
        import os, sys
        from testbed.netbuild import TestbedNet
        from topologies import load_topology
        net = TestbedNet(load_topology("single-server")).start()
        net.popen("e1", ["sleep", "60"])
        print(net.prefix, *[h.pid for h in net.net.hosts], flush=True)
        os.kill(os.getpid(), 9)
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == -9, r.stderr[-2000:]
    prefix, *pids = r.stdout.split()
    pids = [int(p) for p in pids]
    assert leftovers(prefix, pids)["interfaces"], "nothing to clean: the test proves nothing"
    cli = subprocess.run([sys.executable, "-m", "coel", "clean"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert cli.returncode == 0 and prefix in cli.stdout, cli.stdout + cli.stderr
    assert_clean(prefix, pids)

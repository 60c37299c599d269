"""Network emulation fidelity: configured vs measured, side by side in one Mininet run (root).

Measures, on direct links with different (bw_mbit, delay_ms):
  - TCP goodput (iperf3, 3 s) / configured bandwidth,
  - round trips through the transport's delay queue (zmq echo, testbed.linkemu) / 2 x delay,
  - kernel ping RTT (in mode "emulated" this does NOT include the emulated delay),
plus round-trip loss under a configured per-direction loss, the traffic outage after a link
goes down on a path with a backup route (vs the configured convergence time), the delay queue's
wake-up overshoot, and build/stop times of bundled topologies.

    sudo .venv/bin/python benchmarks/net.py [--json-out FILE | --json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.delayqueue import sleep_until_ns  # noqa: E402
from testbed.netbuild import TestbedNet  # noqa: E402
from topologies import load_topology, topology_from_dict  # noqa: E402

PAIRS = [(5.0, 2.0), (20.0, 10.0), (50.0, 25.0), (100.0, 5.0)]  # (bw_mbit, delay_ms)
LOSS_PCT = 10.0
CONVERGENCE_MS = 500.0


def bench_topology() -> dict:
    servers, links = [], []
    for i, (bw, d) in enumerate(PAIRS):
        servers += [{"name": f"a{i}", "memory_mb": 8, "cpu_share": 0.5},
                    {"name": f"b{i}", "memory_mb": 8, "cpu_share": 0.5}]
        links += [{"a": f"a{i}", "b": f"b{i}", "bw_mbit": bw, "delay_ms": d, "queue_pkts": 1000},
                  {"a": f"a{i}", "b": "mgmt", "delay_ms": 0.1}]
    servers += [{"name": "la", "memory_mb": 8, "cpu_share": 0.5},
                {"name": "lb", "memory_mb": 8, "cpu_share": 0.5},
                {"name": "x1", "memory_mb": 8, "cpu_share": 0.5},
                {"name": "x2", "memory_mb": 8, "cpu_share": 0.5}]
    links += [{"a": "la", "b": "lb", "delay_ms": 1.0, "loss_pct": LOSS_PCT},
              {"a": "la", "b": "mgmt", "delay_ms": 0.1},
              # a triangle: x1 - r1 - r2 - x2 with a backup r1 - r3 - r2
              {"a": "x1", "b": "r1", "delay_ms": 1.0}, {"a": "r1", "b": "r2", "delay_ms": 1.0},
              {"a": "r2", "b": "x2", "delay_ms": 1.0}, {"a": "r1", "b": "r3", "delay_ms": 2.0},
              {"a": "r3", "b": "r2", "delay_ms": 2.0}, {"a": "r1", "b": "mgmt", "delay_ms": 0.1},
              {"a": "ctl", "b": "mgmt", "delay_ms": 0.1}]
    return {"name": "net-bench", "convergence_ms": CONVERGENCE_MS,
            "link_defaults": {"bw_mbit": 100}, "servers": servers, "controller": {"name": "ctl"},
            "routers": [{"name": "r1"}, {"name": "r2"}, {"name": "r3"}],
            "switches": [{"name": "mgmt"}], "links": links}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def iperf_mbit(net: TestbedNet, a: str, b: str, seconds: float, port: int) -> float:
    srv = net.popen(b, ["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = net.run(a, ["iperf3", "-c", _peer_ip(net, a, b), "-p",
                        str(port), "-t", str(seconds), "-J"], timeout=seconds + 30)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        srv.kill()
        srv.wait()


def _peer_ip(net: TestbedNet, a: str, b: str) -> str:
    """b's address on the direct link a-b (so the test measures that link)."""
    link = net.topo.link(a, b)
    return net.plan.iface_for_link(b, link).ip


def echo(net: TestbedNet, a: str, b: str, n: int, port: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    addr = f"tcp://{_peer_ip(net, a, b)}:{port}"
    probe = [sys.executable, "-m", "testbed.linkemu", "echo"]
    srv = net.popen(b, probe + ["server", addr, str(n), str(net.delay_file(b))], env=env,
                    cwd=str(REPO))
    try:
        cli = net.popen(a, probe + ["client", addr, str(n), str(net.delay_file(a))], env=env,
                        cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = cli.communicate(timeout=120)
        if cli.returncode != 0:
            raise RuntimeError(err.decode()[-1000:])
        return json.loads(out.decode().strip().splitlines()[-1])
    finally:
        srv.kill()
        srv.wait()


def ping(net: TestbedNet, a: str, ip: str, count: int, interval_s: float) -> tuple[float, float]:
    """(avg RTT ms, loss %)."""
    r = net.run(a, ["ping", "-c", str(count), "-i", str(interval_s), "-q", "-W", "1", ip],
                timeout=count * interval_s + 30)
    loss = float(r.stdout.split("% packet loss")[0].rsplit(" ", 1)[1])
    avg = float(r.stdout.rsplit("=", 1)[1].split("/")[1]) if "rtt" in r.stdout else float("nan")
    return avg, loss


def outage_ms(net: TestbedNet) -> float:
    """Time from links_down(r1, r2) until x1 reaches x2 again over the backup path."""
    target = net.ip("x2")
    t0 = time.monotonic()
    net.links_down("r1", "r2")
    while time.monotonic() - t0 < 10:
        r = net.run("x1", ["ping", "-c", "1", "-W", "0.05", target], timeout=5)
        if r.returncode == 0:
            out = (time.monotonic() - t0) * 1000
            break
        time.sleep(0.005)
    else:
        out = float("inf")
    net.links_up("r1", "r2")
    net.wait_converged()
    return out


def overshoot_ms(n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sleep_until_ns(time.monotonic_ns() + 1_000_000) / 1e6)
    return out


def build_stop_s(name: str) -> tuple[float, float]:
    t0 = time.monotonic()
    net = TestbedNet(load_topology(name), signal_handlers=False).start()
    t1 = time.monotonic()
    net.stop()
    return t1 - t0, time.monotonic() - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="1 s transfers, fewer round trips")
    ap.add_argument("--mode", default="auto")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("iperf3"):
        print("needs root and iperf3", file=sys.stderr)
        return 2
    secs, n_rt = (1.0, 10) if args.quick else (3.0, 30)
    res: dict = {"pairs": [], "host": os.uname().nodename, "cpus": os.cpu_count()}
    topo = topology_from_dict(bench_topology(), "net-bench")
    with TestbedNet(topo, mode=args.mode, signal_handlers=False) as net:
        res["mode"] = net.mode
        for i, (bw, d) in enumerate(PAIRS):
            a, b = f"a{i}", f"b{i}"
            good = iperf_mbit(net, a, b, secs, 5300 + i)
            e = echo(net, a, b, n_rt, 5400 + i)
            kping, _ = ping(net, a, _peer_ip(net, a, b), 10, 0.05)
            rt = e["rtt_ms"]
            res["pairs"].append({
                "bw_mbit": bw, "delay_ms": d, "goodput_mbit": good, "goodput_ratio": good / bw,
                "echo_rtt_p50_ms": statistics.median(rt), "echo_rtt_p95_ms": pct(rt, 0.95),
                "echo_rtt_ratio": statistics.median(rt) / (2 * d), "kernel_ping_rtt_ms": kping,
                "queue_overshoot_p50_ms": statistics.median(e["overshoot_ms"])})
        _, loss = ping(net, "la", _peer_ip(net, "la", "lb"), 200 if not args.quick else 100, 0.01)
        exp = 100 * (1 - (1 - LOSS_PCT / 100) ** 2)
        res["loss"] = {"loss_pct_per_direction": LOSS_PCT, "expected_rt_loss_pct": exp,
                       "measured_rt_loss_pct": loss}
        res["outage"] = {"convergence_ms": CONVERGENCE_MS, "outage_ms": outage_ms(net)}
    ov = overshoot_ms(300)
    res["sleep_overshoot_ms"] = {"p50": statistics.median(ov), "p99": pct(ov, 0.99),
                                 "max": max(ov)}
    res["build"] = {}
    for name in ("edge-star-5", "metro-ring-8"):
        b, s = build_stop_s(name)
        res["build"][name] = {"build_s": b, "stop_s": s}

    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"link emulation mode: {res['mode']}  ({res['cpus']} cpus)")
        print(f"{'bw Mbit/s':>9} {'delay ms':>8} | {'goodput':>8} {'ratio':>6} | "
              f"{'echo RTT p50':>12} {'p95':>7} {'ratio':>6} | {'ping RTT':>8}")
        for p in res["pairs"]:
            print(f"{p['bw_mbit']:>9g} {p['delay_ms']:>8g} | {p['goodput_mbit']:>8.2f} "
                  f"{p['goodput_ratio']:>6.3f} | {p['echo_rtt_p50_ms']:>12.2f} "
                  f"{p['echo_rtt_p95_ms']:>7.2f} {p['echo_rtt_ratio']:>6.3f} | "
                  f"{p['kernel_ping_rtt_ms']:>8.3f}")
        l = res["loss"]
        print(f"loss {l['loss_pct_per_direction']:g}%/direction: round-trip loss "
              f"{l['measured_rt_loss_pct']:.1f}% (expected {l['expected_rt_loss_pct']:.1f}%)")
        o = res["outage"]
        print(f"link down with backup path: outage {o['outage_ms']:.0f} ms "
              f"(convergence_ms {o['convergence_ms']:g})")
        s = res["sleep_overshoot_ms"]
        print(f"delay queue wake-up overshoot: p50 {s['p50']:.4f} ms, p99 {s['p99']:.4f} ms, "
              f"max {s['max']:.3f} ms")
        for name, b in res["build"].items():
            print(f"{name}: build {b['build_s']:.2f} s, stop+cleanup {b['stop_s']:.2f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

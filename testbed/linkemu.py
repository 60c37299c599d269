"""Link emulation: how a Link's bandwidth, delay, jitter, loss and queue become real behaviour.

Two modes, chosen by name (probe_netem() decides "auto"):
- "netem": the kernel does everything (Mininet TCLink: HTB rate + netem delay/jitter/loss/limit).
- "emulated": for kernels without sch_netem (like this machine's). HTB still shapes bandwidth and
  a pfifo under it bounds the queue; loss is `iptables -m statistic --mode random` DROP on the host
  ends of the link (egress on the host side, and also ingress when the other end is a switch,
  whose side has no iptables); delay and jitter are left to the transport's receive-side delay
  queue (nodes/delayqueue.py), fed with per-host JSON files of current one-way path delays.
In both modes the JSON files are written (mode tells the delay queue whether to hold messages).

Commands inside a Mininet host run through `mnexec -a PID` (not the host's shell), so route and
link changes from a timer thread never interleave with a command running in that shell.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from coel_model.errors import ConfigError, InfeasibleError
from nodes.delayqueue import write_delay_file
from topologies.paths import AddressPlan, peer_delays
from topologies.schema import MAX_BW_MBIT, Link, Topology

MODES = ("netem", "emulated")
LOSS_CHAIN = "COEL_LOSS"
HTB_BURST = "15k"  # same burst as Mininet's TCIntf, so a rate change keeps the same shaping


@dataclass(frozen=True)
class NetemProbe:
    available: bool
    detail: str


_probe_cache: NetemProbe | None = None


def probe_netem(refresh: bool = False) -> NetemProbe:
    """Try `tc qdisc add dev lo root netem` in a throwaway network namespace (needs root)."""
    global _probe_cache
    if _probe_cache is not None and not refresh:
        return _probe_cache
    if not shutil.which("unshare") or not shutil.which("tc"):
        _probe_cache = NetemProbe(False, "unshare or tc not installed")
        return _probe_cache
    r = subprocess.run(["unshare", "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                        "delay", "1ms"], capture_output=True, text=True, timeout=10)
    detail = (r.stderr or r.stdout).strip() or "ok"
    _probe_cache = NetemProbe(r.returncode == 0, detail)
    return _probe_cache


def choose_mode(requested: str = "auto") -> str:
    """'auto' -> 'netem' if the kernel has it, else 'emulated'; unknown names list the valid ones."""
    if requested == "auto":
        return "netem" if probe_netem().available else "emulated"
    if requested not in MODES:
        raise ConfigError(f"unknown link emulation mode {requested!r} (valid: auto, {', '.join(MODES)})")
    if requested == "netem" and not probe_netem().available:
        raise InfeasibleError(f"link emulation mode 'netem' requested but this kernel has no "
                              f"sch_netem ({probe_netem().detail}); use 'emulated' or 'auto'")
    return requested


# ---- running commands -----------------------------------------------------------------------
def run_in(pid: int | None, argv: list[str], input: str | None = None,
           check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv in the network namespace of pid (None = the root namespace); an object with a
    run() method stands for a namespace on another machine (testbed/clusternet.py)."""
    if hasattr(pid, "run"):
        return pid.run(argv, input=input, check=check, timeout=timeout)
    full = argv if pid is None else ["mnexec", "-a", str(pid)] + argv
    r = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        where = "root namespace" if pid is None else f"namespace of pid {pid}"
        raise RuntimeError(f"{' '.join(argv)} failed in {where} (rc {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[:500]}")
    return r


@dataclass(frozen=True)
class IntfEnd:
    """One end of a link as the emulator sees it."""
    node: str           # topology name
    intf: str           # kernel interface name
    pid: Any            # namespace pid (None = root namespace: a switch port; see run_in)
    is_switch: bool


class LinkEmulator:
    """Applies and changes link parameters for one mode; writes the delay files."""

    def __init__(self, mode: str, delay_dir: Path):
        if mode not in MODES:
            raise ConfigError(f"unknown link emulation mode {mode!r} (valid: {', '.join(MODES)})")
        self.mode = mode
        self.delay_dir = Path(delay_dir)
        self.delay_dir.mkdir(parents=True, exist_ok=True)
        self.version = 0

    # ---- build time ------------------------------------------------------------------------
    def tclink_params(self, link: Link) -> dict:
        """Parameters for Mininet's TCLink (applied to both ends, like our Link semantics)."""
        bw = link.bw_mbit if link.bw_mbit is not None else MAX_BW_MBIT
        p: dict = {"bw": bw, "use_htb": True}
        if self.mode == "netem":
            p["delay"] = f"{link.delay_ms}ms"
            if link.jitter_ms > 0:
                p["jitter"] = f"{link.jitter_ms}ms"
            if link.loss_pct > 0:
                p["loss"] = link.loss_pct
            if link.queue_pkts is not None:
                p["max_queue_size"] = link.queue_pkts
        return p

    def after_build(self, link: Link, ends: tuple[IntfEnd, IntfEnd]) -> None:
        """Emulated mode: queue length (pfifo under HTB) on both ends."""
        if self.mode == "emulated" and link.queue_pkts is not None:
            for e in ends:
                run_in(e.pid, ["tc", "qdisc", "replace", "dev", e.intf, "parent", "5:1",
                               "handle", "10:", "pfifo", "limit", str(link.queue_pkts)])

    # ---- runtime changes -------------------------------------------------------------------
    def set_bw(self, ends: Iterable[IntfEnd], bw_mbit: float | None) -> None:
        bw = bw_mbit if bw_mbit is not None else MAX_BW_MBIT
        for e in ends:
            run_in(e.pid, ["tc", "class", "change", "dev", e.intf, "parent", "5:0", "classid",
                           "5:1", "htb", "rate", f"{bw}Mbit", "burst", HTB_BURST])

    def set_netem(self, ends: Iterable[IntfEnd], link: Link) -> None:
        """netem mode: change delay/jitter/loss in place (no-op in emulated mode)."""
        if self.mode != "netem":
            return
        args = ["delay", f"{link.delay_ms}ms"]
        if link.jitter_ms > 0:
            args.append(f"{link.jitter_ms}ms")
        if link.loss_pct > 0:
            args += ["loss", f"{link.loss_pct:.5f}%"]
        if link.queue_pkts is not None:
            args += ["limit", str(link.queue_pkts)]
        for e in ends:
            run_in(e.pid, ["tc", "qdisc", "change", "dev", e.intf, "parent", "5:1", "handle",
                           "10:", "netem"] + args)

    def loss_rules(self, topo: Topology, host: str, intf_of: dict[frozenset, str]) -> list[list[str]]:
        """iptables rule specs (for chain LOSS_CHAIN) emulating loss on a host's links."""
        rules = []
        for link in topo.links_of(host):
            if link.loss_pct <= 0 or link.key not in intf_of:
                continue
            p = f"{link.loss_pct / 100:.6f}"
            intf = intf_of[link.key]
            stat = ["-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"]
            rules.append(["-o", intf] + stat)
            if topo.kind(link.other(host)) == "switch":
                rules.append(["-i", intf] + stat)
        return rules

    def apply_loss(self, topo: Topology, host: str, pid: int, intf_of: dict[frozenset, str],
                   installed: bool) -> bool:
        """(Re)write a host's loss chain; returns whether the chain is hooked in."""
        if self.mode != "emulated":
            return installed
        rules = self.loss_rules(topo, host, intf_of)
        if not rules and not installed:
            return False
        lines = ["*filter"]
        if not installed:
            lines.append(f":{LOSS_CHAIN} - [0:0]")
            for chain in ("INPUT", "FORWARD", "OUTPUT"):
                lines.append(f"-I {chain} 1 -j {LOSS_CHAIN}")
        lines.append(f"-F {LOSS_CHAIN}")
        lines += [" ".join([f"-A {LOSS_CHAIN}"] + r) for r in rules]
        lines.append("COMMIT")
        run_in(pid, ["iptables-restore", "--noflush"], input="\n".join(lines) + "\n")
        return True

    @staticmethod
    def link_state(ends: Iterable[IntfEnd], up: bool) -> None:
        for e in ends:
            run_in(e.pid, ["ip", "link", "set", "dev", e.intf, "up" if up else "down"])

    # ---- delay files -----------------------------------------------------------------------
    def delay_file(self, host: str) -> Path:
        return self.delay_dir / f"{host}.json"

    def write_delay_files(self, topo: Topology, plan: AddressPlan) -> int:
        """Per host: one-way delays of the current paths from every peer; atomic replace."""
        self.version += 1
        delays = peer_delays(topo, plan)
        for host, peers in delays.items():
            write_delay_file(self.delay_file(host), {
                "mode": self.mode, "host": host, "version": self.version,
                "serialize_bw": False, "ip": plan.ips(host), "peers": peers})
        return self.version

    def write_mode_record(self, extra: dict | None = None) -> Path:
        """What was in force, for reports (summary.json reads 'mode')."""
        probe = probe_netem()
        rec = {"mode": self.mode, "netem_available": probe.available, "netem_probe": probe.detail,
               "kernel": platform.release(),
               "delay": "kernel netem" if self.mode == "netem" else "transport delay queue",
               "loss": "kernel netem" if self.mode == "netem" else "iptables statistic DROP",
               "bandwidth": "kernel HTB", **(extra or {})}
        path = self.delay_dir / "mode.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)
        return path


# ---- probe: round trips through the emulated delay (what our transport sees) ------------------
def echo_main(argv: list[str] | None = None) -> int:
    """`python -m testbed.linkemu echo server|client ZMQ_ADDR N DELAY_FILE`.

    The receiver of each message holds it per nodes.delayqueue (keyed by the kernel's
    Peer-Address), like the real transport; the client prints JSON {"rtt_ms": [...], "peers"}."""
    import argparse
    import time

    import zmq

    from nodes.delayqueue import DelayTable, sleep_until_ns
    ap = argparse.ArgumentParser(prog="python -m testbed.linkemu echo")
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("addr")
    ap.add_argument("n", type=int)
    ap.add_argument("delay_file")
    ap.add_argument("--payload-bytes", type=int, default=64)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=2,
                    help="round trips not counted (the first one includes the TCP connect)")
    a = ap.parse_args(argv)
    table = DelayTable(a.delay_file)
    ctx = zmq.Context()
    pad = b"x" * a.payload_bytes

    def held(sock):
        frames = sock.recv_multipart(copy=False)
        sent_ns = int(frames[-2].bytes)
        peer = frames[-1].get("Peer-Address")
        nbytes = sum(len(f.bytes) for f in frames)
        return frames, peer, sleep_until_ns(table.hold_until_ns(peer, sent_ns, nbytes))

    try:
        if a.role == "server":
            s = ctx.socket(zmq.ROUTER)
            s.bind(a.addr)
            for _ in range(a.n + a.warmup):
                frames, _, _ = held(s)
                s.send_multipart([frames[0], str(time.monotonic_ns()).encode(), pad])
            time.sleep(0.2)  # let the last reply leave before the socket closes
        else:
            s = ctx.socket(zmq.DEALER)
            s.connect(a.addr)
            rtts, peers, overs = [], set(), []
            for i in range(a.n + a.warmup):
                t0 = time.monotonic_ns()
                s.send_multipart([str(t0).encode(), pad])
                _, peer, over = held(s)
                if i >= a.warmup:
                    rtts.append((time.monotonic_ns() - t0) / 1e6)
                    peers.add(peer)
                    overs.append(over / 1e6)
                time.sleep(a.gap_ms / 1000)
            print(json.dumps({"rtt_ms": rtts, "peers": sorted(peers), "overshoot_ms": overs,
                              "mode": table.mode}))
    finally:
        ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        sys.exit(echo_main(sys.argv[2:]))
    print(f"mode auto -> {choose_mode('auto')} ({probe_netem().detail})")

"""`coel deploy INVENTORY --model DIR`: the runtime contract of `coel run` on real machines.

No Mininet: the controller, agents, entries and clients start over SSH at the inventory's
addresses (testbed/remote.py), with the run's CURVE keys copied to each host. Everything else
is testbed/runner.py's Runner: the same arguments, the same start order, the same scenario
events, the same run folder and report. DeployRunner only swaps its `net` for RemoteHosts, which
  - maps the local paths in each command line to that host's (run folder -> WORK_DIR/<run>/<host>,
    this checkout -> project_dir, this Python -> the inventory's python);
  - starts `exec python -m ...` through the host's multiplexed ssh connection, writing its pid
    to a file there (crash = `kill -9` of that pid over ssh; the local ssh ends with it);
  - where the host is root: a memory+cpu cgroup per server (memory_mb + agent_overhead_mb,
    cpu_share of the host's cores) and link faults (iptables drops that spare SSH, tc netem/tbf);
    where it is not, those events are refused before anything starts;
  - forwards the controller's control socket to a local one over ssh (no control port on the net);
  - at the end fetches each host's traces, shifted by that host's measured clock offset, and
    records the offset and its uncertainty (raw/testbed-clocks.jsonl, meta.json "clocks").
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from coel_model.errors import ConfigError, InfeasibleError
from testbed.inventory import LAN, Inventory, InventoryHost
from testbed.remote import ClockOffset, Ssh, measure_clock_offset, preflight, shift_trace_file
from testbed.runner import REPO, Proc, RunError, RunOptions, Runner, RunResult, make_run_dir, resolve_scenario
from testbed.scenario import Scenario
from topologies.schema import MIB

LINK_KINDS = ("link_down", "link_up", "bw", "delay", "loss", "restore")
CGROUP_KINDS = ("cpu_squeeze", "mem_squeeze")
CPU_PERIOD_US = 100_000


def _module_of(argv: list[str]) -> str:
    return argv[argv.index("-m") + 1] if "-m" in argv else Path(argv[0]).name


class RemoteHosts:
    """The `net` of a DeployRunner: inventory hosts reached over SSH (see the module doc)."""

    mode = "real"
    prefix = ""

    def __init__(self, inv: Inventory, run_dir: Path, trace: Any = None):
        self.inv = inv
        self.topo = inv.topology()
        self.run_dir = Path(run_dir)
        self.trace = trace
        self.nodes = inv.node_hosts()
        self.tag = run_dir.name[-8:]  # the scenario digest: names cgroups and iptables chains
        # short paths: ssh control sockets and the forwarded control socket live here
        self.state = Path(tempfile.mkdtemp(prefix="coel-ssh-"))
        self.ssh = {h.name: Ssh(h.target, self.state / h.name) for h in inv.hosts}
        self.remote_dir = {h.name: f"{inv.work_dir.rstrip('/')}/{run_dir.name}/{h.name}" for h in inv.hosts}
        self.clocks: dict[str, ClockOffset] = {}
        # unix socket paths hold 108 bytes and the run folder's may be longer: a short one in /tmp
        self.remote_control_sock = f"/tmp/coel-{self.tag}-control.sock"
        self.forward: subprocess.Popen | None = None
        self.cgroups: dict[str, str] = {}  # node -> cgroup name (servers on root hosts)
        self.cut: set[str] = set()  # hosts whose link is down (iptables chain in place)
        self.shaped: set[str] = set()  # hosts with a netem qdisc of ours
        self.started = False
        self._stopped = False

    # ---- what the Runner asks ------------------------------------------------------------------
    def host_of(self, node: str) -> InventoryHost:
        try:
            return self.nodes[node]
        except KeyError:
            raise ConfigError(f"{self.inv.source}: no node named {node!r} (nodes: "
                              f"{', '.join(self.nodes)})") from None

    def ip(self, node: str) -> str:
        return self.host_of(node).target.address

    def delay_file(self, node: str) -> Path:
        """Real links have real delays: this file is never written (no emulated delay)."""
        return self.run_dir / "linkemu" / f"{node}.json"

    def map_arg(self, host: InventoryHost, arg: str) -> str:
        """A local path in a command line -> the same thing on `host`."""
        if arg == sys.executable:
            return self.inv.python_path
        for local, remote in ((str(self.state / "control.sock"), self.remote_control_sock),
                              (str(self.run_dir), self.remote_dir[host.name]),
                              (str(REPO), self.inv.project_dir.rstrip("/"))):
            if local in arg:
                return arg.replace(local, remote)
        return arg

    def pid_file(self, node: str, module: str) -> str:
        return f"{self.remote_dir[self.host_of(node).name]}/pids/{node}-{module}.pid"

    def command(self, node: str, argv: list[str], env: dict[str, str] | None = None) -> str:
        """The shell command line `node`'s host runs for argv (also what --dry-run prints)."""
        h = self.host_of(node)
        rd = self.remote_dir[h.name]
        env = env or {}
        envs = {k: env[k] for k in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
        envs.update(COEL_HOST=node, COEL_HOST_IP=h.target.address, PYTHONPATH=self.inv.project_dir)
        pid = self.pid_file(node, _module_of(argv))
        parts = [f"mkdir -p {shlex.quote(rd)}/pids {shlex.quote(rd)}/raw",
                 f"cd {shlex.quote(self.inv.project_dir)}", f"echo $$ > {shlex.quote(pid)}"]
        run = ["env", *(f"{k}={v}" for k, v in envs.items()), *(self.map_arg(h, a) for a in argv)]
        cg = self.cgroup_of(node)
        if cg is not None:
            run = ["cgexec", "-g", f"memory,cpu:/{cg}", *run]
        return " && ".join(parts) + " && exec " + " ".join(shlex.quote(a) for a in run)

    def popen(self, node: str, argv: list[str], stdout: Any = None, stderr: Any = None,
              cwd: Any = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        ssh = self.ssh[self.host_of(node).name]
        return ssh.popen(self.command(node, argv, env), stdout=stdout, stderr=stderr)

    def signal(self, node: str, module: str, sig: str) -> None:
        """kill -SIG the process recorded in its pid file on its host (no error if gone)."""
        pid = shlex.quote(self.pid_file(node, module))
        self.ssh[self.host_of(node).name].run(f"test -f {pid} && kill -{sig} $(cat {pid}) 2>/dev/null; true",
                                              timeout_s=15, check=False)

    # ---- start ---------------------------------------------------------------------------------
    def start(self, keys_dir: Path) -> "RemoteHosts":
        """Pre-flight every host (in parallel), measure clocks, copy keys and topology, cgroups."""
        errors: dict[str, str] = {}

        def check(h: InventoryHost) -> None:
            try:
                what = f"{self.inv.source}: host {h.name}"
                info = preflight(self.ssh[h.name], self.inv.project_dir, self.inv.python, what)
                if h.root and info["uid"] != 0:
                    raise InfeasibleError(f"{what}: the inventory says root: true but {h.target.dest} "
                                          f"is uid {info['uid']}")
                self.clocks[h.name] = measure_clock_offset(self.ssh[h.name], self.inv.python_path)
            except Exception as exc:  # reported together below, per host
                errors[h.name] = str(exc)

        threads = [threading.Thread(target=check, args=(h,)) for h in self.inv.hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise InfeasibleError("\n".join(errors[h.name] for h in self.inv.hosts if h.name in errors))
        self.started = True
        files = {f"keys/{p.relative_to(keys_dir)}": p.read_bytes() for p in sorted(keys_dir.rglob("*"))
                 if p.is_file()}
        files["topology.yaml"] = (self.run_dir / "topology.yaml").read_bytes()
        for h in self.inv.hosts:
            ssh, rd = self.ssh[h.name], self.remote_dir[h.name]
            for rel, data in files.items():
                ssh.put(data, f"{rd}/{rel}")
            if "server" in h.roles:
                self._limits(h)
        return self

    def check_model(self, model_dir: Path) -> None:
        """The model folder must be on every host that loads it (agents, entries, clients)."""
        for h in self.inv.hosts:
            path = self.map_arg(h, str(model_dir))
            r = self.ssh[h.name].run(f"test -f {shlex.quote(path)}/config.json", check=False)
            if r.returncode != 0:
                raise InfeasibleError(f"{self.inv.source}: host {h.name}: model {path} not found "
                                      "(copy the model folder there, at this path)")

    def cgroup_of(self, node: str) -> str | None:
        """The memory+cpu cgroup of a server node on a root host (None elsewhere)."""
        h = self.host_of(node)
        if not h.root or "server" not in h.roles or node != h.node("server"):
            return None
        return f"coel-{self.tag}-{h.name}"

    def _limits(self, h: InventoryHost) -> None:
        cg = self.cgroup_of(h.node("server"))
        if cg is None:
            return
        limit = int((h.memory_mb + self.inv.agent_overhead_mb) * MIB)
        cmds = [f"cgcreate -g memory,cpu:/{cg}", f"cgset -r memory.limit_in_bytes={limit} /{cg}"]
        if h.cpu_share is not None:
            quota = f"$(( $(nproc) * {int(h.cpu_share * CPU_PERIOD_US)} ))"
            cmds.append(f"cgset -r cpu.cfs_period_us={CPU_PERIOD_US} -r cpu.cfs_quota_us={quota} /{cg}")
        r = self.ssh[h.name].run(" && ".join(cmds), check=False)
        if r.returncode != 0:
            raise InfeasibleError(f"{self.inv.source}: host {h.name}: cannot make its cgroup {cg} "
                                  f"(memory {limit} bytes, cpu_share {h.cpu_share}): "
                                  f"{(r.stderr or r.stdout).strip()[-300:]} (cgroup v1 memory and cpu "
                                  "controllers and cgroup-tools are needed; or set root: false)")
        self.cgroups[h.node("server")] = cg

    def forward_control(self, node: str, local_ep: str) -> str:
        """Forward the local unix socket of `local_ep` (ipc://...) to the controller's on its host."""
        h = self.host_of(node)
        local = local_ep[len("ipc://"):]
        remote = self.map_arg(h, local)
        Path(local).unlink(missing_ok=True)
        ssh = self.ssh[h.name]
        self.forward = subprocess.Popen(
            ["ssh", *ssh.options(multiplex=False), "-N", "-o", "ExitOnForwardFailure=yes",
             "-o", "StreamLocalBindUnlink=yes", "-L", f"{local}:{remote}", h.target.dest],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not Path(local).exists():
            if self.forward.poll() is not None or time.monotonic() > deadline:
                raise InfeasibleError(f"host {h.name}: cannot forward the control socket {remote}: "
                                      f"{self.forward.stderr.read().decode(errors='replace')[-300:] if self.forward.poll() is not None else 'timed out'}")
            time.sleep(0.05)
        return remote

    # ---- faults (root hosts only) ----------------------------------------------------------------
    def _link_host(self, a: str, b: str) -> InventoryHost:
        node = b if a == LAN else a
        if LAN not in (a, b):
            raise ConfigError(f"{self.inv.source}: link {a}-{b}: real hosts have one link each, "
                              f"to {LAN!r} (write [{a}, {LAN}])")
        h = self.host_of(node)
        if not h.root:
            raise InfeasibleError(f"host {h.name}: link faults need root there (inventory: root: false)")
        return h

    def _dev(self, h: InventoryHost) -> str:
        r = self.ssh[h.name].run(f"ip -o -4 addr show to {shlex.quote(h.target.address)}")
        fields = r.stdout.split()
        if len(fields) < 2:
            raise InfeasibleError(f"host {h.name}: no interface holds {h.target.address}")
        return fields[1]

    def _chain(self, h: InventoryHost) -> str:
        return f"COEL-{self.tag}"[:28]

    def links_down(self, a: str, b: str) -> None:
        """Drop everything to and from the host except its SSH (the testbed's own channel)."""
        h = self._link_host(a, b)
        c, port = self._chain(h), h.target.port
        self.ssh[h.name].run(
            f"iptables -w -N {c} 2>/dev/null; iptables -w -F {c} && "
            f"iptables -w -A {c} -p tcp --dport {port} -j RETURN && iptables -w -A {c} -p tcp --sport {port} -j RETURN && "
            f"iptables -w -A {c} -i lo -j RETURN && iptables -w -A {c} -o lo -j RETURN && iptables -w -A {c} -j DROP && "
            f"iptables -w -I INPUT -j {c} && iptables -w -I OUTPUT -j {c}")
        self.cut.add(h.name)
        self._set(a, b, up=False)

    def links_up(self, a: str, b: str) -> None:
        h = self._link_host(a, b)
        self._uncut(h)
        self._set(a, b, up=True)

    def _uncut(self, h: InventoryHost) -> None:
        c = self._chain(h)
        self.ssh[h.name].run(f"iptables -w -D INPUT -j {c}; iptables -w -D OUTPUT -j {c}; "
                             f"iptables -w -F {c}; iptables -w -X {c}; true", check=False)
        self.cut.discard(h.name)

    def _netem(self, a: str, b: str, **changes: Any) -> None:
        h = self._link_host(a, b)
        link = self._set(a, b, **changes)
        dev = self._dev(h)
        netem = f"delay {link.delay_ms:g}ms" + (f" {link.jitter_ms:g}ms" if link.jitter_ms else "")
        if link.loss_pct:
            netem += f" loss {link.loss_pct:g}%"
        if link.bw_mbit is not None and "bw_mbit" in changes:
            netem += f" rate {link.bw_mbit:g}mbit"
        self.ssh[h.name].run(f"tc qdisc replace dev {dev} root netem {netem}")
        self.shaped.add(h.name)

    def set_bw(self, a: str, b: str, bw_mbit: float | None) -> None:
        self._netem(a, b, bw_mbit=bw_mbit)

    def set_delay(self, a: str, b: str, delay_ms: float, jitter_ms: float | None = None) -> None:
        self._netem(a, b, delay_ms=delay_ms, **({} if jitter_ms is None else {"jitter_ms": jitter_ms}))

    def set_loss(self, a: str, b: str, loss_pct: float) -> None:
        self._netem(a, b, loss_pct=loss_pct)

    def _set(self, a: str, b: str, **changes: Any):
        self.topo = self.topo.with_link(a, b, **changes)
        if self.trace is not None:
            kind = ("link_up" if changes["up"] else "link_down") if "up" in changes else "link_change"
            self.trace.event(kind, a=a, b=b, mode=self.mode, **changes)
        return self.topo.link(a, b)

    # ---- stop ------------------------------------------------------------------------------------
    def collect(self, raw: Path) -> None:
        """Fetch each host's traces into raw/, shifted onto our clock; record the offsets."""
        from common.tracing import TraceWriter
        clocks = TraceWriter(raw / "testbed-clocks.jsonl", "testbed")
        for h in self.inv.hosts:
            off = self.clocks.get(h.name)
            tmp = Path(tempfile.mkdtemp(prefix="coel-fetch-"))
            try:
                self.ssh[h.name].get_tree(f"{self.remote_dir[h.name]}/raw", tmp)
                for f in sorted(tmp.glob("*.jsonl")):
                    shift_trace_file(f, raw / f.name, off.offset_ns if off else 0)
            except InfeasibleError as exc:
                clocks.event("fetch_failed", host_name=h.name, error=str(exc)[:300])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if off is not None:
                clocks.event("clock_offset", machine=h.name, address=h.target.address, **off.to_dict())
        clocks.close()

    def stop(self) -> None:
        """Undo everything on every host (idempotent): processes, faults, cgroups, files."""
        if self._stopped:
            return
        self._stopped = True
        if self.forward is not None:
            self.forward.terminate()
            try:
                self.forward.wait(5)
            except subprocess.TimeoutExpired:
                self.forward.kill()
        if self.started:
            for h in self.inv.hosts:
                rd = shlex.quote(self.remote_dir[h.name])
                cmds = [f"for f in {rd}/pids/*.pid; do [ -f \"$f\" ] && kill -9 $(cat \"$f\") 2>/dev/null; done"]
                if h.name in self.cut:
                    c = self._chain(h)
                    cmds.append(f"iptables -w -D INPUT -j {c}; iptables -w -D OUTPUT -j {c}; "
                                f"iptables -w -F {c}; iptables -w -X {c}")
                if h.name in self.shaped:
                    cmds.append(f"tc qdisc del dev $(ip -o -4 addr show to {h.target.address} | "
                                "awk '{print $2}') root")
                cg = self.cgroups.get(h.node("server")) if "server" in h.roles else None
                if cg:
                    cmds.append(f"sleep 0.2; cgdelete -g memory,cpu:/{cg}")
                cmds.append(f"rm -rf {rd} {self.remote_control_sock}; rmdir {shlex.quote(str(Path(self.remote_dir[h.name]).parent))}")
                try:
                    self.ssh[h.name].run("; ".join(cmds) + "; true", timeout_s=20, check=False)
                except InfeasibleError:
                    pass  # a dead host: nothing more we can do from here
        for s in self.ssh.values():
            try:
                s.close()
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(self.state, ignore_errors=True)


def check_events(sc: Scenario, inv: Inventory) -> None:
    """Faults that need root on a host that is not root are refused before anything starts."""
    nodes = inv.node_hosts()
    for ev in sc.events:
        if ev.kind in LINK_KINDS:
            node = ev.link[1] if ev.link[0] == LAN else ev.link[0]
            h = nodes.get(node)
            if h is not None and not h.root:
                raise ConfigError(f"scenario {sc.name}: {ev.describe()} at {ev.at_s:g} s: link faults need "
                                  f"root on host {h.name} ({inv.source} says root: false); "
                                  "crash/restart and slo events do not")
        if ev.kind in CGROUP_KINDS:
            h = nodes.get(ev.server)
            if h is not None and not h.root:
                raise ConfigError(f"scenario {sc.name}: {ev.describe()}: needs root on host {h.name} "
                                  f"(its cgroup); {inv.source} says root: false")


class DeployRunner(Runner):
    """A Runner whose hosts are the inventory's machines (see the module doc)."""

    def __init__(self, sc: Scenario, opt: RunOptions, inv: Inventory, run_dir: Path, stream: Any = None,
                 dry_run: bool = False):
        super().__init__(sc, opt, run_dir=run_dir, stream=stream)
        self.inv = inv
        self.dry_run = dry_run
        self.dry_lines: list[str] = []
        if dry_run:
            self.net = RemoteHosts(inv, run_dir)

    def _control_endpoint(self) -> str:
        return f"ipc://{self.net.state}/control.sock"

    def _launch(self, p: Proc) -> None:
        if self.dry_run:
            h = self.net.host_of(p.host)
            self.dry_lines.append(f"{h.target.dest}:{h.target.port}  [{p.key}]  {self.net.command(p.host, p.argv)}")
            return
        super()._launch(p)

    def _build_net(self) -> None:
        from nodes.security import make_keys
        from common.tracing import TraceWriter
        make_keys(self.run_dir / "keys")
        self.net = RemoteHosts(self.inv, self.run_dir, trace=TraceWriter(self.raw / "testbed-net.jsonl", "testbed"))
        t0 = time.monotonic()
        self.net.start(self.run_dir / "keys")
        self.net.check_model(self.model_dir)
        self.meta["net_build_s"] = round(time.monotonic() - t0, 2)
        self.meta["emulation_mode"] = "real"
        self.meta["inventory"] = str(self.inv.source)
        self.meta["placement"] = {"nodes": {n: h.name for n, h in self.net.nodes.items()},
                                  "machines": {h.name: {"address": h.target.address, "user": h.target.user,
                                                        "port": h.target.port, "root": h.root,
                                                        "roles": list(h.roles)} for h in self.inv.hosts}}
        self.meta["clocks"] = {m: c.to_dict() for m, c in self.net.clocks.items()}
        self.meta["cgroups"] = dict(self.net.cgroups)
        self._write_meta()

    def _start_services(self) -> None:
        super()._start_services()
        if not self.dry_run:
            self.net.forward_control(self.topo.controller.name, self.control_ep)

    def _link_counter_sources(self) -> list[tuple[str, str, str]]:
        return []  # real interfaces carry other traffic too; no per-link byte counters here

    def kill_server(self, server: str, process: str | None = None) -> list[str]:
        killed = []
        for role, module in ((("agent", "nodes.agent"), ("entry", "nodes.entry"))):
            if process not in (None, "all", role):
                continue
            p = self.procs.get(f"{server}-{role}")
            if p is not None and p.alive():
                self.net.signal(server, module, "KILL")
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                killed.append(role)
        if not killed:
            raise RunError(f"server_crash {server}: no running {process or 'agent or entry'} on it")
        return killed

    def _stop_processes(self) -> None:
        if isinstance(self.net, RemoteHosts) and self.net.started:
            for role in ("client", "entry", "agent", "controller"):
                for p in [p for p in self.procs.values() if p.role == role and p.alive()]:
                    self.net.signal(p.host, _module_of(p.argv), "TERM")
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline and any(p.alive() for p in self.procs.values()):
                time.sleep(0.1)
            for p in self.procs.values():
                if p.alive():
                    self.net.signal(p.host, _module_of(p.argv), "KILL")
        super()._stop_processes()
        if isinstance(self.net, RemoteHosts) and self.net.started:
            self.net.collect(self.raw)

    def dry_run_text(self) -> str:
        """What would run where: hosts, limits, then one line per process (nothing is started)."""
        self.control_ep = self._control_endpoint()
        self._start_services()
        self._start_clients()
        out = [f"inventory {self.inv.source}: {len(self.inv.hosts)} hosts; checkout {self.inv.project_dir}, "
               f"python {self.inv.python_path}; run files under {self.inv.work_dir}/<run>/<host>"]
        for h in self.inv.hosts:
            lim = ""
            if "server" in h.roles:
                lim = (f" memory_mb={h.memory_mb:g} (+{self.inv.agent_overhead_mb:g} overhead)"
                       f" cpu_share={h.cpu_share if h.cpu_share is not None else 'unlimited'}"
                       f" {'cgroup' if h.root else 'no cgroup (not root)'}")
            out.append(f"  {h.name:<10} {h.target.describe():<40} roles={','.join(h.roles)}"
                       f" root={'yes' if h.root else 'no'}{lim}")
        out.append("processes (in this order; clients after the controller reports serving):")
        out += ["  " + line for line in self.dry_lines]
        if self.sc.events:
            out.append("events: " + "; ".join(f"{e.at_s:g}s {e.describe()}" for e in self.sc.events))
        return "\n".join(out)


def deploy_scenario(inv: Inventory, model: str, scenario: Scenario | None = None, opt: RunOptions | None = None,
                    dry_run: bool = False, stream: Any = None) -> RunResult | str:
    """Run (or, with dry_run, describe) a deployment on the inventory's hosts."""
    opt = opt or RunOptions()
    sc = scenario or Scenario(name=f"deploy-{inv.name}", duration_s=60.0, drain_s=30.0)
    sc = replace(sc, topology=str(inv.source), model=model)
    sc = resolve_scenario(sc, replace(opt, model=None, topology=None))
    from testbed.scenario import check_against_topology
    topo = inv.topology()
    check_against_topology(sc, topo, f"scenario {sc.name}")
    check_events(sc, inv)
    out_dir = Path(tempfile.mkdtemp(prefix="coel-dry-")) if dry_run else opt.out_dir
    run_dir = make_run_dir(sc, out_dir)
    try:
        (run_dir / "topology.yaml").write_text(
            f"# generated from {inv.source} by coel deploy\n" +
            yaml.safe_dump(json.loads(json.dumps(topo.to_dict(), default=list)), sort_keys=False))
        sc = replace(sc, topology=str(run_dir / "topology.yaml"))
        runner = DeployRunner(sc, opt, inv, run_dir, stream=stream, dry_run=dry_run)
        if dry_run:
            return runner.dry_run_text()
        return runner.run()
    finally:
        if dry_run:
            shutil.rmtree(out_dir, ignore_errors=True)

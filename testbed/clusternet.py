"""One emulated topology across several machines: TestbedNet with Mininet Cluster Edition nodes.

`coel run SCENARIO --cluster cluster.yaml` (testbed/cluster.py places the nodes). Nodes placed on
the head machine are built as usual; nodes on another machine are mininet.examples.cluster
RemoteHost / a remote Linux bridge (RemoteMixin + LinuxBridge: this kernel has no Open vSwitch),
reached through one multiplexed ssh connection per machine; a link whose ends are on different
machines is a RemoteSSHLink: a tap pair joined by `ssh -w` (layer 2 over the SSH connection,
needs `PermitTunnel yes`; GRE needs ip_gre, which this kernel lacks). Everything the local
builder does in a namespace (routes, sysctl, tc, iptables, link up/down) goes to a remote
namespace as `mnexec -a PID ...` over ssh (RemoteNs, understood by linkemu.run_in).

Three things in mininet/examples/cluster.py do not work as shipped under Python 3 and are fixed
here by subclassing: rcmd() adds bytes to str; makeTunnel() compares the '@' it reads (bytes)
with a str; and every ssh it runs uses the user's default key and known_hosts (ours: the
cluster file's key, the run's known_hosts, BatchMode).

Remote processes: the runner's command line with the run folder mapped to WORK_DIR/<run> on that
machine (keys and delay files are copied there, rewritten delay files are pushed again), started
over ssh in the host's namespace (and its cgroups); kill/terminate reach the remote pid. At the
end their traces are fetched and shifted by the machine's measured clock offset
(raw/testbed-clocks.jsonl, meta.json "clocks"); meta.json "placement" says what ran where.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from coel_model.errors import InfeasibleError
from testbed.cluster import ClusterSpec, Machine, placement_record
from testbed.netbuild import TestbedNet
from testbed.remote import ClockOffset, Ssh, measure_clock_offset, preflight, shift_trace_file
from topologies.schema import MIB

WORK_DIR = "/tmp/coel-cluster"
CPU_PERIOD_US = 100_000


class RemoteNs:
    """A network namespace on another machine (pid there; None = that machine's root one)."""

    def __init__(self, ssh: Ssh, pid: int | None, machine: str):
        self.ssh, self.pid, self.machine = ssh, pid, machine

    def run(self, argv: list[str], input: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        pre = [] if self.pid is None else ["mnexec", "-a", str(self.pid)]
        r = self.ssh.run(" ".join(shlex.quote(a) for a in pre + argv), timeout_s=timeout, input=input,
                         check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed on machine {self.machine} in namespace of pid "
                               f"{self.pid} (rc {r.returncode}): {(r.stderr or r.stdout).strip()[:500]}")
        return r

    def __repr__(self) -> str:
        return f"RemoteNs({self.machine}, {self.pid})"


class RemotePopen:
    """A process started over ssh: poll/wait follow the local ssh; signals go to the remote pid."""

    def __init__(self, local: subprocess.Popen, ssh: Ssh, pid_file: str):
        self.local, self.ssh, self.pid_file = local, ssh, pid_file
        self.pid = local.pid

    @property
    def returncode(self) -> int | None:
        return self.local.returncode

    def poll(self) -> int | None:
        return self.local.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.local.wait(timeout)

    def send_signal(self, sig: int) -> None:
        if self.local.poll() is not None:
            return
        f = shlex.quote(self.pid_file)
        try:
            self.ssh.run(f"test -f {f} && kill -{int(sig)} $(cat {f}) 2>/dev/null; true", timeout_s=15,
                         check=False)
        except InfeasibleError:
            self.local.send_signal(sig)  # the machine is gone: at least end our side

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        try:
            self.local.wait(5)
        except subprocess.TimeoutExpired:
            self.local.kill()


def _mininet_classes(ssh: Ssh | None) -> dict[str, type]:
    """RemoteHost / remote LinuxBridge / tunnel link classes using this machine's ssh options."""
    from mininet.examples.cluster import RemoteHost, RemoteMixin, RemoteSSHLink
    from mininet.link import TCIntf
    from mininet.node import CPULimitedHost, Node
    from mininet.nodelib import LinuxBridge
    opts = ssh.options(multiplex=False) if ssh is not None else []

    class Fix:
        sshbase = ["ssh", "-q", *opts, "-tt"]

        def _popen(self, cmd: Any, sudo: bool = True, tt: bool = True, **params: Any) -> Any:
            """Nodes on this machine start processes like plain Mininet nodes: RemoteMixin's
            setpgrp makes `mnexec -d` fork and exit 0 at once, so the runner saw every local
            process "exit" while it ran on, orphaned."""
            if not self.isRemote:
                return Node._popen(self, cmd.split() if isinstance(cmd, str) else cmd, **params)
            return super()._popen(cmd, sudo=sudo, tt=tt, **params)

        def rcmd(self, *cmd: Any, **o: Any) -> str:  # upstream adds bytes to str
            p = self.rpopen(*cmd, **o)
            out, _ = p.communicate()
            return out.decode(errors="replace") if isinstance(out, bytes) else out

    class Tunnel(RemoteSSHLink):
        """TC interfaces on both ends; the ssh of the tunnel uses the remote machine's options."""

        def __init__(self, node1: Any, node2: Any, **kw: Any):
            kw.setdefault("cls1", TCIntf)
            kw.setdefault("cls2", TCIntf)
            super().__init__(node1, node2, **kw)

        def makeTunnel(self, node1: Any, node2: Any, intfname1: str, intfname2: str,
                       addr1: Any = None, addr2: Any = None) -> Any:
            if node2.server == "localhost":
                return self.makeTunnel(node2, node1, intfname2, intfname1, addr2, addr1)
            for node in (node1, node2):
                out = node.rcmd("ip tuntap add dev tap9 mode tap user " + node.user)
                if out.strip():
                    raise InfeasibleError(f"tunnel {intfname1}-{intfname2}: tap9 on {node.server}: {out.strip()}")
            ssh_argv = [a for a in node2.sshbase if a not in ("-tt", "-q")]
            cmd = [*ssh_argv, "-n", "-o", "Tunnel=Ethernet", "-w", "9:9", f"{node2.user}@{node2.serverIP}", "echo @"]
            self.cmd = cmd
            tunnel = node1.rpopen(cmd, sudo=False)
            ch = tunnel.stdout.read(1)
            if ch not in ("@", b"@"):
                rest = tunnel.stdout.read()
                raise InfeasibleError(f"ssh tunnel to {node2.serverIP} failed ({ch!r}{rest!r}); does its "
                                      "sshd have `PermitTunnel yes`, and /dev/net/tun?")
            for node in (node1, node2):
                self.moveIntf("tap9", node)
            for node, intf, addr in ((node1, intfname1, addr1), (node2, intfname2, addr2)):
                out = node.cmd("ip link set tap9 name", intf, *(["address", addr] if addr else []))
                if out.strip():
                    raise InfeasibleError(f"renaming tap9 to {intf} on {node.server}: {out.strip()}")
            return tunnel

    return {"host": type("CoelRemoteHost", (Fix, RemoteHost), {}),
            "cpuhost": type("CoelCPUHost", (Fix, RemoteMixin, CPULimitedHost), {}),
            "switch": type("CoelRemoteBridge", (Fix, RemoteMixin, LinuxBridge), {}),
            "link": Tunnel}


class ClusterNet(TestbedNet):
    """TestbedNet whose nodes live on the machines of `placement` (node -> machine name)."""

    def __init__(self, topo: Any, run_dir: Any, spec: ClusterSpec, placement: dict[str, str],
                 project_dir: str | None = None, python: str | None = None, **kw: Any):
        super().__init__(topo, run_dir, **kw)
        if spec.tunnel != "ssh":
            raise InfeasibleError(f"{spec.source}: tunnel {spec.tunnel!r}: only ssh tunnels are built here "
                                  "(GRE needs the ip_gre kernel module; this kernel has no GRE support)")
        self.spec, self.placement = spec, placement
        self.state = Path(tempfile.mkdtemp(prefix="coel-cl-"))
        self.ssh = {m.name: Ssh(m.target, self.state / m.name) for m in spec.machines if not m.head}
        self.remote_dir = {m: f"{WORK_DIR}/{self.run_dir.name}" for m in self.ssh}
        self.project_dir = project_dir or str(Path(__file__).resolve().parents[1])
        self.python = python or os.sys.executable
        self.clocks: dict[str, ClockOffset] = {}
        self._classes: dict[str, dict[str, type]] = {}
        self._remote_cg: dict[str, str] = {}  # server -> cgroup name on its machine
        self._pushed_delay_version = -1
        write = self.emu.write_delay_files

        def write_and_push(topo: Any, plan: Any) -> int:  # remote hosts read their copy
            v = write(topo, plan)
            self._push_delay_files()
            return v
        self.emu.write_delay_files = write_and_push

    # ---- where things are ----------------------------------------------------------------------
    def machine_of(self, node: str) -> Machine:
        return self.spec.machine(self.placement[node])

    def is_remote(self, node: str) -> bool:
        return not self.machine_of(node).head

    def _node_class(self, node: str, default: type) -> type:
        m = self.machine_of(node)
        cls = self._classes.setdefault(m.name, _mininet_classes(self.ssh.get(m.name)))
        if self.topo.kind(node) == "switch":
            return cls["switch"]
        if m.head:
            return cls["cpuhost"] if default.__name__ == "CPULimitedHost" else cls["host"]
        return cls["host"]  # remote CPU limits: a cgroup made on that machine (_remote_cgroups)

    def _link_class(self, link: Any) -> type:
        """Every link is the tunnel-capable class: a veth pair within a machine, `ssh -w` across."""
        m = self.machine_of(link.a)
        return self._classes.setdefault(m.name, _mininet_classes(self.ssh.get(m.name)))["link"]

    def _node_params(self, node: str) -> dict[str, Any]:
        m = self.machine_of(node)
        if m.head:
            return {"server": "localhost", "user": m.target.user}
        return {"server": m.target.address, "serverIP": m.target.address, "user": m.target.user,
                "controlPath": str(self.ssh[m.name].state_dir / "mn-%C")}

    def _ns(self, node: str) -> Any:
        if not self.is_remote(node):
            return super()._ns(node)
        m = self.machine_of(node)
        pid = None if self.topo.kind(node) == "switch" else self.host(node).pid
        return RemoteNs(self.ssh[m.name], pid, m.name)

    def _local_servers(self) -> list:
        return [s for s in self.topo.servers if not self.is_remote(s.name)]

    def _local_nodes(self) -> list:
        if not self.net:
            return []
        return [n for n in self.net.hosts + self.net.switches if not getattr(n, "isRemote", False)]

    def _keep_pids(self) -> set[int]:
        """The ssh sessions of remote nodes' shells (their command lines carry mininet:<name>, like
        local shells; killing them before Mininet's stop() would leave it waiting on a dead pty).
        With the other machine on this kernel, its shells are visible here too: keep them as well."""
        from testbed.cleanup import _all_pids, _cmdline
        remote = {n.name for n in (self.net.hosts + self.net.switches if self.net else [])
                  if getattr(n, "isRemote", False)}
        keep = set()
        for pid in _all_pids():
            words = _cmdline(pid).split()
            if any(w.startswith("mininet:") and w[len("mininet:"):] in remote for w in words):
                keep.add(pid)
        return keep

    def remote_path(self, node: str, path: str) -> str:
        m = self.machine_of(node).name
        return path.replace(str(self.run_dir), self.remote_dir[m]) if m in self.remote_dir else path

    # ---- build -----------------------------------------------------------------------------------
    def start(self) -> "ClusterNet":
        for m in self.spec.machines:
            if m.head:
                continue
            ssh = self.ssh[m.name]
            info = preflight(ssh, self.project_dir, self.python, f"{self.spec.source}: machine {m.name}")
            if info["uid"] != 0:
                raise InfeasibleError(f"{self.spec.source}: machine {m.name}: Mininet needs root there "
                                      f"({m.target.dest} is uid {info['uid']})")
            r = ssh.run("for t in mnexec ip tc brctl cgcreate sudo; do command -v $t >/dev/null || echo $t; done",
                        check=False)
            if r.stdout.strip():
                raise InfeasibleError(f"{self.spec.source}: machine {m.name} lacks {' '.join(r.stdout.split())} "
                                      "(run install.sh there as root)")
            self.clocks[m.name] = measure_clock_offset(ssh, self.python)
            rd = self.remote_dir[m.name]
            ssh.run(f"mkdir -p {shlex.quote(rd)}/raw {shlex.quote(rd)}/linkemu {shlex.quote(rd)}/pids")
        super().start()
        return self

    def push_keys(self, keys_dir: Path) -> None:
        """Copy the run's CURVE keys to every other machine (runner, after make_keys)."""
        for m, ssh in self.ssh.items():
            for p in sorted(Path(keys_dir).rglob("*")):
                if p.is_file():
                    ssh.put(p.read_bytes(), f"{self.remote_dir[m]}/{p.relative_to(self.run_dir)}")

    def _push_delay_files(self) -> None:
        for h in self.topo.hosts:
            if self.is_remote(h):
                f = self.emu.delay_file(h)
                if f.exists():
                    m = self.machine_of(h).name
                    dst = self.remote_path(h, str(f))
                    self.ssh[m].put(f.read_bytes(), dst + ".tmp", mode="644")
                    self.ssh[m].run(f"mv {shlex.quote(dst + '.tmp')} {shlex.quote(dst)}")

    def _memory_cgroups(self) -> None:
        """Local servers as usual; servers on other machines get memory+cpu cgroups made there."""
        super()._memory_cgroups()
        for s in self.topo.servers:
            if not self.is_remote(s.name):
                continue
            name, m = self.mn_name[s.name], self.machine_of(s.name)
            limit = int(self.topo.cgroup_memory_mb(s.name) * MIB)
            quota = f"$(( $(nproc) * {int(s.cpu_share * CPU_PERIOD_US)} ))"
            cmd = (f"cgcreate -g memory,cpu:/{name} && cgset -r memory.limit_in_bytes={limit} /{name} && "
                   + (f"cgset -r cpu.cfs_period_us={CPU_PERIOD_US} -r cpu.cfs_quota_us={quota} /{name} && "
                      if self.cpu_limits else "")
                   + f"cgclassify -g memory,cpu:/{name} {self.host(s.name).pid}")
            r = self.ssh[m.name].run(cmd, check=False)
            if r.returncode != 0:
                raise InfeasibleError(f"server {s.name} on machine {m.name}: cannot make its cgroup {name}: "
                                      f"{(r.stderr or r.stdout).strip()[-300:]}")
            self._remote_cg[s.name] = name
            self._memcg.add(s.name)

    # ---- processes -------------------------------------------------------------------------------
    def popen(self, name: str, argv: list[str], **kwargs: Any) -> Any:
        if not self.is_remote(name):
            return super().popen(name, argv, **kwargs)
        m = self.machine_of(name)
        ssh, rd = self.ssh[m.name], self.remote_dir[m.name]
        env = kwargs.get("env") or {}
        envs = {k: env[k] for k in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
        envs.update(COEL_HOST=name, COEL_HOST_IP=self.ip(name), PYTHONPATH=self.project_dir,
                    COEL_DELAY_FILE=self.remote_path(name, str(self.delay_file(name))))
        mod = argv[argv.index("-m") + 1] if "-m" in argv else Path(argv[0]).name
        pid_file = f"{rd}/pids/{name}-{mod}.pid"
        run = ["mnexec", "-da", str(self.host(name).pid), "env", *(f"{k}={v}" for k, v in envs.items()),
               *(self.python if a == os.sys.executable else self.remote_path(name, a) for a in argv)]
        cg = self._remote_cg.get(name)
        if cg:
            run = ["cgexec", "-g", f"memory,cpu:/{cg}", *run]
        cmd = (f"cd {shlex.quote(self.project_dir)} && echo $$ > {shlex.quote(pid_file)} && exec "
               + " ".join(shlex.quote(a) for a in run))
        local = ssh.popen(cmd, stdout=kwargs.get("stdout"), stderr=kwargs.get("stderr"))
        return RemotePopen(local, ssh, pid_file)

    # ---- run folder ------------------------------------------------------------------------------
    def run_meta(self) -> dict[str, Any]:
        return {"placement": placement_record(self.spec, self.topo, self.placement),
                "clocks": {m: c.to_dict() for m, c in self.clocks.items()}}

    def collect(self, raw: Path) -> None:
        """Fetch the other machines' traces into raw/, shifted onto our clock."""
        from common.tracing import TraceWriter
        clocks = TraceWriter(raw / "testbed-clocks.jsonl", "testbed")
        for m, ssh in self.ssh.items():
            off = self.clocks.get(m)
            tmp = Path(tempfile.mkdtemp(prefix="coel-fetch-"))
            try:
                ssh.get_tree(f"{self.remote_dir[m]}/raw", tmp)
                for f in sorted(tmp.glob("*.jsonl")):
                    shift_trace_file(f, raw / f.name, off.offset_ns if off else 0)
            except InfeasibleError as exc:
                clocks.event("fetch_failed", machine=m, error=str(exc)[:300])
            finally:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            if off is not None:
                clocks.event("clock_offset", machine=m, address=self.spec.machine(m).target.address,
                             **off.to_dict())
        clocks.close()

    # ---- stop ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Remote namespaces' processes first (by their shells' namespace there), then Mininet's
        stop (shells, tunnels, bridges), then the remote cgroups and run folders."""
        if self._stopped:
            return
        for m, ssh in self.ssh.items():
            shells = [n.pid for n in (self.net.hosts if self.net else [])
                      if getattr(n, "isRemote", False) and n.server == self.spec.machine(m).target.address and n.pid]
            script = ["for f in %s/pids/*.pid; do [ -f \"$f\" ] && kill -9 $(cat \"$f\") 2>/dev/null; done"
                      % shlex.quote(self.remote_dir[m])]
            for sp in shells:
                script.append(f"ns=$(readlink /proc/{sp}/ns/net); for p in /proc/[0-9]*; do q=${{p#/proc/}}; "
                              f"[ $q != {sp} ] && [ \"$(readlink $p/ns/net 2>/dev/null)\" = \"$ns\" ] && "
                              "kill -9 $q 2>/dev/null; done")
            try:
                ssh.run("; ".join(script) + "; true", timeout_s=30, check=False)
            except InfeasibleError:
                pass
        try:
            super().stop()
        finally:
            for m, ssh in self.ssh.items():
                cgs = [cg for s, cg in self._remote_cg.items() if self.placement[s] == m]
                cmd = "; ".join([f"cgdelete -g memory,cpu:/{cg}" for cg in cgs]
                                + [f"rm -rf {shlex.quote(self.remote_dir[m])}",
                                   "ip link del tap9 2>/dev/null", "true"])
                try:
                    ssh.run(cmd, timeout_s=30, check=False)
                    ssh.close()
                except InfeasibleError:
                    pass
            import shutil
            shutil.rmtree(self.state, ignore_errors=True)

"""Build a Topology in Mininet and change it while it runs.

The Topology is pure data (topologies/); this module replays it into namespaces: one host per
server/client/router/controller, `mininet.nodelib.LinuxBridge` switches without STP, TCLink
(HTB) links, `CPULimitedHost` CPU shares and a memory cgroup per server host (memory_mb +
agent_overhead_mb). Every segment is an IP subnet; routers forward with static /32 routes
computed from the topology (topologies.paths) and recomputed, after the topology's convergence
delay, whenever a link changes. Link parameters are applied by a testbed.linkemu mode.

Cleanup always runs: stop() is idempotent and is called from `with`, atexit and SIGINT/SIGTERM
handlers; if even that was skipped (kill -9), `coel clean` finds the leftovers by name prefix.
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import string
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError, InfeasibleError
from testbed import cleanup as cl
from testbed.linkemu import IntfEnd, LinkEmulator, choose_mode, run_in
from topologies.paths import AddressPlan, Route, address_plan, static_routes
from topologies.schema import MIB, Link, Topology

_ALNUM = string.digits + string.ascii_lowercase


def _new_prefix() -> str:
    while True:
        p = "co" + "".join(secrets.choice(_ALNUM) for _ in range(3))
        if not cl.read_state(p) and not cl.intfs_of(p):
            return p


def check_can_build() -> None:
    """Mininet needs root, mnexec, tc and the cgroup tools; say which is missing."""
    if os.geteuid() != 0:
        raise InfeasibleError("building the testbed network needs root (Mininet creates "
                              "namespaces, veths and cgroups); run as root or in the VM")
    missing = [t for t in ("mnexec", "tc", "ip", "iptables-restore", "cgcreate", "cgclassify",
                           "cgexec", "cgset", "brctl", "sysctl") if not shutil.which(t)]
    if missing:
        raise InfeasibleError(f"missing tools for the testbed network: {', '.join(missing)} "
                              "(run `bash install.sh` as root)")


class TestbedNet:
    """A running emulated network. Address hosts by their topology names.

    Usage:  with TestbedNet(topo, run_dir) as net: net.popen("e1", [...]); net.links_down("e1", "hub")
    """

    __test__ = False  # not a pytest class

    def __init__(self, topo: Topology, run_dir: str | Path | None = None, mode: str = "auto",
                 convergence_ms: float | None = None, cpu_limits: bool = True,
                 memory_limits: bool = True, signal_handlers: bool = True, trace: Any = None):
        self.topo = topo
        self.mode = choose_mode(mode)
        self.convergence_ms = topo.convergence_ms if convergence_ms is None else convergence_ms
        if self.convergence_ms < 0:
            raise ConfigError(f"convergence_ms must be >= 0, got {self.convergence_ms}")
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="coel-net-"))
        self.cpu_limits, self.memory_limits = cpu_limits, memory_limits
        self.signal_handlers = signal_handlers
        self.plan: AddressPlan = address_plan(topo)
        self.emu = LinkEmulator(self.mode, self.run_dir / "linkemu")
        self.prefix = ""
        self.net = None
        self.mn_name: dict[str, str] = {}
        self._ends: dict[frozenset, tuple[IntfEnd, IntfEnd]] = {}
        self._routes: dict[str, set[Route]] = {}
        self._loss_hooked: dict[str, bool] = {}
        self._memcg: set[str] = set()
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.route_version = 0
        self.route_error: str | None = None
        self._stopped = False
        self._old_handlers: dict[int, Any] = {}
        self.events: list[dict] = []  # what was changed when (for traces / reports)
        self.trace = trace  # optional common.tracing.TraceWriter: link and route events

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "TestbedNet":
        check_can_build()
        from mininet.link import TCLink
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import CPULimitedHost, Host
        from mininet.nodelib import LinuxBridge
        # Mininet logs harmless tc warnings (HTB quantum) as errors; ours are raised, not logged
        setLogLevel(os.environ.get("COEL_MININET_LOG", "critical"))
        if self.mode == "emulated":
            for i, link in enumerate(self.topo.links):
                if link.loss_pct > 0 and self.topo.kind(link.a) == self.topo.kind(link.b) == "switch":
                    raise ConfigError(f"{self.topo.source}: link {link.a}-{link.b}: loss_pct on a "
                                      "switch-switch link cannot be emulated without netem "
                                      "(iptables runs in hosts); put the loss on a host link")
        self.prefix = _new_prefix()
        hosts = self.topo.hosts
        for i, h in enumerate(hosts):
            self.mn_name[h] = f"{self.prefix}h{i}"
        for i, s in enumerate(self.topo.switches):
            self.mn_name[s.name] = f"{self.prefix}s{i}"
        cl.write_state(self.prefix, self._state())
        self._install_cleanup_hooks()
        try:
            self.net = Mininet(topo=None, build=False, controller=None, switch=LinuxBridge,
                               link=TCLink, autoSetMacs=False, waitConnected=False)
            for h in hosts:
                share = self._cpu_share(h)
                kw: dict[str, Any] = {"ip": self.plan.ifaces[h][0].cidr}
                if share is not None and self.cpu_limits:
                    self.net.addHost(self.mn_name[h], cls=self._node_class(h, CPULimitedHost), cpu=share,
                                     **kw, **self._node_params(h))
                else:
                    self.net.addHost(self.mn_name[h], cls=self._node_class(h, Host), **kw, **self._node_params(h))
            for s in self.topo.switches:
                self.net.addSwitch(self.mn_name[s.name], cls=self._node_class(s.name, LinuxBridge), stp=False,
                                   **self._node_params(s.name))
            cl.write_state(self.prefix, self._state())
            self._add_links()
            self.net.build()
            self.net.start()
            cl.write_state(self.prefix, self._state())
            if self.memory_limits:
                self._memory_cgroups()
            for h in hosts:
                self._sysctl(h)
            for link in self.topo.links:
                self.emu.after_build(link, self._ends[link.key])
                if not link.up:
                    self.emu.link_state(self._ends[link.key], up=False)
            for h in hosts:
                self._apply_loss(h)
            self._reroute()
            self.emu.write_mode_record({"prefix": self.prefix, "topology": self.topo.name})
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "TestbedNet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Tear everything down (idempotent); safe from signal handlers and atexit."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._timer:
                self._timer.cancel()
        try:
            if self.prefix:
                # kill our processes first: Mininet only kills the host shells
                nodes = self._local_nodes()
                shells = [n.pid for n in nodes if getattr(n, "pid", None)]
                for _ in range(3):  # Mininet's stop() needs the node shells themselves
                    keep = set(shells) | self._keep_pids()
                    pids = [p for p in cl.processes_of(self.prefix, shells) if p not in keep]
                    if not pids:
                        break
                    cl.kill_pids(pids)
                if self.net is not None:
                    try:
                        self.net.stop()
                    except Exception:  # a half-built net: the sweep below removes the rest
                        pass
                cl.clean_prefix(self.prefix)
        finally:
            self._remove_cleanup_hooks()
            if self._own_run_dir:  # a temp dir we made: its delay files died with the hosts
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def _install_cleanup_hooks(self) -> None:
        atexit.register(self.stop)
        if not self.signal_handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _remove_cleanup_hooks(self) -> None:
        atexit.unregister(self.stop)
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        old = self._old_handlers.get(signum)
        self.stop()
        if callable(old):
            old(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    def _state(self) -> dict:
        shells = {}
        if self.net is not None:
            shells = {h.name: h.pid for h in self._local_nodes() if h in self.net.hosts and getattr(h, "pid", None)}
        return {"prefix": self.prefix, "owner_pid": os.getpid(), "topology": self.topo.name,
                "source": self.topo.source, "run_dir": str(self.run_dir), "mode": self.mode,
                "nodes": self.mn_name, "shell_pids": shells, "created": time.time()}

    # ---- build helpers (testbed/clusternet.py overrides the first four for other machines) --
    def _node_class(self, node: str, default: type) -> type:
        """The Mininet class of a topology node (here: always the local default)."""
        return default

    def _node_params(self, node: str) -> dict[str, Any]:
        return {}

    def _link_class(self, link: Link) -> type | None:
        """The Mininet link class of a topology link (None: the network's default, TCLink)."""
        return None

    def _ns(self, node: str) -> Any:
        """Where commands for a node's namespace run (linkemu.run_in): a host's pid, None for a
        switch (the root namespace)."""
        return None if self.topo.kind(node) == "switch" else self.pid(node)

    def _local_servers(self) -> list:
        """Servers whose memory cgroup is made here (all of them on one machine)."""
        return list(self.topo.servers)

    def _keep_pids(self) -> set[int]:
        """Processes named after our nodes that Mininet's stop() still needs (none here)."""
        return set()

    def _local_nodes(self) -> list:
        """Mininet nodes whose shells are processes of this machine (cleanup kills by pid)."""
        return (self.net.hosts + self.net.switches) if self.net else []

    def _cpu_share(self, h: str) -> float | None:
        kind = self.topo.kind(h)
        if kind == "server":
            return self.topo.server(h).cpu_share
        if kind == "client":
            return self.topo.client(h).cpu_share
        if kind == "controller":
            return self.topo.controller.cpu_share
        return None

    def _intf_name(self, node: str, index: int) -> str:
        return f"{self.mn_name[node]}-eth{index}"

    def _add_links(self) -> None:
        sw_port: dict[str, int] = {}
        for link in self.topo.links:
            ends, names, params = [], [], []
            for n in (link.a, link.b):
                if self.topo.kind(n) == "switch":
                    idx = sw_port.get(n, 1)
                    sw_port[n] = idx + 1
                    name, p, is_sw = self._intf_name(n, idx), {}, True
                else:
                    iface = self.plan.iface_for_link(n, link)
                    name, p, is_sw = self._intf_name(n, iface.index), {"ip": iface.cidr}, False
                ends.append([n, name, is_sw])
                names.append(name)
                params.append(p)
            self.net.addLink(self.mn_name[link.a], self.mn_name[link.b], cls=self._link_class(link), intfName1=names[0],
                             intfName2=names[1], params1=params[0], params2=params[1],
                             **self.emu.tclink_params(link))
            self._ends[link.key] = tuple(
                IntfEnd(n, name, self._ns(n), is_sw)
                for n, name, is_sw in ends)

    def _memory_cgroups(self) -> None:
        """memory:/<host> limited to memory_mb + agent_overhead_mb; the host shell joins it, so
        everything started in the host (cmd or popen) is accounted there."""
        for s in self._local_servers():
            name = self.mn_name[s.name]
            limit = int(self.topo.cgroup_memory_mb(s.name) * MIB)
            for argv in (["cgcreate", "-g", f"memory:/{name}"],
                         ["cgset", "-r", f"memory.limit_in_bytes={limit}", f"/{name}"],
                         ["cgclassify", "-g", f"memory:/{name}", str(self.pid(s.name))]):
                r = subprocess.run(argv, capture_output=True, text=True)
                if r.returncode != 0:
                    raise InfeasibleError(
                        f"server {s.name}: cannot set its memory cgroup to {limit} bytes "
                        f"(memory_mb {s.memory_mb:g} + agent_overhead_mb "
                        f"{self.topo.agent_overhead_mb:g}): {' '.join(argv[:1])}: "
                        f"{(r.stderr or r.stdout).strip()[:300]} (is the cgroup v1 memory "
                        "controller mounted? or pass memory_limits=False)")
            self._memcg.add(s.name)

    def _sysctl(self, h: str) -> None:
        fwd = "1" if self.topo.kind(h) == "router" else "0"
        run_in(self._ns(h), ["sysctl", "-q", "-w", f"net.ipv4.ip_forward={fwd}",
                             "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"])
        for iface in self.plan.ifaces[h]:
            run_in(self._ns(h), ["sysctl", "-q", "-w",
                                 f"net.ipv4.conf.{self._intf_name(h, iface.index)}.rp_filter=0"])

    def _apply_loss(self, h: str) -> None:
        intf_of = {i.link.key: self._intf_name(h, i.index) for i in self.plan.ifaces[h]}
        self._loss_hooked[h] = self.emu.apply_loss(self.topo, h, self._ns(h), intf_of,
                                                   self._loss_hooked.get(h, False))

    # ---- routes ----------------------------------------------------------------------------
    def _reroute(self) -> None:
        """Install the routes of the current topology on every host; rewrite delay files.

        Every route is (re)placed each time: the kernel drops routes through an interface that
        went down, so a diff against what we installed earlier would miss them on 'up'."""
        with self._lock:
            if self._stopped:
                return
            routes = static_routes(self.topo, self.plan)
            for h in self.topo.hosts:
                new = set(routes[h])
                cmds = []
                for r in sorted(new, key=lambda r: r.dst_ip):
                    dev = self._intf_name(h, r.dev_index)
                    via = f" via {r.via_ip}" if r.via_ip else ""
                    cmds.append(f"route replace {r.dst_ip}/32{via} dev {dev} proto static")
                if cmds:
                    r = run_in(self._ns(h), ["ip", "-batch", "-"], input="\n".join(cmds) + "\n",
                               check=False)
                    if r.returncode != 0 and not self._stopped:
                        raise RuntimeError(f"installing routes on {h}: {r.stderr.strip()[:400]}")
                gone = {r.dst_ip for r in self._routes.get(h, set())} - {r.dst_ip for r in new}
                if gone:  # may already be gone with their interface: ignore 'No such process'
                    run_in(self._ns(h), ["ip", "-force", "-batch", "-"], check=False,
                           input="".join(f"route del {ip}/32 proto static\n" for ip in sorted(gone)))
                self._routes[h] = new
            self.route_version = self.emu.write_delay_files(self.topo, self.plan)
            owner = self.plan.host_of_ip()
            n = len(self.topo.hosts)
            self._event("routes", version=self.route_version,
                        unreachable_pairs=sum(n - 1 - len({owner[r.dst_ip] for r in routes[h]})
                                              for h in self.topo.hosts))

    def _reroute_in_timer(self) -> None:
        try:
            self._reroute()
        except Exception as exc:  # a timer thread has no caller: record it for wait_converged
            self.route_error = f"{type(exc).__name__}: {exc}"
            self._event("routes_failed", error=self.route_error)

    def _schedule_reroute(self) -> None:
        """Routes follow a link change after convergence_ms, like a routing protocol would."""
        with self._lock:
            if self._timer:
                self._timer.cancel()
            if self.convergence_ms <= 0:
                self._reroute()
                return
            self._timer = threading.Timer(self.convergence_ms / 1000, self._reroute_in_timer)
            self._timer.daemon = True
            self._timer.start()

    def wait_converged(self, timeout_s: float = 30.0) -> int:
        """Block until a pending route recomputation has run; returns the route version."""
        deadline = time.monotonic() + timeout_s
        while True:
            t = self._timer
            if t is None or not t.is_alive():
                if self.route_error:
                    err, self.route_error = self.route_error, None
                    raise RuntimeError(f"route recomputation failed: {err}")
                return self.route_version
            if time.monotonic() > deadline:
                raise TimeoutError(f"routes did not converge within {timeout_s} s")
            t.join(0.05)

    # ---- public API: hosts -----------------------------------------------------------------
    def _check_node(self, name: str) -> None:
        if name not in self.mn_name:
            raise ConfigError(f"{self.topo.source}: no node named {name!r} (nodes: "
                              f"{', '.join(self.topo.node_names)})")

    def host(self, name: str):
        """The Mininet node object of a topology host."""
        self._check_node(name)
        return self.net[self.mn_name[name]]

    def pid(self, name: str) -> int:
        return self.host(name).pid

    def ip(self, name: str) -> str:
        """The host's primary address (its first interface)."""
        self._check_node(name)
        return self.plan.primary_ip(name)

    def ips(self, name: str) -> list[str]:
        return self.plan.ips(name)

    def delay_file(self, name: str) -> Path:
        """The JSON delay table the host's transport reads (nodes.delayqueue.DelayTable)."""
        self._check_node(name)
        return self.emu.delay_file(name)

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in the host (its namespace and cgroups); stop() kills it."""
        env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
        env.setdefault("COEL_HOST", name)
        env.setdefault("COEL_DELAY_FILE", str(self.delay_file(name)))
        env.setdefault("COEL_HOST_IP", self.ip(name))
        kwargs["env"] = env
        node = self.host(name)
        mncmd = ["mnexec", "-da", str(node.pid)]
        groups = [g for g, on in (("cpu,cpuacct", hasattr(node, "cgroup")),
                                  ("memory", name in self._memcg)) if on]
        if groups:  # mnexec -g expects a joint cpu,cpuacct mount; cgexec handles any layout
            mncmd = ["cgexec"] + [x for g in groups for x in ("-g", f"{g}:/{node.name}")] + mncmd
        return node.popen(argv, mncmd=mncmd, **kwargs)

    def run(self, name: str, argv: list[str], timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run a command to completion in the host's namespace (thread-safe; no shell)."""
        return run_in(self._ns(name), argv, check=check, timeout=timeout)

    def cmd(self, name: str, *args: str) -> str:
        """Run a shell command in the host's Mininet shell (not thread-safe; interactive use)."""
        return self.host(name).cmd(*args)

    # ---- public API: links -----------------------------------------------------------------
    def _link(self, a: str, b: str) -> tuple[Link, tuple[IntfEnd, IntfEnd]]:
        self._check_node(a)
        self._check_node(b)
        try:
            link = self.topo.link(a, b)
        except KeyError:
            raise ConfigError(f"{self.topo.source}: no link between {a!r} and {b!r}") from None
        return link, self._ends[link.key]

    def _change(self, a: str, b: str, **changes: Any) -> Link:
        self.topo = self.topo.with_link(a, b, **changes)
        kind = ("link_up" if changes["up"] else "link_down") if "up" in changes else "link_change"
        self._event(kind, a=a, b=b, **changes)
        return self.topo.link(a, b)

    def _event(self, kind: str, **attrs: Any) -> None:
        t = time.monotonic_ns()
        self.events.append({"t_ns": t, "event": kind, **attrs})
        if self.trace is not None:
            self.trace.event(kind, t_ns=t, topology=self.topo.name, mode=self.mode, **attrs)

    def links_down(self, a: str, b: str) -> None:
        """Take the link a-b down: its interfaces really go down; routes follow after convergence."""
        with self._lock:
            _, ends = self._link(a, b)
            self.emu.link_state(ends, up=False)
            self._change(a, b, up=False)
            self._schedule_reroute()

    def links_up(self, a: str, b: str) -> None:
        with self._lock:
            _, ends = self._link(a, b)
            self.emu.link_state(ends, up=True)
            self._change(a, b, up=True)
            self._schedule_reroute()

    def set_bw(self, a: str, b: str, bw_mbit: float | None) -> None:
        with self._lock:
            _, ends = self._link(a, b)
            self._change(a, b, bw_mbit=bw_mbit)
            self.emu.set_bw(ends, bw_mbit)

    def set_delay(self, a: str, b: str, delay_ms: float, jitter_ms: float | None = None) -> None:
        """Change a link's one-way delay (and jitter); paths may change, so routes follow."""
        with self._lock:
            link, ends = self._link(a, b)
            ch: dict[str, Any] = {"delay_ms": delay_ms}
            if jitter_ms is not None:
                ch["jitter_ms"] = jitter_ms
            link = self._change(a, b, **ch)
            self.emu.set_netem(ends, link)
            self._schedule_reroute()

    def set_loss(self, a: str, b: str, loss_pct: float) -> None:
        with self._lock:
            link, ends = self._link(a, b)
            link = self._change(a, b, loss_pct=loss_pct)
            self.emu.set_netem(ends, link)
            for n in (a, b):
                if self.topo.kind(n) != "switch":
                    self._apply_loss(n)
            self.emu.write_delay_files(self.topo, self.plan)

    def describe(self) -> list[str]:
        """Lines naming each host, its Mininet name, addresses and limits (for `coel net up`)."""
        out = [f"network {self.prefix}: topology {self.topo.name}, link emulation {self.mode}, "
               f"run dir {self.run_dir}"]
        for h in self.topo.hosts:
            kind = self.topo.kind(h)
            extra = ""
            if kind == "server":
                s = self.topo.server(h)
                extra = (f" memory_mb={s.memory_mb:g} (cgroup {self.topo.cgroup_memory_mb(h):g} MiB)"
                         f" cpu_share={s.cpu_share:g}")
            out.append(f"  {h:<8} {kind:<10} mininet={self.mn_name[h]:<10} "
                       f"ip={','.join(self.ips(h))}{extra}")
        return out


def build_network(topo: Topology, run_dir: str | Path | None = None, **kwargs: Any) -> TestbedNet:
    """Build and start; the caller must stop() it (or use it as a context manager)."""
    return TestbedNet(topo, run_dir, **kwargs).start()

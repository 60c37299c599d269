"""Inventory files for `coel deploy`: the real machines a deployment runs on.

    name: lab
    project_dir: /opt/coel          # the checkout on every host (default: this checkout's path)
    python: .venv/bin/python        # relative to project_dir, or absolute
    work_dir: /tmp/coel-deploy      # where each host keeps the run's keys, traces and logs
    defaults: {user: root, key: ~/.ssh/coel_ed25519, port: 22}
    network: {bw_mbit: 100, delay_ms: 1}   # the planner's prior for each host's link (probes refine it)
    hosts:
      - {name: ctl, address: 10.1.0.1, roles: [controller]}
      - {name: e1, address: 10.1.0.2, roles: [server], memory_mb: 6, cpu_share: 0.5, root: true}
      - name: u1
        address: 10.1.0.9
        roles: [client]
        entry: e1
        workload: {rate_rps: 0.5, prompt_tokens: 32, max_new_tokens: 16}

Roles: controller (exactly one host), server (an agent; plus an entry service when it is some
client's entry), client (a load generator). A host with several roles gets one topology node per
role: the server keeps the host's name, the controller is `<host>-ctl`, the client `<host>-cli`.
`root` (default: user is root) says whether the testbed may use cgroups and inject link faults
there. The inventory becomes a star topology (every host on one switch `lan`) for the planner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coel_model.config import read_text_file
from coel_model.errors import ConfigError
from testbed.remote import SshTarget, parse_target
from topologies.loader import Doc, Fields, _cpu, _link_params, _workload
from topologies.schema import (COMPUTE_CLASSES, DEFAULT_AGENT_OVERHEAD_MB, Client, Controller, Link,
                               Server, Switch, Topology, Workload)

ROLES = ("controller", "server", "client")
LAN = "lan"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class InventoryHost:
    name: str
    target: SshTarget
    roles: tuple[str, ...]
    root: bool
    memory_mb: float | None = None  # server: model-shard budget (MiB)
    cpu_share: float | None = None  # fraction of the host's cores (CFS quota where root)
    compute_class: str = "medium"
    entry: str | None = None  # client: the server it sends to
    workload: Workload = field(default_factory=Workload)

    def node(self, role: str) -> str:
        """The topology node of this host's `role`."""
        if len(self.roles) == 1 or role == "server":
            return self.name
        return f"{self.name}-{'ctl' if role == 'controller' else 'cli'}"


@dataclass(frozen=True)
class Inventory:
    name: str
    hosts: tuple[InventoryHost, ...]
    project_dir: str
    python: str
    work_dir: str
    agent_overhead_mb: float
    network: tuple[tuple[str, Any], ...]  # link parameters of every host's link to the lan
    source: str = "<inventory>"

    def host(self, name: str) -> InventoryHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def with_role(self, role: str) -> list[InventoryHost]:
        return [h for h in self.hosts if role in h.roles]

    @property
    def python_path(self) -> str:
        return self.python if self.python.startswith("/") else f"{self.project_dir.rstrip('/')}/{self.python}"

    def node_hosts(self) -> dict[str, InventoryHost]:
        """topology node -> the host it runs on."""
        return {h.node(r): h for h in self.hosts for r in h.roles}

    def topology(self) -> Topology:
        """The star topology the controller plans on (every node on the switch `lan`)."""
        servers = tuple(Server(h.name, "", h.memory_mb, h.cpu_share or 1.0, h.compute_class)
                        for h in self.with_role("server"))
        ctl_host = self.with_role("controller")[0]
        clients = tuple(Client(h.node("client"), h.entry, "", h.workload)
                        for h in self.with_role("client"))
        params = dict(self.network)
        nodes = [s.name for s in servers] + [ctl_host.node("controller")] + [c.name for c in clients]
        return Topology(name=self.name, servers=servers,
                        controller=Controller(ctl_host.node("controller"), ""),
                        links=tuple(Link(n, LAN, **params) for n in nodes), clients=clients,
                        switches=(Switch(LAN),), agent_overhead_mb=self.agent_overhead_mb,
                        convergence_ms=0.0, source=self.source)


def parse_inventory(text: str, source: str = "<inventory>") -> Inventory:
    doc = Doc(source, text=text)
    top = Fields(doc, doc.data, (), ("name", "project_dir", "python", "work_dir", "defaults",
                                     "network", "agent_overhead_mb", "hosts"), "inventory")
    defaults: dict[str, Any] = {}
    if top.has("defaults"):
        fd = Fields(doc, top.m["defaults"], ("defaults",), ("user", "key", "port", "root"), "defaults")
        defaults = {k: fd.m[k] for k in fd.m}
    net = Fields(doc, top.m.get("network") or {}, ("network",),
                 ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts"), "network")
    network = _link_params(net, {})
    hosts: list[InventoryHost] = []
    where: dict[str, tuple] = {}
    addrs: dict[str, tuple] = {}
    for i, v in enumerate(top.list("hosts")):
        p = ("hosts", i)
        f = Fields(doc, v, p, ("name", "address", "user", "key", "port", "root", "roles",
                               "memory_mb", "cpu_share", "compute_class", "entry", "workload"), "host")
        name = f.name()
        if name == LAN:
            raise doc.err(p + ("name",), f"{LAN!r} is the name of the network switch; pick another")
        if name in where:
            raise doc.err(p + ("name",), f"host name {name!r} already used at line {doc.line(where[name])}")
        target = parse_target(f, defaults)
        if target.address in addrs:
            raise doc.err(p + ("address",), f"address {target.address} already used by host at line "
                          f"{doc.line(addrs[target.address])} (give one host several roles instead)")
        if target.key is not None and not Path(target.key).is_file():
            raise doc.err(p + ("key",) if f.has("key") else ("defaults", "key"),
                          f"key file {target.key} not found")
        roles = f.list("roles")
        if not roles:
            raise doc.err(p, f"host {name!r} has no roles (any of: {', '.join(ROLES)})")
        for j, r in enumerate(roles):
            if r not in ROLES:
                raise doc.err(p + ("roles", j), f"unknown role {r!r} (roles: {', '.join(ROLES)})")
        if len(set(roles)) != len(roles):
            raise doc.err(p + ("roles",), "a role is listed twice")
        is_server, is_client = "server" in roles, "client" in roles
        for key, ok, why in (("memory_mb", is_server, "server"), ("compute_class", is_server, "server"),
                             ("entry", is_client, "client"), ("workload", is_client, "client")):
            if f.has(key) and not ok:
                raise doc.err(p + (key,), f"{key} belongs to a {why}; host {name!r} has roles {roles}")
        if is_server and not f.has("memory_mb"):
            raise doc.err(p, f"server {name!r} has no memory_mb (its model-shard memory budget, MiB)")
        if is_client and not f.has("entry"):
            raise doc.err(p, f"client {name!r} has no entry (the server it sends requests to)")
        cc = f.str("compute_class", "medium")
        if cc not in COMPUTE_CLASSES:
            raise doc.err(p + ("compute_class",), f"unknown compute_class {cc!r} "
                          f"(valid: {', '.join(COMPUTE_CLASSES)})")
        root_default = defaults.get("root", target.user == "root")
        hosts.append(InventoryHost(
            name=name, target=target, roles=tuple(roles), root=f.bool("root", root_default),
            memory_mb=f.num("memory_mb", None, gt=0, unit=" MiB") if is_server else None,
            cpu_share=_cpu(f, None), compute_class=cc, entry=f.name("entry", None),
            workload=_workload(doc, f.m.get("workload"), p + ("workload",))))
        where[name], addrs[target.address] = p, p + ("address",)
    if not hosts:
        raise doc.err(("hosts",), "an inventory needs hosts")
    ctls = [i for i, h in enumerate(hosts) if "controller" in h.roles]
    if len(ctls) != 1:
        raise doc.err(("hosts", ctls[1]) if ctls else ("hosts",),
                      f"exactly one host must have the controller role (found {len(ctls)})")
    servers = {h.name for h in hosts if "server" in h.roles}
    if not servers:
        raise doc.err(("hosts",), "no host has the server role")
    for i, h in enumerate(hosts):
        if h.entry is not None and h.entry not in servers:
            raise doc.err(("hosts", i, "entry"), f"client {h.name!r}: entry {h.entry!r} is not a "
                          f"server host (servers: {', '.join(sorted(servers))})")
    nodes: dict[str, str] = {}
    for h in hosts:
        for r in h.roles:
            n = h.node(r)
            if n in nodes or n == LAN:
                raise doc.err(where[h.name], f"node name {n!r} (role {r} of {h.name}) clashes with "
                              f"{nodes.get(n, 'the switch')}")
            nodes[n] = h.name
    inv = Inventory(name=top.name("name", "inventory"), hosts=tuple(hosts),
                    project_dir=top.str("project_dir", str(REPO)), python=top.str("python", ".venv/bin/python"),
                    work_dir=top.str("work_dir", "/tmp/coel-deploy"),
                    agent_overhead_mb=top.num("agent_overhead_mb", DEFAULT_AGENT_OVERHEAD_MB, ge=0, unit=" MiB"),
                    network=tuple(network.items()), source=source)
    return inv


def load_inventory(path: str | Path) -> Inventory:
    return parse_inventory(read_text_file(path, "inventory"), str(Path(path)))

"""Cluster files for `coel run --cluster`: which machines carry one emulated topology, and where
each topology node goes.

    machines:
      - {name: here, address: 10.0.0.1, head: true}        # runs the runner and the controller
      - {name: box2, address: 10.0.0.2, user: root, key: ~/.ssh/coel_ed25519, port: 22}
    placement:            # optional, node -> machine; the rest is placed by place_nodes()
      e4: box2
    tunnel: ssh           # how cut links cross machines: ssh (tap over `ssh -w`) or gre

Loading checks the file alone (unknown keys, duplicate names or addresses, no or two heads, a node
placed on an unknown machine) with file and line; check_against_topology() then checks the node
names against the topology, before anything starts. place_nodes() is pure: it balances the
servers over the machines and, within that, cuts the fewest emulated links (each cut link becomes
a tunnel between machines).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coel_model.config import read_text_file
from coel_model.errors import ConfigError
from testbed.remote import SshTarget, parse_target
from topologies.loader import Doc, Fields
from topologies.schema import Topology

TUNNELS = ("ssh", "gre")


@dataclass(frozen=True)
class Machine:
    name: str
    target: SshTarget
    head: bool = False


@dataclass(frozen=True)
class ClusterSpec:
    machines: tuple[Machine, ...]
    placement: tuple[tuple[str, str], ...] = ()  # (node, machine) given in the file
    tunnel: str = "ssh"
    source: str = "<cluster>"
    placement_lines: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # node -> "file:line"

    @property
    def head(self) -> Machine:
        return next(m for m in self.machines if m.head)

    def machine(self, name: str) -> Machine:
        for m in self.machines:
            if m.name == name:
                return m
        raise KeyError(name)

    def where(self, node: str) -> str:
        return dict(self.placement_lines).get(node, self.source)


def parse_cluster(text: str, source: str = "<cluster>") -> ClusterSpec:
    doc = Doc(source, text=text)
    top = Fields(doc, doc.data, (), ("machines", "placement", "tunnel"), "cluster file")
    machines: list[Machine] = []
    names: dict[str, int] = {}
    addrs: dict[str, int] = {}
    for i, v in enumerate(top.list("machines")):
        p = ("machines", i)
        f = Fields(doc, v, p, ("name", "address", "user", "key", "port", "head"), "machine")
        name = f.name()
        if name in names:
            raise doc.err(p + ("name",), f"machine name {name!r} already used at line "
                          f"{doc.line(('machines', names[name]))}")
        target = parse_target(f)
        if target.address in addrs:
            raise doc.err(p + ("address",), f"address {target.address} already used by machine "
                          f"{machines[addrs[target.address]].name!r} (line "
                          f"{doc.line(('machines', addrs[target.address], 'address'))})")
        if target.key is not None and not Path(target.key).is_file():
            raise doc.err(p + ("key",), f"key file {target.key} not found")
        names[name], addrs[target.address] = i, i
        machines.append(Machine(name, target, f.bool("head", False)))
    if len(machines) < 1:
        raise doc.err(("machines",), "a cluster needs at least one machine")
    heads = [i for i, m in enumerate(machines) if m.head]
    if len(heads) > 1:
        raise doc.err(("machines", heads[1], "head"), f"two head machines ({machines[heads[0]].name} "
                      f"and {machines[heads[1]].name}); the head runs the runner: mark one")
    if not heads:  # the first machine is the head unless another is marked
        machines[0] = Machine(machines[0].name, machines[0].target, True)
    tunnel = top.str("tunnel", "ssh")
    if tunnel not in TUNNELS:
        raise doc.err(("tunnel",), f"unknown tunnel {tunnel!r} (known: {', '.join(TUNNELS)})")
    placement, lines = [], []
    pm = top.m.get("placement") or {}
    if not isinstance(pm, dict):
        raise doc.err(("placement",), "must be a mapping node -> machine")
    for node, mach in pm.items():
        p = ("placement", node)
        if not isinstance(mach, str) or mach not in names:
            raise doc.err(p, f"node {node!r} placed on unknown machine {mach!r} (machines: "
                          f"{', '.join(names)})")
        placement.append((str(node), mach))
        lines.append((str(node), f"{source}:{doc.line(p)}"))
    return ClusterSpec(tuple(machines), tuple(placement), tunnel, source, tuple(lines))


def load_cluster(path: str | Path) -> ClusterSpec:
    return parse_cluster(read_text_file(path, "cluster file"), str(Path(path)))


def check_against_topology(spec: ClusterSpec, topo: Topology) -> None:
    """Every placed node exists; the controller stays on the head (its control socket is local)."""
    nodes = set(topo.node_names)
    for node, mach in spec.placement:
        if node not in nodes:
            raise ConfigError(f"{spec.where(node)}: placement: unknown node {node!r} (topology "
                              f"{topo.name} has: {', '.join(topo.node_names)})")
        if node == topo.controller.name and mach != spec.head.name:
            raise ConfigError(f"{spec.where(node)}: placement: the controller {node!r} must run on "
                              f"the head machine {spec.head.name!r} (the runner talks to it over a "
                              "local socket)")


# ---- placement (pure) ------------------------------------------------------------------------
def cut_links(topo: Topology, placement: dict[str, str]) -> list[tuple[str, str]]:
    """The links whose ends are on different machines (each becomes a tunnel)."""
    return [(l.a, l.b) for l in topo.links if placement[l.a] != placement[l.b]]


def place_nodes(topo: Topology, machines: list[str], fixed: dict[str, str] | None = None,
                head: str | None = None) -> dict[str, str]:
    """node -> machine: servers balanced (counts differ by at most one, fixed ones counted),
    then as few links cut as a greedy start plus pairwise server swaps and single non-server
    moves can find (deterministic). The controller goes to the head unless fixed."""
    if not machines:
        raise ConfigError("place_nodes: no machines")
    head = head or machines[0]
    fixed = dict(fixed or {})
    fixed.setdefault(topo.controller.name, head)
    servers = [s.name for s in topo.servers]
    order = {m: i for i, m in enumerate(machines)}
    # server quota per machine: as even as possible, the head takes the remainder first
    quota = {m: len(servers) // len(machines) for m in machines}
    for m in ([head] + [m for m in machines if m != head])[:len(servers) % len(machines)]:
        quota[m] += 1
    for s in servers:  # fixed servers count against their machine's quota (may exceed it)
        if s in fixed:
            quota[fixed[s]] -= 1
    nbrs: dict[str, list[str]] = {n: [] for n in topo.node_names}
    for l in topo.links:
        nbrs[l.a].append(l.b)
        nbrs[l.b].append(l.a)
    place = dict(fixed)

    def affinity(n: str, m: str) -> int:
        return sum(1 for x in nbrs[n] if place.get(x) == m)

    # greedy: servers in BFS order from the controller, each to the allowed machine it has most
    # placed neighbours on (two hops through switches count too: a star's hub is not placed yet)
    def affinity2(n: str, m: str) -> int:
        return 2 * affinity(n, m) + sum(affinity(x, m) for x in nbrs[n] if x not in place)

    seen, queue = {topo.controller.name}, [topo.controller.name]
    bfs = []
    while queue:
        n = queue.pop(0)
        bfs.append(n)
        for x in sorted(nbrs[n]):
            if x not in seen:
                seen.add(x)
                queue.append(x)
    for s in [n for n in bfs if n in servers and n not in place]:
        free = [m for m in machines if quota[m] > 0]
        m = max(free, key=lambda m: (affinity2(s, m), quota[m], -order[m]))
        place[s] = m
        quota[m] -= 1
    others = [n for n in bfs if n not in place]
    for n in others:  # clients, switches, routers: with most of their placed neighbours
        place[n] = max(machines, key=lambda m: (affinity2(n, m), m == head, -order[m]))

    def cost() -> int:
        return len(cut_links(topo, place))

    movable_servers = [s for s in servers if s not in fixed]
    movable_others = [n for n in others if n not in fixed]
    best = cost()
    improved = True
    while improved:
        improved = False
        for i, a in enumerate(movable_servers):
            for b in movable_servers[i + 1:]:
                if place[a] == place[b]:
                    continue
                place[a], place[b] = place[b], place[a]
                c = cost()
                if c < best:
                    best, improved = c, True
                else:
                    place[a], place[b] = place[b], place[a]
        for n in movable_others:
            for m in machines:
                if m == place[n]:
                    continue
                old, place[n] = place[n], m
                c = cost()
                if c < best:
                    best, improved = c, True
                else:
                    place[n] = old
    return {n: place[n] for n in topo.node_names}


def resolve_placement(spec: ClusterSpec, topo: Topology) -> dict[str, str]:
    """The file's placement completed by place_nodes (after check_against_topology)."""
    check_against_topology(spec, topo)
    return place_nodes(topo, [m.name for m in spec.machines], dict(spec.placement),
                       head=spec.head.name)


def placement_record(spec: ClusterSpec, topo: Topology, placement: dict[str, str]) -> dict[str, Any]:
    """What the run folder keeps: machines, node -> machine, the cut links (tunnels)."""
    return {"machines": {m.name: {"address": m.target.address, "user": m.target.user,
                                  "port": m.target.port, "head": m.head} for m in spec.machines},
            "tunnel": spec.tunnel, "nodes": placement,
            "servers_per_machine": {m.name: sorted(s.name for s in topo.servers
                                                   if placement[s.name] == m.name)
                                    for m in spec.machines},
            "cut_links": [list(l) for l in cut_links(topo, placement)]}

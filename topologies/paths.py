"""Pure graph computations on a Topology: paths, path delay, bottleneck bandwidth, IP addressing
and the static routes that the Mininet builder installs (recomputed after a link change).

Forwarding rule: only routers and switches carry transit traffic; servers, clients and the
controller may be multi-homed but never forward. Paths minimise the sum of link delays, then the
hop count (a tiny per-hop cost), so the routes and the delays the delay queue applies agree.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

import networkx as nx

from coel_model.errors import ConfigError
from topologies.schema import Link, Topology

HOP_COST_MS = 1e-3  # tie-break: among equal-delay paths prefer fewer hops


def graph(topo: Topology, up_only: bool = True) -> nx.Graph:
    """Undirected node graph; edges carry their Link as 'link' and 'delay_ms'."""
    g = nx.Graph()
    for n in topo.node_names:
        g.add_node(n, kind=topo.kind(n))
    for link in topo.links:
        if link.up or not up_only:
            g.add_edge(link.a, link.b, link=link, delay_ms=link.delay_ms)
    return g


def _forwarders(topo: Topology) -> set[str]:
    return {r.name for r in topo.routers} | {s.name for s in topo.switches}


def shortest_paths_from(topo: Topology, src: str, g: nx.Graph | None = None) -> dict[str, list[str]]:
    """Node paths from src to every reachable node over up links (transit only via forwarders)."""
    g = graph(topo) if g is None else g
    fwd = _forwarders(topo)

    def weight(u: str, _v: str, data: dict) -> float | None:
        if u != src and u not in fwd:
            return None  # a non-forwarding host is a dead end
        return data["delay_ms"] + HOP_COST_MS

    _, paths = nx.single_source_dijkstra(g, src, weight=weight)
    return paths


def shortest_path(topo: Topology, a: str, b: str) -> list[str] | None:
    """Node path from a to b over links that are up, or None if b is unreachable."""
    for n in (a, b):
        if n not in topo.node_names:
            raise ConfigError(f"{topo.source}: no node named {n!r}")
    return shortest_paths_from(topo, a).get(b)


def path_links(topo: Topology, path: list[str]) -> list[Link]:
    return [topo.link(u, v) for u, v in zip(path, path[1:])]


def path_delay_ms(topo: Topology, path: list[str]) -> float:
    """One-way delay of a path: each link's delay counts once per direction."""
    return sum(l.delay_ms for l in path_links(topo, path))


def path_jitter_ms(topo: Topology, path: list[str]) -> float:
    """Jitter amplitude of a path: independent per-link jitters add in quadrature."""
    return math.sqrt(sum(l.jitter_ms ** 2 for l in path_links(topo, path)))


def path_loss_pct(topo: Topology, path: list[str]) -> float:
    keep = 1.0
    for l in path_links(topo, path):
        keep *= 1 - l.loss_pct / 100
    return 100 * (1 - keep)


def bottleneck_bw_mbit(topo: Topology, path: list[str]) -> float | None:
    """Smallest link rate on the path (Mbit/s); None if every link is unlimited."""
    rates = [l.bw_mbit for l in path_links(topo, path) if l.bw_mbit is not None]
    return min(rates) if rates else None


# ---- addressing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Iface:
    host: str
    index: int          # ethN on this host
    link: Link
    ip: str             # dotted quad
    prefixlen: int
    segment: int        # L2 segment id (subnet index)

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass(frozen=True)
class AddressPlan:
    """One /24 per L2 segment (a switch component, or a direct host-host link)."""
    ifaces: dict[str, tuple[Iface, ...]]   # host -> its interfaces in link order

    def primary_ip(self, host: str) -> str:
        return self.ifaces[host][0].ip

    def ips(self, host: str) -> list[str]:
        return [i.ip for i in self.ifaces[host]]

    def iface_for_link(self, host: str, link: Link) -> Iface:
        for i in self.ifaces[host]:
            if i.link.key == link.key:
                return i
        raise KeyError(f"host {host!r} has no interface on link {link.a}-{link.b}")

    def host_of_ip(self) -> dict[str, str]:
        return {i.ip: h for h, ifs in self.ifaces.items() for i in ifs}


def address_plan(topo: Topology, base: str = "10.0.0.0/8") -> AddressPlan:
    sw = {s.name for s in topo.switches}
    l2 = nx.Graph()
    l2.add_nodes_from(sorted(sw))
    l2.add_edges_from((l.a, l.b) for l in topo.links if l.a in sw and l.b in sw)
    seg_of_switch: dict[str, int] = {}
    nseg = 0
    for s in (s.name for s in topo.switches):  # stable: order of definition
        if s not in seg_of_switch:
            for m in nx.node_connected_component(l2, s):
                seg_of_switch[m] = nseg
            nseg += 1
    net = ipaddress.ip_network(base)
    subnets = net.subnets(new_prefix=24)
    seg_nets: dict[int, ipaddress.IPv4Network] = {}
    next_host: dict[int, int] = {}
    ifaces: dict[str, list[Iface]] = {h: [] for h in topo.hosts}

    def alloc(seg: int) -> str:
        if seg not in seg_nets:
            seg_nets[seg] = next(subnets)
            next_host[seg] = 1
        k = next_host[seg]
        if k > 254:
            raise ConfigError(f"{topo.source}: more than 254 hosts on one L2 segment")
        next_host[seg] = k + 1
        return str(seg_nets[seg].network_address + k)

    for seg in range(nseg):  # switch segments get the first subnets, in definition order
        seg_nets[seg], next_host[seg] = next(subnets), 1
    for link in topo.links:
        if link.a in sw and link.b in sw:
            continue
        if link.a in sw or link.b in sw:
            host = link.b if link.a in sw else link.a
            seg = seg_of_switch[link.a if link.a in sw else link.b]
            ends = [host]
        else:
            seg = nseg
            nseg += 1
            ends = [link.a, link.b]
        for h in ends:
            ifaces[h].append(Iface(h, len(ifaces[h]), link, alloc(seg), 24, seg))
    for h, ifs in ifaces.items():
        if not ifs:
            raise ConfigError(f"{topo.source}: host {h!r} has no link")
    return AddressPlan({h: tuple(v) for h, v in ifaces.items()})


# ---- static routes ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    dst_ip: str             # a /32 destination
    dev_index: int          # ethN of the host
    via_ip: str | None      # next hop; None = directly attached


def static_routes(topo: Topology, plan: AddressPlan) -> dict[str, list[Route]]:
    """Per host, a /32 route to every IP of every other reachable host over up links.

    /32 routes override the connected /24s, so traffic to an address whose own link is down is
    still routed around it when another path exists."""
    g = graph(topo)
    sw = {s.name for s in topo.switches}
    out: dict[str, list[Route]] = {}
    for h in topo.hosts:
        paths = shortest_paths_from(topo, h, g)
        routes = []
        for d in topo.hosts:
            if d == h or d not in paths:
                continue
            p = paths[d]
            first = topo.link(p[0], p[1])
            nh = next(n for n in p[1:] if n not in sw)  # next host on the path (same L2 segment)
            dev = plan.iface_for_link(h, first)
            if nh == d:
                via = None
            else:
                # nh's interface on the segment we leave through
                via = next(i.ip for i in plan.ifaces[nh] if i.segment == dev.segment)
            for dst in plan.ips(d):
                routes.append(Route(dst, dev.index, via))
        out[h] = routes
    return out


def peer_delays(topo: Topology, plan: AddressPlan) -> dict[str, dict[str, dict]]:
    """host -> {peer ip: {"host", "delay_ms", "jitter_ms", "loss_pct"}} one-way, over up links.

    Unreachable peers are left out (their traffic really fails)."""
    g = graph(topo)
    out: dict[str, dict[str, dict]] = {}
    for h in topo.hosts:
        paths = shortest_paths_from(topo, h, g)
        peers: dict[str, dict] = {}
        for d in topo.hosts:
            if d == h or d not in paths:
                continue
            p = paths[d]
            entry = {"host": d, "delay_ms": round(path_delay_ms(topo, p), 6),
                     "jitter_ms": round(path_jitter_ms(topo, p), 6),
                     "loss_pct": round(path_loss_pct(topo, p), 6), "hops": len(p) - 1}
            for ip in plan.ips(d):
                peers[ip] = entry
        out[h] = peers
    return out

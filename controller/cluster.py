"""The planner's view of the edge cluster: servers (memory, speed, load) and links (bandwidth,
latency, up/down), with routes as shortest paths over the links that are up.

These are the controller's own frozen dataclasses so the planner never imports the testbed or
Mininet; `cluster_from_topology` adapts a topology description (topologies.load_topology) and
`synthetic_cluster` fabricates large heterogeneous clusters for planner benchmarks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Iterable

import networkx as nx
import numpy as np

from coel_model.errors import ConfigError, InfeasibleError

MB = 1 << 20
# Batch-1 decode reads every active weight once: time = bytes / memory bandwidth. Measured here
# (anchors.md): ~14 GB/s read for the whole 2-core machine; a server gets cpu_share of it.
MACHINE_BYTES_PER_S = 14e9
# Prefill is compute-bound; an assumption for the 2-core AVX2 machine (not measured), per core share.
MACHINE_GFLOPS = 40.0
# Loading an expert that is not resident (page cache / local SSD), bytes per second; an assumption.
STORAGE_BYTES_PER_S = 1.5e9
UNLIMITED_MBIT = 100_000.0  # a link without a bandwidth limit (topology bw_mbit: null)


@dataclass(frozen=True)
class Server:
    name: str
    memory_bytes: int  # model-shard budget (topology memory_mb); the agent's own overhead is extra
    bytes_per_s: float  # weight-read bandwidth at batch 1 (memory-bound decode)
    gflops: float = MACHINE_GFLOPS  # for compute-bound prefill
    load: float = 0.0  # fraction of the server already busy, 0 <= load < 1
    storage_bytes_per_s: float = STORAGE_BYTES_PER_S  # on-demand expert loading
    compute_class: str = ""
    # perceived (measured by the server itself, controller/perception.py); None = nominal model
    call_ms: float | None = None  # fixed part of one expert call (bytes / bytes_per_s on top)
    msg_ms: float | None = None  # software round trip of one message through a socket, no link
    storage_ms: float | None = None  # fixed part of one on-demand load (bytes / storage speed on top)
    layer_decode_ms: float | None = None  # one decoder layer without its experts, decode, batch 1
    prefill_token_layer_ms: float | None = None  # the same per prompt token in prefill
    head_ms: float | None = None  # final norm + lm_head per token
    cpu_cores: float | None = None  # the cgroup's CPU limit (cores) the perceived figures were taken under

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("server without a name")
        if self.memory_bytes < 0:
            raise ConfigError(f"server {self.name}: memory_bytes must be >= 0 (got {self.memory_bytes})")
        if self.bytes_per_s <= 0 or self.gflops <= 0 or self.storage_bytes_per_s <= 0:
            raise ConfigError(f"server {self.name}: bytes_per_s, gflops, storage_bytes_per_s must be > 0")
        if not 0.0 <= self.load < 1.0:
            raise ConfigError(f"server {self.name}: load must be in [0, 1) (got {self.load})")

    @property
    def effective_bytes_per_s(self) -> float:
        return self.bytes_per_s * (1.0 - self.load)


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bw_mbit: float
    latency_ms: float  # one way
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    up: bool = True

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ConfigError(f"link {self.a}-{self.b}: a link needs two different ends")
        if self.bw_mbit <= 0 or self.latency_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss_pct < 100:
            raise ConfigError(f"link {self.a}-{self.b}: need bw_mbit > 0, latency_ms >= 0, jitter_ms >= 0, "
                              f"0 <= loss_pct < 100 (got {self.bw_mbit}, {self.latency_ms}, "
                              f"{self.jitter_ms}, {self.loss_pct})")

    @property
    def key(self) -> tuple[str, str]:
        return tuple(sorted((self.a, self.b)))  # type: ignore[return-value]


@dataclass(frozen=True)
class PathStats:
    """A route between two servers: one-way latency (sum), bottleneck bandwidth, end-to-end loss."""
    hops: tuple[str, ...]
    latency_ms: float
    bw_mbit: float
    loss_pct: float


@dataclass(frozen=True)
class Cluster:
    servers: tuple[Server, ...]
    links: tuple[Link, ...]
    nodes: tuple[str, ...] = ()  # routers/switches: forward traffic (servers do not)
    name: str = "cluster"
    hosts: tuple[str, ...] = ()  # other end hosts (clients, controller): links may touch them, no transit

    def __post_init__(self) -> None:
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ConfigError(f"cluster {self.name}: duplicate server names")
        if not names:
            raise ConfigError(f"cluster {self.name}: no servers")
        known = set(names) | set(self.nodes) | set(self.hosts)
        for ln in self.links:
            for end in (ln.a, ln.b):
                if end not in known:
                    raise ConfigError(f"cluster {self.name}: link {ln.a}-{ln.b} ends at unknown node {end!r}")

    @cached_property
    def index(self) -> dict[str, int]:
        return {s.name: i for i, s in enumerate(self.servers)}

    def server(self, name: str) -> Server:
        try:
            return self.servers[self.index[name]]
        except KeyError:
            raise ConfigError(f"unknown server {name!r}; servers: {[s.name for s in self.servers]}") from None

    @cached_property
    def _paths(self) -> dict[tuple[str, str], PathStats]:
        g = nx.Graph()
        g.add_nodes_from(s.name for s in self.servers)
        g.add_nodes_from(self.nodes)
        g.add_nodes_from(self.hosts)
        for ln in self.links:
            if not ln.up:
                continue
            # parallel links: keep the lower-latency one (ties: higher bandwidth)
            if g.has_edge(ln.a, ln.b):
                old = g.edges[ln.a, ln.b]["link"]
                if (old.latency_ms, -old.bw_mbit) <= (ln.latency_ms, -ln.bw_mbit):
                    continue
            # weight: latency, plus a tiny per-hop and serialisation term so ties break the same way
            g.add_edge(ln.a, ln.b, link=ln, w=ln.latency_ms + 1e-6 + 1e-3 / ln.bw_mbit)
        out: dict[tuple[str, str], PathStats] = {}
        names = [s.name for s in self.servers]
        fwd = set(self.nodes)
        for src in names:
            def weight(u: str, _v: str, data: dict, src: str = src) -> float | None:
                return data["w"] if u == src or u in fwd else None  # only routers/switches forward

            _, paths = nx.single_source_dijkstra(g, src, weight=weight)
            for dst in names:
                if dst not in paths:
                    continue
                hops = tuple(paths[dst])
                lat, bw, keep = 0.0, math.inf, 1.0
                for u, v in zip(hops, hops[1:]):
                    ln = g.edges[u, v]["link"]
                    lat += ln.latency_ms
                    bw = min(bw, ln.bw_mbit)
                    keep *= 1.0 - ln.loss_pct / 100.0
                out[(src, dst)] = PathStats(hops, lat, bw, 100.0 * (1.0 - keep))
        return out

    def path(self, a: str, b: str) -> PathStats | None:
        """The route from server a to server b over up links, or None when unreachable."""
        return self._paths.get((a, b))

    def reachable(self, a: str, b: str) -> bool:
        return (a, b) in self._paths

    def _path_matrix(self, attr: str, unreachable: float) -> np.ndarray:
        """(S, S) of PathStats.`attr`; `unreachable` where there is no path."""
        n = len(self.servers)
        m = np.full((n, n), unreachable)
        for (a, b), ps in self._paths.items():
            m[self.index[a], self.index[b]] = getattr(ps, attr)
        return m

    @cached_property
    def latency_matrix_ms(self) -> np.ndarray:
        """(S, S) one-way latency; inf when unreachable."""
        return self._path_matrix("latency_ms", np.inf)

    @cached_property
    def bw_matrix_mbit(self) -> np.ndarray:
        return self._path_matrix("bw_mbit", 0.0)

    @cached_property
    def loss_matrix_pct(self) -> np.ndarray:
        return self._path_matrix("loss_pct", 0.0)

    # ---- derived clusters (pure) ----
    def without_server(self, name: str) -> "Cluster":
        """The cluster after `name` is lost: the server and its links are gone."""
        self.server(name)
        return replace(self, servers=tuple(s for s in self.servers if s.name != name),
                       links=tuple(ln for ln in self.links if name not in (ln.a, ln.b)))

    def with_link(self, a: str, b: str, **changes: Any) -> "Cluster":
        """The cluster with link a-b changed (bw_mbit=, latency_ms=, up=, ...)."""
        key = tuple(sorted((a, b)))
        found = False
        links = []
        for ln in self.links:
            if ln.key == key:
                ln = replace(ln, **changes)
                found = True
            links.append(ln)
        if not found:
            raise ConfigError(f"cluster {self.name}: no link {a}-{b}")
        return replace(self, links=tuple(links))

    def with_server(self, name: str, **changes: Any) -> "Cluster":
        i = self.index.get(name)
        if i is None:
            self.server(name)
        servers = list(self.servers)
        servers[i] = replace(servers[i], **changes)
        return replace(self, servers=tuple(servers))


def cluster_from_dict(doc: dict[str, Any], source: str = "<dict>") -> Cluster:
    """A small JSON/dict form used by tests and `coel plan --cluster`: {"servers":[{"name",
    "memory_mb","cpu_share"|"bytes_per_s",...}], "links":[{"a","b","bw_mbit","latency_ms"|"delay_ms"}],
    "nodes":[forwarding routers/switches], "hosts":[other end hosts]}."""
    try:
        servers = []
        for s in doc["servers"]:
            bps = s.get("bytes_per_s") or float(s.get("cpu_share", 1.0)) * MACHINE_BYTES_PER_S
            servers.append(Server(name=str(s["name"]),
                                  memory_bytes=int(s["memory_bytes"]) if "memory_bytes" in s
                                  else int(float(s["memory_mb"]) * MB),
                                  bytes_per_s=float(bps),
                                  gflops=float(s.get("gflops", float(s.get("cpu_share", 1.0)) * MACHINE_GFLOPS)),
                                  load=float(s.get("load", 0.0)),
                                  compute_class=str(s.get("compute_class", ""))))
        links = [Link(a=str(ln["a"]), b=str(ln["b"]), bw_mbit=float(ln["bw_mbit"]),
                      latency_ms=float(ln.get("latency_ms", ln.get("delay_ms", 0.0))),
                      jitter_ms=float(ln.get("jitter_ms", 0.0)), loss_pct=float(ln.get("loss_pct", 0.0)),
                      up=bool(ln.get("up", True))) for ln in doc.get("links", [])]
    except KeyError as exc:
        raise ConfigError(f"{source}: missing key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return Cluster(servers=tuple(servers), links=tuple(links), nodes=tuple(doc.get("nodes", ())),
                   hosts=tuple(doc.get("hosts", ())), name=str(doc.get("name", source)))


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _names(items: Any) -> Iterable[Any]:
    if items is None:
        return ()
    if isinstance(items, dict):
        return items.values()
    return items


def cluster_from_topology(topo: Any, machine_bytes_per_s: float = MACHINE_BYTES_PER_S,
                          machine_gflops: float = MACHINE_GFLOPS) -> Cluster:
    """Adapt a topology (topologies.load_topology) to the planner's cluster.

    memory_mb is the model-shard budget (the agent overhead is outside it, by convention);
    cpu_share scales the machine's measured weight-read bandwidth; links keep their one-way
    delay_ms, jitter, loss and bandwidth (null = unlimited); routers and switches forward, clients
    and the controller are end hosts that routes never cross (as in topologies.paths)."""
    servers = []
    for s in _names(_get(topo, "servers")):
        share = float(_get(s, "cpu_share", 1.0) or 1.0)
        servers.append(Server(name=str(_get(s, "name")), memory_bytes=int(float(_get(s, "memory_mb")) * MB),
                              bytes_per_s=share * machine_bytes_per_s, gflops=share * machine_gflops,
                              load=float(_get(s, "load", 0.0) or 0.0),
                              compute_class=str(_get(s, "compute_class", "") or "")))
    server_names = {s.name for s in servers}
    fwd = {str(_get(x, "name")) for key in ("routers", "switches") for x in _names(_get(topo, key))}
    links, others = [], set()
    for ln in _names(_get(topo, "links")):
        a, b = str(_get(ln, "a", _get(ln, "src"))), str(_get(ln, "b", _get(ln, "dst")))
        bw = _get(ln, "bw_mbit")
        links.append(Link(a=a, b=b, bw_mbit=float(bw) if bw is not None else UNLIMITED_MBIT,
                          latency_ms=float(_get(ln, "delay_ms", 0.0) or 0.0),
                          jitter_ms=float(_get(ln, "jitter_ms", 0.0) or 0.0),
                          loss_pct=float(_get(ln, "loss_pct", 0.0) or 0.0),
                          up=bool(_get(ln, "up", True))))
        others.update(x for x in (a, b) if x not in server_names and x not in fwd)
    return Cluster(servers=tuple(servers), links=tuple(links), nodes=tuple(sorted(fwd)),
                   hosts=tuple(sorted(others)), name=str(_get(topo, "name", "topology")))


def synthetic_cluster(n_servers: int, memory_total_bytes: float, seed: int = 0, n_sites: int = 8,
                      entry_memory_bytes: float = 0.0) -> Cluster:
    """A heterogeneous edge cluster for planner studies: n_sites site routers on a ring (metro
    links 1 Gbit/s, 2-6 ms), servers on their site router (100-1000 Mbit/s, 0.2-2 ms), memory
    spread log-normally (about 8x between smallest and largest) summing to memory_total_bytes,
    weight-read speed 2-14 GB/s; server s00 (the entry) gets entry_memory_bytes more, e.g. to hold a
    large backbone. Seeded and deterministic."""
    if n_servers < 1 or memory_total_bytes <= 0:
        raise ConfigError("synthetic_cluster: need n_servers >= 1 and memory_total_bytes > 0")
    rng = np.random.default_rng(seed)
    n_sites = max(1, min(n_sites, n_servers))
    mem = rng.lognormal(0.0, 0.6, size=n_servers)
    mem = mem / mem.sum() * memory_total_bytes
    mem[0] += entry_memory_bytes
    speed = rng.uniform(2e9, 14e9, size=n_servers)
    servers = tuple(Server(name=f"s{i:02d}", memory_bytes=int(mem[i]), bytes_per_s=float(speed[i]),
                           gflops=float(speed[i] / MACHINE_BYTES_PER_S * MACHINE_GFLOPS))
                    for i in range(n_servers))
    sites = [f"r{j}" for j in range(n_sites)]
    links = []
    for j in range(n_sites if n_sites > 2 else n_sites - 1):
        links.append(Link(a=sites[j], b=sites[(j + 1) % n_sites], bw_mbit=1000.0,
                          latency_ms=float(rng.uniform(2.0, 6.0))))
    for i, s in enumerate(servers):
        links.append(Link(a=s.name, b=sites[i % n_sites], bw_mbit=float(rng.choice([100.0, 300.0, 1000.0])),
                          latency_ms=float(rng.uniform(0.2, 2.0))))
    return Cluster(servers=servers, links=tuple(links), nodes=tuple(sites), name=f"synthetic-{n_servers}")


def scale_memory(cluster: Cluster, factor: float) -> Cluster:
    """The same cluster with every server's memory budget multiplied (to study big models on
    the shapes of the bundled topologies)."""
    if factor <= 0:
        raise ConfigError(f"memory scale must be > 0 (got {factor})")
    return replace(cluster, servers=tuple(replace(s, memory_bytes=int(s.memory_bytes * factor))
                                          for s in cluster.servers))


def auto_memory_scale(cluster: Cluster, backbone_bytes: int, experts_bytes_4bit: float, copies: int = 1) -> float:
    """A factor that makes the cluster hold `copies` backbones + the experts at 4 bits with 30 %
    slack, and its largest server hold a backbone with 20 % slack (never below 1)."""
    total = sum(s.memory_bytes for s in cluster.servers)
    largest = max(s.memory_bytes for s in cluster.servers)
    need = 1.3 * (copies * backbone_bytes + experts_bytes_4bit) / max(total, 1)
    return max(1.0, need, 1.2 * backbone_bytes / max(largest, 1))

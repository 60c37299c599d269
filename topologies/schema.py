"""Topology description: frozen, validated dataclasses (pure data; no root, no Mininet).

A topology says WHAT the emulated edge network is: sites, edge servers with their model-shard
memory budget and CPU share, client (user) hosts with their workload, routers and switches, the
controller's host, and links with bandwidth/delay/jitter/loss/queue. `topologies.loader` turns a
YAML file into these objects (keeping file/line marks for errors); `testbed.netbuild` turns them
into Mininet namespaces. Units are in every field name: memory_mb is MiB (2**20 bytes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from coel_model.errors import ConfigError

SITE_KINDS = ("edge", "cloud", "user", "core")
# Labels for planners and reports; the emulated speed comes from cpu_share.
COMPUTE_CLASSES = ("device", "small", "medium", "large", "cloud")
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_BW_MBIT = 1000.0  # Mininet's TCIntf.bwParamMax: HTB rates above this are ignored by Mininet
DEFAULT_AGENT_OVERHEAD_MB = 700
MIB = 1 << 20


@dataclass(frozen=True)
class Site:
    name: str
    kind: str = "edge"  # one of SITE_KINDS
    description: str = ""


@dataclass(frozen=True)
class Workload:
    """What one client host sends: Poisson arrivals of prompts with per-class SLOs."""
    rate_rps: float = 0.5         # mean request arrival rate (requests/s)
    prompt_tokens: int = 32       # prompt length (tokens)
    max_new_tokens: int = 16      # output length (tokens)
    slo_ttft_ms: float = 2000.0   # time-to-first-token objective (ms)
    slo_tpot_ms: float = 500.0    # time-per-output-token objective (ms)
    slo_class: str = "default"    # name of the SLO class, for reports
    max_loss_nats: float | None = None  # quality floor: largest predicted loss increase (nats/token); None = any


@dataclass(frozen=True)
class Server:
    """An edge (or cloud) server: one agent process holding expert shards."""
    name: str
    site: str
    memory_mb: float              # model-shard memory budget (MiB); the agent baseline is extra
    cpu_share: float = 0.25       # fraction of ALL machine cores (Mininet CPULimitedHost)
    compute_class: str = "medium"  # label, one of COMPUTE_CLASSES

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mb * MIB)


@dataclass(frozen=True)
class Client:
    """A user host: sends prompts to its entry server."""
    name: str
    entry: str                    # name of the server that receives its requests
    site: str = ""
    workload: Workload = field(default_factory=Workload)
    cpu_share: float | None = None  # None = no CPU limit


@dataclass(frozen=True)
class Router:
    """A host that forwards IP packets (ip_forward=1, static routes computed from the topology)."""
    name: str
    site: str = ""


@dataclass(frozen=True)
class Switch:
    """A Linux bridge (no STP): one L2 segment together with the switches linked to it."""
    name: str
    site: str = ""


@dataclass(frozen=True)
class Controller:
    name: str = "ctl"
    site: str = ""
    cpu_share: float | None = None


@dataclass(frozen=True)
class Link:
    """A bidirectional link; every parameter applies in each direction (like Mininet TCLink)."""
    a: str
    b: str
    bw_mbit: float | None = 100.0   # HTB rate (Mbit/s); None = unlimited
    delay_ms: float = 1.0           # one-way delay of this link (ms)
    jitter_ms: float = 0.0          # one-way jitter amplitude (ms)
    loss_pct: float = 0.0           # random loss per direction (%)
    queue_pkts: int | None = None   # egress queue length (packets); None = kernel default
    up: bool = True                 # initial state

    @property
    def key(self) -> frozenset:
        return frozenset((self.a, self.b))

    def other(self, node: str) -> str:
        return self.b if node == self.a else self.a


@dataclass(frozen=True)
class Topology:
    name: str
    servers: tuple[Server, ...]
    controller: Controller
    links: tuple[Link, ...]
    clients: tuple[Client, ...] = ()
    routers: tuple[Router, ...] = ()
    switches: tuple[Switch, ...] = ()
    sites: tuple[Site, ...] = ()
    description: str = ""
    agent_overhead_mb: float = DEFAULT_AGENT_OVERHEAD_MB  # agent baseline (Python+torch), MiB
    convergence_ms: float = 500.0  # time until routes are recomputed after a link change
    source: str = "<dict>"         # file it was loaded from (for messages)

    # ---- lookups -------------------------------------------------------------------------
    @property
    def hosts(self) -> tuple[str, ...]:
        """Every node that is a network namespace (not a switch), in a stable order."""
        return (tuple(s.name for s in self.servers) + (self.controller.name,)
                + tuple(c.name for c in self.clients) + tuple(r.name for r in self.routers))

    @property
    def node_names(self) -> tuple[str, ...]:
        return self.hosts + tuple(s.name for s in self.switches)

    def kind(self, name: str) -> str:
        """'server' | 'controller' | 'client' | 'router' | 'switch'; KeyError if unknown."""
        return self._kinds()[name]

    def _kinds(self) -> dict[str, str]:
        kinds = {s.name: "server" for s in self.servers}
        kinds[self.controller.name] = "controller"
        kinds.update({c.name: "client" for c in self.clients})
        kinds.update({r.name: "router" for r in self.routers})
        kinds.update({s.name: "switch" for s in self.switches})
        return kinds

    def server(self, name: str) -> Server:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(f"{self.source}: no server named {name!r} (servers: "
                       f"{', '.join(s.name for s in self.servers)})")

    def client(self, name: str) -> Client:
        for c in self.clients:
            if c.name == name:
                return c
        raise KeyError(f"{self.source}: no client named {name!r}")

    def link(self, a: str, b: str) -> Link:
        key = frozenset((a, b))
        for link in self.links:
            if link.key == key:
                return link
        raise KeyError(f"{self.source}: no link between {a!r} and {b!r}")

    def links_of(self, node: str) -> tuple[Link, ...]:
        return tuple(l for l in self.links if node in (l.a, l.b))

    def cgroup_memory_mb(self, server: str) -> float:
        """The memory cgroup limit of a server host: shard budget + agent baseline."""
        return self.server(server).memory_mb + self.agent_overhead_mb

    def with_link(self, a: str, b: str, **changes: Any) -> "Topology":
        """A copy with one link's fields changed (e.g. up=False, bw_mbit=5)."""
        old = self.link(a, b)
        new = replace(old, **changes)
        _check_link_values(new, lambda path, msg: ConfigError(
            f"{self.source}: link {a}-{b}: {path}: {msg}"))
        return replace(self, links=tuple(new if l is old else l for l in self.links))

    def to_dict(self) -> dict:
        """Plain data (for saving the resolved scenario beside a run)."""
        from dataclasses import asdict
        d = asdict(self)
        d.pop("source", None)
        return d


def _check_link_values(link: Link, err: Callable[[str, str], Exception]) -> None:
    """Range checks shared by the loader and runtime changes (set_bw etc.)."""
    if link.bw_mbit is not None and not (0 < link.bw_mbit <= MAX_BW_MBIT):
        raise err("bw_mbit", f"must be > 0 and <= {MAX_BW_MBIT:g} Mbit/s (or null for unlimited), "
                  f"got {link.bw_mbit}")
    if link.delay_ms < 0:
        raise err("delay_ms", f"must be >= 0 ms, got {link.delay_ms}")
    if link.jitter_ms < 0:
        raise err("jitter_ms", f"must be >= 0 ms, got {link.jitter_ms}")
    if not (0 <= link.loss_pct < 100):
        raise err("loss_pct", f"must be in [0, 100) %, got {link.loss_pct}")
    if link.queue_pkts is not None and link.queue_pkts < 1:
        raise err("queue_pkts", f"must be >= 1 packet (or null), got {link.queue_pkts}")

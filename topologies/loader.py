"""Load and validate topology YAML files; every error names the file, the LINE and the field.

We compose the YAML node tree (not `safe_load`) so each value keeps its start mark; the plain
values are then checked field by field and cross-checked (names, references, L2 loops,
reachability) before any `Topology` object exists. Nothing here needs root or Mininet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from coel_model.config import read_text_file
from coel_model.errors import ConfigError
from topologies.schema import (
    COMPUTE_CLASSES, DEFAULT_AGENT_OVERHEAD_MB, NAME_RE, SITE_KINDS, Client, Controller, Link,
    Router, Server, Site, Switch, Topology, Workload, _check_link_values,
)

BUNDLED_DIR = Path(__file__).resolve().parent
DEFAULT_TOPOLOGY = "edge-star-5"
_REQUIRED = object()
Path_ = tuple  # a field path like ("links", 3, "bw_mbit")


class Doc:
    """Plain values plus the line of every mapping key/value, addressed by field path."""

    def __init__(self, source: str, text: str | None = None, data: Any = None):
        self.source = source
        self.lines: dict[Path_, int] = {}
        if text is not None:
            try:
                root = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = f"{mark.line + 1}" if mark is not None else "?"
                problem = getattr(exc, "problem", None) or str(exc)
                raise ConfigError(f"{source}:{line}: YAML syntax error: {problem}") from None
            if root is None:
                raise ConfigError(f"{source}:1: empty topology file")
            self.data = self._plain(root, ())
        else:
            self.data = data

    def _plain(self, node: yaml.Node, path: Path_) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    raise ConfigError(f"{self.source}:{knode.start_mark.line + 1}: "
                                      f"{_fmt(path)}: mapping keys must be plain strings")
                key = str(knode.value)
                if key in out:
                    raise ConfigError(f"{self.source}:{knode.start_mark.line + 1}: "
                                      f"{_fmt(path + (key,))}: duplicate key")
                self.lines[path + (key,)] = knode.start_mark.line + 1
                out[key] = self._plain(vnode, path + (key,))
                self.lines[path + (key,)] = knode.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._plain(v, path + (i,)) for i, v in enumerate(node.value)]
        return yaml.constructor.SafeConstructor().construct_object(node)

    def line(self, path: Path_) -> str:
        for n in range(len(path), -1, -1):  # fall back to the nearest enclosing node
            if path[:n] in self.lines:
                return str(self.lines[path[:n]])
        return "?"

    def err(self, path: Path_, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}:{self.line(path)}: {_fmt(path) or '(top)'}: {msg}")


def _fmt(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class Fields:
    """Typed reads from one mapping; unknown keys are rejected on their own line."""

    def __init__(self, doc: Doc, value: Any, path: Path_, allowed: tuple[str, ...], what: str):
        if not isinstance(value, dict):
            raise doc.err(path, f"{what} must be a mapping, got {type(value).__name__}")
        self.doc, self.m, self.path = doc, value, path
        for key in value:
            if key not in allowed:
                raise doc.err(path + (key,), f"unknown key {key!r} in {what} "
                              f"(allowed: {', '.join(allowed)})")

    def has(self, name: str) -> bool:
        return name in self.m

    def _get(self, name: str, default: Any) -> Any:
        if name not in self.m:
            if default is _REQUIRED:
                raise self.doc.err(self.path, f"missing required field {name!r}")
            return default, False
        return self.m[name], True

    def str(self, name: str, default: Any = _REQUIRED) -> Any:
        v, given = self._get(name, default)
        if given and not isinstance(v, str):
            raise self.doc.err(self.path + (name,), f"must be a string, got {v!r}")
        return v

    def name(self, name: str = "name", default: Any = _REQUIRED) -> Any:
        v = self.str(name, default)
        if v is not None and v != "" and not NAME_RE.match(v):
            raise self.doc.err(self.path + (name,), f"{v!r} is not a valid name (lowercase letter, "
                               "then up to 31 of a-z 0-9 _ -)")
        return v

    def num(self, name: str, default: Any = _REQUIRED, *, gt: float | None = None,
            ge: float | None = None, le: float | None = None, lt: float | None = None,
            integer: bool = False, nullable: bool = False, unit: str = "") -> Any:
        v, given = self._get(name, default)
        if not given or (v is None and nullable):
            return v
        p = self.path + (name,)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.doc.err(p, f"must be a {'whole ' if integer else ''}number{unit}, got {v!r}")
        if integer and int(v) != v:
            raise self.doc.err(p, f"must be a whole number{unit}, got {v!r}")
        for bound, ok, word in ((gt, lambda b: v > b, ">"), (ge, lambda b: v >= b, ">="),
                                (le, lambda b: v <= b, "<="), (lt, lambda b: v < b, "<")):
            if bound is not None and not ok(bound):
                raise self.doc.err(p, f"must be {word} {bound:g}{unit}, got {v!r}")
        return int(v) if integer else float(v)

    def bool(self, name: str, default: Any = _REQUIRED) -> Any:
        v, given = self._get(name, default)
        if given and not isinstance(v, bool):
            raise self.doc.err(self.path + (name,), f"must be true or false, got {v!r}")
        return v

    def list(self, name: str) -> list:
        v, given = self._get(name, [])
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.doc.err(self.path + (name,), f"must be a list, got {type(v).__name__}")
        return v


_LINK_KEYS = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts")


def _link_params(f: Fields, defaults: dict[str, Any]) -> dict[str, Any]:
    return {
        "bw_mbit": f.num("bw_mbit", defaults.get("bw_mbit", 100.0), gt=0, nullable=True,
                         unit=" Mbit/s"),
        "delay_ms": f.num("delay_ms", defaults.get("delay_ms", 1.0), ge=0, unit=" ms"),
        "jitter_ms": f.num("jitter_ms", defaults.get("jitter_ms", 0.0), ge=0, unit=" ms"),
        "loss_pct": f.num("loss_pct", defaults.get("loss_pct", 0.0), ge=0, lt=100, unit=" %"),
        "queue_pkts": f.num("queue_pkts", defaults.get("queue_pkts"), ge=1, integer=True,
                            nullable=True, unit=" packets"),
    }


def _workload(doc: Doc, value: Any, path: Path_) -> Workload:
    if value is None:
        return Workload()
    f = Fields(doc, value, path, ("rate_rps", "prompt_tokens", "max_new_tokens", "slo_ttft_ms",
                                   "slo_tpot_ms", "slo_class", "max_loss_nats"), "workload")
    d = Workload()
    return Workload(
        rate_rps=f.num("rate_rps", d.rate_rps, gt=0, unit=" req/s"),
        prompt_tokens=f.num("prompt_tokens", d.prompt_tokens, ge=1, integer=True, unit=" tokens"),
        max_new_tokens=f.num("max_new_tokens", d.max_new_tokens, ge=1, integer=True,
                             unit=" tokens"),
        slo_ttft_ms=f.num("slo_ttft_ms", d.slo_ttft_ms, gt=0, unit=" ms"),
        slo_tpot_ms=f.num("slo_tpot_ms", d.slo_tpot_ms, gt=0, unit=" ms"),
        slo_class=f.str("slo_class", d.slo_class),
        max_loss_nats=f.num("max_loss_nats", d.max_loss_nats, ge=0, nullable=True, unit=" nats/token"),
    )


def _cpu(f: Fields, default: Any) -> Any:
    return f.num("cpu_share", default, gt=0, le=1, nullable=True, unit=" (fraction of all cores)")


def build_topology(doc: Doc) -> Topology:
    """Validate a parsed document and build the frozen Topology (raises ConfigError)."""
    top = Fields(doc, doc.data, (), ("name", "description", "agent_overhead_mb", "convergence_ms",
                                      "link_defaults", "sites", "servers", "clients", "routers",
                                      "switches", "controller", "links"), "topology")
    name = top.name("name")
    defaults: dict[str, Any] = {}
    if top.has("link_defaults"):
        fd = Fields(doc, top.m["link_defaults"], ("link_defaults",), _LINK_KEYS, "link_defaults")
        defaults = _link_params(fd, {})
    where: dict[str, Path_] = {}  # node/site name -> path where it was defined

    def define(n: str, path: Path_, registry: dict[str, Path_], what: str) -> None:
        if n in registry:
            raise doc.err(path + ("name",), f"{what} name {n!r} already used at line "
                          f"{doc.line(registry[n])}")
        registry[n] = path

    sites: list[Site] = []
    site_where: dict[str, Path_] = {}
    for i, v in enumerate(top.list("sites")):
        p = ("sites", i)
        f = Fields(doc, v, p, ("name", "kind", "description"), "site")
        kind = f.str("kind", "edge")
        if kind not in SITE_KINDS:
            raise doc.err(p + ("kind",), f"unknown site kind {kind!r} (valid: {', '.join(SITE_KINDS)})")
        s = Site(f.name(), kind, f.str("description", ""))
        define(s.name, p, site_where, "site")
        sites.append(s)

    def site_ref(f: Fields, required: bool = False) -> str:
        s = f.name("site", _REQUIRED if required else "")
        if s and sites and s not in site_where:
            raise doc.err(f.path + ("site",), f"unknown site {s!r} (sites: {', '.join(site_where)})")
        return s or ""

    servers = []
    for i, v in enumerate(top.list("servers")):
        p = ("servers", i)
        f = Fields(doc, v, p, ("name", "site", "memory_mb", "cpu_share", "compute_class"), "server")
        n = f.name()
        if not f.has("memory_mb"):
            raise doc.err(p, f"server {n!r} has no memory_mb (its model-shard memory budget, MiB)")
        cc = f.str("compute_class", "medium")
        if cc not in COMPUTE_CLASSES:
            raise doc.err(p + ("compute_class",), f"unknown compute_class {cc!r} "
                          f"(valid: {', '.join(COMPUTE_CLASSES)})")
        srv = Server(n, site_ref(f), f.num("memory_mb", gt=0, unit=" MiB"), _cpu(f, 0.25), cc)
        if srv.cpu_share is None:
            raise doc.err(p + ("cpu_share",), "a server needs a cpu_share in (0, 1]")
        define(n, p, where, "node")
        servers.append(srv)
    if not servers:
        raise doc.err(("servers",), "a topology needs at least one server")

    if not top.has("controller"):
        raise doc.err((), "missing required field 'controller' (the controller's host)")
    f = Fields(doc, top.m["controller"], ("controller",), ("name", "site", "cpu_share"), "controller")
    ctl = Controller(f.name("name", "ctl"), site_ref(f), _cpu(f, None))
    define(ctl.name, ("controller",), where, "node")

    clients = []
    for i, v in enumerate(top.list("clients")):
        p = ("clients", i)
        f = Fields(doc, v, p, ("name", "site", "entry", "workload", "cpu_share"), "client")
        c = Client(f.name(), f.name("entry"), site_ref(f), _workload(doc, f.m.get("workload"),
                   p + ("workload",)), _cpu(f, None))
        define(c.name, p, where, "node")
        clients.append(c)
    server_names = {s.name for s in servers}
    for i, c in enumerate(clients):
        if c.entry not in server_names:
            raise doc.err(("clients", i, "entry"), f"client {c.name!r}: entry {c.entry!r} is not a "
                          f"server (servers: {', '.join(sorted(server_names))})")

    routers, switches = [], []
    for key, cls, out in (("routers", Router, routers), ("switches", Switch, switches)):
        for i, v in enumerate(top.list(key)):
            p = (key, i)
            f = Fields(doc, v, p, ("name", "site"), key[:-1])
            obj = cls(f.name(), site_ref(f))
            define(obj.name, p, where, "node")
            out.append(obj)

    links = []
    seen: dict[frozenset, int] = {}
    for i, v in enumerate(top.list("links")):
        p = ("links", i)
        f = Fields(doc, v, p, ("a", "b", "up") + _LINK_KEYS, "link")
        a, b = f.name("a"), f.name("b")
        for end, n in (("a", a), ("b", b)):
            if n not in where:
                raise doc.err(p + (end,), f"link end {n!r} is not a defined node (dangling link; "
                              f"nodes: {', '.join(where)})")
        if a == b:
            raise doc.err(p, f"link from {a!r} to itself")
        key = frozenset((a, b))
        if key in seen:
            raise doc.err(p, f"second link between {a!r} and {b!r} (first at line "
                          f"{doc.line(('links', seen[key]))})")
        seen[key] = i
        link = Link(a, b, up=f.bool("up", True), **_link_params(f, defaults))
        _check_link_values(link, lambda field, msg: doc.err(p + (field,), msg))
        links.append(link)

    topo = Topology(
        name=name, servers=tuple(servers), controller=ctl, links=tuple(links),
        clients=tuple(clients), routers=tuple(routers), switches=tuple(switches),
        sites=tuple(sites), description=top.str("description", ""),
        agent_overhead_mb=top.num("agent_overhead_mb", DEFAULT_AGENT_OVERHEAD_MB, ge=0, unit=" MiB"),
        convergence_ms=top.num("convergence_ms", 500.0, ge=0, unit=" ms"),
        source=doc.source,
    )
    _check_structure(topo, doc, where)
    return topo


def _check_structure(topo: Topology, doc: Doc, where: dict[str, Path_]) -> None:
    """No L2 loops, no host twice on one L2 segment, every node connected to the controller."""
    sw = {s.name for s in topo.switches}
    l2 = nx.Graph()
    l2.add_nodes_from(sw)
    for i, link in enumerate(topo.links):
        if link.a in sw and link.b in sw:
            if nx.has_path(l2, link.a, link.b):
                raise doc.err(("links", i), f"switch link {link.a}-{link.b} closes an L2 loop "
                              "(bridges run without spanning tree; route redundant paths through "
                              "routers instead)")
            l2.add_edge(link.a, link.b)
    segment = {n: min(comp) for comp in nx.connected_components(l2) for n in comp}
    attached: dict[tuple[str, str], int] = {}
    for i, link in enumerate(topo.links):
        for host, other in ((link.a, link.b), (link.b, link.a)):
            if host in sw or other not in sw:
                continue
            k = (host, segment[other])
            if k in attached:
                raise doc.err(("links", i), f"host {host!r} has a second link into the L2 segment "
                              f"of switch {other!r} (first at line "
                              f"{doc.line(('links', attached[k]))}); that is an L2 loop")
            attached[k] = i
    g = nx.Graph()
    g.add_nodes_from(topo.node_names)
    g.add_edges_from((l.a, l.b) for l in topo.links)
    reach = nx.node_connected_component(g, topo.controller.name)
    for n in topo.node_names:
        if n not in reach:
            raise doc.err(where.get(n, ()), f"node {n!r} is not connected to the controller "
                          f"{topo.controller.name!r} by any link")


def parse_topology(text: str, source: str = "<string>") -> Topology:
    return build_topology(Doc(source, text=text))


def topology_from_dict(data: dict, source: str = "<dict>") -> Topology:
    """Validate plain data (e.g. a scenario's inline topology); errors carry no line numbers."""
    return build_topology(Doc(source, data=data))


def bundled_topologies() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def resolve_named_yaml(name_or_path: str | Path, directory: Path, what: str) -> Path:
    """A path to a YAML file, or the name of a bundled `what` (a `<name>.yaml` in `directory`)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: {what} file not found")
        return p
    cand = directory / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(x.stem for x in directory.glob("*.yaml"))
        raise ConfigError(f"unknown {what} {str(name_or_path)!r}: not a file, and not a bundled "
                          f"{what} (bundled: {', '.join(known)})")
    return cand


def resolve_topology_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled topology."""
    return resolve_named_yaml(name_or_path, BUNDLED_DIR, "topology")


def load_topology(name_or_path: str | Path = DEFAULT_TOPOLOGY) -> Topology:
    """Load and validate a topology by bundled name or file path (raises ConfigError)."""
    path = resolve_topology_path(name_or_path)
    return parse_topology(read_text_file(path, "topology"), str(path))

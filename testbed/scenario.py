"""Scenarios: what a run does — which topology and model, which planner, how long, what traffic,
and which faults at which times. Pure data loaded from YAML with file/line errors; the resolved
scenario is saved in every run folder and its hash names the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError
from topologies.loader import Doc, Fields, resolve_named_yaml  # the YAML-with-line-numbers reader topologies use

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO = "demo"

# kind -> (required fields, optional fields); times are seconds since traffic starts
EVENT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "link_down": (("link",), ()),
    "link_up": (("link",), ()),
    "bw": (("link", "bw_mbit"), ()),
    "delay": (("link", "delay_ms"), ("jitter_ms",)),
    "loss": (("link", "loss_pct"), ()),
    "restore": (("link",), ()),
    "server_crash": (("server",), ("process",)),  # process: all (default) | agent | entry
    "server_restart": (("server",), ()),
    "cpu_squeeze": (("server", "cpu_share"), ()),
    "mem_squeeze": (("server", "memory_mb"), ()),
    "cpu_hog": (("cores", "duration_s"), ("server",)),  # busy processes on `cores` cores, in a host or the machine
    "slo": (("slo_class",), ("slo_ttft_ms", "slo_tpot_ms")),
}


CRASH_PROCESSES = ("all", "agent", "entry")
WORKLOAD_APIS = ("native", "openai")  # the clients' protocol: ZeroMQ (nodes.client) or HTTP (nodes.http_client)


@dataclass(frozen=True)
class Event:
    at_s: float  # seconds after traffic starts
    kind: str  # one of EVENT_FIELDS
    link: tuple[str, str] | None = None  # (a, b) node names of a topology link
    server: str | None = None
    bw_mbit: float | None = None
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_pct: float | None = None
    cpu_share: float | None = None
    memory_mb: float | None = None
    slo_class: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    process: str | None = None  # server_crash: which of the server's processes die (None = all)
    cores: float | None = None  # cpu_hog: busy cores (a whole number)
    duration_s: float | None = None  # cpu_hog: how long

    def describe(self) -> str:
        target = "-".join(self.link) if self.link else (self.server or self.slo_class or "")
        extra = {k: v for k, v in dataclasses.asdict(self).items()
                 if v is not None and k not in ("at_s", "kind", "link", "server", "slo_class")}
        return f"{self.kind} {target} {extra if extra else ''}".strip()


@dataclass(frozen=True)
class WorkloadOverride:
    """Scales or replaces the topology clients' workloads for this scenario (None = keep)."""
    rate_scale: float = 1.0  # multiplies every client's rate_rps
    prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    api: str = "native"  # native: nodes.client over ZeroMQ; openai: nodes.http_client over the entry's HTTP API
    trace_csv: str | None = None  # replay this request trace (nodes/workload.py) instead of Poisson arrivals


@dataclass(frozen=True)
class Scenario:
    name: str
    topology: str = "edge-star-5"  # bundled name or path
    model: str = "models/tiny-moe"  # checkpoint folder (relative to the project root or absolute)
    profile: str | None = None  # profile JSON; None = <model>/profile.json
    strategy: str = "coel"  # planner strategy name
    duration_s: float = 60.0  # traffic duration
    drain_s: float = 30.0  # after traffic stops, wait at most this long for requests in flight
    seed: int = 0
    static: bool = False  # keep the initial plan (no re-deployment)
    replan_interval_s: float = 0.0  # scheduled re-plan period; 0 = only on events
    emulation: str = "auto"  # auto | netem | emulated
    workload: WorkloadOverride = field(default_factory=WorkloadOverride)
    events: tuple[Event, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short hash of the resolved scenario: the run folder's name carries it."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    def with_overrides(self, **kw: Any) -> "Scenario":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


_TOP_KEYS = ("name", "description", "topology", "model", "profile", "strategy", "duration_s", "drain_s",
             "seed", "static", "replan_interval_s", "emulation", "workload", "events")


def _event(doc: Doc, value: Any, path: tuple) -> Event:
    if not isinstance(value, dict):
        raise doc.err(path, "an event must be a mapping with at_s and kind")
    kind = value.get("kind")
    if kind not in EVENT_FIELDS:
        raise doc.err(path + ("kind",), f"unknown event kind {kind!r} (known: {', '.join(EVENT_FIELDS)})")
    req, opt = EVENT_FIELDS[kind]
    f = Fields(doc, value, path, ("at_s", "kind") + req + opt, f"{kind} event")
    kw: dict[str, Any] = {"at_s": f.num("at_s", ge=0, unit=" s"), "kind": kind}
    for name in req + opt:
        default = _REQUIRED_MARK if name in req else None
        if name == "link":
            v = value.get("link", default)
            if v is _REQUIRED_MARK:
                raise doc.err(path, f"{kind} event needs 'link: [a, b]'")
            if v is not None:
                if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)):
                    raise doc.err(path + ("link",), f"must be a list of two node names, got {v!r}")
                kw["link"] = (v[0], v[1])
        elif name in ("server", "slo_class"):
            v = f.str(name) if name in req else f.str(name, None)
            kw[name] = v
        elif name == "process":
            v = f.str(name, None)
            if v is not None and v not in CRASH_PROCESSES:
                raise doc.err(path + ("process",), f"must be one of {', '.join(CRASH_PROCESSES)}, got {v!r}")
            kw[name] = None if v == "all" else v
        else:
            bounds = {"cpu_share": dict(gt=0, le=1), "loss_pct": dict(ge=0, lt=100)}.get(name, dict(ge=0))
            if name in ("bw_mbit", "memory_mb", "cores", "duration_s"):
                bounds = dict(gt=0)
            kw[name] = f.num(name, **bounds) if name in req else f.num(name, None, **bounds)
    if kind == "slo" and kw.get("slo_ttft_ms") is None and kw.get("slo_tpot_ms") is None:
        raise doc.err(path, "slo event needs slo_ttft_ms and/or slo_tpot_ms")
    if kind == "cpu_hog" and kw["cores"] != int(kw["cores"]):
        raise doc.err(path + ("cores",), f"must be a whole number of cores, got {kw['cores']:g}")
    return Event(**kw)


_REQUIRED_MARK = object()


def build_scenario(doc: Doc) -> Scenario:
    f = Fields(doc, doc.data, (), _TOP_KEYS, "scenario")
    kw: dict[str, Any] = {
        "name": f.name("name"),
        "topology": f.str("topology", "edge-star-5"),
        "model": f.str("model", "models/tiny-moe"),
        "profile": f.str("profile", None),
        "strategy": f.str("strategy", "coel"),
        "duration_s": f.num("duration_s", 60.0, gt=0, unit=" s"),
        "drain_s": f.num("drain_s", 30.0, ge=0, unit=" s"),
        "seed": f.num("seed", 0, integer=True, ge=0),
        "static": f.bool("static", False),
        "replan_interval_s": f.num("replan_interval_s", 0.0, ge=0, unit=" s"),
        "emulation": f.str("emulation", "auto"),
    }
    if kw["emulation"] not in ("auto", "netem", "emulated"):
        raise doc.err(("emulation",), f"must be auto, netem or emulated, got {kw['emulation']!r}")
    if f.has("workload"):
        w = Fields(doc, doc.data["workload"], ("workload",), ("rate_scale", "prompt_tokens", "max_new_tokens",
                                                              "api", "trace_csv"), "workload")
        api = w.str("api", "native")
        if api not in WORKLOAD_APIS:
            raise doc.err(("workload", "api"), f"must be one of {', '.join(WORKLOAD_APIS)}, got {api!r}")
        kw["workload"] = WorkloadOverride(
            rate_scale=w.num("rate_scale", 1.0, gt=0),
            prompt_tokens=w.num("prompt_tokens", None, integer=True, gt=0),
            max_new_tokens=w.num("max_new_tokens", None, integer=True, gt=0),
            api=api, trace_csv=w.str("trace_csv", None))
    events = [_event(doc, v, ("events", i)) for i, v in enumerate(f.list("events"))]
    for i, ev in enumerate(events):
        if ev.at_s > kw["duration_s"]:
            raise doc.err(("events", i, "at_s"), f"event at {ev.at_s:g} s is after the traffic ends "
                          f"(duration_s {kw['duration_s']:g} s)")
    kw["events"] = tuple(sorted(events, key=lambda e: e.at_s))
    return Scenario(**kw)


def check_against_topology(sc: Scenario, topo: Any, source: str) -> None:
    """Every event must name a link, server or SLO class that exists in the topology."""
    links = {frozenset((l.a, l.b)) for l in topo.links}
    servers = {s.name for s in topo.servers}
    classes = {c.workload.slo_class for c in topo.clients}
    for i, ev in enumerate(sc.events):
        if ev.link is not None and frozenset(ev.link) not in links:
            raise ConfigError(f"{source}: events[{i}] ({ev.kind}): no link {ev.link[0]}-{ev.link[1]} in "
                              f"topology {topo.name}")
        if ev.server is not None and ev.server not in servers:
            raise ConfigError(f"{source}: events[{i}] ({ev.kind}): no server {ev.server!r} in topology "
                              f"{topo.name} (servers: {', '.join(sorted(servers))})")
        if ev.slo_class is not None and ev.slo_class not in classes:
            raise ConfigError(f"{source}: events[{i}] (slo): no SLO class {ev.slo_class!r} "
                              f"(classes: {', '.join(sorted(classes))})")


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    return build_scenario(Doc(source, text=text))


def resolve_scenario_path(name_or_path: str | Path) -> Path:
    return resolve_named_yaml(name_or_path, SCENARIO_DIR, "scenario")


def load_scenario(name_or_path: str | Path = DEFAULT_SCENARIO) -> Scenario:
    path = resolve_scenario_path(name_or_path)
    return parse_scenario(path.read_text(), source=str(path))

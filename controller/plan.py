"""What the planner consumes besides profile and cluster (requirements, options) and what it
produces (a Plan): frozen, validated, JSON round-trippable.

Plan layout (JSON):
  bits[l][e]            bit width of routed expert e of layer l
  placement[l][e]       servers holding it, best first (more than one = replicas)
  on_demand{server}     [[l, e], ...] experts that server serves by loading them when needed
  backbone{entry}       [{"server", "layers": [l0, l1]}, ...] stages running the backbone for
                        requests entering at `entry` (one stage = the coordinator runs all layers)
  compression{"a|b"}    agreed token-compression settings for the server pair a-b
  predicted{...}        per request class: ttft_ms, token_ms, quality_loss_nats, meets_slo ...
  memory_bytes{server}  bytes the plan puts on each server
  reasons[]             the decisions, with their numbers
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError


@dataclass(frozen=True)
class RequestClass:
    """Requests that enter at one server with one SLO (a client group in the topology)."""
    name: str
    entry: str  # server receiving the requests
    rate_rps: float = 1.0  # arrivals per second
    prompt_tokens: int = 128
    new_tokens: int = 64
    ttft_slo_ms: float = math.inf  # time to first token
    token_slo_ms: float = math.inf  # per output token (time per output token)
    max_loss_nats: float = math.inf  # quality floor: largest predicted loss increase accepted

    def __post_init__(self) -> None:
        if self.rate_rps < 0 or self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ConfigError(f"request class {self.name}: need rate_rps >= 0, prompt_tokens >= 1, new_tokens >= 1")
        if self.ttft_slo_ms <= 0 or self.token_slo_ms <= 0 or self.max_loss_nats < 0:
            raise ConfigError(f"request class {self.name}: SLOs must be > 0 and max_loss_nats >= 0")


@dataclass(frozen=True)
class Requirements:
    classes: tuple[RequestClass, ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise ConfigError("requirements: at least one request class")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ConfigError(f"requirements: duplicate class names {names}")

    @property
    def entries(self) -> tuple[str, ...]:
        return tuple(sorted({c.entry for c in self.classes}))

    @property
    def max_loss_nats(self) -> float:
        return min(c.max_loss_nats for c in self.classes)

    def weights(self) -> dict[str, float]:
        """Share of output tokens per class (how much each class's latency counts)."""
        tot = sum(c.rate_rps * c.new_tokens for c in self.classes)
        if tot <= 0:
            return {c.name: 1.0 / len(self.classes) for c in self.classes}
        return {c.name: c.rate_rps * c.new_tokens / tot for c in self.classes}

    def with_slo(self, token_slo_ms: float | None = None, ttft_slo_ms: float | None = None,
                 max_loss_nats: float | None = None) -> "Requirements":
        from dataclasses import replace
        out = []
        for c in self.classes:
            ch: dict[str, Any] = {}
            if token_slo_ms is not None:
                ch["token_slo_ms"] = token_slo_ms
            if ttft_slo_ms is not None:
                ch["ttft_slo_ms"] = ttft_slo_ms
            if max_loss_nats is not None:
                ch["max_loss_nats"] = max_loss_nats
            out.append(replace(c, **ch))
        return Requirements(tuple(out))

    def to_dict(self) -> dict[str, Any]:
        return {"classes": [{f.name: _num_out(getattr(c, f.name)) for f in fields(c)} for c in self.classes]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> "Requirements":
        known = {f.name for f in fields(RequestClass)}
        out = []
        for i, c in enumerate(doc.get("classes", [])):
            bad = sorted(set(c) - known)
            if bad:
                raise ConfigError(f"{source}: classes[{i}]: unknown keys {bad}; known: {sorted(known)}")
            out.append(RequestClass(**{k: _num_in(v) for k, v in c.items()}))
        return cls(tuple(out))


def single_class(entry: str, token_slo_ms: float = math.inf, ttft_slo_ms: float = math.inf,
                 max_loss_nats: float = math.inf, rate_rps: float = 1.0) -> Requirements:
    return Requirements((RequestClass(name=f"at-{entry}", entry=entry, rate_rps=rate_rps,
                                      token_slo_ms=token_slo_ms, ttft_slo_ms=ttft_slo_ms,
                                      max_loss_nats=max_loss_nats),))


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def requirements_from_topology(topo: Any, default_entry: str | None = None) -> Requirements:
    """One request class per client of the topology (entry server + workload + SLOs)."""
    classes = []
    clients = _get(topo, "clients") or ()
    if isinstance(clients, dict):
        clients = list(clients.values())
    for c in clients:
        w = _get(c, "workload") or {}
        name = str(_get(c, "name"))
        def val(key: str, default: float) -> float:
            v = _get(w, key, None)
            return default if v is None else v

        classes.append(RequestClass(
            name=name, entry=str(_get(c, "entry")),
            rate_rps=float(val("rate_rps", 1.0)),
            prompt_tokens=int(val("prompt_tokens", 128)),
            new_tokens=int(val("max_new_tokens", 64)),
            ttft_slo_ms=float(val("slo_ttft_ms", math.inf)),
            token_slo_ms=float(val("slo_tpot_ms", math.inf)),
            max_loss_nats=float(val("max_loss_nats", math.inf))))
    if not classes:
        servers = list(_get(topo, "servers") or ())
        if isinstance(_get(topo, "servers"), dict):
            servers = list(_get(topo, "servers").values())
        entry = default_entry or (str(_get(servers[0], "name")) if servers else None)
        if entry is None:
            raise ConfigError("topology has neither clients nor servers")
        return single_class(entry)
    return Requirements(tuple(classes))


OBJECTIVES = ("latency", "quality")


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the planner and its cost model (defaults documented in docs/planner.md)."""
    msg_overhead_ms: float = 0.3  # one request/reply through pyzmq, measured 0.2-0.4 ms here
    call_overhead_ms: float = 0.03  # one small expert call on CPU (~27-33 us measured)
    # an expert call to the coordinator's own server: the entry reaches its co-located agent through
    # a socket too (no link delay, but the message round trip)
    local_call_ms: float = 0.3
    # False: the runtime runs every backbone layer on the entry's coordinator and calls the expert
    # holders per layer, also for pipeline plans (stage execution is issue 14); the cost model then
    # predicts that, not the stages. True once agents execute stages.
    stage_execution: bool = False
    rto_ms: float = 200.0  # TCP retransmission timeout charged per lost packet
    header_bytes: int = 64  # per message
    headroom_frac: float = 0.08  # memory kept free on each server for re-homing after a failure
    max_replicas: int = 4  # copies of one expert at most
    seed: int = 0  # only the `random` strategy uses it
    max_migration_factor: float = 2.0  # replan: bytes moved <= factor x bytes the lost server held
    compression_costs: tuple = ()  # measured (name, quality_nats, bytes_factor, calls_factor, tokens_factor)
    allowed_bits: tuple[int, ...] = (2, 3, 4, 8, 16)
    # what `coel` optimises among the candidates that keep memory, every quality floor and the SLOs:
    # "latency" (the paper's: lowest rate-weighted ms/token, then TTFT) or "quality" (lowest loss)
    objective: str = "latency"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {list(OBJECTIVES)} (got {self.objective!r})")
        if not 0.0 <= self.headroom_frac < 0.9:
            raise ConfigError(f"headroom_frac must be in [0, 0.9) (got {self.headroom_frac})")
        if self.max_replicas < 1 or self.max_migration_factor < 1.0:
            raise ConfigError("max_replicas >= 1 and max_migration_factor >= 1 required")


@dataclass(frozen=True)
class Stage:
    server: str
    l0: int  # first layer (inclusive)
    l1: int  # last layer (exclusive)


@dataclass(frozen=True, eq=True)
class Plan:
    strategy: str
    mode: str  # "intra" | "inter" | "offload" | "pipeline" | "random"
    model: str
    bits: tuple[tuple[int, ...], ...]
    placement: tuple[tuple[tuple[str, ...], ...], ...]
    backbone: tuple[tuple[str, tuple[Stage, ...]], ...]  # (entry, stages) sorted by entry
    on_demand: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    compression: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    predicted: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    memory_bytes: tuple[tuple[str, int], ...] = ()
    reasons: tuple[str, ...] = ()

    # ---- convenient views ----
    @property
    def n_layers(self) -> int:
        return len(self.bits)

    @property
    def n_experts(self) -> int:
        return len(self.bits[0]) if self.bits else 0

    def backbone_map(self) -> dict[str, tuple[Stage, ...]]:
        return dict(self.backbone)

    def on_demand_map(self) -> dict[str, set[tuple[int, int]]]:
        return {s: set(v) for s, v in self.on_demand}

    def compression_map(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.compression}

    def predicted_map(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.predicted}

    def memory_map(self) -> dict[str, int]:
        return dict(self.memory_bytes)

    def servers_used(self) -> set[str]:
        used = {s for row in self.placement for reps in row for s in reps}
        used |= {st.server for _, stages in self.backbone for st in stages}
        return used

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "coel-plan", "version": 1,
            "strategy": self.strategy, "mode": self.mode, "model": self.model,
            "bits": [list(r) for r in self.bits],
            "placement": [[list(reps) for reps in row] for row in self.placement],
            "on_demand": {s: [list(x) for x in v] for s, v in self.on_demand},
            "backbone": {e: [{"server": st.server, "layers": [st.l0, st.l1]} for st in stages]
                         for e, stages in self.backbone},
            "compression": {k: _json_safe(dict(v)) for k, v in self.compression},
            "predicted": {k: _json_safe(dict(v)) for k, v in self.predicted},
            "memory_bytes": dict(self.memory_bytes),
            "reasons": list(self.reasons),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> "Plan":
        if doc.get("format") != "coel-plan":
            raise ConfigError(f'{source}: not a plan ("format" must be "coel-plan")')
        try:
            plan = cls(
                strategy=str(doc["strategy"]), mode=str(doc["mode"]), model=str(doc.get("model", "")),
                bits=tuple(tuple(int(b) for b in row) for row in doc["bits"]),
                placement=tuple(tuple(tuple(str(s) for s in reps) for reps in row) for row in doc["placement"]),
                backbone=tuple(sorted((e, tuple(Stage(str(st["server"]), int(st["layers"][0]), int(st["layers"][1]))
                                                for st in stages)) for e, stages in doc["backbone"].items())),
                on_demand=tuple(sorted((s, tuple(sorted((int(x[0]), int(x[1])) for x in v)))
                                       for s, v in doc.get("on_demand", {}).items())),
                compression=freeze_map(_json_unsafe(doc.get("compression", {}))),
                predicted=freeze_map(_json_unsafe(doc.get("predicted", {}))),
                memory_bytes=tuple(sorted((s, int(b)) for s, b in doc.get("memory_bytes", {}).items())),
                reasons=tuple(str(r) for r in doc.get("reasons", [])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{source}: malformed plan ({exc!r})") from None
        return plan.check(source)

    def check(self, source: str = "<plan>") -> "Plan":
        """Shapes agree, every expert has a width and at least one server, widths are known."""
        if not self.bits or len(self.placement) != len(self.bits):
            raise ConfigError(f"{source}: bits has {len(self.bits)} layers, placement {len(self.placement)}")
        for l, (brow, prow) in enumerate(zip(self.bits, self.placement)):
            if len(brow) != len(self.bits[0]) or len(prow) != len(brow):
                raise ConfigError(f"{source}: layer {l}: {len(brow)} widths, {len(prow)} placements, "
                                  f"{len(self.bits[0])} experts in layer 0")
            for e, (b, reps) in enumerate(zip(brow, prow)):
                if b not in (2, 3, 4, 8, 16):
                    raise ConfigError(f"{source}: layer {l} expert {e}: bit width {b} not in [2, 3, 4, 8, 16]")
                if not reps:
                    raise ConfigError(f"{source}: layer {l} expert {e} is placed on no server")
        if not self.backbone:
            raise ConfigError(f"{source}: no backbone placement")
        return self

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "Plan":
        try:
            return cls.from_dict(json.loads(text), source)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: plan file not found")
        return cls.from_json(p.read_text(), str(p))


def freeze_map(d: dict[str, dict[str, Any]]) -> tuple:
    """{k: {field: value}} -> sorted nested tuples (hashable, order-independent equality)."""
    return tuple(sorted((str(k), tuple(sorted((str(f), _freeze(v)) for f, v in inner.items())))
                        for k, inner in d.items()))


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def _num_out(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


def _num_in(v: Any) -> Any:
    if v == "inf":
        return math.inf
    return v


def _json_safe(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _json_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_json_safe(v) for v in d]
    return _num_out(d)


def _json_unsafe(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _json_unsafe(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_json_unsafe(v) for v in d]
    return _num_in(d)

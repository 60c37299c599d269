"""Token-compression negotiation per inter-server connection, as pure functions.

The controller proposes, for each server pair that carries expert traffic, a ranked list of
compression settings (field names of nodes.compression.CompressionSettings) from the path's
bandwidth and latency, the request shape and the quality cost of each setting; the two agents
answer with what they support and what they measured; `agree` picks the first proposed setting
both support whose cost fits the quality budget. A link change -> propose again.

Messages the deployer sends (plain dicts; nodes/protocol.py frames them):
  {"type": "compress.propose", "version": 1, "link": "a|b",
   "candidates": [{"name", "settings": {...}, "decode_ms", "prefill_ms", "quality_nats"}, ...]}
  answer: {"type": "compress.answer", "version": 1, "link": "a|b", "server": "a",
           "supported": ["none", "int8", ...], "measured_quality_nats": {"int8": 0.0004, ...}}
  decision: {"type": "compress.set", "version": 1, "link": "a|b", "name": ..., "settings": {...}}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from coel_model.errors import ConfigError

MSG_VERSION = 1


@dataclass(frozen=True)
class CompressionCost:
    """One setting and what it costs/saves. Factors multiply: bytes per vector on the wire,
    expert calls sent to remote servers, prefill tokens sent; quality_nats adds to the loss."""
    name: str
    settings: tuple[tuple[str, Any], ...]
    quality_nats: float
    bytes_factor: float = 1.0
    calls_factor: float = 1.0
    tokens_factor: float = 1.0
    codec_ms_per_mb: float = 0.0  # CPU time to (de)compress, both ends together
    source: str = "default"

    def __post_init__(self) -> None:
        if self.quality_nats < 0 or not (0 < self.bytes_factor <= 2) or not (0 < self.calls_factor <= 1) \
                or not (0 < self.tokens_factor <= 1):
            raise ConfigError(f"compression cost {self.name}: need quality_nats >= 0, 0 < bytes_factor <= 2, "
                              f"0 < calls_factor <= 1, 0 < tokens_factor <= 1")

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def _s(**kw: Any) -> tuple[tuple[str, Any], ...]:
    base = {"act_dtype": "fp16", "prune_beta": 0.0, "protect_top_frac": 0.0, "drop_tokens_frac": 0.0,
            "fuse_threshold": 0.0, "fuse_max_frac": 0.0}
    base.update(kw)
    return tuple(sorted(base.items()))


# Defaults until D2's measure_compression_cost table is supplied. Sources (anchors.md):
# int8 activations: distributed-llama Q80 (~2x fewer bytes than fp16, quality cost assumed tiny);
# pruning: MC-MoE online pruning, 15% fewer expert calls for < 0.6% loss (ln 1.006 = 0.006 nats);
# fusion: ToMe-style merging, ~0.2-0.3% accuracy for ~2x fewer tokens (we assume 0.6x tokens).
DEFAULT_COSTS: tuple[CompressionCost, ...] = (
    CompressionCost("none", _s(), 0.0, 1.0),
    CompressionCost("int8", _s(act_dtype="int8"), 0.0005, 0.52, codec_ms_per_mb=0.5),
    CompressionCost("int8+prune", _s(act_dtype="int8", prune_beta=0.5, protect_top_frac=0.02), 0.0065,
                    0.52, calls_factor=0.85, codec_ms_per_mb=0.5),
    CompressionCost("int8+fuse", _s(act_dtype="int8", fuse_threshold=0.9, fuse_max_frac=0.5), 0.0035,
                    0.52, tokens_factor=0.6, codec_ms_per_mb=1.0),
    CompressionCost("int8+prune+fuse", _s(act_dtype="int8", prune_beta=0.5, protect_top_frac=0.02,
                                           fuse_threshold=0.9, fuse_max_frac=0.5), 0.0095,
                    0.52, calls_factor=0.85, tokens_factor=0.6, codec_ms_per_mb=1.0),
)


def costs_from_measurements(rows: Iterable[dict[str, Any]]) -> tuple[CompressionCost, ...]:
    """nodes.compression.measure_compression_cost rows -> cost entries (the "none" entry, fp16
    on the wire, is always first; a measured row named "none" is skipped).

    quality: `loss_increase` (nats/token; else ln(1 + ppl_increase)), floored at 0. Bytes per
    vector relative to fp16: 2 x `vector_bytes_ratio` (measured against fp32 rows; else
    `bytes_ratio`, which also folds in pruning and merging). calls: 1 - `pruned_frac`. prefill
    tokens: 1 - `merged_frac`."""
    out = [DEFAULT_COSTS[0]]
    for i, r in enumerate(rows):
        try:
            st = dict(r["settings"])
            name = str(r.get("name") or r.get("label") or f"measured-{i}")
            if name == "none":
                continue
            if "loss_increase" in r:
                q = max(float(r["loss_increase"]), 0.0)
            else:
                q = math.log1p(max(float(r.get("ppl_increase", 0.0)), 0.0))
            vec = float(r["vector_bytes_ratio"]) * 2.0 if "vector_bytes_ratio" in r else float(r["bytes_ratio"])
            calls = 1.0 - float(r.get("pruned_frac", 0.0))
            tokens = 1.0 - float(r.get("merged_frac", 0.0))
            out.append(CompressionCost(name, _s(**st), q, min(max(vec, 1e-3), 2.0),
                                       calls_factor=min(max(calls, 1e-3), 1.0),
                                       tokens_factor=min(max(tokens, 1e-3), 1.0), source="measured"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"compression cost row {i}: {exc!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class LinkView:
    """What negotiation needs of a route: one-way latency, bottleneck bandwidth, loss."""
    key: str
    bw_mbit: float
    latency_ms: float
    loss_pct: float = 0.0


@dataclass(frozen=True)
class Traffic:
    """Per request on this connection: vectors per decode step and per prefill, vector width."""
    d_model: int
    prompt_tokens: int
    new_tokens: int
    elt_bytes_fp16: int = 2


@dataclass(frozen=True)
class Candidate:
    name: str
    settings: tuple[tuple[str, Any], ...]
    decode_ms: float
    prefill_ms: float
    quality_nats: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": dict(self.settings), "decode_ms": round(self.decode_ms, 4),
                "prefill_ms": round(self.prefill_ms, 4), "quality_nats": self.quality_nats}


def transfer_ms(link: LinkView, nbytes: float) -> float:
    """Serialisation time of nbytes in one direction on the route's bottleneck."""
    return nbytes * 8.0 / (link.bw_mbit * 1e3)


# How many ms of wire time per request one nat of quality is worth when the SLO does not say
# (infinite SLO or quality budget): int8 (0.0005 nats) then has to save > 5 ms per request.
DEFAULT_MS_PER_NAT = 1e4


def propose(link: LinkView, costs: Iterable[CompressionCost], traffic: Traffic,
            quality_budget_nats: float, slo_request_ms: float = math.inf) -> list[Candidate]:
    """Rank the settings for one connection, best first. Time = predicted wire + codec time per
    request (prefill plus every decode step). Quality is priced so that spending the whole
    quality budget is worth the whole request SLO (slo_request_ms = TTFT SLO + new_tokens x
    per-token SLO): score = time + quality x slo_request_ms / quality_budget. Settings over the
    quality budget are left out; "none" is always a candidate (the fallback)."""
    if math.isfinite(slo_request_ms) and math.isfinite(quality_budget_nats) and quality_budget_nats > 0:
        ms_per_nat = slo_request_ms / quality_budget_nats
    else:
        ms_per_nat = DEFAULT_MS_PER_NAT
    cands = []
    for c in costs:
        if c.quality_nats > quality_budget_nats and c.name != "none":
            continue
        vec = traffic.d_model * traffic.elt_bytes_fp16 * c.bytes_factor
        dec_bytes = 2 * vec * c.calls_factor  # out and back, one vector each way
        pre_bytes = 2 * vec * traffic.prompt_tokens * c.tokens_factor * c.calls_factor
        codec = c.codec_ms_per_mb / 1e6
        decode_ms = transfer_ms(link, dec_bytes) + codec * dec_bytes
        prefill_ms = transfer_ms(link, pre_bytes) + codec * pre_bytes
        cands.append(Candidate(c.name, c.settings, decode_ms, prefill_ms, c.quality_nats))
    cands.sort(key=lambda x: (round(x.prefill_ms + traffic.new_tokens * x.decode_ms + x.quality_nats * ms_per_nat, 6),
                              x.quality_nats, x.name))
    if not any(x.name == "none" for x in cands):
        cands.append(Candidate("none", _s(), math.inf, math.inf, 0.0))
    return cands


@dataclass(frozen=True)
class AgentCapabilities:
    """An agent's answer: setting names it can run and the quality cost it measured."""
    server: str
    supported: frozenset[str]
    measured_quality_nats: tuple[tuple[str, float], ...] = ()

    @classmethod
    def everything(cls, server: str) -> "AgentCapabilities":
        return cls(server, frozenset(c.name for c in DEFAULT_COSTS))


def agree(proposal: list[Candidate], answers: Iterable[AgentCapabilities],
          quality_budget_nats: float) -> Candidate:
    """The first proposed setting every agent supports whose (measured, else proposed) cost fits
    the budget; "none" when nothing else does."""
    answers = list(answers)
    for cand in proposal:
        if not all(cand.name in a.supported or cand.name == "none" for a in answers):
            continue
        q = max([cand.quality_nats] + [dict(a.measured_quality_nats).get(cand.name, 0.0) for a in answers])
        if q <= quality_budget_nats or cand.name == "none":
            return Candidate(cand.name, cand.settings, cand.decode_ms, cand.prefill_ms, q)
    return Candidate("none", _s(), math.inf, math.inf, 0.0)


def propose_message(link_key: str, proposal: list[Candidate]) -> dict[str, Any]:
    return {"type": "compress.propose", "version": MSG_VERSION, "link": link_key,
            "candidates": [c.to_dict() for c in proposal if math.isfinite(c.decode_ms)]}


def answer_message(link_key: str, caps: AgentCapabilities) -> dict[str, Any]:
    return {"type": "compress.answer", "version": MSG_VERSION, "link": link_key, "server": caps.server,
            "supported": sorted(caps.supported), "measured_quality_nats": dict(caps.measured_quality_nats)}


def parse_answer(msg: dict[str, Any]) -> AgentCapabilities:
    if msg.get("type") != "compress.answer" or msg.get("version") != MSG_VERSION:
        raise ConfigError(f"not a compress.answer v{MSG_VERSION} message: type={msg.get('type')!r} "
                          f"version={msg.get('version')!r}")
    return AgentCapabilities(str(msg["server"]), frozenset(msg.get("supported", ())),
                             tuple(sorted((str(k), float(v)) for k, v in msg.get("measured_quality_nats", {}).items())))


def decision_message(link_key: str, chosen: Candidate) -> dict[str, Any]:
    return {"type": "compress.set", "version": MSG_VERSION, "link": link_key, "name": chosen.name,
            "settings": dict(chosen.settings)}


def link_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def cost_by_name(costs: Iterable[CompressionCost]) -> dict[str, CompressionCost]:
    return {c.name: c for c in costs}


def request_quality_score(request_ms: float, quality_nats: float) -> float:
    """What link re-negotiation minimises: predicted request time x the perplexity factor
    exp(quality_nats). Latency and perplexity are traded at equal elasticity (1% slower costs as
    much as 1% higher perplexity), so the rule has no unit to tune and scales with the model: a
    setting is worth its quality cost when it saves more than that fraction of the request
    time. A 10x slower link makes its wire time ~10x larger while the quality cost stays put,
    which is what tightens the setting; recovery undoes it by the same rule."""
    return request_ms * math.exp(quality_nats)

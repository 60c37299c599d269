"""The latency and memory model every strategy is judged by (see docs/planner.md).

Decode, per output token, for a request class whose backbone runs in stages s = (server h,
layers l0..l1):   token_ms = head_ms + sum over stages [hop to h] + sum over its layers
    backbone_bytes_layer / bw_h  +  E[ max over servers v involved in layer l of cost_v ]
where cost_v = net(h, v) + (sum of active expert bytes on v) / bw_v (+ storage load time for
on-demand experts) + per-call overhead, net(h, v) = 2 x one-way path latency + bytes both
ways / bottleneck bandwidth + message overhead + loss x RTO, and v is involved with probability
q_v (from popularity and co-activation). E[max] treats servers as independent: sort cost_v
descending, sum cost_i q_i prod_{j<i} (1 - q_j). Prefill (TTFT) is the same walk with T tokens:
q_v -> 1 - (1 - q_v)^T, T-token payloads, roofline compute max(bytes / bw, flops / gflops).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from controller.cluster import Cluster, Server
from controller.negotiation import DEFAULT_COSTS, CompressionCost, link_key
from controller.plan import PlanOptions, Plan, Requirements, Stage, freeze_map
from coel_model.profile_format import Profile


@dataclass
class Layout:
    """A plan in array form while strategies build it. S = len(cluster.servers)."""
    bits: np.ndarray  # (L, E) int
    hosted: np.ndarray  # (L, E, S) bool: the server keeps a copy (resident or on demand)
    on_demand: np.ndarray  # (L, E, S) bool: the copy is loaded on demand (not resident)
    stages: dict[str, list[tuple[int, int, int]]]  # entry -> [(server idx, l0, l1)]
    compression: dict[tuple[int, int], CompressionCost] = field(default_factory=dict)

    def copy(self) -> "Layout":
        return Layout(self.bits.copy(), self.hosted.copy(), self.on_demand.copy(),
                      {k: list(v) for k, v in self.stages.items()}, dict(self.compression))

    def coordinators(self) -> dict[str, int]:
        return {e: st[0][0] for e, st in self.stages.items()}


def head_bytes(profile: Profile) -> int:
    return profile.backbone_layer_bytes()[1]


def stage_backbone_bytes(profile: Profile, l0: int, l1: int, with_head: bool) -> int:
    layer_b, head_b = profile.backbone_layer_bytes()
    return layer_b * (l1 - l0) + (head_b if with_head else 0)


def layout_memory(profile: Profile, cluster: Cluster, lay: Layout) -> np.ndarray:
    """Bytes per server: resident experts + backbone parts + an on-demand buffer of top_k
    experts (the largest it may load) per server that serves experts on demand."""
    S = len(cluster.servers)
    eb = profile.expert_bytes(lay.bits)  # (L, E)
    resident = lay.hosted & ~lay.on_demand
    mem = np.einsum("les,le->s", resident.astype(np.float64), eb.astype(np.float64))
    for s in range(S):
        od = lay.on_demand[:, :, s]
        if od.any():
            mem[s] += profile.cfg.top_k * eb[od].max()
    seen: set[tuple[int, int, int]] = set()
    for stages in lay.stages.values():
        for i, (s, l0, l1) in enumerate(stages):
            key = (s, l0, l1)
            if key in seen:
                continue
            seen.add(key)
            mem[s] += stage_backbone_bytes(profile, l0, l1, with_head=(i == 0))
    return mem.astype(np.int64)


def _msg_ms(cluster: Cluster, opts: PlanOptions, h: int, payload_bytes: np.ndarray | float,
            bytes_factor: np.ndarray | float = 1.0) -> np.ndarray:
    """Request + reply from server h to every server: (S,) ms; 0 to itself, inf if unreachable."""
    lat = cluster.latency_matrix_ms[h]
    bw = np.maximum(cluster.bw_matrix_mbit[h], 1e-9)
    loss = cluster.loss_matrix_pct[h] / 100.0
    nbytes = 2.0 * (np.asarray(payload_bytes) * bytes_factor + opts.header_bytes)
    soft = msg_overhead_ms(cluster, opts)
    out = 2.0 * lat + nbytes * 8.0 / (bw * 1e3) + (soft[h] + soft) / 2 + 2.0 * loss * opts.rto_ms
    out = np.where(np.isfinite(lat), out, np.inf)
    out[h] = local_call_ms(cluster, opts, h)  # the server's own agent: a socket round trip, no link
    return out


def msg_overhead_ms(cluster: Cluster, opts: PlanOptions) -> np.ndarray:
    """(S,) software cost of a message round trip at each server: perceived, else the nominal."""
    return np.array([opts.msg_overhead_ms if s.msg_ms is None else s.msg_ms for s in cluster.servers])


def local_call_ms(cluster: Cluster, opts: PlanOptions, h: int) -> float:
    s = cluster.servers[h]
    return opts.local_call_ms if s.msg_ms is None else float(s.msg_ms)


def call_ms(cluster: Cluster, opts: PlanOptions) -> np.ndarray:
    """(S,) fixed cost of one expert call on each server (perceived, else nominal)."""
    return np.array([opts.call_overhead_ms if s.call_ms is None else s.call_ms for s in cluster.servers])


def layer_decode_ms(server: Server, layer_bytes: float) -> float:
    """One decoder layer without experts, decode: perceived, else its weights read once."""
    if server.layer_decode_ms is not None:
        return server.layer_decode_ms
    return layer_bytes / server.effective_bytes_per_s * 1e3


def layer_prefill_ms(server: Server, layer_bytes: float, tokens: int) -> float:
    if server.prefill_token_layer_ms is not None:
        return server.prefill_token_layer_ms * tokens
    return max(layer_bytes / server.effective_bytes_per_s,
               layer_bytes * tokens / (server.gflops * (1.0 - server.load) * 1e9)) * 1e3


def head_ms(server: Server, head_bytes: float) -> float:
    """lm_head per token (the embedding row is tiny)."""
    if server.head_ms is not None:
        return server.head_ms
    return head_bytes / 2.0 / server.effective_bytes_per_s * 1e3


def _pair_factors(lay: Layout, h: int, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per destination server: bytes, calls, tokens factors, codec ms/MB and quality of the
    agreed compression between h and it."""
    bf, cf, tf, codec, q = (np.ones(S), np.ones(S), np.ones(S), np.zeros(S), np.zeros(S))
    for v in range(S):
        c = lay.compression.get((min(h, v), max(h, v)))
        if c is not None and v != h:
            bf[v], cf[v], tf[v], codec[v], q[v] = (c.bytes_factor, c.calls_factor, c.tokens_factor,
                                                   c.codec_ms_per_mb, c.quality_nats)
    return bf, cf, tf, codec, q


def expected_max(cost: np.ndarray, q: np.ndarray) -> np.ndarray:
    """E[max_v cost_v * 1{v involved}] for independent involvement; cost/q (..., S) -> (...)."""
    order = np.argsort(-cost, axis=-1, kind="stable")
    c = np.take_along_axis(cost, order, -1)
    qq = np.take_along_axis(q, order, -1)
    c = np.where(qq > 0, c, 0.0)
    none_before = np.cumprod(1.0 - qq, axis=-1)
    none_before = np.concatenate([np.ones_like(none_before[..., :1]), none_before[..., :-1]], axis=-1)
    return (c * qq * none_before).sum(-1)


def _per_server(serve: np.ndarray, values: np.ndarray, S: int) -> np.ndarray:
    """(L, E) values summed per (layer, serving server): (L, S)."""
    L = serve.shape[0]
    flat = (np.arange(L)[:, None] * S + serve).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=L * S).reshape(L, S)


def involvement(coact: np.ndarray, serve: np.ndarray, p_eff: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, S) probability that a token needs server v in layer l, and (L, S) sum of p_eff there.
    Inclusion-exclusion to second order with the measured co-activation (fires-together pairs
    count once), bounded by [max single p, min(1, sum p)]; independence when no co-activation."""
    L, E = serve.shape
    psum = _per_server(serve, p_eff, S)
    pmax = np.zeros((L, S))
    np.maximum.at(pmax, (np.repeat(np.arange(L), E), serve.ravel()), p_eff.ravel())
    indep = 1.0 - np.exp(_per_server(serve, np.log1p(-np.minimum(p_eff, 1 - 1e-9)), S))
    has = coact.reshape(L, -1).any(1)
    if not has.any():
        return indep, psum
    same = serve[:, :, None] == serve[:, None, :]  # (L, E, E) both served by one server
    pair_mass = 0.5 * (coact * same).sum(2)  # (L, E): half of e's pairs on its server
    pairs = _per_server(serve, pair_mass, S)
    q = np.clip(psum - pairs, pmax, np.minimum(psum, 1.0))
    return np.where(has[:, None], q, indep), psum


@dataclass(frozen=True)
class HubCost:
    decode_ms: np.ndarray  # (L,) expert part of each layer, decode
    prefill_ms: np.ndarray  # (L,) expert part of each layer, prefill of T tokens
    quality_nats: float  # compression quality cost on the connections this hub uses
    used_pairs: frozenset[tuple[int, int]]
    busy_token_ms: np.ndarray  # (S,) expected expert compute per decoded token on each server
    busy_prefill_ms: np.ndarray  # (S,) expert compute per prefill on each server
    calls_per_token: np.ndarray  # (S,) expected expert calls per decoded token to each server


def hub_cost(profile: Profile, cluster: Cluster, lay: Layout, h: int, prompt_tokens: int,
             opts: PlanOptions, layers: slice | None = None) -> HubCost:
    """Expert cost per layer when the backbone of those layers runs on server h."""
    S = len(cluster.servers)
    cfg = profile.cfg
    sl = layers or slice(0, profile.n_layers)
    hosted = lay.hosted[sl]
    ondem = lay.on_demand[sl]
    p = profile.popularity[sl]
    eb = profile.expert_bytes(lay.bits)[sl].astype(np.float64)  # (L, E)
    vec = cfg.d_model * 2.0
    bf, cf, tf, codec, qual = _pair_factors(lay, h, S)
    net = _msg_ms(cluster, opts, h, vec, bf) + codec * 2 * vec * bf / 1e6
    bw = np.array([s.effective_bytes_per_s for s in cluster.servers])
    gf = np.array([s.gflops * (1.0 - s.load) for s in cluster.servers])
    sto = np.array([s.storage_bytes_per_s for s in cluster.servers])
    sto_fixed = np.array([s.storage_ms or 0.0 for s in cluster.servers])
    co = call_ms(cluster, opts)
    comp = eb[..., None] / bw * 1e3 + np.where(ondem, eb[..., None] / sto * 1e3 + sto_fixed, 0.0)  # (L, E, S) ms
    pick = np.where(hosted, net[None, None, :] + comp, np.inf)
    serve = pick.argmin(-1)  # (L, E) best copy: network + compute (+ load)
    if not np.isfinite(np.take_along_axis(pick, serve[..., None], 2)).all():
        bad = np.argwhere(~np.isfinite(np.take_along_axis(pick, serve[..., None], 2)[..., 0]))[0]
        from coel_model.errors import InfeasibleError
        raise InfeasibleError(f"layer {bad[0] + sl.start} expert {bad[1]}: no reachable copy from server "
                              f"{cluster.servers[h].name}")
    p_eff = p * np.where(serve == h, 1.0, cf[serve])
    q, psum = involvement(profile.coact_same[sl], serve, p_eff, S)
    c_serve = np.take_along_axis(comp, serve[..., None], 2)[..., 0]
    work = _per_server(serve, p_eff * c_serve, S)  # expected compute ms per token on v
    safe_q = np.where(q > 0, q, 1.0)
    calls = psum / safe_q
    cost = net[None, :] + work / safe_q + co[None, :] * calls
    decode = expected_max(cost, q)
    # prefill: T tokens; every touched expert's weights read once; payload T_v vectors each way
    T = prompt_tokens
    qT = 1.0 - (1.0 - np.clip(q, 0, 1)) ** T
    touched = 1.0 - (1.0 - np.clip(p, 0, 1)) ** T
    read_ms = _per_server(serve, touched * c_serve, S)
    flops = _per_server(serve, p_eff * T * 2.0 * 3 * cfg.d_model * cfg.expert_hidden, S)
    flop_ms = flops / (gf * 1e9) * 1e3
    tok_v = T * q * tf[None, :]
    lat = cluster.latency_matrix_ms[h]
    bwl = np.maximum(cluster.bw_matrix_mbit[h], 1e-9)
    pay = 2.0 * (tok_v * vec * bf[None, :] + opts.header_bytes)
    soft = msg_overhead_ms(cluster, opts)
    net_T = 2 * lat[None, :] + pay * 8.0 / (bwl[None, :] * 1e3) + (soft[h] + soft[None, :]) / 2 \
        + codec[None, :] * pay / 1e6 + 2 * cluster.loss_matrix_pct[h][None, :] / 100 * opts.rto_ms
    net_T[:, h] = local_call_ms(cluster, opts, h)
    net_T = np.where(np.isfinite(lat)[None, :], net_T, np.inf)
    cost_T = net_T + np.maximum(read_ms, flop_ms) + co[None, :] * np.minimum(psum * T, p.shape[1])
    prefill = expected_max(np.where(qT > 0, cost_T, 0.0), qT)
    used = np.bincount(serve.ravel(), minlength=S) > 0
    used_pairs = frozenset((min(h, v), max(h, v)) for v in np.nonzero(used)[0] if v != h)
    qn = max([float(qual[v]) for v in np.nonzero(used)[0] if v != h] + [0.0])
    busy_tok = (work + co[None, :] * psum).sum(0)
    busy_pre = np.where(qT > 0, np.maximum(read_ms, flop_ms), 0.0).sum(0)
    return HubCost(decode, prefill, qn, used_pairs, busy_tok, busy_pre, psum.sum(0))


@dataclass(frozen=True)
class ClassPrediction:
    name: str
    entry: str
    coordinator: str
    token_ms: float
    ttft_ms: float
    quality_loss_nats: float
    token_slo_ms: float
    ttft_slo_ms: float
    max_loss_nats: float

    @property
    def meets_slo(self) -> bool:
        return self.token_ms <= self.token_slo_ms and self.ttft_ms <= self.ttft_slo_ms

    @property
    def meets_quality(self) -> bool:
        return self.quality_loss_nats <= self.max_loss_nats + 1e-12

    @property
    def slo_ratio(self) -> float:
        """How far from the SLO (<= 1 meets it); the token SLO dominates."""
        r = [self.token_ms / self.token_slo_ms if math.isfinite(self.token_slo_ms) else 0.0,
             self.ttft_ms / self.ttft_slo_ms if math.isfinite(self.ttft_slo_ms) else 0.0]
        return max(r)

    def to_items(self) -> dict:
        return {"entry": self.entry, "coordinator": self.coordinator, "token_ms": round(self.token_ms, 4),
                "ttft_ms": round(self.ttft_ms, 4), "quality_loss_nats": round(self.quality_loss_nats, 6),
                "token_slo_ms": self.token_slo_ms, "ttft_slo_ms": self.ttft_slo_ms,
                "max_loss_nats": self.max_loss_nats, "meets_slo": self.meets_slo,
                "meets_quality": self.meets_quality}


def evaluate(profile: Profile, cluster: Cluster, reqs: Requirements, lay: Layout,
             opts: PlanOptions, utilization: np.ndarray | None = None) -> list[ClassPrediction]:
    """Predicted TTFT, per-token latency and quality for every request class. With
    `utilization` (an (S,) array), also fills in each server's busy fraction under the classes'
    arrival rates (rate x (prefill + new_tokens x per-token compute)), on top of its `load`;
    >= 1 means the arrivals cannot be sustained (latency is predicted for an idle server)."""
    S = len(cluster.servers)
    idx = cluster.index
    layer_b, head_b = profile.backbone_layer_bytes()
    expert_loss = float(profile.expert_loss(lay.bits).sum())
    cache: dict[tuple[int, int], HubCost] = {}
    out = []
    for c in reqs.classes:
        stages = lay.stages[c.entry]
        coord = stages[0][0]
        if not opts.stage_execution:  # what the runtime executes today: the entry runs every layer
            coord = idx[c.entry]
            stages = [(coord, 0, profile.n_layers)]
        tok = head_ms(cluster.servers[coord], head_b)
        ttft = tok
        e = idx[c.entry]
        if coord != e:
            ttft += float(_msg_ms(cluster, opts, e, c.prompt_tokens * 4.0)[coord])
        qual = 0.0
        prev = coord
        for (h, l0, l1) in stages:
            if h != prev:
                one = _msg_ms(cluster, opts, prev, profile.cfg.d_model * 2.0)[h] / 2
                oneT = _msg_ms(cluster, opts, prev, profile.cfg.d_model * 2.0 * c.prompt_tokens)[h] / 2
                tok += one
                ttft += oneT
            n = l1 - l0
            if n == 0:
                prev = h
                continue
            key = (h, l0, l1, c.prompt_tokens)
            if key not in cache:
                cache[key] = hub_cost(profile, cluster, lay, h, c.prompt_tokens, opts, layers=slice(l0, l1))
            hc = cache[key]
            srv = cluster.servers[h]
            if utilization is not None:
                per_req = c.new_tokens * (hc.busy_token_ms + 0.0) + hc.busy_prefill_ms
                per_req[h] += c.new_tokens * n * layer_decode_ms(srv, layer_b) \
                    + n * layer_prefill_ms(srv, layer_b, c.prompt_tokens)
                utilization += c.rate_rps * per_req / 1e3
            tok += n * layer_decode_ms(srv, layer_b) + float(hc.decode_ms.sum())
            if h == coord and len(stages) == 1 and srv.msg_ms is not None:
                # a perceived server: its processes share its CPU, so a token also takes at least the
                # CPU time they spend on it there (the entry's layers and its half of every call, the
                # co-located agent's half of the local calls and their expert work)
                m = float(srv.msg_ms)
                local = float(hc.calls_per_token[h])
                cpu = head_ms(srv, head_b) + n * layer_decode_ms(srv, layer_b) + float(hc.busy_token_ms[h]) \
                    + m * local + m / 2 * (float(hc.calls_per_token.sum()) - local)
                tok = max(tok, cpu)
            ttft += n * layer_prefill_ms(srv, layer_b, c.prompt_tokens) + float(hc.prefill_ms.sum())
            qual = max(qual, hc.quality_nats)
            prev = h
        if prev != coord:
            tok += _msg_ms(cluster, opts, prev, profile.cfg.d_model * 2.0)[coord] / 2
            ttft += _msg_ms(cluster, opts, prev, profile.cfg.d_model * 2.0)[coord] / 2
        out.append(ClassPrediction(c.name, c.entry, cluster.servers[coord].name, float(tok), float(ttft),
                                   expert_loss + qual, c.token_slo_ms, c.ttft_slo_ms, c.max_loss_nats))
    return out


def used_pairs(profile: Profile, cluster: Cluster, lay: Layout) -> set[tuple[int, int]]:
    """Server pairs that carry expert traffic or pipeline hops (where compression is negotiated)."""
    pairs: set[tuple[int, int]] = set()
    for stages in lay.stages.values():
        prev = stages[0][0]
        for (h, l0, l1) in stages:
            if h != prev:
                pairs.add((min(h, prev), max(h, prev)))
            prev = h
            others = np.nonzero(lay.hosted[l0:l1].any((0, 1)))[0]
            pairs |= {(min(h, int(v)), max(h, int(v))) for v in others if v != h}
        if prev != stages[0][0]:
            pairs.add((min(prev, stages[0][0]), max(prev, stages[0][0])))
    return pairs


def layout_to_plan(profile: Profile, cluster: Cluster, reqs: Requirements, lay: Layout, opts: PlanOptions,
                   strategy: str, mode: str, model: str, reasons: list[str]) -> Plan:
    names = [s.name for s in cluster.servers]
    L, E, S = lay.hosted.shape
    util = np.array([s.load for s in cluster.servers], dtype=np.float64)
    preds = evaluate(profile, cluster, reqs, lay, opts, utilization=util)
    coords = lay.coordinators()
    # replicas ordered best-first: the coordinators' own copy, then by latency from the first coordinator
    ref = cluster.index[reqs.classes[0].entry]
    ref = coords.get(reqs.classes[0].entry, ref)
    order = np.argsort(cluster.latency_matrix_ms[ref], kind="stable")
    rank = np.empty(S, dtype=int)
    rank[order] = np.arange(S)
    by_rank = np.lexsort((np.arange(S), rank))  # servers best-first (rank, then index)
    cells: list[list[list[str]]] = [[[] for _ in range(E)] for _ in range(L)]
    for l, e, k in np.argwhere(lay.hosted[:, :, by_rank]):  # row-major: each cell's servers in rank order
        cells[l][e].append(names[by_rank[k]])
    placement = [tuple(tuple(c) for c in row) for row in cells]
    ondem = []
    for v in range(S):
        items = tuple((int(l), int(e)) for l, e in np.argwhere(lay.on_demand[:, :, v]))
        if items:
            ondem.append((names[v], items))
    mem = layout_memory(profile, cluster, lay)
    comp = {link_key(names[a], names[b]): {"name": c.name, **c.settings_dict} for (a, b), c in
            sorted(lay.compression.items())}
    pred = {p.name: p.to_items() for p in preds}
    worst = max(preds, key=lambda p: p.token_ms)
    pred["_overall"] = {"token_ms_max": round(worst.token_ms, 4),
                        "ttft_ms_max": round(max(p.ttft_ms for p in preds), 4),
                        "quality_loss_nats": round(max(p.quality_loss_nats for p in preds), 6),
                        "expert_loss_nats": round(float(profile.expert_loss(lay.bits).sum()), 6),
                        "avg_bits": round(float(_avg_bits(profile, lay.bits)), 4),
                        "expert_bytes": int(profile.expert_bytes(lay.bits).sum()),
                        "meets_slo": all(p.meets_slo for p in preds),
                        "meets_quality": all(p.meets_quality for p in preds),
                        "max_utilization": round(float(util.max()), 4)}
    pred["_utilization"] = {names[v]: round(float(util[v]), 4) for v in range(S) if util[v] > 0}
    hot = [f"{names[v]} {util[v]:.2f}" for v in np.argsort(-util) if util[v] >= 0.8]
    if hot:
        reasons = list(reasons) + [f"arrival rates keep servers busy beyond 80 % ({', '.join(hot[:5])}): latency "
                                   f"is predicted for an idle server, queues will add to it"]
    return Plan(strategy=strategy, mode=mode, model=model,
                bits=tuple(tuple(int(b) for b in row) for row in lay.bits),
                placement=tuple(placement),
                backbone=tuple(sorted((e, tuple(Stage(names[s], l0, l1) for s, l0, l1 in st))
                                      for e, st in lay.stages.items())),
                on_demand=tuple(ondem), compression=freeze_map(comp), predicted=freeze_map(pred),
                memory_bytes=tuple(sorted((names[v], int(mem[v])) for v in range(S) if mem[v] > 0)),
                reasons=tuple(reasons))


def _avg_bits(profile: Profile, bits: np.ndarray) -> float:
    """Parameter-weighted mean bit width of the routed experts."""
    return float(bits.mean())


def layout_from_plan(plan: Plan, profile: Profile, cluster: Cluster,
                     costs: tuple[CompressionCost, ...] = DEFAULT_COSTS) -> tuple[Layout, list[str]]:
    """Array form of a plan on a (possibly changed) cluster; copies on servers that no longer
    exist are dropped and listed."""
    L, E, S = profile.n_layers, profile.n_experts, len(cluster.servers)
    if plan.n_layers != L or plan.n_experts != E:
        from coel_model.errors import ConfigError
        raise ConfigError(f"plan is for {plan.n_layers} x {plan.n_experts} experts, profile has {L} x {E}")
    idx = cluster.index
    hosted = np.zeros((L, E, S), dtype=bool)
    ondem = np.zeros((L, E, S), dtype=bool)
    gone: set[str] = set()
    for l, row in enumerate(plan.placement):
        for e, reps in enumerate(row):
            for s in reps:
                if s in idx:
                    hosted[l, e, idx[s]] = True
                else:
                    gone.add(s)
    for s, items in plan.on_demand:
        if s in idx:
            for l, e in items:
                ondem[l, e, idx[s]] = True
    stages = {}
    for entry, sts in plan.backbone:
        stages[entry] = [(idx.get(st.server, -1), st.l0, st.l1) for st in sts]
    by_name = {c.name: c for c in costs}
    comp = {}
    for k, items in plan.compression:
        a, b = k.split("|")
        name = dict(items).get("name")
        if a in idx and b in idx and name in by_name:
            comp[(min(idx[a], idx[b]), max(idx[a], idx[b]))] = by_name[name]
    return Layout(np.array(plan.bits, dtype=np.int64), hosted, ondem, stages, comp), sorted(gone)

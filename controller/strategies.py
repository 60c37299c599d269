"""Planning strategies behind one interface: strategy(ctx) -> (Layout, mode, reasons).

  coel      intra-server when the compressed model at the quality floor fits one server that
            meets the SLO, else inter-server placement jointly with bit allocation
  uniform   one bit width for all experts, layers split in proportion to memory (exo-like)
  pipeline  layer-wise partition by dynamic programming over devices and links (EdgeShard-like)
  offload   one server, hot experts resident, the rest loaded on demand (Mixtral-offloading-like)
  random    uniform bits, experts on random servers with room (seeded)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from coel_model.allocate import costs_from_profile, solve_for_quality, solve_lagrangian
from coel_model.errors import InfeasibleError
from controller.cluster import Cluster
from controller.negotiation import DEFAULT_COSTS, CompressionCost, LinkView, Traffic, agree, propose, \
    AgentCapabilities
from controller.costmodel import Layout, evaluate, layout_memory, stage_backbone_bytes, used_pairs, ClassPrediction
from controller.placement import place_experts, refine_moves, replicate_hot
from controller.plan import PlanOptions, Requirements
from coel_model.profile_format import Profile

MB = 1 << 20


def _mb(x: float) -> str:
    return f"{x / MB:,.1f} MB"



def _measured_costs(profile: Profile, allowed_bits: tuple[int, ...]):
    """The planner's cost table: measured loss, monotone over every profiled width, unweighted."""
    allowed = tuple(b for b in profile.bits if b in allowed_bits)
    if not allowed:
        raise InfeasibleError(f"no allowed bit width among the profiled ones {list(profile.bits)}")
    return costs_from_profile(profile, "measured", bits=allowed, monotone_within="profiled")


def allocate_for_budget(profile: Profile, budget_bytes: float, allowed_bits: tuple[int, ...]) -> np.ndarray:
    """(L, E) widths with the least predicted loss within budget_bytes (coel_model.allocate)."""
    alloc = solve_lagrangian(_measured_costs(profile, allowed_bits), budget_bytes)
    return alloc.bits_array(profile.n_layers, profile.n_experts)


def allocate_for_quality(profile: Profile, max_loss_nats: float, allowed_bits: tuple[int, ...],
                         active: bool = False) -> np.ndarray:
    """(L, E) widths with the fewest bytes (active: bytes weighted by popularity, what a token
    reads) whose predicted loss stays <= max_loss_nats (coel_model.allocate)."""
    weight = profile.popularity.reshape(-1) + 1e-6 if active else None
    alloc = solve_for_quality(_measured_costs(profile, allowed_bits), max_loss_nats, weight)
    return alloc.bits_array(profile.n_layers, profile.n_experts)

@dataclass
class Context:
    """Inputs shared by all strategies, checked once."""
    profile: Profile
    cluster: Cluster
    reqs: Requirements
    opts: PlanOptions
    costs: tuple[CompressionCost, ...]
    coords: dict[str, int]  # entry -> coordinator server index
    usable: np.ndarray  # (S,) bool: reachable from every coordinator
    capacity: np.ndarray  # (S,) memory_bytes
    reasons: list[str] = field(default_factory=list)

    @property
    def L(self) -> int:
        return self.profile.n_layers

    @property
    def E(self) -> int:
        return self.profile.n_experts

    @property
    def S(self) -> int:
        return len(self.cluster.servers)

    def name(self, v: int) -> str:
        return self.cluster.servers[v].name

    def min_expert_bytes(self) -> float:
        b = min(x for x in self.profile.bits if x in self.opts.allowed_bits)
        return float(self.profile.nbytes[:, :, self.profile.bit_index(b)].sum())

    def empty_layout(self, bits: np.ndarray) -> Layout:
        L, E, S = self.L, self.E, self.S
        return Layout(bits.astype(np.int64), np.zeros((L, E, S), bool), np.zeros((L, E, S), bool),
                      {c.entry: [(self.coords[c.entry], 0, L)] for c in self.reqs.classes})


def make_context(profile: Profile, cluster: Cluster, reqs: Requirements, opts: PlanOptions,
                 costs: tuple[CompressionCost, ...] = DEFAULT_COSTS) -> Context:
    """Pick a coordinator (backbone host) per entry, the usable servers, and reject inputs that
    cannot fit even at the smallest bit width."""
    idx = cluster.index
    S = len(cluster.servers)
    cap = np.array([s.memory_bytes for s in cluster.servers], dtype=np.float64)
    bb = profile.backbone_bytes
    reasons: list[str] = []
    coords: dict[str, int] = {}
    for entry in reqs.entries:
        if entry not in idx:
            raise InfeasibleError(f"entry server {entry!r} is not in the cluster (servers: "
                                  f"{[s.name for s in cluster.servers]})")
        e = idx[entry]
        if cap[e] >= bb:
            coords[entry] = e
            continue
        lat = cluster.latency_matrix_ms[e]
        fits = [v for v in range(S) if cap[v] >= bb and math.isfinite(lat[v])]
        if not fits:
            big = int(np.argmax(cap))
            raise InfeasibleError(f"backbone needs {_mb(bb)} and no server reachable from entry {entry} has it "
                                  f"(largest: {cluster.servers[big].name} with {_mb(cap[big])})")
        v = min(fits, key=lambda x: (lat[x], -cap[x], x))
        coords[entry] = v
        reasons.append(f"entry {entry} has {_mb(cap[e])} < backbone {_mb(bb)}: backbone runs on "
                       f"{cluster.servers[v].name} ({lat[v]:.2f} ms away)")
    usable = np.ones(S, dtype=bool)
    for h in set(coords.values()):
        usable &= np.isfinite(cluster.latency_matrix_ms[h])
    unreachable = [cluster.servers[v].name for v in range(S) if not usable[v]]
    if unreachable:
        reasons.append(f"servers unreachable from a coordinator, not used: {unreachable}")
    ctx = Context(profile, cluster, reqs, opts, costs, coords, usable, cap, reasons)
    need = bb * len(set(coords.values())) + ctx.min_expert_bytes()
    have = cap[usable].sum()
    if need > have:
        extra = f"; unreachable servers {unreachable} hold {_mb(cap[~usable].sum())}" if unreachable else ""
        raise InfeasibleError(f"cannot fit even at {min(opts.allowed_bits)} bits: need {_mb(need)} "
                              f"(backbone {_mb(bb)} x {len(set(coords.values()))} + experts "
                              f"{_mb(ctx.min_expert_bytes())}), usable memory is {_mb(have)} on "
                              f"{int(usable.sum())} servers{extra}")
    return ctx


def negotiate_compression(ctx: Context, lay: Layout, quality_budget_nats: float,
                          answers: dict[str, AgentCapabilities] | None = None) -> list[str]:
    """Agree a setting for every server pair the layout uses (agents assumed to support every
    default setting unless their answers are given). Returns reasons."""
    notes = []
    lay.compression = {}
    if not math.isfinite(quality_budget_nats):
        quality_budget_nats = max(c.quality_nats for c in ctx.costs)
    cls = ctx.reqs.classes
    traffic = Traffic(ctx.profile.cfg.d_model, max(c.prompt_tokens for c in cls), max(c.new_tokens for c in cls))
    slo_ms = min(c.ttft_slo_ms + c.new_tokens * c.token_slo_ms for c in cls)
    by_name = {c.name: c for c in ctx.costs}
    chosen: dict[str, int] = {}
    for (a, b) in sorted(used_pairs(ctx.profile, ctx.cluster, lay)):
        ps = ctx.cluster.path(ctx.name(a), ctx.name(b))
        if ps is None:
            continue
        link = LinkView(f"{ctx.name(a)}|{ctx.name(b)}", ps.bw_mbit, ps.latency_ms, ps.loss_pct)
        prop = propose(link, ctx.costs, traffic, quality_budget_nats, slo_ms)
        caps = [answers[x] for x in (ctx.name(a), ctx.name(b)) if answers and x in answers] or \
            [AgentCapabilities.everything(ctx.name(a)), AgentCapabilities.everything(ctx.name(b))]
        c = agree(prop, caps, quality_budget_nats)
        lay.compression[(a, b)] = by_name.get(c.name, ctx.costs[0])
        chosen[c.name] = chosen.get(c.name, 0) + 1
    if chosen:
        notes.append("token compression per server pair: " + ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items()))
                     + f" (quality budget {quality_budget_nats:.4g} nats)")
    return notes


def _quality_budget_for_compression(ctx: Context, lay: Layout) -> float:
    floor = ctx.reqs.max_loss_nats
    if not math.isfinite(floor):
        return math.inf
    return max(0.0, floor - float(ctx.profile.expert_loss(lay.bits).sum()))


def _finish(ctx: Context, lay: Layout) -> tuple[list[ClassPrediction], list[str]]:
    notes = negotiate_compression(ctx, lay, _quality_budget_for_compression(ctx, lay))
    return evaluate(ctx.profile, ctx.cluster, ctx.reqs, lay, ctx.opts), notes


def _free_after_backbone(ctx: Context, lay: Layout, headroom: float) -> np.ndarray:
    mem = layout_memory(ctx.profile, ctx.cluster, lay).astype(np.float64)
    free = ctx.capacity * (1.0 - headroom) - mem
    return np.where(ctx.usable, np.maximum(free, 0.0), 0.0)


def _score(preds: list[ClassPrediction], reqs: Requirements) -> float:
    w = reqs.weights()
    return sum(w[p.name] * p.token_ms for p in preds)


# ---------------------------------------------------------------- CoEL

def _coel_inter(ctx: Context, floor_bits: np.ndarray, lean: np.ndarray,
                notes: list[str]) -> tuple[Layout, list[ClassPrediction]]:
    """Inter-server: bits for the whole usable memory, placement by the greedy; if the SLO is
    missed, fewer bytes (towards the quality-floor widths) and try again, keep the best."""
    base = ctx.empty_layout(floor_bits)
    headroom = ctx.opts.headroom_frac
    free = _free_after_backbone(ctx, base, headroom)
    floor_bytes = float(ctx.profile.expert_bytes(floor_bits).sum())
    if free.sum() < floor_bytes:
        headroom = 0.0
        free = _free_after_backbone(ctx, base, 0.0)
        notes.append("no memory headroom kept for failures: the model needs all of it")
    full = free.sum() * 0.98  # leave 2% for bin-packing slack
    tried: list[tuple[tuple[bool, float], Layout, list[ClassPrediction], list[str]]] = []
    last_error: InfeasibleError | None = None
    seen: list[np.ndarray] = []
    for frac in (1.0, 0.6, 0.3, 0.0, -1.0):
        if frac >= 0:
            budget = floor_bytes + frac * max(full - floor_bytes, 0.0)
            bits = allocate_for_budget(ctx.profile, budget, ctx.opts.allowed_bits) if frac > 0 else floor_bits
            bits = np.maximum(bits, floor_bits)
        else:  # fewest bytes read per token at the floor (may hold more bytes in total)
            bits = lean
            budget = float(ctx.profile.expert_bytes(bits).sum())
            if budget > full or np.array_equal(bits, floor_bits):
                continue
        if any(np.array_equal(bits, x) for x in seen):
            continue  # same widths as a budget already tried (memory is the binding limit)
        seen.append(bits)
        lnotes: list[str] = []
        try:
            hosted, bits, left = place_experts(ctx.profile, ctx.cluster, ctx.reqs, bits, free, ctx.coords,
                                               ctx.usable, ctx.opts, notes=lnotes)
        except InfeasibleError as exc:  # memory fragments: fewer bytes leave bigger gaps
            last_error = exc
            notes.append(f"expert budget {_mb(budget)} does not pack into the servers ({exc}): trying fewer bytes")
            continue
        hosted, left, n_moved = refine_moves(ctx.profile, ctx.cluster, ctx.reqs, bits, hosted, left, ctx.coords,
                                             ctx.usable, ctx.opts)
        if n_moved:
            lnotes.append(f"local search moved {n_moved} experts after the greedy")
        reserve = ctx.capacity * headroom
        rep_best = None
        for rep_frac in (0.0, 0.25, 0.5, 1.0):  # replicas help the network, but pile compute on the coordinator
            rnotes: list[str] = []
            h2, _ = replicate_hot(ctx.profile, ctx.cluster, ctx.reqs, bits, hosted, left + reserve,
                                  ctx.coords, reserve, ctx.opts, rnotes, fraction=rep_frac)
            trial = Layout(bits, h2, np.zeros_like(h2), base.stages)
            sc = _score(evaluate(ctx.profile, ctx.cluster, ctx.reqs, trial, ctx.opts), ctx.reqs)
            if rep_best is None or sc < rep_best[0] - 1e-9:
                rep_best = (sc, h2, rnotes, rep_frac)
        _, hosted, rnotes, rep_frac = rep_best
        lnotes += rnotes or ["no replicas: copying hot experts to the coordinator did not lower the predicted latency"]
        lay = Layout(bits, hosted, np.zeros_like(hosted), base.stages)
        preds, cn = _finish(ctx, lay)
        n_servers = int(hosted.any((0, 1)).sum())
        what = (f"expert budget {_mb(budget)} ({frac:.0%} of the way from the quality-floor size "
                f"{_mb(floor_bytes)} to all usable memory {_mb(full)})" if frac >= 0 else
                f"widths that read the fewest bytes per token at the quality floor ({_mb(budget)})")
        lnotes = [f"inter-server: {what}, average {bits.mean():.2f} bits, experts on {n_servers} servers"] \
            + lnotes[:5] + ([f"... {len(lnotes) - 5} more"] if len(lnotes) > 5 else []) + cn
        q_ok = all(p.meets_quality for p in preds)
        ok = all(p.meets_slo for p in preds) and q_ok
        tried.append(((not q_ok, not ok, _score(preds, ctx.reqs)), lay, preds, lnotes))
        if ok and ctx.opts.objective == "quality":
            break  # the most bytes that meet the SLO: best quality (the latency objective weighs them all)
        missed = "the quality floor (packing narrowed experts)" if not q_ok else "the SLO"
        notes.append(f"expert budget {_mb(budget)} misses {missed} ({_score(preds, ctx.reqs):.2f} ms/token "
                     f"weighted): trying fewer bytes")
    if not tried:
        raise last_error
    key, lay, preds, lnotes = min(tried, key=lambda t: t[0])
    notes += lnotes
    if key[1]:
        worst = max(preds, key=lambda p: p.slo_ratio)
        notes.append(f"no inter-server plan meets every SLO: best keeps {worst.name} at "
                     f"{worst.token_ms:.2f} ms/token (SLO {worst.token_slo_ms}) and TTFT {worst.ttft_ms:.1f} ms "
                     f"(SLO {worst.ttft_slo_ms})")
    return lay, preds


def _coel_intra(ctx: Context, floor_bits: np.ndarray, notes: list[str]) -> tuple[Layout, list[ClassPrediction]] | None:
    """Intra-server: every entry served by one server that holds the backbone and all experts
    (nearest server to the entry that fits the quality-floor model); more bits if room allows."""
    floor_bytes = float(ctx.profile.expert_bytes(floor_bits).sum())
    bb = ctx.profile.backbone_bytes
    lat = ctx.cluster.latency_matrix_ms
    hosts: dict[str, int] = {}
    for entry in ctx.reqs.entries:
        e = ctx.cluster.index[entry]
        fits = [v for v in range(ctx.S) if ctx.usable[v] and np.isfinite(lat[e, v])
                and ctx.capacity[v] * (1 - ctx.opts.headroom_frac) >= bb + floor_bytes]
        if not fits:
            return None
        hosts[entry] = min(fits, key=lambda v: (lat[e, v], -ctx.cluster.servers[v].bytes_per_s, v))  # nearest, fastest
    budget = min(ctx.capacity[v] * (1 - ctx.opts.headroom_frac) - bb for v in set(hosts.values()))
    bits = np.maximum(allocate_for_budget(ctx.profile, budget, ctx.opts.allowed_bits), floor_bits)
    L = ctx.L
    hosted = np.zeros((L, ctx.E, ctx.S), bool)
    for v in set(hosts.values()):
        hosted[:, :, v] = True
    lay = Layout(bits, hosted, np.zeros_like(hosted), {c.entry: [(hosts[c.entry], 0, L)] for c in ctx.reqs.classes})
    preds, cn = _finish(ctx, lay)
    notes.append(f"intra-server: {', '.join(sorted({ctx.name(v) for v in hosts.values()}))} holds the backbone "
                 f"{_mb(bb)} + all experts at {bits.mean():.2f} average bits ({_mb(ctx.profile.expert_bytes(bits).sum())}; "
                 f"quality-floor size {_mb(floor_bytes)})")
    notes += cn
    return lay, preds


def _coel_pipeline(ctx: Context, floor_bits: np.ndarray, lean: np.ndarray):
    """Layer-wise partition (the pipeline DP) with CoEL's mixed widths: fewer hops per token
    than per-layer expert calls when coordinators cannot hold the experts. Tries the
    quality-floor widths and the widths that fill the usable memory; keeps the faster."""
    main = max(ctx.reqs.classes, key=lambda c: (ctx.reqs.weights()[c.name], c.name))
    free_total = float(ctx.capacity[ctx.usable].sum()) - ctx.profile.backbone_bytes
    options = [floor_bits] + ([lean] if not np.array_equal(lean, floor_bits) else [])
    try:
        options.append(np.maximum(allocate_for_budget(ctx.profile, 0.95 * free_total, ctx.opts.allowed_bits),
                                  floor_bits))
    except InfeasibleError:
        pass
    best = None
    for bits in options:
        res = pipeline_dp(ctx, bits, main.entry)
        if res is None:
            continue
        stages_for = {c.entry: list(res[1]) for c in ctx.reqs.classes}
        lay = _pipeline_layout(ctx, bits, stages_for)
        mem = layout_memory(ctx.profile, ctx.cluster, lay)
        if (mem > ctx.capacity + 0.5).any():
            continue
        preds, cn = _finish(ctx, lay)
        key = (not all(p.meets_quality for p in preds), _score(preds, ctx.reqs))
        if best is None or key < best[0]:
            stages = res[1]
            shared = ([f"every entry uses this partition (planned for {main.entry}; one copy of the weights)"]
                      if len(ctx.reqs.entries) > 1 else [])
            best = (key, lay, preds, [f"layer-wise partition with mixed widths ({bits.mean():.2f} average bits): "
                                      + ", ".join(f"{ctx.name(v)}[{a}:{z}]" for v, a, z in stages if z > a)]
                    + shared + cn)
    if best is None:
        return None
    return ("pipeline", (best[1], best[2]), best[3])


OBJECTIVE_TEXT = {
    "latency": "lowest predicted per-token latency for the workload mix (rate-weighted), TTFT next, subject to "
               "memory, every class's quality floor and SLOs",
    "quality": "best predicted quality among the candidates that meet the SLOs (then the lowest per-token latency)",
}
BASELINES = ("uniform", "pipeline", "offload", "random")  # their layouts are CoEL candidates too


@dataclass(frozen=True)
class Candidate:
    """One layout CoEL weighs: `label` names where it came from, `mode` is the plan's mode."""
    label: str
    mode: str
    layout: Layout
    preds: list[ClassPrediction]
    notes: list[str]

    def token_ms(self, reqs: Requirements) -> float:
        return _score(self.preds, reqs)

    def ttft_ms(self, reqs: Requirements) -> float:
        w = reqs.weights()
        return sum(w[p.name] * p.ttft_ms for p in self.preds)

    @property
    def loss_nats(self) -> float:
        return max(p.quality_loss_nats for p in self.preds)

    @property
    def meets_quality(self) -> bool:
        return all(p.meets_quality for p in self.preds)

    @property
    def meets_slo(self) -> bool:
        return all(p.meets_slo for p in self.preds)


def candidate_key(c: Candidate, reqs: Requirements, objective: str) -> tuple:
    """Sort key of the choice: the quality floor is hard, then the SLOs; among those, the
    objective. (A candidate missing the SLO is only chosen when none meets it: the fastest.)"""
    ok = c.meets_quality and c.meets_slo
    tok, ttft, loss = round(c.token_ms(reqs), 9), round(c.ttft_ms(reqs), 6), round(c.loss_nats, 9)
    if objective == "quality":
        return (not c.meets_quality, not ok, loss if ok else 0.0, tok, ttft)
    return (not c.meets_quality, not ok, tok, ttft, loss)


def choose(cands: list[Candidate], reqs: Requirements, objective: str) -> list[Candidate]:
    """Candidates best first (stable: earlier candidates win ties)."""
    return sorted(cands, key=lambda c: candidate_key(c, reqs, objective))


def describe_candidate(c: Candidate, reqs: Requirements) -> str:
    miss = [w for w, ok in (("SLO", c.meets_slo), ("quality floor", c.meets_quality)) if not ok]
    return (f"{c.label} {c.token_ms(reqs):.2f} ms/token, TTFT {c.ttft_ms(reqs):.1f} ms, loss {c.loss_nats:.4f}, "
            f"{c.layout.bits.mean():.2f} avg bits" + (f" (misses {' and '.join(miss)})" if miss else ""))


def baseline_candidates(ctx: Context, reasons: list[str]) -> list[Candidate]:
    """Every baseline's own layout, judged by the same cost model (so CoEL is never predicted
    worse than a baseline that keeps the floor and the SLOs)."""
    out = []
    for name in BASELINES:
        try:
            lay, mode, notes = STRATEGIES[name](ctx)
        except InfeasibleError as exc:
            reasons.append(f"baseline layout {name} infeasible: {exc}")
            continue
        out.append(Candidate(f"{name}-layout", mode, lay, evaluate(ctx.profile, ctx.cluster, ctx.reqs, lay, ctx.opts),
                             notes))
    return out


def _coel_hybrids(ctx: Context, bits_options: list[np.ndarray]) -> list[Candidate]:
    """Hybrid layouts (only when the runtime executes stages): pipeline stages of contiguous
    layers, each stage server holding the hottest of its layers' experts (CoEL's mixed widths)
    that fit, the others placed on other servers by the placement greedy (remote experts only
    where memory forces it). Stages need room for 50 % or 75 % of their experts, so fewer stages
    suffice than in a pure pipeline."""
    if not ctx.opts.stage_execution:
        return []
    main = max(ctx.reqs.classes, key=lambda c: (ctx.reqs.weights()[c.name], c.name))
    out: list[Candidate] = []
    for bits in bits_options:
        for share in (0.5, 0.75):
            res = pipeline_dp(ctx, bits, main.entry, expert_share=share)
            if res is None:
                continue
            stages = res[1]
            stages_for = {c.entry: list(stages) for c in ctx.reqs.classes}
            base = Layout(bits.copy(), np.zeros((ctx.L, ctx.E, ctx.S), bool), np.zeros((ctx.L, ctx.E, ctx.S), bool),
                          stages_for)
            left = np.where(ctx.usable, ctx.capacity - layout_memory(ctx.profile, ctx.cluster, base), 0.0)
            eb = ctx.profile.expert_bytes(bits).astype(np.float64)
            hosted = base.hosted
            for v, l0, l1 in stages:
                if l1 <= l0:
                    continue
                cells = sorted(((l, e) for l in range(l0, l1) for e in range(ctx.E)),
                               key=lambda le: (-ctx.profile.popularity[le], le))
                for l, e in cells:
                    if eb[l, e] <= left[v]:
                        hosted[l, e, v] = True
                        left[v] -= eb[l, e]
            todo = ~hosted.any(2)
            n_remote = int(todo.sum())
            if n_remote:
                try:
                    hosted, bits2, _ = place_experts(ctx.profile, ctx.cluster, ctx.reqs, bits, np.maximum(left, 0.0),
                                                     ctx.coords, ctx.usable, ctx.opts, hosted=hosted, todo=todo)
                except InfeasibleError:
                    continue
            else:
                bits2 = bits
            lay = Layout(bits2, hosted, np.zeros_like(hosted), stages_for)
            if (layout_memory(ctx.profile, ctx.cluster, lay) > ctx.capacity + 0.5).any():
                continue
            preds, cn = _finish(ctx, lay)
            out.append(Candidate(f"hybrid-{share:.0%}", "pipeline", lay, preds, [
                f"hybrid: stages " + ", ".join(f"{ctx.name(v)}[{a}:{z}]" for v, a, z in stages if z > a)
                + f" holding their hottest experts, {n_remote} experts remote where memory forced it, "
                  f"{bits2.mean():.2f} average bits"] + cn))
    return out


def strategy_coel(ctx: Context) -> tuple[Layout, str, list[str]]:
    floor = ctx.reqs.max_loss_nats
    objective = ctx.opts.objective
    floor_bits = allocate_for_quality(ctx.profile, floor, ctx.opts.allowed_bits) if math.isfinite(floor) \
        else np.full((ctx.L, ctx.E), min(ctx.opts.allowed_bits))
    floor_bytes = float(ctx.profile.expert_bytes(floor_bits).sum())
    usable_mem = float(ctx.capacity[ctx.usable].sum()) - ctx.profile.backbone_bytes * len(set(ctx.coords.values()))
    if floor_bytes > usable_mem:
        raise InfeasibleError(f"quality floor {floor:.4g} nats needs {_mb(floor_bytes)} of experts "
                              f"(average {floor_bits.mean():.2f} bits); usable memory after the backbone is "
                              f"{_mb(usable_mem)}")
    reasons = [f"objective {objective}: {OBJECTIVE_TEXT[objective]}",
               f"quality floor {floor:.4g} nats -> smallest experts {_mb(floor_bytes)} at "
               f"{floor_bits.mean():.2f} average bits"]
    intra_notes: list[str] = []
    intra = _coel_intra(ctx, floor_bits, intra_notes)
    if objective == "quality" and intra is not None and all(p.meets_slo for p in intra[1]):
        best = max(intra[1], key=lambda p: p.token_ms)
        return intra[0], "intra", reasons + intra_notes + [
            f"chose intra-server: fits one server and meets the SLO ({best.token_ms:.2f} ms/token worst class)"]
    inter_notes: list[str] = []
    lean = allocate_for_quality(ctx.profile, floor, ctx.opts.allowed_bits, active=True) \
        if math.isfinite(floor) else floor_bits
    inter = _coel_inter(ctx, floor_bits, lean, inter_notes)
    cands = [Candidate("inter", "inter", inter[0], inter[1], inter_notes)]
    if intra is not None:
        cands.append(Candidate("intra", "intra", intra[0], intra[1], intra_notes))
    else:
        reasons.append(f"intra-server impossible: no server has {_mb(ctx.profile.backbone_bytes + floor_bytes)} "
                       f"for backbone + quality-floor experts (largest {_mb(ctx.capacity[ctx.usable].max())})")
    pipe = _coel_pipeline(ctx, floor_bits, lean)
    if pipe is not None:
        cands.append(Candidate("pipeline", "pipeline", pipe[1][0], pipe[1][1], pipe[2]))
    cands += _coel_hybrids(ctx, [floor_bits] + ([lean] if not np.array_equal(lean, floor_bits) else []))
    try:
        off = strategy_offload(ctx, floor_bits=lean)
        cands.append(Candidate("offload", "offload", off[0],
                               evaluate(ctx.profile, ctx.cluster, ctx.reqs, off[0], ctx.opts), off[2]))
    except InfeasibleError as exc:
        reasons.append(f"intra-server with on-demand experts impossible: {exc}")
    cands += baseline_candidates(ctx, reasons)
    ranked = choose(cands, ctx.reqs, objective)
    best = ranked[0]
    if not best.meets_quality:
        raise InfeasibleError(f"quality floor {floor:.4g} nats cannot be met once the experts are packed into the "
                              f"servers: the best plan ({best.label}) predicts {best.loss_nats:.4g} nats (the "
                              f"floor-width experts need {_mb(floor_bytes)}; usable memory after the backbone is "
                              f"{_mb(usable_mem)})")
    runners = "; ".join(describe_candidate(c, ctx.reqs) for c in ranked[1:])
    return best.layout, best.mode, reasons + best.notes + [
        f"chose {describe_candidate(best, ctx.reqs)} by objective {objective}",
        f"runner-up candidates: {runners or 'none'}"]


# ---------------------------------------------------------------- baselines

def _uniform_bits_that_fit(ctx: Context, budget_bytes: float) -> int:
    for b in sorted(ctx.opts.allowed_bits, reverse=True):
        if b in ctx.profile.bits and ctx.profile.nbytes[:, :, ctx.profile.bit_index(b)].sum() <= budget_bytes:
            return b
    raise InfeasibleError(f"experts do not fit {_mb(budget_bytes)} even at {min(ctx.opts.allowed_bits)} bits "
                          f"({_mb(ctx.min_expert_bytes())})")


def strategy_offload(ctx: Context, floor_bits: np.ndarray | None = None) -> tuple[Layout, str, list[str]]:
    """Each coordinator holds the backbone, the hottest experts that fit, and loads the others
    from storage on demand (a buffer of top_k experts); uniform width: the one with the lowest
    predicted latency among those meeting the quality floor."""
    best = None
    L, E, S = ctx.L, ctx.E, ctx.S
    floor = ctx.reqs.max_loss_nats
    coords = sorted(set(ctx.coords.values()))
    for b in sorted(x for x in ctx.opts.allowed_bits if x in ctx.profile.bits):
        bits = np.full((L, E), b, dtype=np.int64)
        if floor_bits is not None and ctx.profile.expert_loss(bits).sum() > floor:
            bits = np.maximum(bits, floor_bits)  # uniform misses the floor: lift to the floor's widths
        eb = ctx.profile.expert_bytes(bits).astype(np.float64)
        hosted = np.zeros((L, E, S), bool)
        ondem = np.zeros((L, E, S), bool)
        feasible = True
        for h in coords:
            room = ctx.capacity[h] - ctx.profile.backbone_bytes - ctx.profile.cfg.top_k * eb.max()
            if room < 0:
                feasible = False
                break
            hosted[:, :, h] = True
            order = np.argsort(-ctx.profile.popularity, axis=None, kind="stable")
            csum = np.cumsum(eb.reshape(-1)[order])
            resident = np.zeros(L * E, bool)
            resident[order[csum <= room]] = True
            ondem[:, :, h] = ~resident.reshape(L, E)
        if not feasible:
            continue
        lay = Layout(bits, hosted, ondem, {c.entry: [(ctx.coords[c.entry], 0, L)] for c in ctx.reqs.classes})
        preds = evaluate(ctx.profile, ctx.cluster, ctx.reqs, lay, ctx.opts)
        ok_q = all(p.meets_quality for p in preds)
        key = (not ok_q, _score(preds, ctx.reqs))
        if best is None or key < best[0]:
            n_res = int((hosted & ~ondem).sum())
            best = (key, lay, [f"offload: {bits.mean():.2f}-bit experts, {n_res} resident, {int(ondem.sum())} loaded on demand "
                               f"at {ctx.cluster.servers[coords[0]].storage_bytes_per_s / 1e9:.1f} GB/s"])
    if best is None:
        h = coords[0]
        raise InfeasibleError(f"offload: {ctx.name(h)} has {_mb(ctx.capacity[h])}, less than backbone "
                              f"{_mb(ctx.profile.backbone_bytes)} + a buffer of {ctx.profile.cfg.top_k} experts")
    return best[1], "offload", best[2]


def _layer_bytes(ctx: Context, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: memory (backbone layer + all its experts) and decode bytes read per token."""
    eb = ctx.profile.expert_bytes(bits).astype(np.float64)
    layer_b, _ = ctx.profile.backbone_layer_bytes()
    return layer_b + eb.sum(1), layer_b + (ctx.profile.popularity * eb).sum(1)


def _pipeline_layout(ctx: Context, bits: np.ndarray, stages_for: dict[str, list[tuple[int, int, int]]]) -> Layout:
    L, E, S = ctx.L, ctx.E, ctx.S
    hosted = np.zeros((L, E, S), bool)
    for stages in stages_for.values():
        for (v, l0, l1) in stages:
            hosted[l0:l1, :, v] = True
    return Layout(bits, hosted, np.zeros_like(hosted), stages_for)


def pipeline_dp(ctx: Context, bits: np.ndarray, entry: str,
                expert_share: float = 1.0) -> tuple[float, list[tuple[int, int, int]]] | None:
    """EdgeShard-style DP. Devices in order of latency from the coordinator (which holds the
    embeddings and head and may run the first stage). dp[i][j]: best decode time with layers
    [0, i) done and the hidden state on device j; a stage runs layers [i', i) on device j after
    device j' < j (memory per stage checked). The last stage sends the hidden state back.
    `expert_share` < 1: a stage needs room for only that share of its layers' expert bytes
    (hybrid plans place the rest elsewhere)."""
    h = ctx.coords[entry]
    lat = ctx.cluster.latency_matrix_ms[h]
    devs = [h] + sorted((v for v in range(ctx.S) if v != h and ctx.usable[v]), key=lambda v: (lat[v], v))
    D, L = len(devs), ctx.L
    mem_l, read_l = _layer_bytes(ctx, bits)
    if expert_share < 1.0:
        layer_b, _ = ctx.profile.backbone_layer_bytes()
        mem_l = layer_b + expert_share * (mem_l - layer_b)
    cmem = np.concatenate([[0.0], np.cumsum(mem_l)])
    cread = np.concatenate([[0.0], np.cumsum(read_l)])
    bw = np.array([ctx.cluster.servers[v].effective_bytes_per_s for v in devs])
    cap = np.array([ctx.capacity[v] for v in devs])
    cap[0] -= stage_backbone_bytes(ctx.profile, 0, 0, with_head=True)
    from controller.costmodel import _msg_ms
    vec = ctx.profile.cfg.d_model * 2.0
    hop = np.array([_msg_ms(ctx.cluster, ctx.opts, v, vec)[devs] / 2 for v in devs])  # (D, D) one way
    np.fill_diagonal(hop, 0.0)  # staying on a device is no hop
    E = ctx.E
    call = ctx.opts.call_overhead_ms * ctx.profile.cfg.top_k
    INF = math.inf
    dp = np.full((L + 1, D), INF)
    arg: dict[tuple[int, int], tuple[int, int]] = {}
    dp[0, 0] = 0.0  # at the coordinator, nothing done
    for i in range(1, L + 1):
        for ip in range(i):
            seg_mem = cmem[i] - cmem[ip]
            seg_ms = (cread[i] - cread[ip]) / bw * 1e3 + call * (i - ip)  # (D,)
            ok = seg_mem <= cap
            if not ok.any():
                continue
            prev = dp[ip]  # (D,)
            if not np.isfinite(prev).any():
                continue
            # from device jp to device j > jp (or j == 0 == jp when ip == 0)
            trans = prev[:, None] + hop  # (jp, j)
            tri = np.triu(np.ones((D, D), bool), 1)
            if ip == 0:
                tri[0, 0] = True
            trans = np.where(tri, trans, INF)
            jp = trans.argmin(0)
            val = trans[jp, np.arange(D)] + seg_ms
            val = np.where(ok, val, INF)
            better = val < dp[i]
            for j in np.nonzero(better)[0]:
                dp[i, j] = val[j]
                arg[(i, int(j))] = (ip, int(jp[j]))
    final = dp[L] + hop[:, 0]
    j = int(np.argmin(final))
    if not np.isfinite(final[j]):
        return None
    stages = []
    i = L
    while i > 0:
        ip, jp = arg[(i, j)]
        stages.append((devs[j], ip, i))
        i, j = ip, jp
    stages.reverse()
    if stages[0][0] != h:
        stages.insert(0, (h, 0, 0))  # the coordinator keeps the embeddings and head
    return float(final.min()), stages


def strategy_pipeline(ctx: Context) -> tuple[Layout, str, list[str]]:
    """Uniform bits (highest that lets the DP find a partition), layers split by the DP; every
    entry uses the pipeline of the heaviest class (one copy of the weights)."""
    main = max(ctx.reqs.classes, key=lambda c: (ctx.reqs.weights()[c.name], c.name))
    for b in sorted((x for x in ctx.opts.allowed_bits if x in ctx.profile.bits), reverse=True):
        bits = np.full((ctx.L, ctx.E), b, dtype=np.int64)
        if ctx.profile.expert_bytes(bits).sum() > ctx.capacity[ctx.usable].sum():
            continue
        res = pipeline_dp(ctx, bits, main.entry)
        if res is None:
            continue
        _, stages = res
        stages_for = {c.entry: list(stages) for c in ctx.reqs.classes}
        lay = _pipeline_layout(ctx, bits, stages_for)
        notes = [f"pipeline: {b}-bit experts, {len([s for s in stages if s[2] > s[1]])} stages: "
                 + ", ".join(f"{ctx.name(v)}[{l0}:{l1}]" for v, l0, l1 in stages if l1 > l0)]
        if len(ctx.reqs.entries) > 1:
            notes.append(f"all entries use the pipeline planned for {main.entry} (one copy of the weights)")
        preds, cn = _finish(ctx, lay)
        return lay, "pipeline", notes + cn
    raise InfeasibleError(f"pipeline: no layer partition fits the servers' memory even at "
                          f"{min(ctx.opts.allowed_bits)} bits (a layer needs "
                          f"{_mb(_layer_bytes(ctx, np.full((ctx.L, ctx.E), min(ctx.opts.allowed_bits)))[0].max())})")


def strategy_uniform(ctx: Context) -> tuple[Layout, str, list[str]]:
    """exo-like: the highest uniform width that fits, layers split over all usable servers in
    proportion to their memory, in listing order starting at the coordinator."""
    main = max(ctx.reqs.classes, key=lambda c: (ctx.reqs.weights()[c.name], c.name))
    h = ctx.coords[main.entry]
    ring = [h] + [v for v in range(ctx.S) if v != h and ctx.usable[v]]
    cap = np.array([ctx.capacity[v] for v in ring])
    for b in sorted((x for x in ctx.opts.allowed_bits if x in ctx.profile.bits), reverse=True):
        bits = np.full((ctx.L, ctx.E), b, dtype=np.int64)
        mem_l, _ = _layer_bytes(ctx, bits)
        share = cap / cap.sum() * ctx.L
        counts = np.floor(share).astype(int)
        for k in np.argsort(-(share - counts), kind="stable")[: ctx.L - counts.sum()]:
            counts[k] += 1
        stages, l0, ok = [], 0, True
        for k, v in enumerate(ring):
            n = int(counts[k])
            need = mem_l[l0:l0 + n].sum() + (stage_backbone_bytes(ctx.profile, 0, 0, True) if k == 0 else 0)
            if need > ctx.capacity[v]:
                ok = False
                break
            if n or k == 0:
                stages.append((v, l0, l0 + n))
            l0 += n
        if not ok:
            continue
        stages_for = {c.entry: list(stages) for c in ctx.reqs.classes}
        lay = _pipeline_layout(ctx, bits, stages_for)
        preds, cn = _finish(ctx, lay)
        return lay, "pipeline", [f"uniform: {b}-bit experts, layers split by memory: "
                                 + ", ".join(f"{ctx.name(v)}[{a}:{z}]" for v, a, z in stages if z > a)] + cn
    raise InfeasibleError(f"uniform: no uniform width lets a memory-proportional layer split fit "
                          f"(total usable {_mb(ctx.capacity[ctx.usable].sum())})")


def strategy_random(ctx: Context) -> tuple[Layout, str, list[str]]:
    """Seeded: the highest uniform width that fits, each expert on a random server with room."""
    rng = np.random.default_rng(ctx.opts.seed)
    base = ctx.empty_layout(np.zeros((ctx.L, ctx.E), dtype=np.int64))
    free = _free_after_backbone(ctx, base, 0.0)
    b = _uniform_bits_that_fit(ctx, free.sum() * 0.9)
    while True:
        bits = np.full((ctx.L, ctx.E), b, dtype=np.int64)
        eb = ctx.profile.expert_bytes(bits).astype(np.float64)
        hosted = np.zeros((ctx.L, ctx.E, ctx.S), bool)
        left = free.copy()
        ok = True
        for flat in rng.permutation(ctx.L * ctx.E):
            l, e = divmod(int(flat), ctx.E)
            cand = np.nonzero(left >= eb[l, e])[0]
            if not len(cand):
                ok = False
                break
            v = int(rng.choice(cand))
            hosted[l, e, v] = True
            left[v] -= eb[l, e]
        if ok:
            break
        smaller = [x for x in ctx.opts.allowed_bits if x < b and x in ctx.profile.bits]
        if not smaller:
            raise InfeasibleError("random: experts do not fit the servers even at the smallest width")
        b = max(smaller)
    lay = Layout(bits, hosted, np.zeros_like(hosted), base.stages)
    _, cn = _finish(ctx, lay)
    return lay, "random", [f"random: {b}-bit experts on random servers with room (seed {ctx.opts.seed})"] + cn


STRATEGIES: dict[str, Callable[[Context], tuple[Layout, str, list[str]]]] = {
    "coel": strategy_coel,
    "uniform": strategy_uniform,
    "pipeline": strategy_pipeline,
    "offload": strategy_offload,
    "random": strategy_random,
}

"""Greedy expert placement that minimises the cost model's own objective.

Experts are placed hottest first (popularity across all layers, ties by layer and expert id).
Each goes to the server that least increases its layer's expected decode latency,
sum over request classes (weight w_c) of E[max over involved servers (net_c(v) + compute_v)],
among servers with room. A server already holding experts that fire with this one (measured
co-activation) barely raises its involvement probability, so co-firing experts gather on one
server; a server's growing compute pushes later experts to others, so a layer spreads only as
far as compute and memory require. One step costs O(S^2) numpy work: 58 x 256 experts on 64
servers place in about a second.
"""
from __future__ import annotations

import numpy as np

from coel_model.errors import InfeasibleError
from controller.cluster import Cluster
from controller.costmodel import _msg_ms, expected_max
from controller.plan import PlanOptions, Requirements
from coel_model.profile_format import Profile

MB = 1 << 20


class LayerState:
    """Per layer: involvement q (S,), summed popularity (S,), expected compute ms (S,), and the
    co-activation mass A (E, S) between each expert and what each server already holds."""

    def __init__(self, L: int, E: int, S: int):
        self.q = np.zeros((L, S))
        self.psum = np.zeros((L, S))
        self.work = np.zeros((L, S))
        self.A = np.zeros((L, E, S))


def class_net_ms(profile: Profile, cluster: Cluster, reqs: Requirements, coords: dict[str, int],
                 opts: PlanOptions) -> tuple[np.ndarray, np.ndarray]:
    """(C, S) decode message cost from each class's coordinator and (C,) class weights."""
    w = reqs.weights()
    nets, ws = [], []
    for c in reqs.classes:
        nets.append(_msg_ms(cluster, opts, coords[c.entry], profile.cfg.d_model * 2.0))
        ws.append(w[c.name])
    return np.array(nets), np.array(ws)


def delta_expected_max(c: np.ndarray, q: np.ndarray, c_new: np.ndarray, q_new: np.ndarray) -> np.ndarray:
    """Change of E[max] (costmodel.expected_max) of each row when only server v changes from
    (c[:, v], q[:, v]) to (c_new[:, v], q_new[:, v]); all (n, S), for every v at once.

    E[max] = integral over t of 1 - F(t), F(t) = prod_i (1 - q_i [c_i > t]). Changing server v
    multiplies F by g(t) = (1 - q'[c' > t]) / (1 - q[c > t]), so the change is the integral of
    F(t) (1 - g(t)), a combination of G(x) = integral_0^x F read off the sorted costs. O(n S^2)
    comparisons instead of a sort per candidate."""
    n, S = c.shape
    q = np.minimum(q, 1.0 - 1e-9)
    q_new = np.minimum(q_new, 1.0 - 1e-9)
    c = np.where(q > 0, c, 0.0)
    order = np.argsort(c, axis=1, kind="stable")
    cs = np.take_along_axis(c, order, 1)  # ascending
    one_minus = 1.0 - np.take_along_axis(q, order, 1)
    # F_j on [cs_j, cs_{j+1}) = prod_{i > j} (1 - q_i); F_-1 on [0, cs_0) = prod of all
    suf = np.cumprod(one_minus[:, ::-1], axis=1)[:, ::-1]  # suf[j] = prod_{i >= j}
    F = np.concatenate([suf[:, 1:], np.ones((n, 1))], axis=1)  # F_j
    F_m1 = suf[:, 0]
    widths = np.diff(cs, axis=1)  # (n, S-1)
    Gk = np.concatenate([(F_m1 * cs[:, 0])[:, None],
                         (F_m1 * cs[:, 0])[:, None] + np.cumsum(F[:, :-1] * widths, axis=1)], axis=1)  # G(cs_j)

    def G(x: np.ndarray) -> np.ndarray:  # x (n, S) -> (n, S)
        j = (cs[:, None, :] <= x[:, :, None]).sum(2) - 1  # last knot <= x
        jj = np.maximum(j, 0)
        at = np.take_along_axis(Gk, jj, 1) + np.take_along_axis(F, jj, 1) * (x - np.take_along_axis(cs, jj, 1))
        return np.where(j < 0, F_m1[:, None] * x, at)

    c_old = c
    g_old, g_new = G(c_old), G(c_new)
    up = (q_new - q) / (1.0 - q)
    grow = c_new >= c_old
    return np.where(grow, up * g_old + q_new * (g_new - g_old),
                    up * g_new - q / (1.0 - q) * (g_old - g_new))


def place_experts(profile: Profile, cluster: Cluster, reqs: Requirements, bits: np.ndarray,
                  free_bytes: np.ndarray, coords: dict[str, int], usable: np.ndarray, opts: PlanOptions,
                  hosted: np.ndarray | None = None, todo: np.ndarray | None = None,
                  notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place every expert with `todo` (default: all) on one server. Returns (hosted (L,E,S),
    bits (L,E) possibly lowered where nothing had room, free bytes left). Existing `hosted`
    copies count in the layer states (re-planning keeps them).

    Vectorised over layers: round r places the r-th hottest remaining expert of every layer at
    once (layers only interact through memory, which is settled hottest first inside a round)."""
    L, E = bits.shape
    S = len(cluster.servers)
    hosted = np.zeros((L, E, S), dtype=bool) if hosted is None else hosted.copy()
    bits = bits.copy()
    free = free_bytes.astype(np.float64).copy()
    net, w = class_net_ms(profile, cluster, reqs, coords, opts)  # (C, S), (C,)
    bw = np.array([s.effective_bytes_per_s for s in cluster.servers])
    eb = profile.expert_bytes(bits).astype(np.float64)
    pop = profile.popularity
    st = LayerState(L, E, S)
    if hosted.any():  # existing copies (re-planning): each expert counts once, at its first copy
        from controller.costmodel import _per_server, involvement
        has = hosted.any(2)
        first = np.argmax(hosted, axis=2)
        p_has = pop * has
        coact = profile.coact_same * has[:, None, :] * has[:, :, None]
        st.q, st.psum = involvement(coact, first, p_has, S)
        st.q = np.where(st.psum > 0, st.q, 0.0)
        st.work = _per_server(first, p_has * eb / bw[first] * 1e3, S)
        for l in range(L):  # A[l, :, v] = sum of co-activation with the experts v already holds
            es_l = np.nonzero(has[l])[0]
            if not len(es_l):
                continue
            order = es_l[np.argsort(first[l, es_l], kind="stable")]
            vs, starts = np.unique(first[l, order], return_index=True)
            st.A[l][:, vs] = np.add.reduceat(profile.coact_same[l][:, order], starts, axis=1)
    if todo is None:
        todo = ~hosted.any(2)
    # per layer: experts to place, hottest first (ties by id)
    queues = []
    for l in range(L):
        es = np.nonzero(todo[l])[0]
        queues.append(es[np.lexsort((es, -pop[l, es]))])
    rounds = max((len(q) for q in queues), default=0)
    allowed_bits = [b for b in profile.bits if b in opts.allowed_bits]
    call = opts.call_overhead_ms
    for r in range(rounds):
        ls = np.array([l for l in range(L) if r < len(queues[l])], dtype=np.int64)
        es = np.array([queues[l][r] for l in ls], dtype=np.int64)
        p = pop[ls, es]  # (n,)
        b = eb[ls, es]
        q0 = st.q[ls]  # (n, S)
        A = st.A[ls, es]  # (n, S)
        ps0 = st.psum[ls]
        joint = np.minimum(A, p[:, None])
        qn = np.where(A > 0, q0 + p[:, None] - joint, 1.0 - (1.0 - q0) * (1.0 - p[:, None]))
        qn = np.clip(qn, np.maximum(q0, p[:, None]), np.minimum(1.0, ps0 + p[:, None]))
        wadd = p[:, None] * b[:, None] / bw[None, :] * 1e3  # (n, S)
        # objective change if the expert goes to server v, for every v at once
        wk0 = st.work[ls]
        c_old = np.where(q0 > 0, (wk0 + call * ps0) / np.where(q0 > 0, q0, 1.0), 0.0)
        c_new = (wk0 + wadd + call * (ps0 + p[:, None])) / qn
        obj = np.zeros((len(ls), S))
        for c in range(net.shape[0]):
            obj += w[c] * delta_expected_max(net[c][None, :] + c_old, q0, net[c][None, :] + c_new, qn)
        obj = np.where(usable[None, :], obj, np.inf)
        chosen = np.empty(len(ls), dtype=np.int64)
        okm = np.isfinite(obj) & (free[None, :] >= b[:, None])
        first = np.argmin(np.where(okm, obj, np.inf), axis=1)
        if okm.any(1).all() and (np.bincount(first, weights=b, minlength=S) <= free).all():
            order = ()  # no server is asked for more than it has: every layer takes its best
            chosen[:] = first
            hosted[ls, es, first] = True
            free -= np.bincount(first, weights=eb[ls, es], minlength=S)
        else:
            order = np.argsort(-p, kind="stable")  # settle memory hottest first
        for k in order:
            l, e = int(ls[k]), int(es[k])
            bk = float(b[k])
            ok = np.isfinite(obj[k]) & (free >= bk)
            if not ok.any():
                v = _lower_bits(profile, l, e, bits, eb, free, usable, allowed_bits, notes)
            else:
                v = int(np.argmin(np.where(ok, obj[k], np.inf)))
            chosen[k] = v
            hosted[l, e, v] = True
            free[v] -= eb[l, e]
        # each layer appears once per round, so the layer states update in one go
        r_ = np.arange(len(ls))
        st.q[ls, chosen] = qn[r_, chosen]
        st.psum[ls, chosen] += p
        st.work[ls, chosen] += p * eb[ls, es] / bw[chosen] * 1e3
        st.A[ls, :, chosen] += profile.coact_same[ls, :, es]
    return hosted, bits, free


def _lower_bits(profile: Profile, l: int, e: int, bits: np.ndarray, eb: np.ndarray, free: np.ndarray,
                usable: np.ndarray, allowed_bits: list[int], notes: list[str] | None) -> int:
    """No server has room for this expert at its width: take the widest smaller width some
    server has room for (the most free server), or raise with the numbers."""
    for nb in sorted([x for x in allowed_bits if x < bits[l, e]], reverse=True):
        nbytes = float(profile.nbytes[l, e, profile.bit_index(nb)])
        cand = np.nonzero(usable & (free >= nbytes))[0]
        if len(cand):
            if notes is not None:
                notes.append(f"layer {l} expert {e}: lowered {bits[l, e]} -> {nb} bits, no server had "
                             f"{eb[l, e] / MB:.2f} MB free")
            bits[l, e] = nb
            eb[l, e] = nbytes
            return int(cand[np.argmax(free[cand])])
    raise InfeasibleError(
        f"layer {l} expert {e} fits no server even at {allowed_bits[0]} bits "
        f"({profile.nbytes[l, e, 0] / MB:.2f} MB; the most free memory left is "
        f"{free[usable].max() / MB if usable.any() else 0:.2f} MB)")


def replicate_hot(profile: Profile, cluster: Cluster, reqs: Requirements, bits: np.ndarray, hosted: np.ndarray,
                  free: np.ndarray, coords: dict[str, int], reserve: np.ndarray, opts: PlanOptions,
                  notes: list[str], fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Copy hot experts to each coordinator while it has room above its reserve: an expert
    whose nearest copy is remote saves p x round trip per token there. Most valuable first;
    `fraction` keeps only that share of the copies that would fit (callers compare a few, since
    piling every expert on the coordinator also serialises their compute there)."""
    hosted = hosted.copy()
    free = free.copy()
    eb = profile.expert_bytes(bits).astype(np.float64)
    net, _ = class_net_ms(profile, cluster, reqs, coords, opts)
    done: set[int] = set()
    added_total = 0
    for ci, c in enumerate(reqs.classes):
        h = coords[c.entry]
        if h in done:
            continue
        done.add(h)
        nearest = np.where(hosted, net[ci][None, None, :], np.inf).min(2)  # (L, E)
        ncopies = hosted.sum(2)
        gain = np.where(~hosted[:, :, h] & (ncopies < opts.max_replicas) & np.isfinite(nearest),
                        profile.popularity * nearest, 0.0)
        order = np.argsort(-gain, axis=None, kind="stable")
        room = free[h] - reserve[h]
        picks = []
        for flat in order:
            l, e = divmod(int(flat), gain.shape[1])
            if gain[l, e] <= 0:
                break
            if eb[l, e] > room:
                continue
            picks.append((l, e))
            room -= eb[l, e]
        room = free[h] - reserve[h]
        picks = picks[: int(round(fraction * len(picks)))]
        for l, e in picks:
            hosted[l, e, h] = True
            room -= eb[l, e]
        added = len(picks)
        free[h] = room + reserve[h]
        if added:
            notes.append(f"replicated {added} hot experts onto coordinator {cluster.servers[h].name} "
                         f"({(free[h]) / MB:.1f} MB left there)")
            added_total += added
    return hosted, free


def refine_moves(profile: Profile, cluster: Cluster, reqs: Requirements, bits: np.ndarray, hosted: np.ndarray,
                 free: np.ndarray, coords: dict[str, int], usable: np.ndarray, opts: PlanOptions,
                 max_options: int = 5000, passes: int = 2) -> tuple[np.ndarray, np.ndarray, int]:
    """Local search after the greedy, for small deployments (layers x experts x servers <=
    max_options): move single-copy experts, one at a time, to the server that lowers their
    layer's rate-weighted decode cost as the cost model computes it exactly; stop when a pass
    moves nothing; then tries swapping pairs of them. Hot-first greedy choices can be myopic
    on few servers (a full server blocks the one better move); this fixes most."""
    from controller.costmodel import Layout, hub_cost
    L, E, S = hosted.shape
    if L * E * S > max_options:
        return hosted, free, 0
    hosted, free = hosted.copy(), free.copy()
    eb = profile.expert_bytes(bits).astype(np.float64)
    w = reqs.weights()
    hubs: dict[int, float] = {}
    for c in reqs.classes:
        hubs[coords[c.entry]] = hubs.get(coords[c.entry], 0.0) + w[c.name]
    stages = {c.entry: [(coords[c.entry], 0, L)] for c in reqs.classes}

    def layer_cost(l: int, h_: np.ndarray) -> float:
        lay = Layout(bits, h_, np.zeros_like(h_), stages)
        return sum(wt * float(hub_cost(profile, cluster, lay, h, 1, opts, layers=slice(l, l + 1)).decode_ms[0])
                   for h, wt in sorted(hubs.items()))

    moved = 0
    for _ in range(passes):
        changed = False
        for l in range(L):
            cur = layer_cost(l, hosted)
            for e in np.argsort(-profile.popularity[l], kind="stable"):
                homes = np.nonzero(hosted[l, e])[0]
                if len(homes) != 1:
                    continue
                v0 = int(homes[0])
                best_v, best_c = v0, cur
                for v in range(S):
                    if v == v0 or not usable[v] or free[v] < eb[l, e]:
                        continue
                    hosted[l, e, v0], hosted[l, e, v] = False, True
                    c = layer_cost(l, hosted)
                    hosted[l, e, v0], hosted[l, e, v] = True, False
                    if c < best_c - 1e-9:
                        best_v, best_c = v, c
                if best_v != v0:
                    hosted[l, e, v0], hosted[l, e, best_v] = False, True
                    free[v0] += eb[l, e]
                    free[best_v] -= eb[l, e]
                    cur = best_c
                    moved += 1
                    changed = True
            # swaps: two single-copy experts on different servers trade places (memory permitting)
            single = [int(e) for e in range(E) if hosted[l, e].sum() == 1]
            for i, a in enumerate(single):
                for b in single[i + 1:]:
                    va, vb = int(np.argmax(hosted[l, a])), int(np.argmax(hosted[l, b]))
                    if va == vb or free[va] + eb[l, a] < eb[l, b] or free[vb] + eb[l, b] < eb[l, a]:
                        continue
                    hosted[l, a, va], hosted[l, a, vb], hosted[l, b, vb], hosted[l, b, va] = False, True, False, True
                    c = layer_cost(l, hosted)
                    if c < cur - 1e-9:
                        free[va] += eb[l, a] - eb[l, b]
                        free[vb] += eb[l, b] - eb[l, a]
                        cur = c
                        moved += 1
                        changed = True
                    else:
                        hosted[l, a, va], hosted[l, a, vb], hosted[l, b, vb], hosted[l, b, va] = True, False, True, False
        if not changed:
            break
    return hosted, free, moved

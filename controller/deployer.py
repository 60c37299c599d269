"""Executes plan diffs on the running cluster, make-before-break.

Order (controller.planner.diff already sorts actions this way): load every new shard on its
agent (LOAD_SHARD over the network: real transfer time), then switch every entry's placement
atomically (PLACEMENT, acknowledged), then drop the shards no placement names any more
(UNLOAD_SHARD). Failed loads are retried in rounds with exponential back-off, each key
(server, layer, expert, bits) at most max_attempts times; a key that still fails is left out of the placement (its old holders, if any, keep
serving it), and the outcome lists it. Over-budget answers are not retried (they cannot heal).

Pure helpers (`entry_holders`, `entry_compression`) decide what each entry is told; the
`Deployer` class only moves bytes. The controller keeps `deployed` (server -> shards it holds)
as the truth the placement is built from: an expert is routed only to holders that confirmed
the load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from controller.negotiation import link_key
from controller.plan import Plan
from controller.planner import Action
from nodes import protocol as P
from nodes.transport import NodeError, RemoteError

ShardKey = tuple[int, int, int]  # (layer, expert, bits)


@dataclass(frozen=True)
class DeployConfig:
    max_attempts: int = 4  # per key: first try + retries
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 2.0
    chunk_bytes: int = 4 << 20  # LOAD_SHARD messages carry at most about this many tensor bytes
    chunk_max_shards: int = P.MAX_TENSORS // 16  # and at most this many experts (a packed expert is <= 16 tensors)
    load_timeout_s: float = 15.0  # one LOAD_SHARD chunk (4 MB at 5 Mbit/s is ~7 s)
    placement_timeout_s: float = 3.0
    unload_timeout_s: float = 3.0


@dataclass
class DeployOutcome:
    bytes_moved: int = 0
    loaded: list[tuple[str, int, int, int]] = field(default_factory=list)
    failed: list[tuple[str, int, int, int, str]] = field(default_factory=list)  # + reason
    dropped: list[tuple[str, int, int]] = field(default_factory=list)
    entries_updated: list[str] = field(default_factory=list)
    entries_failed: list[tuple[str, str]] = field(default_factory=list)
    load_s: float = 0.0
    switch_s: float = 0.0
    drop_s: float = 0.0
    unplaced: list[tuple[int, int]] = field(default_factory=list)
    effective: Any = None  # the plan as actually deployed (controller.deployer.effective_plan)


class ShardSource:
    """Quantized expert tensors of one model, made once per (layer, expert, bits)."""

    def __init__(self, model: Any, group_size: int = 64, method: str = "rtn"):
        self.model = model
        self.group_size = group_size
        self.method = method
        self._cache: dict[ShardKey, dict[str, torch.Tensor]] = {}

    def tensors(self, l: int, e: int, bits: int) -> dict[str, torch.Tensor]:
        key = (l, e, bits)
        if key not in self._cache:
            from nodes.shards import expert_tensors
            module = self.model.expert(l, e)
            if bits not in (16, 32):
                from coel_model import quant
                module = quant.quantize_expert(module, quant.QuantSpec(bits=bits, group_size=self.group_size,
                                                                       method=self.method))
            self._cache[key] = {k: v.contiguous() for k, v in expert_tensors(module, bits).items()}
        return self._cache[key]

    def desc(self, l: int, e: int, bits: int) -> dict[str, Any]:
        cfg = self.model.cfg
        d = {"layer": l, "expert": e, "bits": bits, "d_model": cfg.d_model, "hidden": cfg.expert_hidden}
        if bits not in (16, 32):
            d.update(group_size=self.group_size, method=self.method)
        return d

    def nbytes(self, l: int, e: int, bits: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(l, e, bits).values())


# ---------------------------------------------------------------- pure decisions

def entry_holders(target: Plan, deployed: dict[str, set[ShardKey]], alive: set[str],
                  fallback: dict[tuple[int, int], tuple[str, ...]] | None = None
                  ) -> tuple[dict[tuple[int, int], tuple[str, ...]], list[tuple[int, int]]]:
    """(layer, expert) -> servers to route to: the target's holders that are alive and confirmed
    the shard (at the target's bits, or any bits while a re-quantized copy is still loading),
    else the previous holders still alive and holding it. Returns (holders, experts with none)."""
    out: dict[tuple[int, int], tuple[str, ...]] = {}
    unplaced = []
    for l, row in enumerate(target.placement):
        for e, reps in enumerate(row):
            want = target.bits[l][e]
            hs = tuple(s for s in reps if s in alive and (l, e, want) in deployed.get(s, set()))
            if not hs:
                hs = tuple(s for s in reps if s in alive and any(k[:2] == (l, e) for k in deployed.get(s, set())))
            if not hs and fallback:
                hs = tuple(s for s in fallback.get((l, e), ()) if s in alive
                           and any(k[:2] == (l, e) for k in deployed.get(s, set())))
            if not hs:
                unplaced.append((l, e))
                hs = tuple(s for s in reps) or tuple((fallback or {}).get((l, e), ()))
            out[(l, e)] = hs
    return out, unplaced


def own_copies(target: Plan, entry: str, holders: dict[tuple[int, int], tuple[str, ...]]
               ) -> dict[tuple[int, int], tuple[str, ...]]:
    """What one entry is routed to. Offload plans give every coordinator its own copy of every
    expert (resident or on demand) for its own entry: route each entry to its coordinator's
    copies only (else an entry would spread its calls over the other entries' servers, which
    the plan did not cost). Other plans: every holder (the entry picks replicas by latency)."""
    if target.mode != "offload":
        return holders
    stages = target.backbone_map().get(entry)
    if not stages:
        return holders
    coord = stages[0].server
    return {k: ((coord,) if coord in hs else hs) for k, hs in holders.items()}


def entry_compression(plan: Plan, entry: str, servers: set[str], enabled: bool = True,
                      problems: list[str] | None = None) -> dict[str, dict]:
    """Per holder server, the CompressionSettings header agreed for the pair (entry, holder);
    {} (fp32 passthrough) for the entry's own server, unknown pairs, or when disabled. Settings
    the nodes reject raise ValueError, or with `problems` given are listed there and skipped."""
    out: dict[str, dict] = {}
    if not enabled:
        return out
    comp = plan.compression_map()
    for s in sorted(servers):
        if s == entry:
            continue
        st = comp.get(link_key(entry, s))
        if st:
            from nodes.compression import CompressionSettings
            settings = {k: v for k, v in st.items() if k != "name"}
            try:
                out[s] = CompressionSettings.from_header(settings).to_header()
            except ValueError as exc:  # a setting the nodes do not know: fp32 on that pair, reported
                if problems is None:
                    raise ValueError(f"plan compression for {entry}|{s} ({st.get('name')!r}): {exc}") from None
                problems.append(f"plan compression for {entry}|{s} ({st.get('name')!r}) rejected: {exc}")
    return out


def keep_set(holders: dict[tuple[int, int], tuple[str, ...]], target: Plan) -> set[tuple[str, int, int]]:
    """(server, layer, expert) copies that must stay: routed to, or in the target plan."""
    keep = {(s, l, e) for (l, e), hs in holders.items() for s in hs}
    for l, row in enumerate(target.placement):
        for e, reps in enumerate(row):
            keep |= {(s, l, e) for s in reps}
    return keep


def transition_overflow(target: Plan, deployed: dict[str, set[ShardKey]], alive: set[str],
                        nbytes: Callable[[int, int, int], int], capacity: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Servers that cannot hold old and new copies at once during a make-before-break switch to
    `target`: server -> (bytes needed at the peak, budget). A load that replaces the same
    (layer, expert) at other bits is done in place by the agent, so it counts once."""
    over = {}
    for srv in sorted(alive):
        held = {k[:2]: k for k in deployed.get(srv, set())}
        need = sum(nbytes(*k) for k in held.values())
        for l, row in enumerate(target.placement):
            for e, reps in enumerate(row):
                if srv not in reps:
                    continue
                k = (l, e, target.bits[l][e])
                old = held.get((l, e))
                if old == k:
                    continue
                need += nbytes(*k) - (nbytes(*old) if old is not None else 0)
        cap = capacity.get(srv)
        if cap is not None and need > cap:
            over[srv] = (need, cap)
    return over


def effective_plan(target: Plan, deployed: dict[str, set[ShardKey]], alive: set[str]) -> Plan:
    """The plan as actually deployed: each expert's copies are the live servers that hold it
    (target's order first), at the bits they hold; experts nobody holds keep the target's entry
    (the next re-plan sees them missing and loads them). What later re-plans start from."""
    from dataclasses import replace
    placement, bits = [], []
    for l, row in enumerate(target.placement):
        prow, brow = [], []
        for e, reps in enumerate(row):
            have = {srv: b for srv in sorted(alive) for (ll, ee, b) in deployed.get(srv, set()) if (ll, ee) == (l, e)}
            order = [x for x in reps if x in have] + sorted(x for x in have if x not in reps)
            want = target.bits[l][e]
            if not order:
                prow.append(tuple(reps))
                brow.append(want)
                continue
            same = [x for x in order if have[x] == want]
            if same:
                order = same  # copies at other bits are being replaced; the plan speaks of one width
            prow.append(tuple(order))
            brow.append(want if same else have[order[0]])
        placement.append(tuple(prow))
        bits.append(tuple(brow))
    placement_t, bits_t = tuple(placement), tuple(bits)
    if placement_t == target.placement and bits_t == target.bits:
        return target
    return replace(target, placement=placement_t, bits=bits_t,
                   reasons=target.reasons + ("deployed state differs from the target (failed loads): "
                                             "recorded as deployed",))


def pipeline_stages(plan: Plan) -> dict[str, tuple[int, int, bool]]:
    """server -> (l0, l1, ends) of the backbone slice it runs for some entry's pipeline; the first
    stage also holds the embedding and lm_head (`ends`). Plans whose backbone has one stage run
    it on the entry, as before, and add nothing. One slice per server: a plan that asks a
    server for two different slices raises ValueError."""
    out: dict[str, tuple[int, int, bool]] = {}
    for entry, stages in plan.backbone:
        if len(stages) < 2:
            continue
        for i, st in enumerate(stages):
            have = out.setdefault(st.server, (st.l0, st.l1, i == 0))
            if have != (st.l0, st.l1, i == 0):
                raise ValueError(f"plan {plan.strategy}: server {st.server} would run layers {list(have)} and "
                                 f"[{st.l0}, {st.l1}) (entry {entry}); a server runs one backbone slice")
    return out


def entry_stages(plan: Plan, entry: str, ready: dict[str, tuple[int, int, bool]]) -> list[tuple[str, int, int]]:
    """The pipeline an entry is told to use: its plan stages when every stage server has its slice
    loaded (`ready`: server -> slice), else [] (the entry runs the whole backbone itself)."""
    stages = plan.backbone_map().get(entry, ())
    if len(stages) < 2 or any(ready.get(st.server) != (st.l0, st.l1, i == 0) for i, st in enumerate(stages)):
        return []
    return [(st.server, st.l0, st.l1) for st in stages]


# ---------------------------------------------------------------- execution

class Deployer:
    """Moves shards and routes; `client_for(server)` gives an AgentClient (or None if unknown)."""

    def __init__(self, source: ShardSource, client_for: Callable[[str], Any], cfg: DeployConfig | None = None,
                 tracer: Any = None, sleep: Callable[[float], None] = time.sleep,
                 is_alive: Callable[[str], bool] = lambda server: True):
        self.source = source
        self.client_for = client_for
        self.is_alive = is_alive  # a server declared lost meanwhile is not retried (the next re-plan re-homes)
        self.cfg = cfg or DeployConfig()
        self.tracer = tracer
        self.sleep = sleep
        self.attempts: dict[tuple[str, int, int, int], int] = {}

    def load(self, server: str, keys: list[ShardKey], outcome: DeployOutcome,
             deployed: dict[str, set[ShardKey]], on_demand: set[tuple[int, int]] | frozenset = frozenset(),
             buffer_slots: int = 2) -> None:
        """Load `keys` on `server` in chunks; failed keys are retried in rounds with exponential
        back-off, each key at most max_attempts times (counted per (server, layer, expert, bits)).
        (layer, expert) in `on_demand` go to the agent's storage, loaded into a buffer of
        `buffer_slots` shards when called (offload plans)."""
        todo = list(keys)
        backoff = self.cfg.backoff_initial_s
        while todo:
            chunks, cur, nb = [], [], 0
            for k in todo:
                b = self.source.nbytes(*k)
                if cur and (nb + b > self.cfg.chunk_bytes or len(cur) >= self.cfg.chunk_max_shards):
                    chunks.append(cur)
                    cur, nb = [], 0
                cur.append(k)
                nb += b
            if cur:
                chunks.append(cur)
            retry: list[ShardKey] = []
            for chunk in chunks:
                err = self._send_chunk(server, chunk, outcome, deployed, on_demand, buffer_slots)
                if err is None:
                    continue
                permanent = isinstance(err, RemoteError) and err.code in (P.ErrorCode.OVER_BUDGET.value,
                                                                          P.ErrorCode.BAD_SHARD.value,
                                                                          P.ErrorCode.UNSUPPORTED.value)
                for k in chunk:
                    ak = (server, *k)
                    self.attempts[ak] = self.attempts.get(ak, 0) + 1
                    if permanent or self.attempts[ak] >= self.cfg.max_attempts or not self.is_alive(server):
                        outcome.failed.append((server, *k, str(err)[:300]))
                    else:
                        retry.append(k)
            if retry:
                self.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)
            todo = retry

    def _send_chunk(self, server: str, chunk: list[ShardKey], outcome: DeployOutcome,
                    deployed: dict[str, set[ShardKey]], on_demand: set[tuple[int, int]] | frozenset = frozenset(),
                    buffer_slots: int = 2) -> Exception | None:
        client = self.client_for(server)
        if client is None:
            return NodeError(f"server {server}: no registered agent")
        descs, tensors = [], {}
        for i, (l, e, b) in enumerate(chunk):
            descs.append(self.source.desc(l, e, b))
            if (l, e) in on_demand:
                descs[-1].update(resident=False, buffer_slots=buffer_slots)
            for name, t in self.source.tensors(l, e, b).items():
                tensors[f"{i}/{name}"] = t
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        t0 = time.monotonic_ns()
        try:
            client.call(P.MsgType.LOAD_SHARD, {"shards": descs, "replace": True}, tensors,
                        timeout_s=self.cfg.load_timeout_s)
        except NodeError as exc:
            if self.tracer is not None:
                self.tracer.event("load_failed", server=server, shards=[list(k) for k in chunk], reason=str(exc)[:300])
            return exc
        outcome.bytes_moved += nbytes
        for (l, e, b) in chunk:
            held = deployed.setdefault(server, set())
            held -= {k for k in held if k[:2] == (l, e)}  # replace=True: one copy per (layer, expert)
            held.add((l, e, b))
            outcome.loaded.append((server, l, e, b))
            self.attempts.pop((server, l, e, b), None)
        if self.tracer is not None:
            self.tracer.span(f"deploy-{t0}", "load_shard", t0, time.monotonic_ns(), server=server,
                             shards=len(chunk), bytes=nbytes)
        return None

    def unload(self, server: str, keys: list[tuple[int, int]], outcome: DeployOutcome,
               deployed: dict[str, set[ShardKey]]) -> None:
        client = self.client_for(server)
        if client is None or not keys:
            return
        try:
            client.call(P.MsgType.UNLOAD_SHARD, {"shards": [list(k) for k in keys]}, timeout_s=self.cfg.unload_timeout_s)
        except NodeError as exc:
            if self.tracer is not None:
                self.tracer.event("unload_failed", server=server, reason=str(exc)[:300])
            return
        held = deployed.get(server, set())
        for l, e in keys:
            held -= {k for k in held if k[:2] == (l, e)}
            outcome.dropped.append((server, l, e))


    def load_stage(self, server: str, l0: int, l1: int, ends: bool, holders: list[list],
                   compression: dict[str, dict], kv_cache_bytes: int, with_weights: bool,
                   outcome: DeployOutcome) -> str | None:
        """LOAD_STAGE on `server`: the backbone slice [l0, l1) (with the embedding and lm_head when
        `ends`: the pipeline's first stage) or, without weights, new expert holders for the slice
        it already runs. Returns None on success, else the reason."""
        from nodes.pipeline import stage_tensors
        client = self.client_for(server)
        if client is None:
            return f"server {server}: no registered agent"
        model = self.source.model
        tensors = stage_tensors(model, l0, l1, ends) if with_weights else {}
        body = {"l0": l0, "l1": l1, "config": model.cfg.to_dict(), "holders": holders,
                "kv_cache_bytes": kv_cache_bytes, "compression": compression, "ends": ends}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        t0 = time.monotonic_ns()
        try:
            client.call(P.MsgType.LOAD_STAGE, body, tensors, timeout_s=self.cfg.load_timeout_s)
        except NodeError as exc:
            if self.tracer is not None:
                self.tracer.event("load_failed", server=server, stage=[l0, l1], reason=str(exc)[:300])
            return str(exc)[:300]
        outcome.bytes_moved += nbytes
        if self.tracer is not None:
            self.tracer.span(f"deploy-{t0}", "load_stage", t0, time.monotonic_ns(), server=server, layers=[l0, l1],
                             bytes=nbytes)
        return None


    def sync_stages(self, target: Plan, holders: dict[tuple[int, int], tuple[str, ...]], alive: set[str],
                    ep_of: dict[str, str], compression_for: Callable[[str, set[str]], dict[str, dict]],
                    ready: dict[str, tuple[tuple[int, int], Any]], outcome: DeployOutcome) -> None:
        """Every alive stage server of `target` runs its slice with the current expert holders:
        weights go out when the server does not hold that slice yet, only the holders when they
        changed. `ready` (server -> (slice, holders sent)) is updated; entries are pointed at a
        pipeline only once all its stages are in it (make-before-break)."""
        try:
            wanted = pipeline_stages(target)
        except ValueError as exc:
            if self.tracer is not None:
                self.tracer.event("stages_rejected", reason=str(exc)[:300])
            wanted = {}
        for server in list(ready):
            if server not in alive:
                ready.pop(server)  # a lost server's slice is gone with it
            elif server not in wanted:
                ready.pop(server)
                client = self.client_for(server)
                try:  # the plan runs no stage here any more: free the slice's memory
                    if client is not None:
                        client.call(P.MsgType.STAGE_RELEASE, {"requests": [], "unload": True},
                                    timeout_s=self.cfg.unload_timeout_s)
                except NodeError as exc:
                    if self.tracer is not None:
                        self.tracer.event("unload_failed", server=server, stage=True, reason=str(exc)[:300])
        cfg = self.source.model.cfg
        for server, (l0, l1, ends) in sorted(wanted.items()):
            if server not in alive or server not in ep_of:
                continue
            hs = [[l, e, [ep_of[s] for s in holders.get((l, e), ()) if s in ep_of]]
                  for l in range(l0, l1) for e in range(cfg.n_experts)]
            if any(not h[2] for h in hs):
                continue  # an expert of the slice has no holder: the stage could not run
            servers = {s for l in range(l0, l1) for e in range(cfg.n_experts) for s in holders.get((l, e), ())}
            comp = {ep_of[s]: c for s, c in compression_for(server, servers).items() if s in ep_of and c}
            have = ready.get(server)
            if have is not None and have == ((l0, l1, ends), (hs, comp)):
                continue
            kv = 8 * 2 * (l1 - l0) * cfg.n_kv_heads * cfg.max_seq_len * cfg.hd * 4  # 8 requests at full length
            why = self.load_stage(server, l0, l1, ends, hs, comp, kv, have is None or have[0] != (l0, l1, ends),
                                  outcome)
            if why is None:
                ready[server] = ((l0, l1, ends), (hs, comp))
            else:
                ready.pop(server, None)
                outcome.failed.append((server, l0, l1, -1, f"stage: {why}"))


def load_actions(actions: list[Action], alive: set[str]) -> dict[str, list[ShardKey]]:
    """load_shard actions grouped by (alive) server, in diff order."""
    out: dict[str, list[ShardKey]] = {}
    for a in actions:
        if a.kind == "load_shard" and a.server in alive:
            out.setdefault(a.server, []).append((a.layer, a.expert, a.bits))
    return out

"""Executing plans: the initial deployment and every re-deployment, make-before-break, from the
planner's target to loaded shards, switched entries and dropped leftovers. A mixin of
controller.service.Controller (its state: plan, deployed, holders, registry, deployer, ...), kept
apart from the monitoring half; the choices themselves are pure (controller.planner,
controller.triggers.choose_full_plan, controller.deployer)."""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from coel_model.errors import CoelError, InfeasibleError
from controller import monitor as M
from controller import triggers as T
from controller.deployer import (DeployOutcome, effective_plan, entry_compression, entry_holders, entry_stages,
                                 keep_set, own_copies, transition_overflow)
from nodes import protocol as P
from nodes.transport import NodeError


class Rollout:
    """Plan execution for the Controller (mixin)."""

    def _resources(self, peers: dict | None = None) -> dict[str, tuple[int | None, float]]:
        """Per server (memory_bytes, load) from its agent's reported cgroup limits (`peers`: a
        registry snapshot already taken, else a fresh one)."""
        peers = self.registry.snapshot() if peers is None else peers
        out = {}
        for s in self.topo.servers:
            p = peers.get(("agent", s.name))
            if p is not None and p.alive:
                out[s.name] = M.resource_observation(p.stats, s.memory_mb, s.cpu_share, os.cpu_count() or 1,
                                                     self.topo.agent_overhead_mb)
        return out

    def _observed(self):
        alive = self._alive("agent")
        res = self._resources()
        self.planned_resources = res
        obs = {}
        for s in self.topo.servers:
            mem, load = res.get(s.name, (None, 0.0))
            load = max(load, 0.5 if s.name in self.overloaded else 0.0)
            obs[s.name] = M.observation_of(self.probe_state.get(s.name), s.name in alive, load, mem)
        cluster, notes = M.observed_cluster(self.base_cluster, obs, self.topo.controller.name)
        from controller.perception import apply_perception  # measured speeds instead of nominal ones
        peers = self.registry.snapshot()
        reports = {r: {n: p.perception for (role, n), p in peers.items() if role == r and p.perception}
                   for r in ("agent", "entry")}
        cluster, pnotes = apply_perception(cluster, reports["agent"], reports["entry"])
        return cluster, notes + pnotes

    def _requirements_for(self, cluster) -> Any:
        from controller.plan import Requirements
        with self._lock:
            reqs = self.reqs
        keep = tuple(c for c in reqs.classes if c.entry in cluster.index)
        if not keep:
            raise InfeasibleError(f"no request class has its entry server alive (entries "
                                  f"{sorted({c.entry for c in reqs.classes})})")
        return Requirements(keep)

    def _initial_deploy(self) -> None:
        from controller.planner import diff, plan, renegotiate_compression
        from controller.plan import PlanOptions
        t0 = time.monotonic_ns()
        cluster, notes = self._observed()
        reqs = self._requirements_for(cluster)
        opts = PlanOptions(objective=self.cfg.objective)
        target = plan(self.profile, cluster, reqs, self.cfg.strategy, None, opts)
        target, _ = renegotiate_compression(target, self.profile, cluster, reqs, opts)
        self.negotiated_on = cluster
        t1 = time.monotonic_ns()
        self.state = "deploying"
        actions = diff(None, target)
        outcome = self._execute(None, target, actions)
        t2 = time.monotonic_ns()
        self.plan = outcome.effective
        if outcome.failed:
            raise InfeasibleError(f"initial deployment: {len(outcome.failed)} shard loads failed, e.g. "
                                  f"{outcome.failed[0]}")
        if outcome.unplaced:
            raise InfeasibleError(f"initial deployment: experts {outcome.unplaced[:4]} have no holder")
        self._event("deployment", plan_s=(t1 - t0) / 1e9, deploy_s=(t2 - t1) / 1e9, bytes_moved=outcome.bytes_moved,
                    actions=len(actions), strategy=target.strategy, mode=target.mode,
                    reasons=list(target.reasons)[:20] + notes, summary=M.plan_summary(target))

    def _execute(self, current, target, actions) -> DeployOutcome:
        """Make-before-break: load what the target needs, switch entries, then drop the rest."""
        out = DeployOutcome()
        alive = self._alive("agent")
        t0 = time.monotonic()
        for s in sorted(alive):
            want = [(l, e, target.bits[l][e]) for l, row in enumerate(target.placement)
                    for e, reps in enumerate(row) if s in reps]
            todo = [k for k in want if k not in self.deployed.get(s, set())]
            if todo:  # on-demand copies (offload plans) go to the agent's storage, not its memory
                self.deployer.load(s, todo, out, self.deployed, on_demand=target.on_demand_map().get(s, set()),
                                   buffer_slots=self.profile.cfg.top_k)
        t1 = time.monotonic()
        holders, out.unplaced = entry_holders(target, self.deployed, alive, self.holders)
        ep_of = {n: p.endpoint for (r, n), p in self.registry.snapshot().items() if r == "agent"}
        self.deployer.sync_stages(target, holders, alive, ep_of,
                                  lambda srv, peers: entry_compression(target, srv, peers, self.cfg.compression, []),
                                  self.stages_ready, out)
        self._push_placement(target, holders, out)
        t2 = time.monotonic()
        keep = keep_set(holders, target)
        for s in sorted(alive):
            stale = sorted({(l, e) for (l, e, b) in self.deployed.get(s, set()) if (s, l, e) not in keep})
            if stale:
                self.deployer.unload(s, stale, out, self.deployed)
        out.load_s, out.switch_s, out.drop_s = t1 - t0, t2 - t1, time.monotonic() - t2
        self.holders = holders
        out.effective = effective_plan(target, self.deployed, alive)
        return out

    def _push_placement(self, target, holders, out: DeployOutcome, only: str | None = None) -> None:
        peers = self.registry.snapshot()
        ep_of = {n: p.endpoint for (r, n), p in peers.items() if r == "agent"}
        if only is None:
            self.placement_version += 1
        body_holders = [[l, e, [ep_of[s] for s in hs if s in ep_of]] for (l, e), hs in sorted(holders.items())]
        body_holders = [h for h in body_holders if h[2]]
        servers = {s for hs in holders.values() for s in hs}
        for (role, name), p in sorted(peers.items()):
            if role != "entry" or not p.alive or (only is not None and name != only):
                continue
            if not self._agent_heard_recently(name, "entry"):  # cut off: it gets the placement when it is back
                out.entries_failed.append((name, "silent"))
                self.entries_behind.add(name)
                continue
            problems: list[str] = []
            comp = entry_compression(target, name, servers, self.cfg.compression, problems)
            for why in problems:
                self._event("compression_rejected", entry=name, reason=why)
            mine = own_copies(target, name, holders)
            routed = body_holders if mine is holders else [  # offload: this entry's coordinator only
                h for h in ([l, e, [ep_of[s] for s in hs if s in ep_of]] for (l, e), hs in sorted(mine.items())) if h[2]]
            body = {"version": self.placement_version, "holders": routed,
                    "compression": {ep_of[s]: c for s, c in comp.items() if s in ep_of and c},
                    "stages": [[ep_of[s], l0, l1] for s, l0, l1 in
                               entry_stages(target, name, {k: v[0] for k, v in self.stages_ready.items()})]}
            c = self._entry_client(name, p.endpoint)
            for attempt in range(3):
                try:
                    c.call(P.MsgType.PLACEMENT, body, timeout_s=self.cfg.deploy.placement_timeout_s)
                    out.entries_updated.append(name)
                    self.entries_behind.discard(name)
                    break
                except NodeError as exc:
                    if attempt == 2:
                        out.entries_failed.append((name, str(exc)[:200]))
                        self.entries_behind.add(name)
                        self._event("placement_failed", entry=name, reason=str(exc)[:300])

    # ---------------- serving ----------------

    def _compression_reason(self, ch: Any) -> str:
        """One line per re-negotiated pair: the route it was agreed on (measured) and the change,
        naming the degraded link as observed (probe goodput/RTT of its agent)."""
        a, b = ch.link.split("|")
        seen = []
        for s in (a, b):
            st = self.probe_state.get(s)
            if st is not None and st.goodput_mbit and st.initial_goodput_mbit:
                seen.append(f"{s} probe goodput {st.initial_goodput_mbit:.1f} -> {st.base_goodput_mbit:.1f} Mbit/s, "
                            f"RTT {st.initial_rtt_ms:.2f} -> {st.base_rtt_ms:.2f} ms")
        return (f"pair {a}-{b}: route now {ch.bw_mbit:.3g} Mbit/s, {ch.latency_ms:.3g} ms one way (measured"
                + (f": {'; '.join(seen)}" if seen else "") + f"); compression {ch.from_name or 'none in force'} -> "
                f"{ch.to_name} (predicted request {ch.request_ms_before:.2f} -> {ch.request_ms_after:.2f} ms)")

    def _resync_agent(self, name: str) -> None:
        """An agent that came back: believe only what it reports holding; drop what no plan names."""
        c = self._agent_client(name)
        try:
            st = c.call(P.MsgType.STATUS, timeout_s=2.0)
        except NodeError as exc:
            self._event("resync_failed", server=name, reason=str(exc)[:200])
            return
        held = {(s["layer"], s["expert"], s["bits"]) for s in st.body.get("shards", [])}
        self.deployed[name] = held
        wanted = set()
        if self.plan is not None:
            wanted = {(l, e) for l, row in enumerate(self.plan.placement) for e, reps in enumerate(row) if name in reps}
        stale = sorted({(l, e) for l, e, _ in held} - wanted)
        if stale:
            self.deployer.unload(name, stale, DeployOutcome(), self.deployed)

    def redeploy(self, triggers: list[M.Trigger]) -> dict | None:
        """Incremental re-plan from the current plan + make-before-break migration; logs the event."""
        from controller.plan import PlanOptions
        from controller.planner import bytes_loaded, changed_pairs, diff, plan, renegotiate_compression, server_bytes
        kind, reasons, detected_ns, detect_s = M.merge_triggers(triggers)
        t0 = time.monotonic_ns()
        self.replans += 1
        try:
            cluster, notes = self._observed()
            reqs = self._requirements_for(cluster)
            opts = PlanOptions(objective=self.cfg.objective)
            target = plan(self.profile, cluster, reqs, self.cfg.strategy, self.plan, opts)
            if kind != "agent_lost" and self.plan is not None:  # the re-deployment choice: controller.triggers
                full = plan(self.profile, cluster, reqs, self.cfg.strategy, None, opts)
                budget = opts.max_migration_factor * max(
                    [server_bytes(self.plan, self.profile, s.name) for s in cluster.servers] or [0])
                overflow = transition_overflow(full, self.deployed, self._alive("agent"), self.source.nbytes,
                                               self._capacities())
                ok, why = T.choose_full_plan(kind, target.predicted_map().get("_overall", {}),
                                             full.predicted_map().get("_overall", {}),
                                             bytes_loaded(diff(self.plan, full), self.profile), budget, overflow)
                notes.append(why)
                if ok:
                    target = replace(full, reasons=(why,) + full.reasons)
            # token compression: re-negotiated on every pair whose measured route changed (and new
            # pairs); the others keep the setting in force (the planner's own pass is overridden)
            current = self.plan.compression_map() if self.plan is not None else {}
            changed = changed_pairs(self.negotiated_on, cluster, sorted(target.compression_map()))
            target, comp_changes = renegotiate_compression(target, self.profile, cluster, reqs, opts,
                                                           current=current, changed=changed)
            self.negotiated_on = cluster
            comp_reasons = [self._compression_reason(ch) for ch in comp_changes]
        except CoelError as exc:
            self._event("replan_failed", trigger=kind, reasons=reasons, error=str(exc)[:500])
            return None
        t1 = time.monotonic_ns()
        actions = diff(self.plan, target)
        alive = self._alive("agent")
        missing = any((l, e, target.bits[l][e]) not in self.deployed.get(s, set())
                      for l, row in enumerate(target.placement) for e, reps in enumerate(row) for s in reps if s in alive)
        routes_stale = any(s not in alive for hs in self.holders.values() for s in hs)
        pred = {"token_ms_predicted_before": (self.plan.predicted_map().get("_overall", {}).get("token_ms_max")
                                              if self.plan is not None else None),
                "token_ms_predicted_after": target.predicted_map().get("_overall", {}).get("token_ms_max")}
        if not actions and not missing and not routes_stale:
            self.plan = target
            self._event("replan", trigger=kind, detected_ns=detected_ns, replan_s=(t1 - t0) / 1e9, actions=0,
                        bytes_moved=0, reasons=reasons + notes, compression_changes=[], **pred)
            return {"trigger": kind, "actions": 0, "bytes_moved": 0, "compression_changes": []}
        outcome = self._execute(self.plan, target, actions)
        t2 = time.monotonic_ns()
        self.plan = outcome.effective
        rec = {"trigger": kind, "detected_ns": detected_ns, "detect_s": detect_s, "replan_s": (t1 - t0) / 1e9,
               "migrate_s": (t2 - t1) / 1e9, "bytes_moved": outcome.bytes_moved, "actions": len(actions),
               "loads": len(outcome.loaded), "drops": len(outcome.dropped), "failed_loads": len(outcome.failed),
               "unplaced": [list(k) for k in outcome.unplaced[:8]], "entries_updated": outcome.entries_updated,
               "placement_version": self.placement_version,
               "action_kinds": dict(Counter(a.kind for a in actions)), **pred,
               "compression_changes": [{"link": c.link, "from": c.from_name, "to": c.to_name,
                                        "bw_mbit": round(c.bw_mbit, 3), "latency_ms": round(c.latency_ms, 3),
                                        "request_ms_before": round(c.request_ms_before, 3),
                                        "request_ms_after": round(c.request_ms_after, 3)} for c in comp_changes],
               "reasons": list(dict.fromkeys(reasons + notes + comp_reasons + list(target.reasons)))[:24]}
        self.redeployments.append(rec)
        self._event("redeployment", **rec)
        return rec

"""The controller process (`coel controller`): registration, probing, planning, deployment,
monitoring and re-deployment of one CoEL run.

Threads, each owning its sockets (ZeroMQ sockets are not thread-safe):
  registry    ROUTER on --listen (CURVE): REGISTER/HEARTBEAT of agents and entries, answered at
              once (their liveness depends on it); records last-seen times and stats.
  prober      PROBE round trips to every live agent (RTT and a quick payload; a full goodput
              payload only when the quick one looks changed: controller.monitor).
  control     REP on --control (controller.api): STATUS, PLAN, SET_SLO, REPLAN, SHUTDOWN.
  main        the state machine: waiting -> probing -> planning -> deploying -> serving; each
              tick turns observations into triggers (controller.monitor, pure) and, unless
              --static, re-plans incrementally (controller.planner.plan with current=) and
              executes the diff make-before-break (controller.deployer).
Every re-deployment is written to the trace as an event "redeployment" with trigger,
detected_ns, detect_s, replan_s, migrate_s, bytes_moved, actions, compression_changes and
reasons; a re-plan that changes nothing is an event "replan" with actions 0. A link change
(trigger "bw" or "delay") re-negotiates the token compression of the pairs whose measured route
changed (controller.planner.renegotiate_compression) and pushes it in the next PLACEMENT.
"""
from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from coel_model.errors import CoelError, ConfigError, InfeasibleError
from controller import liveness as L
from controller import monitor as M
from controller.detector import Detector
from controller.prober import Prober, SuspectProber
from controller.registry import Registry
from controller.deployer import (DeployConfig, DeployOutcome, Deployer, ShardSource, effective_plan,
                                 entry_compression, entry_holders, keep_set, own_copies, transition_overflow)
from nodes import protocol as P
from nodes.security import load_keys, start_authenticator
from nodes.transport import AgentClient, NodeError

TICK_S = 0.05


@dataclass(frozen=True)
class ControllerConfig:
    topology: str
    model_dir: str
    listen: str
    control: str
    expect_agents: tuple[str, ...]
    expect_entries: tuple[str, ...] = ()
    strategy: str = "coel"
    objective: str = "latency"  # controller.plan.OBJECTIVES: what the coel strategy optimises
    profile_path: str | None = None
    keys_dir: str | None = None
    run_dir: str | None = None
    static: bool = False
    replan_interval_s: float | None = None
    trace_path: str | None = None
    register_timeout_s: float = 120.0
    compression: bool = True  # send the negotiated token compression to entries (off = fp32 passthrough)
    monitor: M.MonitorConfig = field(default_factory=M.MonitorConfig)
    liveness: L.LivenessConfig = field(default_factory=L.LivenessConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def __post_init__(self) -> None:
        if not self.expect_agents:
            raise ConfigError("controller: --expect-agents lists no agent")
        if self.replan_interval_s is not None and self.replan_interval_s <= 0:
            raise ConfigError(f"--replan-interval-s must be > 0 (got {self.replan_interval_s})")
        for ep, flag in ((self.listen, "--listen"), (self.control, "--control")):
            if "://" not in ep:
                raise ConfigError(f"{flag} {ep!r} must look like tcp://IP:PORT or ipc://PATH")


class Controller:
    def __init__(self, cfg: ControllerConfig, delay_factory: Any = None):
        from coel_model.checkpoint import load_model
        from controller.cluster import cluster_from_topology
        from controller.plan import requirements_from_topology
        from topologies import load_topology
        self.cfg = cfg
        self.delay_factory = delay_factory or (lambda: None)
        self.topo = load_topology(cfg.topology)
        names = {s.name for s in self.topo.servers}
        bad = [n for n in cfg.expect_agents + cfg.expect_entries if n not in names]
        if bad:
            raise ConfigError(f"controller: {bad} are not servers of topology {self.topo.name} "
                              f"(servers: {sorted(names)})")
        self.base_cluster = cluster_from_topology(self.topo)
        self.reqs = requirements_from_topology(self.topo, default_entry=(cfg.expect_entries or (None,))[0])
        self.model = load_model(cfg.model_dir)
        self.profile, self.profile_note = self._load_profile()
        self.keys = load_keys(cfg.keys_dir) if cfg.keys_dir else None
        self.tracer = None
        if cfg.trace_path:
            from testbed.traces import TraceWriter
            self.tracer = TraceWriter(cfg.trace_path, self.topo.controller.name)
        self.ctx = zmq.Context()
        self.state = "starting"
        self.error: str | None = None
        self.plan = None
        self.holders: dict[tuple[int, int], tuple[str, ...]] = {}
        self.deployed: dict[str, set[tuple[int, int, int]]] = {}
        self.placement_version = 0
        self.redeployments: list[dict] = []
        self.negotiated_on = None  # the (measured) cluster the compression in force was agreed on
        self.replans = 0
        self.probe_state: dict[str, M.ProbeState] = {}
        self.overloaded: set[str] = set()
        self.planned_resources: dict[str, tuple[int | None, float]] = {}  # what the last plan assumed
        self.entries_behind: set[str] = set()  # entries that missed a placement update
        self.requests: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.clients: dict[str, AgentClient] = {}
        self.source = ShardSource(self.model, group_size=self.profile.group_size)
        self.deployer = Deployer(self.source, self._agent_client, cfg.deploy, self.tracer,
                                 is_alive=self._agent_heard_recently)
        self.registry = Registry(cfg.listen, self.keys, self.ctx, self.delay_factory(), cfg.liveness)
        self.detector = Detector(self.registry, cfg.liveness, SuspectProber(self.keys, self.ctx, self.delay_factory),
                                 self._event)
        self.nominal_mbit = self._nominal_rates()
        self.prober = Prober(self.registry, self.keys, cfg.monitor, self.ctx, self.delay_factory,
                             lambda name: M.probe_payload_bytes(self.probe_state.get(name), self.nominal_mbit.get(name),
                                                                cfg.monitor),
                             lambda name, rtt, gp: M.probe_suspect(self.probe_state.get(name), rtt,
                                                                   self._cap_goodput(name, gp), cfg.monitor),
                             lambda name, rtt, quick: M.quick_suspect(self.probe_state.get(name), rtt, quick,
                                                                      cfg.monitor))
        self.api = None
        dt = self.delay_factory()
        self.emulation_mode = getattr(dt, "mode", "none") if dt is not None else "none"

    # ---------------- inputs ----------------
    def _load_profile(self):
        from controller.profile import load_profile, synthetic_profile
        path = self.cfg.profile_path or str(Path(self.cfg.model_dir) / "profile.json")
        mc = self.model.cfg
        if Path(path).exists() or self.cfg.profile_path:
            prof = load_profile(path)
            note = f"profile {path}"
        else:
            bb = mc.param_counts().get("backbone")
            prof = synthetic_profile(mc, backbone_params=bb, source=f"synthetic for {self.cfg.model_dir}")
            note = f"no profile at {path}: synthetic statistics (measured ones come from `coel profile`)"
        pc = prof.cfg
        if (pc.n_layers, pc.n_experts, pc.d_model, pc.expert_hidden) != \
                (mc.n_layers, mc.n_experts, mc.d_model, mc.expert_hidden):
            raise ConfigError(f"{path}: profile is for {pc.n_layers} layers x {pc.n_experts} experts d={pc.d_model} "
                              f"hidden={pc.expert_hidden}, the model {self.cfg.model_dir} has {mc.n_layers} x "
                              f"{mc.n_experts} d={mc.d_model} hidden={mc.expert_hidden}")
        return prof, note

    def _cap_goodput(self, name: str, gp: float) -> float:
        """A probe cannot be faster than its path: shaper bursts and timing artifacts are clipped
        at goodput_cap_factor x the topology's bottleneck rate."""
        nominal = self.nominal_mbit.get(name)
        return min(gp, self.cfg.monitor.goodput_cap_factor * nominal) if nominal else gp

    def _nominal_rates(self) -> dict[str, float]:
        """Bottleneck rate (Mbit/s) of the topology path controller -> each server (probe sizing)."""
        from topologies import bottleneck_bw_mbit, shortest_path
        out = {}
        for s in self.topo.servers:
            path = shortest_path(self.topo, self.topo.controller.name, s.name)
            bw = bottleneck_bw_mbit(self.topo, path) if path else None
            if bw:
                out[s.name] = float(bw)
        return out

    def _agent_client(self, server: str) -> AgentClient | None:
        p = self.registry.peers.get(("agent", server))
        if p is None:
            return None
        c = self.clients.get(f"agent:{server}")
        if c is None or c.endpoint != p.endpoint:
            if c is not None:
                c.close()
            c = self.clients[f"agent:{server}"] = AgentClient(p.endpoint, self.keys, self.ctx, name="controller",
                                                              delay=self.delay_factory())
        return c

    def _entry_client(self, name: str, endpoint: str) -> AgentClient:
        c = self.clients.get(f"entry:{name}")
        if c is None or c.endpoint != endpoint:
            if c is not None:
                c.close()
            c = self.clients[f"entry:{name}"] = AgentClient(endpoint, self.keys, self.ctx, name="controller",
                                                            delay=self.delay_factory())
        return c

    def _event(self, kind: str, t_ns: int | None = None, **attrs: Any) -> None:
        if self.tracer is not None:
            self.tracer.event(kind, t_ns, **attrs)

    def _capacities(self) -> dict[str, int]:
        """Each agent's shard budget as it reported it (else the topology's memory_mb)."""
        out = {s.name: int(s.memory_mb * (1 << 20)) for s in self.topo.servers}
        for (role, name), p in self.registry.snapshot().items():
            if role == "agent" and p.stats.get("memory_budget_bytes"):
                out[name] = int(p.stats["memory_budget_bytes"])
        return out

    def _agent_heard_recently(self, server: str, role: str = "agent") -> bool:
        """Alive and not even suspect right now (the detector runs while the main loop deploys)."""
        with self.registry.lock:
            p = self.registry.peers.get((role, server))
            return p is not None and p.live.state == L.ALIVE

    def _alive(self, role: str = "agent") -> set[str]:
        with self.registry.lock:
            return {p.name for p in self.registry.peers.values() if p.role == role and p.alive}

    # ---------------- control API ----------------
    def handle_control(self, op: str, args: dict) -> Any:
        if op == "STATUS":
            return self.status()
        if op == "PLAN":
            return self.plan.to_dict() if self.plan is not None else None
        if op == "SET_SLO":
            return self._set_slo(args)
        if op == "REPLAN":
            self.requests.put(M.Trigger("forced", time.monotonic_ns(), "REPLAN via the control API"))
            return {"ok": True}
        if op == "SHUTDOWN":
            self._stop.set()
            return {"ok": True}
        raise ConfigError(f"unknown control op {op!r}; valid: {list(P.CONTROL_OPS)}")

    def _set_slo(self, args: dict) -> dict:
        from controller.plan import Requirements
        cls = args.get("slo_class")
        if not isinstance(cls, str) or not cls:
            raise ConfigError("SET_SLO needs slo_class (a client name, its workload slo_class, or '*')")
        ttft, tpot = args.get("slo_ttft_ms"), args.get("slo_tpot_ms")
        for v, n in ((ttft, "slo_ttft_ms"), (tpot, "slo_tpot_ms")):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"SET_SLO: {n} must be a number > 0 (got {v!r})")
        by_client = {c.name: c.workload.slo_class for c in self.topo.clients}
        with self._lock:
            hit, out = [], []
            for c in self.reqs.classes:
                if cls in ("*", c.name, by_client.get(c.name)):
                    ch = {}
                    if ttft is not None:
                        ch["ttft_slo_ms"] = float(ttft)
                    if tpot is not None:
                        ch["token_slo_ms"] = float(tpot)
                    c = replace(c, **ch)
                    hit.append(c.name)
                out.append(c)
            if not hit:
                raise ConfigError(f"SET_SLO: no request class {cls!r}; classes: "
                                  f"{[(c.name, by_client.get(c.name)) for c in self.reqs.classes]}")
            self.reqs = Requirements(tuple(out))
        self.requests.put(M.Trigger("slo_change", time.monotonic_ns(),
                                    f"SLO of {hit}: ttft {ttft} ms, tpot {tpot} ms"))
        return {"ok": True, "classes": hit}

    def status(self) -> dict:
        peers = self.registry.snapshot()
        now = time.monotonic_ns()
        agents, entries = {}, {}
        for (role, name), p in sorted(peers.items()):
            st = self.probe_state.get(name)
            d = {"alive": p.alive, "endpoint": p.endpoint, "pid": p.pid, "last_seen_s": round((now - p.last_seen_ns) / 1e9, 3),
                 "registers": p.registers, "liveness": p.live.state, "heartbeat_s": p.live.period_s,
                 "lost_count": p.live.lost_count, "rejoin_count": p.live.rejoin_count}
            if role == "agent":
                d.update(rtt_ms=round(st.rtt_ms[-1], 3) if st and st.rtt_ms else None,
                         goodput_mbit=round(st.goodput_mbit[-1], 2) if st and st.goodput_mbit else None,
                         baseline_rtt_ms=st.base_rtt_ms if st else None,
                         baseline_goodput_mbit=st.base_goodput_mbit if st else None,
                         memory_used_bytes=p.stats.get("memory_used_bytes"),
                         memory_budget_bytes=p.stats.get("memory_budget_bytes"),
                         cpu_percent=p.stats.get("cpu_percent"), shards=len(self.deployed.get(name, ())),
                         cgroup_memory_limit_bytes=p.stats.get("cgroup_memory_limit_bytes"),
                         cgroup_cpu_cores=p.stats.get("cgroup_cpu_cores"),
                         overloaded=name in self.overloaded)
                agents[name] = d
            else:
                d.update({k: p.stats.get(k) for k in ("served", "failed", "active", "queued", "placement_version",
                                                      "failovers", "expert_rtt_ms")})
                entries[name] = d
        with self._lock:
            slo = self.reqs.to_dict()
        return {"state": self.state, "error": self.error, "agents": agents, "entries": entries,
                "plan_summary": M.plan_summary(self.plan), "redeployments": len(self.redeployments),
                "redeployment_list": self.redeployments[-20:], "replans": self.replans,
                "placement_version": self.placement_version, "emulation_mode": self.emulation_mode,
                "static": self.cfg.static, "requirements": slo, "profile": self.profile_note}

    # ---------------- lifecycle ----------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        from controller.api import ControlServer
        auth = None
        try:
            if self.keys is not None:
                auth = start_authenticator(self.ctx, self.keys)
            self.registry.start()
            self.api = ControlServer(self.cfg.control, self.handle_control, self.ctx).start()
            self._event("controller_start", strategy=self.cfg.strategy, static=self.cfg.static,
                        topology=self.topo.name, profile=self.profile_note, emulation_mode=self.emulation_mode)
            self.state = "waiting"
            self._wait_registration()
            self.state = "probing"
            self._baseline_probes()
            self.prober.start()
            self.state = "planning"
            self._initial_deploy()
            self.state = "serving"
            self._event("serving", placement_version=self.placement_version)
            self._serve_loop()
            return 0
        except CoelError as exc:
            self.state, self.error = "failed", str(exc)
            self._event("controller_failed", reason=str(exc))
            raise
        finally:
            self.detector.stop()
            self.detector.prober.stop()
            self.prober.stop()
            self._event("detector", **dict(self.detector.stats))
            self._event("probe_bytes", payload_bytes=self.prober.bytes_sent, on_wire_bytes=2 * self.prober.bytes_sent)
            self.registry.stop()
            if self.api is not None:
                self.api.stop()
            for c in self.clients.values():
                c.close()
            if auth is not None:
                auth.stop()
            if self.tracer is not None:
                self.tracer.close()
            self.ctx.term()

    def _wait_registration(self) -> None:
        deadline = time.monotonic() + self.cfg.register_timeout_s
        want = {("agent", n) for n in self.cfg.expect_agents} | {("entry", n) for n in self.cfg.expect_entries}
        while True:
            with self.registry.lock:
                missing = sorted(want - set(self.registry.peers))
            if not missing:
                return
            if self._stop.is_set():
                raise ConfigError("controller: shut down while waiting for registrations")
            if time.monotonic() > deadline:
                raise ConfigError(f"controller: after {self.cfg.register_timeout_s:.0f} s these did not register at "
                                  f"{self.cfg.listen}: {[f'{r} {n}' for r, n in missing]}")
            time.sleep(0.05)

    def _baseline_probes(self) -> None:
        mc = self.cfg.monitor
        for name in sorted(self.cfg.expect_agents):
            st = self.probe_state.setdefault(name, M.ProbeState())
            c = self._agent_client(name)
            for _ in range(mc.baseline_probes):
                try:
                    rtt, quick = self.prober.probe_once(c, mc.quick_probe_bytes)
                    gp = self.prober.payload_once(c, rtt, M.probe_payload_bytes(None, self.nominal_mbit.get(name), mc))
                except NodeError as exc:
                    self._event("probe_failed", server=name, reason=str(exc)[:200])
                    continue
                M.add_quick(st, rtt, quick, time.monotonic_ns(), mc, full=True)
                M.add_probe(st, rtt, self._cap_goodput(name, gp), time.monotonic_ns(), mc)
            self._event("baseline", server=name, rtt_ms=st.base_rtt_ms, goodput_mbit=st.base_goodput_mbit)

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
                    "compression": {ep_of[s]: c for s, c in comp.items() if s in ep_of and c}}
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
    def _serve_loop(self) -> None:
        mc = self.cfg.monitor
        next_sched = time.monotonic() + self.cfg.replan_interval_s if self.cfg.replan_interval_s else math.inf
        pending: list[M.Trigger] = []
        cores_of = {s.name: s.cpu_share * (os.cpu_count() or 1) for s in self.topo.servers}
        self.detector.prober.start()
        self.detector.start(time.monotonic_ns())
        while not self._stop.is_set():
            time.sleep(TICK_S)
            now = time.monotonic_ns()
            # 1. liveness verdicts (controller.detector) and registrations
            pending += self._liveness_triggers(now)
            for name in sorted(self.entries_behind):  # an entry that missed an update gets it once heard again
                if self._agent_heard_recently(name, "entry"):
                    self._push_placement(self.plan, self.holders, DeployOutcome(), only=name)
            # 3. probes
            while True:
                try:
                    name, t_ns, rtt, gp, err, quick = self.prober.results.get_nowait()
                except queue.Empty:
                    break
                if err is not None:
                    continue  # a silent agent is judged by its heartbeats
                st = self.probe_state.setdefault(name, M.ProbeState())
                M.add_quick(st, rtt, quick, t_ns, mc, full=gp is not None)
                if gp is not None:
                    M.add_probe(st, rtt, self._cap_goodput(name, gp), t_ns, mc)
                v = M.probe_change(st, mc)
                if v is not None:
                    kind, what, why = v  # what: "bw" | "delay" (the re-deployment's trigger)
                    M.rebase(st, mc, M.verdict_samples(kind, what, mc))
                    self._event(kind, server=name, change=what, reason=why)
                    pending.append(M.Trigger(what, t_ns, f"{name}: {kind.replace('_', ' ')}: {why}", name))
            # 4. overload
            peers = self.registry.snapshot()  # one copy per tick, for 4 and 4b
            for (role, name), p in peers.items():
                if role != "agent" or not p.alive:
                    continue
                share = cores_of.get(name, 0.0)
                over = M.overloaded(p.cpu_hist, share, mc)
                if over and name not in self.overloaded:
                    self.overloaded.add(name)
                    pending.append(M.Trigger("overload", now, f"agent {name} cpu at >= {mc.overload_cpu_frac} x "
                                                              f"its share ({share:.2f} cores)", name))
                elif not over and name in self.overloaded and p.cpu_hist and \
                        p.cpu_hist[-1] < 50.0 * share:
                    self.overloaded.discard(name)
            # 4b. cgroup squeezes (memory limit / CPU quota changed under an agent)
            if self.plan is not None:
                for name, (mem, load) in self._resources(peers).items():
                    old_mem, old_load = self.planned_resources.get(name, (None, 0.0))
                    if mem != old_mem and (mem is None or old_mem is None or abs(mem - old_mem) > 0.05 * max(old_mem, 1)) \
                            or abs(load - old_load) > 0.1:
                        self.planned_resources[name] = (mem, load)
                        self._event("resource_change", server=name, memory_bytes=mem, load=load,
                                    previous_memory_bytes=old_mem, previous_load=old_load)
                        pending.append(M.Trigger("resource_change", now, f"agent {name}: shard memory "
                                                 f"{'as planned' if mem is None else f'{mem / (1 << 20):.2f} MiB'}, "
                                                 f"cpu load {load:.2f} (cgroup limits)", name))
            # 5. API and schedule
            while True:
                try:
                    pending.append(self.requests.get_nowait())
                except queue.Empty:
                    break
            if time.monotonic() >= next_sched:
                next_sched = time.monotonic() + self.cfg.replan_interval_s
                pending.append(M.Trigger("scheduled", now, f"every {self.cfg.replan_interval_s:g} s"))
            if pending:
                if self.cfg.static:
                    for t in pending:
                        self._event("trigger_ignored", trigger=t.kind, reason=t.reason, static=True)
                else:
                    try:
                        self.redeploy(pending)
                    except Exception as exc:  # a bug in one re-deployment must not stop the monitoring
                        import traceback
                        self._event("redeploy_error", triggers=[t.kind for t in pending],
                                    error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc(limit=4)[-1500:])
                pending = []

    def _liveness_triggers(self, now: int) -> list[M.Trigger]:
        """The detector's verdicts and the registry's notices -> triggers (and resyncs, placements)."""
        out: list[M.Trigger] = []
        while True:
            try:
                verdict, role, name, t_ns, extra = self.detector.verdicts.get_nowait()
            except queue.Empty:
                break
            if verdict == "lost" and role == "agent":
                out.append(M.Trigger("agent_lost", t_ns, f"agent {name} silent for {extra:.2f} s and unreachable "
                                                         f"by direct and indirect probes", name, extra))
            elif verdict == "back" and role == "agent":
                self._resync_agent(name)
                out.append(M.Trigger("agent_rejoined", t_ns, f"agent {name} back (heard steadily"
                                                             f"{', a restarted process' if extra else ''})", name))
            elif verdict == "back":
                self._push_placement(self.plan, self.holders, DeployOutcome(), only=name)
        while True:
            try:
                kind, role, name, restarted, t_ns = self.registry.notices.get_nowait()
            except queue.Empty:
                break
            if kind in ("refuted", "heard_again"):
                self._event(f"{role}_{'heartbeat_resumed' if kind == 'refuted' else 'heard_again'}", t_ns, name=name)
                continue
            self._event(f"{role}_{kind}", t_ns, name=name, restarted=restarted)
            with self.registry.lock:
                p = self.registry.peers.get((role, name))
                state = p.live.state if p is not None else L.LOST
            if kind == "registered" or state not in (L.ALIVE, L.SUSPECT):
                continue  # a new peer no plan names yet, or one on probation (the detector says when it is back)
            if role == "entry":
                self._push_placement(self.plan, self.holders, DeployOutcome(), only=name)
            elif restarted:  # a crash and restart faster than detection: its shards are gone
                with self.registry.lock:
                    p.live.new_process = False
                self._resync_agent(name)
                out.append(M.Trigger("agent_rejoined", t_ns, f"agent {name} restarted (new process)", name))
        return out

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
            if kind != "agent_lost" and self.plan is not None:
                # links, load or SLO changed (or a schedule): the incremental plan keeps every expert
                # where it is; a full plan may serve much better. Adopt it only when clearly worth it.
                full = plan(self.profile, cluster, reqs, self.cfg.strategy, None, opts)
                inc_pred = target.predicted_map().get("_overall", {})
                full_pred = full.predicted_map().get("_overall", {})
                moved = bytes_loaded(diff(self.plan, full), self.profile)
                budget = opts.max_migration_factor * max(
                    [server_bytes(self.plan, self.profile, s.name) for s in cluster.servers] or [0])
                gain = 0.0 if kind == "slo_change" and not inc_pred.get("meets_slo", True) else 0.2
                if kind == "slo_change" and not inc_pred.get("meets_slo", True) and full_pred.get("meets_slo"):
                    budget = float("inf")  # a missed SLO justifies a full re-deployment
                ok, why = M.prefer_full_plan(inc_pred, full_pred, moved, budget, gain)
                if ok:
                    over = transition_overflow(full, self.deployed, self._alive("agent"), self.source.nbytes,
                                               self._capacities())
                    if over:
                        ok = False
                        why = (f"full re-plan rejected: make-before-break does not fit on "
                               + ", ".join(f"{s} ({n} > {c} bytes)" for s, (n, c) in sorted(over.items())))
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


# ---------------------------------------------------------------- command line

def add_controller_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, help="run folder (for relative defaults)")
    p.add_argument("--topology", required=True, help="bundled topology name or YAML path")
    p.add_argument("--model", required=True, help="checkpoint directory (expert weights are quantized from it)")
    p.add_argument("--profile", default=None, help="coel-profile JSON (default MODEL/profile.json)")
    p.add_argument("--strategy", default="coel", help="planner strategy: coel | uniform | pipeline | offload | random")
    p.add_argument("--objective", default="latency", choices=("latency", "quality"),
                   help="what coel optimises under the SLOs and quality floor (default: latency)")
    p.add_argument("--listen", required=True, help="ROUTER endpoint for REGISTER/HEARTBEAT, e.g. tcp://10.0.0.9:7000")
    p.add_argument("--control", required=True, help="control API endpoint, e.g. ipc://RUN/control.sock")
    p.add_argument("--keys", default=None, help="CURVE key directory (default: plain text)")
    p.add_argument("--expect-agents", required=True, help="comma-separated server names")
    p.add_argument("--expect-entries", default="", help="comma-separated entry server names")
    p.add_argument("--static", action="store_true", help="keep the initial plan: monitor, never migrate")
    p.add_argument("--replan-interval-s", type=float, default=None, help="re-plan on this schedule too")
    p.add_argument("--heartbeat-s", type=float, default=0.2,
                   help="heartbeat period assumed for a peer whose REGISTER does not state one")
    p.add_argument("--suspect-after-s", type=float, default=0.5,
                   help="silence that always makes a peer suspect (earlier when its own gaps say so)")
    p.add_argument("--suspect-probe-timeout-s", type=float, default=0.3,
                   help="timeout of the direct and indirect probes of a suspect")
    p.add_argument("--indirect-probes", type=int, default=2, help="other agents asked to probe a suspect")
    p.add_argument("--rejoin-stable-s", type=float, default=0.6,
                   help="a lost peer heard again is back after this long heard on time")
    p.add_argument("--probe-interval-s", type=float, default=0.5, help="RTT + goodput probe period per agent")
    p.add_argument("--probe-window", type=int, default=3, help="recent probes compared with the baseline "
                   "(delay changes, recoveries)")
    p.add_argument("--probe-confirm", type=int, default=2, help="consecutive low-goodput probes that declare a "
                   "bandwidth drop (a suspect agent is re-probed after --probe-recheck-s)")
    p.add_argument("--probe-recheck-s", type=float, default=0.05, help="re-probe delay for an agent whose last "
                   "probe looked changed")
    p.add_argument("--probe-bytes", type=int, default=32 * 1024,
                   help="full goodput probe payload (echoed back; sent only when the quick probe looks changed)")
    p.add_argument("--quick-probe-bytes", type=int, default=48 * 1024,
                   help="payload of the every-interval quick probe (echoed back)")
    p.add_argument("--bw-drop-ratio", type=float, default=0.3, help="goodput below this x baseline triggers")
    p.add_argument("--rtt-rise-ratio", type=float, default=2.5, help="RTT above this x baseline triggers")
    p.add_argument("--rtt-rise-min-ms", type=float, default=5.0, help="... and at least this many ms above it")
    p.add_argument("--no-compression", action="store_true", help="fp32 passthrough on every link")
    p.add_argument("--register-timeout-s", type=float, default=120.0)
    p.add_argument("--trace", default=None, help="append events/spans (JSONL)")
    p.add_argument("--delay-file", default=None, help="emulated path delays (default $COEL_DELAY_FILE)")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve Prometheus GET /metrics here "
                   "(controller/metrics.py)")


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    split = lambda s: tuple(x.strip() for x in (s or "").split(",") if x.strip())  # noqa: E731
    live = L.LivenessConfig(default_period_s=args.heartbeat_s, max_suspect_s=args.suspect_after_s,
                            probe_timeout_s=args.suspect_probe_timeout_s, indirect_probes=args.indirect_probes,
                            rejoin_stable_s=args.rejoin_stable_s)
    mon = M.MonitorConfig(probe_interval_s=args.probe_interval_s,
                          probe_bytes=args.probe_bytes, probe_window=args.probe_window,
                          probe_confirm=args.probe_confirm, probe_recheck_s=args.probe_recheck_s,
                          quick_probe_bytes=args.quick_probe_bytes,
                          bw_drop_ratio=args.bw_drop_ratio,
                          rtt_rise_ratio=args.rtt_rise_ratio, rtt_rise_min_ms=args.rtt_rise_min_ms)
    return ControllerConfig(topology=args.topology, model_dir=args.model, listen=args.listen, control=args.control,
                            expect_agents=split(args.expect_agents), expect_entries=split(args.expect_entries),
                            strategy=args.strategy, objective=args.objective, profile_path=args.profile,
                            keys_dir=args.keys,
                            run_dir=args.run_dir, static=args.static, replan_interval_s=args.replan_interval_s,
                            trace_path=args.trace, register_timeout_s=args.register_timeout_s,
                            compression=not args.no_compression, monitor=mon, liveness=live)


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.planner import strategy_names
    from nodes.agent import delay_hook_from_env
    if args.strategy not in strategy_names():
        raise ConfigError(f"unknown strategy {args.strategy!r}; valid strategies: {strategy_names()}")
    cfg = config_from_args(args)
    ctl = Controller(cfg, lambda: delay_hook_from_env(args.delay_file))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ctl.stop())
    from controller.metrics import MetricsExporter
    exporter = MetricsExporter(ctl, args.metrics) if args.metrics else None
    try:
        return ctl.run()
    finally:
        if exporter is not None:
            exporter.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m controller.service ...` = `coel controller ...`."""
    ap = argparse.ArgumentParser(prog="controller.service")
    add_controller_args(ap)
    try:
        return cmd_controller(ap.parse_args(argv))
    except CoelError as exc:
        print(f"coel controller: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

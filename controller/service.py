"""The controller process (`coel controller`): registration, probing, planning, deployment,
monitoring and re-deployment of one CoEL run. This module wires the parts and runs the main loop.

Threads, each owning its sockets (ZeroMQ sockets are not thread-safe):
  registry    controller.registry: REGISTER/HEARTBEAT of agents and entries, answered at once;
              per-peer liveness records (agreed heartbeat period, gap history); indirect probes.
  detector    controller.detector: the liveness policy (controller.liveness) every 20 ms:
              suspicion, direct (suspect-prober thread) and indirect probes, lost/back verdicts.
  prober      controller.prober: RTT + packet-pair goodput probes of every live agent.
  control     REP on --control (controller.api): STATUS, PLAN, SET_SLO, REPLAN, SHUTDOWN.
  main        waiting -> probing -> planning -> deploying -> serving; each tick turns verdicts and
              observations into triggers (controller.monitoring; decisions in controller.triggers,
              pure) and, unless --static, re-plans incrementally and executes the diff
              make-before-break (controller.rollout).
Every re-deployment is a trace event "redeployment" (trigger, detected_ns, detect_s, replan_s,
migrate_s, bytes_moved, actions, compression_changes, reasons); a re-plan that changes nothing is
an event "replan" with actions 0.
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
from typing import Any

import zmq

from coel_model.errors import CoelError, ConfigError
from controller import control_views as C
from controller import liveness as L
from controller import monitor as M
from controller.detector import Detector
from controller.prober import Prober, SuspectProber
from controller.registry import Registry
from controller.monitoring import Monitoring
from controller.rollout import Rollout
from controller.options import ControllerConfig, add_controller_args, config_from_args, run_profile
from controller.prober import nominal_rates
from controller.deployer import DeployOutcome, Deployer, ShardSource
from nodes import protocol as P
from nodes.security import load_keys, start_authenticator
from nodes.transport import AgentClient

TICK_S = 0.05


class Controller(Monitoring, Rollout):
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
        self.profile, self.profile_note = run_profile(cfg, self.model.cfg)
        self.keys = load_keys(cfg.keys_dir) if cfg.keys_dir else None
        self.tracer = None
        if cfg.trace_path:
            from common.tracing import TraceWriter
            self.tracer = TraceWriter(cfg.trace_path, self.topo.controller.name)
        self.ctx = zmq.Context()
        self.state = "starting"
        self.error: str | None = None
        self.plan = None
        self.holders: dict[tuple[int, int], tuple[str, ...]] = {}
        self.stages_ready: dict[str, Any] = {}  # stage server -> (slice, holders) it runs (Deployer.sync_stages)
        self.deployed: dict[str, set[tuple[int, int, int]]] = {}
        self.placement_version = 0
        self.redeployments: list[dict] = []
        self.negotiated_on = None  # the (measured) cluster the compression in force was agreed on
        self.replans = 0
        self.probe_state: dict[str, M.ProbeState] = {}
        self.overloaded: set[str] = set()
        self.discounted: set[str] = set()  # agents whose link change is currently read as contention
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
                                 self._event, self._recent_rtt_ms)
        self.nominal_mbit = nominal_rates(self.topo)
        self.prober = Prober(self.registry, self.keys, cfg.monitor, self.ctx, self.delay_factory,
                             lambda name: M.probe_payload_bytes(self.probe_state.get(name), self.nominal_mbit.get(name),
                                                                cfg.monitor),
                             lambda name, rtt, gp: M.probe_suspect(self.probe_state.get(name), rtt,
                                                                   self._cap_goodput(name, gp), cfg.monitor),
                             lambda name, rtt, quick: M.quick_suspect(self.probe_state.get(name), rtt, quick,
                                                                      cfg.monitor),
                             lambda name: M.quick_payload_bytes(self.probe_state.get(name), cfg.monitor))
        self.api = None
        dt = self.delay_factory()
        self.emulation_mode = getattr(dt, "mode", "none") if dt is not None else "none"

    # ---------------- inputs ----------------
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

    def _recent_rtt_ms(self, name: str) -> list[float]:
        """The Prober's last RTTs to an agent (read from the detector thread: a copy of a list)."""
        st = self.probe_state.get(name)
        return list(st.rtt_ms[-3:]) if st is not None else []

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
        by_client = {c.name: c.workload.slo_class for c in self.topo.clients}
        with self._lock:
            self.reqs, hit, why = C.apply_slo(self.reqs, by_client, args)
        self.requests.put(M.Trigger("slo_change", time.monotonic_ns(), why))
        return {"ok": True, "classes": hit}

    def status(self) -> dict:
        with self._lock:
            slo = self.reqs.to_dict()
        return {"state": self.state, "error": self.error,
                **C.peer_status(self.registry.snapshot(), self.probe_state, self.deployed, self.overloaded,
                                time.monotonic_ns()),
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
            # 3. probes, overload and cgroup squeezes (controller.monitoring)
            pending += self._probe_triggers() + self._resource_triggers(now, cores_of)
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

# ---------------------------------------------------------------- command line
def cmd_controller(args: argparse.Namespace) -> int:
    from controller.planner import strategy_names
    from nodes.delayqueue import delay_hook_from_env
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

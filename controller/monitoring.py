"""The monitoring half of the controller: baseline probes, the prober's samples, verdicts of the
failure detector and the registry's notices, overload and cgroup reports -> triggers. A mixin of
controller.service.Controller (its state: probe_state, registry, detector, ...); every decision
is a pure function (controller.triggers, controller.monitor, controller.liveness)."""
from __future__ import annotations

import queue
import time

from controller import liveness as L
from controller import monitor as M
from controller import triggers as T
from controller.deployer import DeployOutcome
from nodes.transport import NodeError


class Monitoring:
    """Observation -> triggers for the Controller (mixin)."""

    def _cap_goodput(self, name: str, gp: float) -> float:
        """A probe cannot be faster than its path: shaper bursts and timing artifacts are clipped
        at goodput_cap_factor x the topology's bottleneck rate."""
        nominal = self.nominal_mbit.get(name)
        return min(gp, self.cfg.monitor.goodput_cap_factor * nominal) if nominal else gp

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

    def _probe_triggers(self) -> list[M.Trigger]:
        """The prober's new samples -> probe state, trace counters, link verdicts (controller.triggers)."""
        mc, out = self.cfg.monitor, []
        while True:
            try:
                name, t_ns, rtt, gp, err, quick = self.prober.results.get_nowait()
            except queue.Empty:
                return out
            if err is not None:
                continue  # a silent agent is judged by the detector
            st = self.probe_state.setdefault(name, M.ProbeState())
            M.add_quick(st, rtt, quick, t_ns, mc, full=gp is not None)
            if self.tracer is not None:  # the samples behind every link verdict, for the report
                self.tracer.counter(f"probe_rtt_ms:{name}", round(rtt, 3), t_ns)
                self.tracer.counter(f"probe_quick_mbit:{name}", round(quick, 2), t_ns)
            if gp is not None:
                M.add_probe(st, rtt, self._cap_goodput(name, gp), t_ns, mc)
                if self.tracer is not None:
                    self.tracer.counter(f"probe_goodput_mbit:{name}", round(self._cap_goodput(name, gp), 2), t_ns)
            ev, trig = T.probe_step(name, st, self.probe_state, t_ns, mc)
            if ev is not None and trig is None:  # discounted as contention: said once per episode
                if name not in self.discounted:
                    self._event(ev.kind, t_ns, **ev.attrs)
                self.discounted.add(name)
                continue
            self.discounted.discard(name)
            if ev is not None:
                self._event(ev.kind, t_ns, **ev.attrs)
                out.append(trig)

    def _resource_triggers(self, now: int, cores_of: dict[str, float]) -> list[M.Trigger]:
        """Overload (reported CPU at its share) and cgroup squeezes -> triggers (controller.triggers)."""
        peers = self.registry.snapshot()
        self.overloaded, out = T.overload_step({n: p.cpu_hist for (r, n), p in peers.items() if r == "agent" and p.alive},
                                               self.overloaded, cores_of, now, self.cfg.monitor)
        if self.plan is not None:
            self.planned_resources, events, trigs = T.resource_step(self._resources(peers), self.planned_resources, now)
            for ev in events:
                self._event(ev.kind, **ev.attrs)
            out += trigs
        return out

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

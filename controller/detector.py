"""The failure detector thread: runs the liveness policy (controller.liveness) on the registry's
per-peer records every TICK_S, from its own thread, so a re-deployment that keeps the main loop
busy for seconds neither delays a real detection nor causes a false one.

Per tick: measure its own lateness (with the registry thread's: Lifeguard self-awareness ->
one stretch factor for every deadline); turn silence into suspicion; for each new suspect send a
direct PROBE (SuspectProber) and ask `indirect_probes` other agents for one (Registry.ask_indirect);
apply the probe answers; convict when all failed; declare peers on probation back when stable.
Events go to the trace at once; verdicts the main loop acts on go to `verdicts`:
  ("lost", role, name, t_ns, silent_s)      ("back", role, name, t_ns, restarted)
"""
from __future__ import annotations

import collections
import queue
import time
from typing import Any, Callable

from controller import liveness as L
from controller.prober import SuspectProber
from controller.registry import Registry
from nodes.background import ThreadedLoop

TICK_S = 0.02
LAG_WINDOW_S = 2.0  # self-awareness looks at the worst lateness within this window


class Detector(ThreadedLoop):
    thread_name = "detector"

    def __init__(self, registry: Registry, cfg: L.LivenessConfig, prober: SuspectProber,
                 event: Callable[..., None], recent_rtt_ms: Callable[[str], list[float]] | None = None):
        super().__init__()
        self.registry, self.cfg, self.prober, self._event = registry, cfg, prober, event
        self.recent_rtt_ms = recent_rtt_ms or (lambda name: [])  # the Prober's latest RTTs to an agent
        self.verdicts: queue.Queue = queue.Queue()
        self.lags: collections.deque = collections.deque(maxlen=200)  # (t_ns, own lateness s)
        self.serving_ns = 0  # silence counts only from serving on (start-up work is not silence)
        self.stats = collections.Counter()
        self._rounds = 0

    def start(self, serving_ns: int) -> "Detector":
        self.serving_ns = serving_ns
        with self.registry.lock:  # nobody is silent for the time before serving
            for p in self.registry.peers.values():
                p.live.last_heard_ns = max(p.live.last_heard_ns, serving_ns)
        return super().start()

    def self_factor(self, now_ns: int) -> float:
        lo = now_ns - int(LAG_WINDOW_S * 1e9)
        lags = [x for t, x in list(self.lags) + list(self.registry.lags_s) if t >= lo]
        with self.registry.lock:
            periods = [p.live.period_s for p in self.registry.peers.values()] or [self.cfg.default_period_s]
        return L.self_factor(lags, min(periods), self.cfg)

    def _run(self) -> None:
        self.ready.set()
        t_next = time.monotonic() + TICK_S
        while not self._stop.wait(max(0.0, t_next - time.monotonic())):
            now_s = time.monotonic()
            self.lags.append((time.monotonic_ns(), max(0.0, now_s - t_next)))
            t_next = now_s + TICK_S
            try:
                self.tick(time.monotonic_ns())
            except Exception as exc:  # a bug here must not end failure detection for the run
                self._event("detector_error", error=f"{type(exc).__name__}: {exc}")

    def tick(self, now_ns: int) -> None:
        factor = self.self_factor(now_ns)
        # probe answers first: a suspect that answered is not convicted in the same tick
        answers: list[tuple[str, int, str, bool, float | None]] = []
        while True:
            try:
                name, suspicion, reached, rtt = self.prober.results.get_nowait()
            except queue.Empty:
                break
            answers.append((name, suspicion, "controller", reached, rtt))
        while True:
            try:
                answers.append(self.registry.peer_probe_results.get_nowait())
            except queue.Empty:
                break
        to_probe: list[tuple[str, str, int, str, float, list[str]]] = []
        events: list[tuple[str, dict[str, Any]]] = []
        with self.registry.lock:
            peers = self.registry.peers
            agents_alive = [p.name for p in peers.values() if p.role == "agent" and p.live.state == L.ALIVE]
            for target, suspicion, via, reached, rtt in answers:  # target: "role:name"
                role, _, name = target.partition(":")
                p = peers.get((role, name))
                if p is not None and L.probe_result(p.live, reached, via, suspicion) == "refuted":
                    self.stats["refuted"] += 1
                    events.append(("suspect_refuted", dict(role=role, name=name, by=via, rtt_ms=rtt,
                                                           reason="answered a probe while its heartbeats "
                                                                  "were late: slow, not lost")))
            for (role, name), p in sorted(peers.items()):
                live = p.live
                silent_s = (now_ns - live.last_heard_ns) / 1e9
                v = L.check_silence(live, now_ns, self.cfg, factor)
                if v == "suspect":
                    self.stats["suspects"] += 1
                    self._rounds += 1
                    helpers = L.pick_helpers(name, agents_alive, self.cfg.indirect_probes, self._rounds)
                    timeout_s = L.probe_timeout_s(self.cfg, factor,
                                                  self.recent_rtt_ms(name) if role == "agent" else None)
                    to_probe.append((role, name, live.suspicion, p.endpoint, timeout_s, helpers))
                    events.append(("suspect", dict(role=role, name=name, silent_s=round(silent_s, 3),
                                                   limit_s=round(L.suspect_after_s(live, self.cfg, factor), 3),
                                                   self_factor=round(factor, 2), helpers=helpers,
                                                   probe_timeout_s=round(timeout_s, 3))))
                elif v == "lost":  # on probation and silent again: it never was back
                    events.append(("probation_failed", dict(role=role, name=name, silent_s=round(silent_s, 3))))
                if L.conclude(live, now_ns, self.cfg, factor) == "lost":
                    self.stats["lost"] += 1
                    self.verdicts.put(("lost", role, name, now_ns, silent_s))
                    events.append((f"{role}_lost", dict(name=name, silent_s=round(silent_s, 3),
                                                        probes_failed=live.probes_failed,
                                                        probes_sent=live.probes_expected,
                                                        self_factor=round(factor, 2))))
                if L.check_back(live, now_ns, self.cfg):
                    restarted, live.new_process = live.new_process, False
                    self.verdicts.put(("back", role, name, now_ns, restarted))
                    events.append((f"{role}_rejoined", dict(name=name, restarted=restarted,
                                                            after_s=round((now_ns - live.heard_again_ns) / 1e9, 3))))
        for role, name, suspicion, endpoint, timeout_s, helpers in to_probe:
            key = f"{role}:{name}"
            self.prober.probe(key, suspicion, endpoint, timeout_s)
            asked = [h for h in helpers if self.registry.ask_indirect(h, key, suspicion, endpoint, timeout_s)]
            with self.registry.lock:
                p = self.registry.peers.get((role, name))
                if p is not None and p.live.suspicion == suspicion:
                    L.expect_probes(p.live, 1 + len(asked), timeout_s)
        for kind, attrs in events:
            self._event(kind, now_ns, **attrs)

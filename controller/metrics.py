"""Prometheus exporter of the controller (`coel controller --metrics HOST:PORT`, GET /metrics).

Everything is read from the controller when Prometheus scrapes (its STATUS view and its list of
re-deployments), so nothing is counted twice and the control loop does no extra work: state and
placement version, re-deployments by trigger with their detection, re-plan and migration times
(histograms over the run so far) and bytes moved, probe results per controller-agent link (RTT,
goodput and their baselines), and what agents and entries report in their heartbeats (memory,
CPU, shards; requests served and failed), so one scrape target covers the agents too.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# detection, re-planning and migration: from ~10 ms to a minute
PHASE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATES = ("starting", "waiting", "probing", "planning", "serving", "failed")


def _histogram(name: str, doc: str, values: list[float]) -> HistogramMetricFamily:
    buckets, acc = [], 0
    for le in PHASE_BUCKETS_S:
        acc = sum(1 for v in values if v <= le)
        buckets.append((repr(le), acc))
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(values)))


class ControllerCollector:
    """`status` = Controller.status; `redeployments` = the controller's list of re-deployment records."""

    def __init__(self, status: Callable[[], dict[str, Any]], redeployments: Callable[[], list[dict]]):
        self.status, self.redeployments = status, redeployments

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        st = self.status()
        recs = list(self.redeployments())
        state = GaugeMetricFamily("coel_controller_state", "1 for the controller's current state", labels=["state"])
        for s in STATES:
            state.add_metric([s], 1.0 if st.get("state") == s else 0.0)
        yield state
        yield GaugeMetricFamily("coel_controller_placement_version", "Placement version last pushed to the entries",
                                value=st.get("placement_version") or 0)
        by_trigger = CounterMetricFamily("coel_controller_redeployments", "Re-deployments (migrations) by trigger",
                                         labels=["trigger"])
        counts: dict[str, int] = {}
        for r in recs:
            counts[r.get("trigger", "?")] = counts.get(r.get("trigger", "?"), 0) + 1
        for trig, n in sorted(counts.items()):
            by_trigger.add_metric([trig], n)
        yield by_trigger
        yield CounterMetricFamily("coel_controller_replans", "Re-plans (with or without a migration)",
                                  value=st.get("replans") or 0)
        yield CounterMetricFamily("coel_controller_migrated_bytes", "Expert bytes loaded by re-deployments",
                                  value=sum(r.get("bytes_moved") or 0 for r in recs))
        yield _histogram("coel_controller_detection_seconds", "Fault -> the controller's verdict (its own estimate)",
                         [r["detect_s"] for r in recs if r.get("detect_s") is not None])
        yield _histogram("coel_controller_replan_seconds", "Re-plan time of each re-deployment",
                         [r["replan_s"] for r in recs if r.get("replan_s") is not None])
        yield _histogram("coel_controller_migration_seconds", "Migration (load, switch routes, drop) time",
                         [r["migrate_s"] for r in recs if r.get("migrate_s") is not None])
        up = GaugeMetricFamily("coel_peer_up", "1 while the controller hears the peer", labels=["role", "name"])
        rtt = GaugeMetricFamily("coel_probe_rtt_seconds", "Last RTT probe, controller -> agent link", labels=["agent"])
        rtt0 = GaugeMetricFamily("coel_probe_rtt_baseline_seconds", "Baseline RTT of the link", labels=["agent"])
        gp = GaugeMetricFamily("coel_probe_goodput_bits_per_second", "Last goodput probe of the link",
                               labels=["agent"])
        gp0 = GaugeMetricFamily("coel_probe_goodput_baseline_bits_per_second", "Baseline goodput of the link",
                                labels=["agent"])
        mem = GaugeMetricFamily("coel_agent_memory_used_bytes", "Shard memory an agent reports", labels=["agent"])
        budget = GaugeMetricFamily("coel_agent_memory_budget_bytes", "Shard memory budget", labels=["agent"])
        cpu = GaugeMetricFamily("coel_agent_cpu_percent", "CPU an agent reports (percent of one core)",
                                labels=["agent"])
        shards = GaugeMetricFamily("coel_agent_shards", "Expert shards deployed on the agent", labels=["agent"])
        for name, a in sorted((st.get("agents") or {}).items()):
            up.add_metric(["agent", name], 1.0 if a.get("alive") else 0.0)
            for fam, key, scale in ((rtt, "rtt_ms", 1e-3), (rtt0, "baseline_rtt_ms", 1e-3),
                                    (gp, "goodput_mbit", 1e6), (gp0, "baseline_goodput_mbit", 1e6),
                                    (mem, "memory_used_bytes", 1), (budget, "memory_budget_bytes", 1),
                                    (cpu, "cpu_percent", 1), (shards, "shards", 1)):
                if a.get(key) is not None:
                    fam.add_metric([name], float(a[key]) * scale)
        served = CounterMetricFamily("coel_entry_served", "Requests an entry reports served", labels=["entry"])
        failed = CounterMetricFamily("coel_entry_failed", "Requests an entry reports failed", labels=["entry"])
        for name, e in sorted((st.get("entries") or {}).items()):
            up.add_metric(["entry", name], 1.0 if e.get("alive") else 0.0)
            if e.get("served") is not None:
                served.add_metric([name], e["served"])
            if e.get("failed") is not None:
                failed.add_metric([name], e["failed"])
        yield from (up, rtt, rtt0, gp, gp0, mem, budget, cpu, shards, served, failed)


class MetricsExporter:
    """GET /metrics of a controller on HOST:PORT (prometheus_client's own HTTP server, a daemon thread)."""

    def __init__(self, controller: Any, listen: str):
        from prometheus_client import start_http_server

        from coel_model.errors import ConfigError
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--metrics {listen!r} must look like HOST:PORT, e.g. 10.0.0.9:8000")
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ControllerCollector(controller.status, lambda: controller.redeployments))
        try:
            self.server, self.thread = start_http_server(int(port), host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics {listen}: cannot bind: {exc}") from None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

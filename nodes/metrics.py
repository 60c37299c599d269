"""Prometheus metrics of an entry server (served as text on the HTTP front's GET /metrics).

Request-side numbers (requests, tokens, TTFT, time per output token) are observed by wrapping
every request's sink (nodes.serving.TokenSink), so ZeroMQ and HTTP requests count alike, labelled
by `api`. Expert calls and bytes per peer, fail-overs, placement version and the entry's counters
are read from the entry when Prometheus scrapes (a custom collector): nothing on the decode path.
Names follow Prometheus conventions (base units: seconds, bytes; counters end in _total).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# TTFT spans a few ms (loopback, warm) to tens of seconds (waiting for a new placement)
TTFT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
# one decode step: ~1 ms (one process) to seconds (fail-over, placement wait)
TPOT_BUCKETS_S = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EntryMetrics:
    """One registry per entry; `wrap` meters a request, `exposition` renders the text format."""

    def __init__(self, server: str, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("coel_requests", "Requests finished, by API and outcome (ok, error, cancelled)",
                                ["api", "outcome"], registry=r)
        self.prompt_tokens = Counter("coel_prompt_tokens", "Prompt tokens of finished requests", ["api"],
                                     registry=r)
        self.generation_tokens = Counter("coel_generation_tokens", "Tokens generated (streamed) by this entry",
                                         ["api"], registry=r)
        self.ttft = Histogram("coel_time_to_first_token_seconds", "Request received -> first token produced",
                              ["api"], buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = Histogram("coel_time_per_output_token_seconds", "Time between consecutive tokens of a request",
                              ["api"], buckets=TPOT_BUCKETS_S, registry=r)
        self.http = Counter("coel_http_requests", "HTTP requests by route and status code", ["route", "code"],
                            registry=r)
        self.running = Gauge("coel_requests_running", "Requests a worker is decoding", registry=r)
        r.register(_EntryCollector(server, stats))

    def wrap(self, sink: Any, api: str, t_recv_ns: int) -> "MeteredSink":
        return MeteredSink(sink, self, api, t_recv_ns)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MeteredSink:
    """A TokenSink that records timings and counts, then passes everything on."""
    __slots__ = ("inner", "m", "api", "t_last_ns", "first", "_ended")

    def __init__(self, inner: Any, m: EntryMetrics, api: str, t_recv_ns: int):
        self.inner, self.m, self.api, self.t_last_ns, self.first = inner, m, api, t_recv_ns, True
        self._ended = False
        m.running.inc()

    def token(self, index: int, token_id: int) -> None:
        now = time.monotonic_ns()
        (self.m.ttft if self.first else self.m.tpot).labels(self.api).observe((now - self.t_last_ns) / 1e9)
        self.first, self.t_last_ns = False, now
        self.m.generation_tokens.labels(self.api).inc()
        self.inner.token(index, token_id)

    def _end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            self.m.running.dec()
            self.m.requests.labels(self.api, outcome).inc()

    def done(self, info: dict[str, Any]) -> None:
        self.m.prompt_tokens.labels(self.api).inc(int(info.get("prompt_tokens", 0)))
        # a sink that stops a request on purpose (a stop string) calls that a success
        self._end(getattr(self.inner, "cancel_outcome", "cancelled") if info.get("cancelled") else "ok")
        self.inner.done(info)

    def error(self, code: str, reason: str) -> None:
        self._end("error")
        self.inner.error(code, reason)

    def cancelled(self) -> bool:
        return self.inner.cancelled()


class _EntryCollector:
    """Reads the entry's own counters at scrape time (see EntryService.metrics_snapshot)."""

    def __init__(self, server: str, stats: Callable[[], dict[str, Any]]):
        self.server, self.stats = server, stats
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Any]:
        return []  # contents depend on the peers seen so far

    def collect(self) -> Iterable[Any]:
        with self._lock:
            s = self.stats()
        calls = CounterMetricFamily("coel_expert_calls", "Expert calls sent, by peer (agent endpoint)",
                                    labels=["peer"])
        nbytes = CounterMetricFamily("coel_expert_bytes", "Bytes of expert calls, by peer and direction",
                                     labels=["peer", "direction"])
        rtt = GaugeMetricFamily("coel_expert_rtt_seconds", "Smoothed expert-call round trip, by peer",
                                labels=["peer"])
        for peer, v in sorted(s["peers"].items()):
            calls.add_metric([peer], v["calls"])
            nbytes.add_metric([peer, "sent"], v["bytes_sent"])
            nbytes.add_metric([peer, "received"], v["bytes_received"])
            if v.get("rtt_ms") is not None:
                rtt.add_metric([peer], v["rtt_ms"] / 1e3)
        yield calls
        yield nbytes
        yield rtt
        yield CounterMetricFamily("coel_expert_failovers", "Expert calls retried on another replica",
                                  value=s["failovers"])
        yield CounterMetricFamily("coel_step_retries", "Decode steps retried while waiting for a new placement",
                                  value=s["step_retries"])
        yield CounterMetricFamily("coel_redeployments", "New placements received after the first "
                                  "(re-deployments seen by this entry)", value=s["placement_updates"])
        yield GaugeMetricFamily("coel_placement_version", "Version of the placement in force (-1: none yet)",
                                value=s["placement_version"])
        yield GaugeMetricFamily("coel_requests_blocked", "Requests waiting for a new placement",
                                value=s["blocked"])
        yield GaugeMetricFamily("coel_requests_queued", "Requests waiting for a free worker", value=s["queued"])
        up = GaugeMetricFamily("coel_entry_healthy", "1 when the entry can serve a request now", labels=["server"])
        up.add_metric([self.server], 1.0 if s["healthy"] else 0.0)
        yield up

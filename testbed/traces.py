"""Trace records of a run: reading the per-process JSONL files (written by common.tracing,
whose docstring gives the record format), merging them, and exporting a Chrome/Perfetto trace."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from coel_model.errors import ConfigError


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of one JSONL file; a torn last line (process killed mid-write) is skipped."""
    path = Path(path)
    with open(path) as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                continue
            raise ConfigError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}:{i}: a trace record must be a JSON object")
        yield rec


@dataclass
class Trace:
    spans: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    counters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def t0_ns(self) -> int:
        times = [s["t0_ns"] for s in self.spans] + [e["t_ns"] for e in self.events] + \
                [c["t_ns"] for c in self.counters]
        return min(times) if times else 0

    def requests(self) -> list[dict[str, Any]]:
        """The client-side 'request' spans, one per request, in submission order."""
        return sorted((s for s in self.spans if s["span"] == "request"), key=lambda s: s["t0_ns"])


def merge(paths: Iterable[str | Path]) -> Trace:
    """Merge per-process JSONL files into one time-ordered trace."""
    tr = Trace()
    for p in sorted(Path(x) for x in paths):
        for rec in read_jsonl(p):
            if "span" in rec:
                tr.spans.append(rec)
            elif "event" in rec:
                tr.events.append(rec)
            elif "counter" in rec:
                tr.counters.append(rec)
    tr.spans.sort(key=lambda s: (s["t0_ns"], s["t1_ns"]))
    tr.events.sort(key=lambda e: e["t_ns"])
    tr.counters.sort(key=lambda c: c["t_ns"])
    return tr


def write_jsonl(trace: Trace, path: str | Path) -> None:
    with open(path, "w") as fh:
        for rec in sorted(trace.spans + trace.events + trace.counters,
                          key=lambda r: r.get("t0_ns", r.get("t_ns", 0))):
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


FAILURE_EVENTS = {"link_down", "server_crash", "request_failed", "agent_lost", "link_degraded",
                  "fault"}


def to_chrome(trace: Trace) -> dict[str, Any]:
    """Chrome/Perfetto trace-event JSON: processes = hosts, `X` spans, flow events linking the hops
    of one request, global instant events for failures and re-deployments, `C` counters."""
    t0 = trace.t0_ns
    us = lambda ns: (ns - t0) / 1000.0  # noqa: E731  trace-event timestamps are microseconds
    hosts = sorted({r["host"] for r in trace.spans + trace.events + trace.counters})
    pid_of = {h: i + 1 for i, h in enumerate(hosts)}
    out: list[dict[str, Any]] = []
    for h, pid in pid_of.items():
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": h}})
    tids: dict[tuple[int, str], int] = {}

    def tid_for(pid: int, lane: str) -> int:
        key = (pid, lane)
        if key not in tids:
            tids[key] = len([k for k in tids if k[0] == pid]) + 1
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[key],
                        "args": {"name": lane}})
        return tids[key]

    by_trace: dict[str, list[dict[str, Any]]] = {}
    for s in trace.spans:
        pid = pid_of[s["host"]]
        lane = "requests" if s["span"] == "request" else str(s.get("attrs", {}).get("lane", s["span"].split(".")[0]))
        ev = {"ph": "X", "name": s["span"], "cat": "span", "pid": pid, "tid": tid_for(pid, lane),
              "ts": us(s["t0_ns"]), "dur": max(0.0, (s["t1_ns"] - s["t0_ns"]) / 1000.0),
              "args": {"trace_id": s["trace_id"], **s.get("attrs", {})}}
        out.append(ev)
        by_trace.setdefault(s["trace_id"], []).append(ev)
    flow_id = 0
    for tid_, evs in by_trace.items():
        hops = sorted((e for e in evs if e["name"] != "request"), key=lambda e: e["ts"])
        for a, b in zip(hops, hops[1:]):
            if a["pid"] == b["pid"]:
                continue  # flows link hops between hosts
            flow_id += 1
            out.append({"ph": "s", "id": flow_id, "name": "hop", "cat": "flow", "pid": a["pid"],
                        "tid": a["tid"], "ts": a["ts"]})
            out.append({"ph": "f", "id": flow_id, "name": "hop", "cat": "flow", "bp": "e",
                        "pid": b["pid"], "tid": b["tid"], "ts": b["ts"]})
    for e in trace.events:
        pid = pid_of[e["host"]]
        out.append({"ph": "i", "s": "g", "name": e["event"],
                    "cat": "failure" if e["event"] in FAILURE_EVENTS else "event",
                    "pid": pid, "tid": 0, "ts": us(e["t_ns"]), "args": e.get("attrs", {})})
    for c in trace.counters:
        pid = pid_of[c["host"]]
        out.append({"ph": "C", "name": c["counter"], "pid": pid, "ts": us(c["t_ns"]),
                    "args": {"value": c["value"]}})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"clock": "CLOCK_MONOTONIC", "t0_ns": t0}}

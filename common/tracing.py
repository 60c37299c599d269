"""Trace writing, the ground-floor service every process uses (agents, entries, clients, the
controller, the testbed). Reading, merging and drawing traces is the testbed's business
(testbed/traces.py).

Every process appends one JSON object per line:
    span   {"trace_id", "span", "host", "pid", "t0_ns", "t1_ns", "attrs": {...}}
    event  {"event": kind, "host", "pid", "t_ns", "attrs": {...}}   (faults, re-deployments, marks)
    counter{"counter": name, "host", "pid", "t_ns", "value": x}     (e.g. link bytes)
Times are CLOCK_MONOTONIC nanoseconds: all hosts of a Mininet run share one kernel clock, so
spans from different hosts line up without any clock synchronisation.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class TraceWriter:
    """Append-only JSONL writer, safe to share between threads of one process."""

    def __init__(self, path: str | Path, host: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", buffering=1)

    def _write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"), default=float)
        with self._lock:
            self._fh.write(line + "\n")

    def span(self, trace_id: str, name: str, t0_ns: int, t1_ns: int, **attrs: Any) -> None:
        self._write({"trace_id": trace_id, "span": name, "host": self.host, "pid": self.pid,
                     "t0_ns": int(t0_ns), "t1_ns": int(t1_ns), "attrs": attrs})

    def event(self, event: str, t_ns: int | None = None, **attrs: Any) -> None:
        self._write({"event": event, "host": self.host, "pid": self.pid,
                     "t_ns": int(t_ns if t_ns is not None else time.monotonic_ns()), "attrs": attrs})

    def counter(self, name: str, value: float, t_ns: int | None = None) -> None:
        self._write({"counter": name, "host": self.host, "pid": self.pid,
                     "t_ns": int(t_ns if t_ns is not None else time.monotonic_ns()), "value": value})

    def close(self) -> None:
        with self._lock:
            self._fh.close()

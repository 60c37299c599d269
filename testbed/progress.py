"""Live progress of a run: requests done/lost and the last latencies, read from the clients'
JSONL traces as they grow (no extra channel to the clients), plus the faults injected so far.

On a terminal it is a rich Live line that redraws in place; otherwise (tests, logs) it prints
one plain line every `every_s` seconds and one per fault, so logs stay short.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


class ClientTail:
    """Incrementally reads the 'request' spans of every raw/*-client.jsonl of a run."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = Path(raw_dir)
        self._offsets: dict[Path, int] = {}
        self.done = 0
        self.lost = 0
        self.last: dict[str, Any] | None = None

    def poll(self) -> list[dict[str, Any]]:
        new = []
        for p in sorted(self.raw_dir.glob("*-client.jsonl")):
            off = self._offsets.get(p, 0)
            try:
                with open(p, "rb") as fh:
                    fh.seek(off)
                    chunk = fh.read()
            except FileNotFoundError:
                continue
            end = chunk.rfind(b"\n")
            if end < 0:
                continue
            self._offsets[p] = off + end + 1
            for line in chunk[:end].splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("span") != "request":
                    continue
                new.append(rec)
                if rec["attrs"].get("ok"):
                    self.done += 1
                else:
                    self.lost += 1
                self.last = rec
        return new


class RunProgress:
    def __init__(self, scenario: str, duration_s: float, raw_dir: Path, live: bool | None = None,
                 every_s: float = 5.0, stream: Any = None):
        self.scenario = scenario
        self.duration_s = duration_s
        self.tail = ClientTail(raw_dir)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self.events: list[str] = []
        self.redeployments = 0
        self._t_print = 0.0
        self._rich = None
        self.t0 = time.monotonic()

    def start(self) -> None:
        self.t0 = time.monotonic()
        if self.live:
            from rich.console import Console
            from rich.live import Live
            self._rich = Live("", console=Console(file=self.stream), refresh_per_second=4, transient=False)
            self._rich.start()

    def line(self) -> str:
        t = time.monotonic() - self.t0
        last = "-"
        if self.tail.last is not None:
            a = self.tail.last["attrs"]
            if a.get("ok"):
                last = f"ttft {a.get('ttft_ms', 0):.0f} ms, tok {a.get('tpot_ms') or 0:.0f} ms"
            else:
                last = f"LOST ({str(a.get('error', ''))[:40]})"
        ev = "; ".join(self.events[-2:]) or "none"
        return (f"[{self.scenario}] t={t:5.1f}/{self.duration_s:g}s  requests done {self.tail.done} "
                f"lost {self.tail.lost}  last: {last}  re-deployments {self.redeployments}  events: {ev}")

    def note(self, text: str) -> None:
        t = time.monotonic() - self.t0
        self.events.append(f"{t:.1f}s {text}")
        if not self.live:
            print(f"[{self.scenario}] t={t:5.1f}s {text}", file=self.stream, flush=True)

    def update(self, redeployments: int | None = None) -> None:
        self.tail.poll()
        if redeployments is not None:
            self.redeployments = redeployments
        if self._rich is not None:
            self._rich.update(self.line())
        elif time.monotonic() - self._t_print >= self.every_s:
            self._t_print = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.update(self.line())
            self._rich.stop()
            self._rich = None

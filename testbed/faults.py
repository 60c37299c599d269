"""Fault injection: turn a scenario Event into a real change of the running testbed.

The injector acts on the network (testbed.netbuild.TestbedNet), on the processes of a server
(through the runner's `ProcessControl`: kill / start its agent and entry) and on host cgroups.
It never tells the controller what it did: the controller must notice by observation. The only
exception is an SLO change, which goes through the controller's control API as a user would
send it. Every injection is recorded as one trace event {"event": "fault", "attrs": {"kind", ...,
"ok", "error"?, "apply_ms"}} so reports can line re-deployments up with their cause.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from coel_model.errors import ConfigError
from testbed.scenario import CRASH_PROCESSES, EVENT_FIELDS, Event
from topologies.schema import MIB, Topology


class ProcessControl(Protocol):
    """What the injector needs from the runner to crash and restart a server."""

    def kill_server(self, server: str, process: str | None = None) -> list[str]: ...  # roles killed

    def start_server(self, server: str) -> list[str]: ...  # returns the roles started


@dataclass(frozen=True)
class FaultResult:
    kind: str
    ok: bool
    attrs: dict[str, Any]
    error: str | None = None


def event_from_dict(d: dict[str, Any], source: str = "<inject>") -> Event:
    """An Event from a plain dict (what `coel inject` writes), validated like scenario events."""
    kind = d.get("kind")
    if kind not in EVENT_FIELDS:
        raise ConfigError(f"{source}: unknown fault kind {kind!r} (known: {', '.join(EVENT_FIELDS)})")
    req, opt = EVENT_FIELDS[kind]
    unknown = set(d) - set(req) - set(opt) - {"kind", "at_s"}
    if unknown:
        raise ConfigError(f"{source}: {kind}: unknown fields {sorted(unknown)} (takes {list(req + opt)})")
    missing = [k for k in req if d.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: {kind} needs {', '.join(missing)}")
    kw: dict[str, Any] = {"at_s": float(d.get("at_s", 0.0)), "kind": kind}
    for k in req + opt:
        v = d.get(k)
        if v is None:
            continue
        if k == "link":
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, str) for x in v)):
                raise ConfigError(f"{source}: {kind}: link must be two node names, got {v!r}")
            kw[k] = (v[0], v[1])
        elif k in ("server", "slo_class"):
            kw[k] = str(v)
        elif k == "process":
            if v not in CRASH_PROCESSES:
                raise ConfigError(f"{source}: {kind}: process must be one of {', '.join(CRASH_PROCESSES)}, got {v!r}")
            kw[k] = None if v == "all" else v
        else:
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: {kind}: {k} must be a number, got {v!r}") from None
            if x < 0 or (k in ("bw_mbit", "memory_mb", "cpu_share", "cores", "duration_s") and x <= 0) or \
                    (k == "cpu_share" and x > 1) or (k == "loss_pct" and x >= 100):
                raise ConfigError(f"{source}: {kind}: {k}={x:g} is out of range")
            kw[k] = x
    if kind == "slo" and kw.get("slo_ttft_ms") is None and kw.get("slo_tpot_ms") is None:
        raise ConfigError(f"{source}: slo needs slo_ttft_ms and/or slo_tpot_ms")
    if kind == "cpu_hog" and kw["cores"] != int(kw["cores"]):
        raise ConfigError(f"{source}: cpu_hog: cores must be a whole number, got {kw['cores']:g}")
    return Event(**kw)


class FaultInjector:
    """Applies events to a running testbed; `original` is the topology as built (for restore)."""

    def __init__(self, net: Any, procs: ProcessControl, original: Topology, trace: Any = None,
                 control: Any = None):
        self.net = net
        self.procs = procs
        self.original = original
        self.trace = trace  # TraceWriter of the testbed (raw/testbed-faults.jsonl)
        self.control = control  # controller.api.ControlClient (only for slo)
        self.history: list[FaultResult] = []
        self.current_cpu: dict[str, float] = {}  # CPU shares changed by cpu_squeeze
        self.hogs: list[subprocess.Popen] = []  # cpu_hog processes (each ends by itself; close() kills the rest)

    def apply(self, ev: Event, source: str = "scenario") -> FaultResult:
        """Inject one event; failures are recorded (ok=false) and returned, never raised, so a
        bad injection does not tear down a run that is otherwise fine."""
        attrs: dict[str, Any] = {"kind": ev.kind, "source": source, "at_s": ev.at_s}
        for k in ("link", "server", "bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "cpu_share",
                  "memory_mb", "slo_class", "slo_ttft_ms", "slo_tpot_ms", "process", "cores", "duration_s"):
            v = getattr(ev, k)
            if v is not None:
                attrs[k] = list(v) if k == "link" else v
        t0 = time.monotonic_ns()
        error = None
        try:
            attrs.update(self._do(ev) or {})
        except Exception as exc:  # recorded, not raised: the run goes on
            error = f"{type(exc).__name__}: {exc}"[:500]
        attrs["apply_ms"] = round((time.monotonic_ns() - t0) / 1e6, 3)
        attrs["ok"] = error is None
        if error:
            attrs["error"] = error
        if self.trace is not None:
            self.trace.event("fault", t_ns=t0, **attrs)
        res = FaultResult(ev.kind, error is None, attrs, error)
        self.history.append(res)
        return res

    # ---- the kinds ---------------------------------------------------------------------------
    def _do(self, ev: Event) -> dict[str, Any] | None:
        k = ev.kind
        if k == "link_down":
            self.net.links_down(*ev.link)
        elif k == "link_up":
            self.net.links_up(*ev.link)
        elif k == "bw":
            self.net.set_bw(*ev.link, ev.bw_mbit)
        elif k == "delay":
            self.net.set_delay(*ev.link, ev.delay_ms, ev.jitter_ms)
        elif k == "loss":
            self.net.set_loss(*ev.link, ev.loss_pct)
        elif k == "restore":
            return self._restore(ev.link)
        elif k == "server_crash":
            return {"killed": self.procs.kill_server(ev.server, ev.process)}
        elif k == "server_restart":
            return {"started": self.procs.start_server(ev.server)}
        elif k == "cpu_squeeze":
            return self._cpu(ev.server, ev.cpu_share)
        elif k == "mem_squeeze":
            return self._mem(ev.server, ev.memory_mb)
        elif k == "cpu_hog":
            return self._hog(ev.server, int(ev.cores), ev.duration_s)
        elif k == "slo":
            if self.control is None:
                raise ConfigError("slo event: no controller control API to send SET_SLO to")
            args = {"slo_class": ev.slo_class}
            if ev.slo_ttft_ms is not None:
                args["slo_ttft_ms"] = ev.slo_ttft_ms
            if ev.slo_tpot_ms is not None:
                args["slo_tpot_ms"] = ev.slo_tpot_ms
            return {"reply": self.control.call("SET_SLO", **args)}
        else:  # pragma: no cover - EVENT_FIELDS and this list are kept together
            raise ConfigError(f"no injector for event kind {k!r}")
        return None

    def _restore(self, link: tuple[str, str]) -> dict[str, Any]:
        """Back to the link as the topology file describes it (bw, delay, jitter, loss, state)."""
        a, b = link
        orig = self.original.link(a, b)
        cur = self.net.topo.link(a, b)
        done = []
        if cur.bw_mbit != orig.bw_mbit:
            self.net.set_bw(a, b, orig.bw_mbit)
            done.append("bw")
        if (cur.delay_ms, cur.jitter_ms) != (orig.delay_ms, orig.jitter_ms):
            self.net.set_delay(a, b, orig.delay_ms, orig.jitter_ms)
            done.append("delay")
        if cur.loss_pct != orig.loss_pct:
            self.net.set_loss(a, b, orig.loss_pct)
            done.append("loss")
        if cur.up != orig.up:
            (self.net.links_up if orig.up else self.net.links_down)(a, b)
            done.append("state")
        return {"restored": done}

    def _cpu(self, server: str, share: float) -> dict[str, Any]:
        """Change the host's CFS quota (Mininet CPULimitedHost) to `share` of the machine."""
        host = self.net.host(server)
        if not hasattr(host, "setCPUFrac"):
            raise ConfigError(f"server {server}: its host has no CPU cgroup (built with cpu_limits off?)")
        before = self.current_cpu.get(server, self.original.server(server).cpu_share)
        host.setCPUFrac(share, sched="cfs")
        self.current_cpu[server] = share
        return {"cpu_share_before": before}

    def _hog(self, server: str | None, cores: int, duration_s: float) -> dict[str, Any]:
        """Busy processes on `cores` cores for duration_s (testbed.hog): in the server's host (its
        namespace and cgroups: they compete with its agent and entry), or on the machine."""
        argv = [sys.executable, "-m", "testbed.hog", str(cores), f"{duration_s:g}"]
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if server is not None:
            p = self.net.popen(server, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        self.hogs = [h for h in self.hogs if h.poll() is None] + [p]
        return {"hog_pid": p.pid, "where": server or "machine"}

    def close(self) -> None:
        """Kill what cpu_hog events left running (their workers would end at their deadline anyway)."""
        for p in self.hogs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait(5)
        self.hogs = []

    def _mem(self, server: str, memory_mb: float) -> dict[str, Any]:
        """Lower (or raise) the server's memory cgroup limit to memory_mb + agent_overhead_mb."""
        name = self.net.mn_name[server]
        limit = int((memory_mb + self.original.agent_overhead_mb) * MIB)
        r = subprocess.run(["cgset", "-r", f"memory.limit_in_bytes={limit}", f"/{name}"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"server {server}: cgset memory.limit_in_bytes={limit} failed: "
                               f"{(r.stderr or r.stdout).strip()[:300]}")
        return {"cgroup_limit_bytes": limit}

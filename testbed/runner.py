"""`coel run`: one scenario end to end in Mininet, written to a run folder.

Division of labour: the Scenario says what happens (testbed/scenario.py), TestbedNet builds and
changes the network (netbuild.py), the FaultInjector turns events into changes (faults.py), and
this module sequences the processes of the runtime contract (controller, agents, entries,
clients, each `python -m <module>` in its Mininet host), samples link byte counters, takes
`coel inject` commands, and always tears everything down and writes the report.

Run folder  runs/<YYYYmmdd-HHMMSS>-<scenario>-<digest>/:
  scenario.yaml, scenario.json  the resolved scenario (its digest names the folder)
  meta.json                     emulation mode in force, strategy, static, topology, model, versions,
                                processes, outcome
  raw/*.jsonl                   per-process traces (+ testbed-faults.jsonl, testbed-net.jsonl,
                                testbed-links.jsonl)
  logs/*.log                    stdout/stderr of every process
  keys/, linkemu/               CURVE keys, per-host delay files
  inject.jsonl                  commands from `coel inject` (and inject-results.jsonl)
  summary.json, summary.csv, trace.json, spans.jsonl, *.png   (testbed/report.py)
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coel_model.errors import CoelError, ConfigError, InfeasibleError
from testbed.scenario import Scenario, check_against_topology

REPO = Path(__file__).resolve().parents[1]
CONTROLLER_PORT = 7000
AGENT_PORT = 7100
ENTRY_PORT = 7200
HTTP_PORT = 8000  # each entry: OpenAI-compatible API + /metrics (nodes/http_front.py); controller: /metrics
LINK_SAMPLE_S = 0.5
STATUS_POLL_S = 1.0
IPC_PATH_MAX = 100  # sockaddr_un holds 108 bytes


@dataclass(frozen=True)
class RunOptions:
    """How to run a scenario (None = what the scenario says)."""
    out_dir: Path = Path("runs")
    static: bool | None = None
    duration_s: float | None = None
    drain_s: float | None = None
    emulation: str | None = None
    model: str | None = None
    profile: str | None = None
    strategy: str | None = None
    topology: str | None = None
    serving_timeout_s: float = 300.0  # start-up: torch imports + quantize + deploy on 2 shared cores
    heartbeat_s: float = 0.2
    entry_call_timeout_s: float = 1.0
    no_compression: bool = False
    live_progress: bool | None = None  # None = when stderr is a terminal
    cpu_limits: bool = True
    memory_limits: bool = True
    extra_controller_args: tuple[str, ...] = ()
    cluster: str | None = None  # cluster.yaml: the topology across machines (testbed/clusternet.py)

    def __post_init__(self) -> None:
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(f"--duration-s must be > 0 (got {self.duration_s})")
        if self.serving_timeout_s <= 0:
            raise ConfigError(f"serving timeout must be > 0 (got {self.serving_timeout_s})")


def resolve_scenario(sc: Scenario, opt: RunOptions) -> Scenario:
    """The scenario as it will run: command-line overrides folded in (they change the digest)."""
    sc = sc.with_overrides(static=opt.static, duration_s=opt.duration_s, drain_s=opt.drain_s,
                           emulation=opt.emulation, model=opt.model, profile=opt.profile,
                           strategy=opt.strategy, topology=opt.topology)
    late = [e for e in sc.events if e.at_s > sc.duration_s]
    if late:
        raise ConfigError(f"scenario {sc.name}: {len(late)} event(s) after the traffic ends "
                          f"(duration_s {sc.duration_s:g} s; first at {late[0].at_s:g} s): "
                          "lengthen --duration-s")
    return sc


def project_path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (REPO / q if not q.exists() else q.resolve())


def make_run_dir(sc: Scenario, out_dir: Path, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    base = Path(out_dir) / f"{stamp}-{sc.name}-{sc.digest()}"
    run, i = base, 1
    while run.exists():  # two runs of one scenario within a second
        i += 1
        run = base.with_name(f"{base.name}.{i}")
    (run / "raw").mkdir(parents=True)
    (run / "logs").mkdir()
    return run.resolve()


def write_resolved_scenario(sc: Scenario, run: Path) -> None:
    import yaml
    d = json.loads(json.dumps(sc.to_dict(), default=list))
    for ev in d["events"]:
        for k in [k for k, v in ev.items() if v is None]:
            del ev[k]
    (run / "scenario.json").write_text(json.dumps(d, indent=2) + "\n")
    (run / "scenario.yaml").write_text(f"# resolved scenario, digest {sc.digest()}\n" +
                                       yaml.safe_dump(d, sort_keys=False))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "kernel": platform.release()}
    for mod in ("torch", "zmq", "mininet", "numpy"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", getattr(m, "VERSION", "?")))
        except Exception:  # a missing optional module is just not listed
            pass
    try:
        out["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return out


@dataclass
class Proc:
    host: str
    role: str  # controller | agent | entry | client
    argv: list[str]
    log: Path
    popen: subprocess.Popen | None = None
    starts: int = 0

    @property
    def key(self) -> str:
        return f"{self.host}-{self.role}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def log_tail(path: Path, n_lines: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    | " + line for line in lines[-n_lines:]) or "    | (empty log)"


class RunError(CoelError):
    """A run could not start or went wrong in a way the user must act on."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any] | None
    outcome: str
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs one resolved scenario; use run() (it always cleans up)."""

    def __init__(self, sc: Scenario, opt: RunOptions, run_dir: Path | None = None, stream: Any = None):
        from topologies import load_topology
        self.sc = sc
        self.opt = opt
        self.stream = stream or sys.stderr
        topo_arg = sc.topology
        if topo_arg.endswith((".yaml", ".yml")) and not Path(topo_arg).exists():
            topo_arg = str(project_path(topo_arg))  # relative to the project, like model paths
        self.topo = load_topology(topo_arg)
        check_against_topology(sc, self.topo, f"scenario {sc.name}")
        self.model_dir = project_path(sc.model)
        if not (self.model_dir / "config.json").exists():
            raise ConfigError(f"scenario {sc.name}: model {sc.model!r} not found (no {self.model_dir}/config.json);"
                              " pass --model DIR")
        self.profile = str(project_path(sc.profile)) if sc.profile else None
        if self.profile and not Path(self.profile).exists():
            raise ConfigError(f"scenario {sc.name}: profile {self.profile} not found")
        if not self.topo.clients:
            raise ConfigError(f"topology {self.topo.name}: no clients, so no traffic to run")
        self.entries = sorted({c.entry for c in self.topo.clients})
        self.cluster = self.placement = None
        if opt.cluster:  # checked before anything starts: file:line errors
            from testbed.cluster import load_cluster, resolve_placement
            self.cluster = load_cluster(opt.cluster)
            self.placement = resolve_placement(self.cluster, self.topo)
        if sc.workload.trace_csv:  # refuse a bad trace before anything starts
            from nodes.workload import read_trace_csv
            read_trace_csv(project_path(sc.workload.trace_csv), sc.duration_s)
        self.run_dir = run_dir or make_run_dir(sc, opt.out_dir)
        self.raw = self.run_dir / "raw"
        self.procs: dict[str, Proc] = {}
        self.net = None
        self.control = None
        self.injector = None
        self.fault_trace = None
        self.link_trace = None
        self.meta: dict[str, Any] = {}
        self.t_traffic_ns: int | None = None
        self.last_status: dict[str, Any] | None = None
        self._inject_offset = 0

    # ---- helpers -----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _control_endpoint(self) -> str:
        path = self.run_dir / "control.sock"
        if len(str(path)) > IPC_PATH_MAX:  # unix socket paths are short: use a link-free tmp name
            path = Path("/tmp") / f"coel-{self.run_dir.name[-40:]}-{os.getpid()}.sock"
            (self.run_dir / "control.sock.path").write_text(str(path) + "\n")
        return f"ipc://{path}"

    def _py(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-u", "-m", module, *args]

    def _launch(self, p: Proc) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        env.pop("COEL_LINKEMU_FILE", None)  # the delay file is COEL_DELAY_FILE (set by netbuild)
        fh = open(p.log, "a")
        fh.write(f"=== start {p.starts + 1} at monotonic {time.monotonic():.3f}: {' '.join(p.argv)}\n")
        fh.flush()
        try:
            p.popen = self.net.popen(p.host, p.argv, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        finally:
            fh.close()
        p.starts += 1

    def _add(self, host: str, role: str, argv: list[str]) -> Proc:
        p = Proc(host, role, argv, self.run_dir / "logs" / f"{host}-{role}.log")
        self.procs[p.key] = p
        return p

    # ---- ProcessControl for the fault injector ------------------------------------------------
    def kill_server(self, server: str, process: str | None = None) -> list[str]:
        killed = []
        for role in (("agent", "entry") if process is None else (process,)):
            p = self.procs.get(f"{server}-{role}")
            if p is not None and p.alive():
                p.popen.send_signal(signal.SIGKILL)
                p.popen.wait(10)
                killed.append(role)
        if not killed:
            raise RunError(f"server_crash {server}: no running {process or 'agent or entry'} on it")
        return killed

    def start_server(self, server: str) -> list[str]:
        started = []
        for role in ("agent", "entry"):
            p = self.procs.get(f"{server}-{role}")
            if p is not None and not p.alive():
                self._launch(p)
                started.append(role)
        if not started:
            raise RunError(f"server_restart {server}: its agent and entry are already running")
        return started

    # ---- phases ------------------------------------------------------------------------------
    def _build_net(self) -> None:
        from nodes.security import make_keys
        from testbed.netbuild import TestbedNet
        from common.tracing import TraceWriter
        kw = dict(mode=self.sc.emulation, trace=TraceWriter(self.raw / "testbed-net.jsonl", "testbed"),
                  cpu_limits=self.opt.cpu_limits, memory_limits=self.opt.memory_limits)
        if self.cluster is not None:
            from testbed.clusternet import ClusterNet
            self.net = ClusterNet(self.topo, self.run_dir, self.cluster, self.placement, **kw)
        else:
            self.net = TestbedNet(self.topo, self.run_dir, **kw)
        t0 = time.monotonic()
        self.net.start()
        self.meta["net_build_s"] = round(time.monotonic() - t0, 2)
        self.meta["emulation_mode"] = self.net.mode
        self.meta["mininet_prefix"] = self.net.prefix
        self.meta["shell_pids"] = {h: self.net.pid(h) for h in self.topo.hosts}
        make_keys(self.run_dir / "keys")
        if self.cluster is not None:
            self.net.push_keys(self.run_dir / "keys")
            self.meta.update(self.net.run_meta())
        self._write_meta()

    def _start_services(self) -> None:
        run, raw, keys = self.run_dir, self.raw, str(self.run_dir / "keys")
        ctl = self.topo.controller.name
        ctl_ep = f"tcp://{self.net.ip(ctl)}:{CONTROLLER_PORT}"
        self.control_ep = self._control_endpoint()
        servers = [s.name for s in self.topo.servers]
        args = ["--run-dir", str(run), "--topology", str(self.topo.source), "--model", str(self.model_dir),
                "--strategy", self.sc.strategy, "--listen", ctl_ep, "--control", self.control_ep,
                "--keys", keys, "--expect-agents", ",".join(servers), "--expect-entries", ",".join(self.entries),
                "--heartbeat-s", str(self.opt.heartbeat_s), "--trace", str(raw / f"{ctl}-controller.jsonl"),
                "--register-timeout-s", str(self.opt.serving_timeout_s),
                "--delay-file", str(self.net.delay_file(ctl))]
        if self.profile:
            args += ["--profile", self.profile]
        if self.sc.static:
            args.append("--static")
        if self.sc.replan_interval_s > 0:
            args += ["--replan-interval-s", str(self.sc.replan_interval_s)]
        if self.opt.no_compression:
            args.append("--no-compression")
        args += ["--metrics", f"{self.net.ip(ctl)}:{HTTP_PORT}"]
        self.meta["metrics"] = {ctl: f"http://{self.net.ip(ctl)}:{HTTP_PORT}/metrics"}
        args += list(self.opt.extra_controller_args)
        self._launch(self._add(ctl, "controller", self._py("controller.service", *args)))
        for s in self.topo.servers:
            ip = self.net.ip(s.name)
            self._launch(self._add(s.name, "agent", self._py(
                "nodes.agent", "--endpoint", f"tcp://{ip}:{AGENT_PORT}", "--memory-mb", f"{s.memory_mb:g}",
                "--threads", "1", "--controller", ctl_ep, "--keys", keys, "--name", s.name,
                "--heartbeat-s", str(self.opt.heartbeat_s), "--trace-out", str(raw / f"{s.name}-agent.jsonl"),
                "--delay-file", str(self.net.delay_file(s.name)))))
        for e in self.entries:
            ip = self.net.ip(e)
            self._launch(self._add(e, "entry", self._py(
                "nodes.entry", "--name", e, "--listen", f"tcp://{ip}:{ENTRY_PORT}", "--controller", ctl_ep,
                "--model", str(self.model_dir), "--keys", keys, "--trace", str(raw / f"{e}-entry.jsonl"),
                "--heartbeat-s", str(self.opt.heartbeat_s), "--call-timeout-s", str(self.opt.entry_call_timeout_s),
                "--delay-file", str(self.net.delay_file(e)), "--http", f"{ip}:{HTTP_PORT}")))
        self.meta["http_api"] = {e: f"http://{self.net.ip(e)}:{HTTP_PORT}/v1" for e in self.entries}
        self.meta["metrics"].update({e: f"http://{self.net.ip(e)}:{HTTP_PORT}/metrics" for e in self.entries})

    def _wait_serving(self) -> dict[str, Any]:
        from controller.api import ControlClient, ControlError
        self.control = ControlClient(self.control_ep, timeout_s=3.0)
        deadline = time.monotonic() + self.opt.serving_timeout_s
        last: dict[str, Any] | None = None
        t_say = 0.0
        while time.monotonic() < deadline:
            dead = [p for p in self.procs.values() if p.popen is not None and p.popen.poll() is not None]
            if dead:
                p = dead[0]
                raise RunError(f"{p.role} on {p.host} exited (code {p.popen.returncode}) before the controller "
                               f"was serving; last lines of {p.log}:\n{log_tail(p.log)}")
            try:
                last = self.control.call("STATUS", timeout_s=3.0)
            except ControlError:
                pass  # not up yet (importing torch, loading the model): keep the last answer
            if last is not None:
                if last.get("state") == "serving":
                    return last
                if last.get("state") == "failed":
                    p = self.procs[f"{self.topo.controller.name}-controller"]
                    raise RunError(f"controller failed: {last.get('error')}; last lines of {p.log}:\n"
                                   f"{log_tail(p.log)}")
            if time.monotonic() - t_say > 10:
                t_say = time.monotonic()
                self.say(f"waiting for the controller: state {last.get('state') if last else 'not answering'}")
            time.sleep(0.5)
        raise RunError(self._not_serving_message(last))

    def _not_serving_message(self, last: dict[str, Any] | None) -> str:
        state = last.get("state") if last else "no answer on the control API"
        registered = set((last or {}).get("agents", {})) | {f"entry {n}" for n in (last or {}).get("entries", {})}
        missing = [p for p in self.procs.values()
                   if p.role in ("agent", "entry") and
                   (p.host if p.role == "agent" else f"entry {p.host}") not in registered]
        ctl = self.procs[f"{self.topo.controller.name}-controller"]
        who = missing or [ctl]
        parts = [f"controller not serving after {self.opt.serving_timeout_s:g} s (state: {state}); "
                 f"not registered: {', '.join(p.key for p in missing) or 'none (controller stuck)'}"]
        for p in who[:3]:
            parts.append(f"last lines of {p.log}:\n{log_tail(p.log)}")
        return "\n".join(parts)

    def _start_clients(self) -> None:
        w = self.sc.workload
        for i, c in enumerate(self.topo.clients):
            wl = c.workload
            rate = wl.rate_rps * w.rate_scale
            if w.api == "openai":
                module, target = "nodes.http_client", ["--base-url",
                                                       f"http://{self.net.ip(c.entry)}:{HTTP_PORT}/v1"]
            else:
                module, target = "nodes.client", ["--entry", f"tcp://{self.net.ip(c.entry)}:{ENTRY_PORT}",
                                                  "--keys", str(self.run_dir / "keys")]
            extra = ["--trace-csv", str(project_path(w.trace_csv))] if w.trace_csv else []
            self._launch(self._add(c.name, "client", self._py(
                module, "--name", c.name, *target, "--rate-rps", f"{rate:g}",
                "--prompt-tokens", str(w.prompt_tokens or wl.prompt_tokens),
                "--max-new-tokens", str(w.max_new_tokens or wl.max_new_tokens),
                "--slo-class", wl.slo_class, "--duration-s", f"{self.sc.duration_s:g}",
                "--drain-s", f"{self.sc.drain_s:g}", "--seed", str(self.sc.seed * 1000 + i),
                "--model", str(self.model_dir), "--trace", str(self.raw / f"{c.name}-client.jsonl"),
                "--delay-file", str(self.net.delay_file(c.name)), *extra)))

    # ---- link counters -------------------------------------------------------------------------
    def _link_counter_sources(self) -> list[tuple[str, str, str]]:
        """(name, /proc/<pid>/net/dev path, interface) per link: the host end when there is one
        (its namespace's counters), else the switch port in the root namespace."""
        out = []
        for link in self.topo.links:
            _, ends = self.net._link(link.a, link.b)
            ends = [e for e in ends if e.pid is None or isinstance(e.pid, int)]  # on this machine
            if not ends:
                continue
            end = next((e for e in ends if not e.is_switch), ends[0])
            dev = f"/proc/{end.pid}/net/dev" if end.pid else "/proc/self/net/dev"
            out.append((f"{link.a}-{link.b}", dev, end.intf))
        return out

    @staticmethod
    def _read_net_dev(path: str) -> dict[str, int]:
        out = {}
        try:
            with open(path) as fh:
                for line in fh.readlines()[2:]:
                    name, _, rest = line.partition(":")
                    f = rest.split()
                    if len(f) >= 9:
                        out[name.strip()] = int(f[0]) + int(f[8])  # rx_bytes + tx_bytes
        except OSError:
            pass
        return out

    def _sample_links(self, sources: list[tuple[str, str, str]]) -> None:
        t = time.monotonic_ns()
        cache: dict[str, dict[str, int]] = {}
        for name, dev, intf in sources:
            if dev not in cache:
                cache[dev] = self._read_net_dev(dev)
            v = cache[dev].get(intf)
            if v is not None:
                self.link_trace.counter(f"link_bytes:{name}", v, t_ns=t)

    # ---- coel inject channel -------------------------------------------------------------------
    def _poll_inject(self) -> None:
        from testbed.faults import event_from_dict
        path = self.run_dir / "inject.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as fh:
            fh.seek(self._inject_offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._inject_offset += end + 1
        for line in chunk[:end].splitlines():
            if not line.strip():
                continue
            res: dict[str, Any]
            try:
                cmd = json.loads(line)
                ev = event_from_dict(cmd.get("event", {}), "coel inject")
                check_against_topology(replace(self.sc, events=(ev,)), self.topo, "coel inject")
                r = self.injector.apply(ev, source="inject")
                self.progress.note(f"injected {ev.describe()}" + ("" if r.ok else f" FAILED: {r.error}"))
                res = {"id": cmd.get("id"), "ok": r.ok, "error": r.error, "attrs": r.attrs}
            except (CoelError, json.JSONDecodeError, AttributeError, TypeError) as exc:
                res = {"id": None, "ok": False, "error": str(exc)}
                try:
                    res["id"] = json.loads(line).get("id")
                except Exception:
                    pass
            with open(self.run_dir / "inject-results.jsonl", "a") as fh:
                fh.write(json.dumps(res, default=str) + "\n")

    # ---- the run ---------------------------------------------------------------------------------
    def _traffic(self) -> str:
        from testbed.faults import FaultInjector
        from testbed.progress import RunProgress
        from common.tracing import TraceWriter
        self.fault_trace = TraceWriter(self.raw / "testbed-faults.jsonl", "testbed")
        self.injector = FaultInjector(self.net, self, self.topo, self.fault_trace, self.control)
        self.progress = RunProgress(self.sc.name, self.sc.duration_s, self.raw, live=self.opt.live_progress,
                                    stream=self.stream)
        sources = self._link_counter_sources()
        self._sample_links(sources)
        self._start_clients()
        self.t_traffic_ns = time.monotonic_ns()
        self.fault_trace.event("traffic_start", t_ns=self.t_traffic_ns, duration_s=self.sc.duration_s)
        (self.run_dir / "runner.pid").write_text(f"{os.getpid()}\n")
        self.progress.start()
        t0 = time.monotonic()
        pending = list(self.sc.events)
        next_sample = t0 + LINK_SAMPLE_S
        next_status = t0
        hard_end = t0 + self.sc.duration_s + self.sc.drain_s + 30.0
        clients = [p for p in self.procs.values() if p.role == "client"]
        outcome = "completed"
        try:
            while True:
                now = time.monotonic()
                while pending and now - t0 >= pending[0].at_s:
                    ev = pending.pop(0)
                    r = self.injector.apply(ev)
                    self.progress.note(ev.describe() + ("" if r.ok else f" FAILED: {r.error}"))
                self._poll_inject()
                if now >= next_sample:
                    self._sample_links(sources)
                    next_sample += LINK_SAMPLE_S
                    if next_sample < now:
                        next_sample = now + LINK_SAMPLE_S
                if now >= next_status:
                    next_status = now + STATUS_POLL_S
                    try:
                        self.last_status = self.control.call("STATUS", timeout_s=1.0)
                    except CoelError:
                        pass
                self.progress.update((self.last_status or {}).get("redeployments"))
                if all(not p.alive() for p in clients) and not pending:
                    break
                if now > hard_end:
                    outcome = "clients did not exit in time"
                    break
                ctl = self.procs[f"{self.topo.controller.name}-controller"]
                if not ctl.alive():
                    outcome = f"controller exited (code {ctl.popen.returncode})"
                    break
                time.sleep(0.1)
            self._sample_links(sources)
        finally:
            self.progress.stop()
        bad = {p.host: p.popen.returncode for p in clients if p.popen and p.popen.returncode not in (0, None)}
        if bad and outcome == "completed":
            outcome = f"clients exited with errors: {bad}"
        return outcome

    def _stop_processes(self) -> None:
        if self.control is not None:
            try:
                self.control.call("SHUTDOWN", timeout_s=1.0)
            except CoelError:
                pass
        order = [p for role in ("client", "entry", "agent", "controller")
                 for p in self.procs.values() if p.role == role]
        for p in order:
            if p.alive():
                try:
                    p.popen.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5.0
        for p in order:
            if p.popen is None:
                continue
            try:
                p.popen.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                try:
                    p.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.control is not None:
            self.control.close()
            self.control = None

    def _write_meta(self, **extra: Any) -> None:
        self.meta.update(extra)
        (self.run_dir / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")

    def run(self) -> RunResult:
        from testbed.report import build_report
        from common.tracing import TraceWriter
        write_resolved_scenario(self.sc, self.run_dir)
        self.link_trace = TraceWriter(self.raw / "testbed-links.jsonl", "testbed")
        self.meta = {"scenario": self.sc.name, "digest": self.sc.digest(), "emulation_requested": self.sc.emulation,
                     "emulation_mode": None, "strategy": self.sc.strategy, "static": self.sc.static,
                     "topology": self.topo.name, "topology_source": str(self.topo.source),
                     "model": str(self.model_dir), "profile": self.profile, "duration_s": self.sc.duration_s,
                     "drain_s": self.sc.drain_s, "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "runner_pid": os.getpid(), "entries": self.entries}
        self._write_meta()
        outcome, error = "failed", None
        try:
            self.say(f"run folder {self.run_dir}")
            self._build_net()
            self.say(f"network up ({self.net.mode} link emulation, {self.meta['net_build_s']} s); starting "
                     f"controller, {len(self.topo.servers)} agents, {len(self.entries)} entries")
            self._start_services()
            t0 = time.monotonic()
            st = self._wait_serving()
            self.meta["serving_after_s"] = round(time.monotonic() - t0, 1)
            self.meta["initial_plan_summary"] = st.get("plan_summary")
            try:
                self.meta["initial_plan"] = self.control.call("PLAN", timeout_s=5.0)
            except CoelError:
                pass
            self._write_meta()
            self.say(f"serving after {self.meta['serving_after_s']} s; traffic for {self.sc.duration_s:g} s "
                     f"(+ drain up to {self.sc.drain_s:g} s), {len(self.sc.events)} scheduled events")
            outcome = self._traffic()
            try:
                self.meta["final_plan"] = self.control.call("PLAN", timeout_s=5.0)
                self.meta["final_status"] = self.control.call("STATUS", timeout_s=5.0)
            except CoelError:
                pass
        except KeyboardInterrupt:
            outcome = "interrupted"
        except CoelError as exc:
            outcome, error = "failed", str(exc)
        except Exception as exc:  # a bug: still clean up and keep what was recorded
            outcome, error = "crashed", f"{type(exc).__name__}: {exc}"
        finally:
            if self.injector is not None:
                self.injector.close()  # cpu_hog processes
            self._stop_processes()
            if self.cluster is not None and self.net is not None and self.net.prefix:
                self.net.collect(self.raw)  # other machines' traces, onto our clock
            if self.net is not None:
                self.net.stop()
            (self.run_dir / "runner.pid").unlink(missing_ok=True)
            if getattr(self, "control_ep", "").startswith("ipc://"):
                Path(self.control_ep[len("ipc://"):]).unlink(missing_ok=True)  # the dead controller's socket
            for w in (self.fault_trace, getattr(self.net, "trace", None)):
                if w is not None:
                    w.close()
            if self.link_trace is not None:
                self.link_trace.close()
            self._write_meta(outcome=outcome, error=error, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             traffic_start_ns=self.t_traffic_ns,
                             processes={k: {"host": p.host, "role": p.role, "starts": p.starts,
                                            "pid": p.popen.pid if p.popen else None,
                                            "returncode": p.popen.returncode if p.popen else None}
                                        for k, p in self.procs.items()})
        summary = None
        if any(self.raw.glob("*.jsonl")):
            try:
                summary = build_report(self.run_dir)
            except Exception as exc:  # the raw traces stay; `coel report` can be re-run after a fix
                error = (error + "; " if error else "") + f"report: {type(exc).__name__}: {exc}"
        return RunResult(self.run_dir, summary, outcome, error, self.meta)


def run_scenario(sc: Scenario, opt: RunOptions, stream: Any = None) -> RunResult:
    """Resolve, check, run; the run folder exists (with meta.json) even when the run fails."""
    from testbed.netbuild import check_can_build
    sc = resolve_scenario(sc, opt)
    check_can_build()
    return Runner(sc, opt, stream=stream).run()


# ---- coel inject (client side) --------------------------------------------------------------------
def send_inject(run_dir: Path, event: dict[str, Any], wait_s: float = 10.0) -> dict[str, Any]:
    """Append an inject command to a running run's inject.jsonl and wait for the runner's result."""
    import uuid
    from testbed.faults import event_from_dict
    run_dir = Path(run_dir)
    if not (run_dir / "meta.json").exists():
        raise ConfigError(f"{run_dir}: not a run folder (no meta.json)")
    event_from_dict(event, "coel inject")  # fail fast on bad input, before touching the run
    pid_file = run_dir / "runner.pid"
    if not pid_file.exists():
        raise InfeasibleError(f"{run_dir}: no runner.pid: the run is not in its traffic phase (finished, "
                              "or still starting)")
    pid = int(pid_file.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        raise InfeasibleError(f"{run_dir}: its runner (pid {pid}) is not running") from None
    cid = uuid.uuid4().hex[:12]
    line = json.dumps({"id": cid, "event": event, "t": time.time()}) + "\n"
    with open(run_dir / "inject.jsonl", "a") as fh:  # one short write: appends do not interleave
        fh.write(line)
    res_path = run_dir / "inject-results.jsonl"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if res_path.exists():
            for l in res_path.read_text().splitlines():
                try:
                    r = json.loads(l)
                except json.JSONDecodeError:
                    continue
                if r.get("id") == cid:
                    return r
        time.sleep(0.1)
    raise InfeasibleError(f"{run_dir}: the runner did not pick up the command within {wait_s:g} s")


# ---- a small random model for tests and development (the bundled one is trained elsewhere) -------
def make_random_model(out_dir: Path, d_model: int = 128, n_layers: int = 3, n_experts: int = 8,
                      expert_hidden: int = 512, vocab_size: int = 512, seed: int = 0) -> Path:
    """An untrained MoE checkpoint (fp16) + a BPE tokenizer trained on the calibration split, so
    the full stack (clients tokenize real prompts) runs without the bundled model. Experts are
    sized so that the model does not fit the smallest edge-star-5 server alone."""
    import torch

    from coel_model.checkpoint import save_model
    from coel_model.config import MoEConfig
    from coel_model.corpus import REPO_DATA_DIR, read_split_file
    from coel_model.model import MoEModel, init_weights
    from coel_model.tokenizer import train_tokenizer
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    texts = read_split_file(REPO_DATA_DIR / "calib.txt")[:200]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    cfg = MoEConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                    n_experts=n_experts, top_k=2, expert_hidden=expert_hidden, max_seq_len=512,
                    bos_token_id=-1, eos_token_id=0)
    torch.manual_seed(seed)
    model = MoEModel(cfg)
    init_weights(model, seed=seed)
    save_model(model, out_dir, dtype=torch.float16)
    tok.save(out_dir / "tokenizer.json")
    return out_dir

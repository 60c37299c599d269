"""`coel forward RUN`: reach a running testbed's HTTP endpoints from the machine itself.

Every entry serves the OpenAI-compatible API and /metrics on port 8000 of its Mininet host, the
controller serves /metrics there too (meta.json "http_api", "metrics"). Mininet hosts live in
their own network namespaces, which the root namespace cannot reach; so this listens on
127.0.0.1 (controller on --base-port, entries on the next ports in name order) and relays each
accepted connection into the target host's namespace: `mnexec -a <host shell pid>` runs a small
relay there (stdin/stdout <-> TCP to the target). It also writes RUN/prometheus.yml, a scrape
config for exactly these local ports, so a Prometheus (and the Grafana dashboard in
docs/monitoring/) on the machine can watch the run. Stops on Ctrl-C or when the run ends.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from coel_model.errors import ConfigError, InfeasibleError

# runs inside the target namespace: bytes on stdin go to the TCP peer, the peer's bytes to stdout
RELAY = """
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(None)
def up():
    while True:
        b = os.read(0, 65536)
        if not b:
            break
        s.sendall(b)
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    os.write(1, b)
"""


@dataclass(frozen=True)
class Target:
    host: str  # Mininet host name
    role: str  # controller | entry
    ip: str
    port: int
    pid: int  # the host's shell: its namespaces
    local_port: int


def run_targets(run_dir: Path, base_port: int) -> list[Target]:
    """The run's HTTP endpoints (controller first, then entries by name) and their local ports."""
    meta_path = Path(run_dir) / "meta.json"
    if not meta_path.exists():
        raise ConfigError(f"{run_dir}: not a run folder (no meta.json)")
    meta = json.loads(meta_path.read_text())
    urls = meta.get("metrics") or {}
    pids = meta.get("shell_pids") or {}
    if not urls or not pids:
        raise InfeasibleError(f"{run_dir}: meta.json lists no HTTP endpoints yet (the run is still starting, "
                              "or it predates the HTTP front)")
    entries = set(meta.get("entries") or [])
    hosts = sorted(urls, key=lambda h: (h in entries, h))
    out = []
    for i, h in enumerate(hosts):
        u = urlparse(urls[h])
        if h not in pids:
            raise InfeasibleError(f"{run_dir}: no shell pid for host {h} in meta.json")
        out.append(Target(h, "entry" if h in entries else "controller", u.hostname or "", u.port or 80,
                          int(pids[h]), base_port + i))
    return out


def prometheus_config(run_name: str, targets: list[Target], bind: str = "127.0.0.1",
                      scrape_interval_s: float = 1.0) -> str:
    """A Prometheus scrape config for the forwarded ports (YAML text)."""
    lines = [f"# written by `coel forward` for run {run_name}: targets are the local ends of its relays",
             "global:", f"  scrape_interval: {scrape_interval_s:g}s", "  evaluation_interval: 5s",
             "scrape_configs:"]
    for role in ("controller", "entry"):
        ts = [t for t in targets if t.role == role]
        if not ts:
            continue
        lines += [f"  - job_name: coel-{role}", "    static_configs:"]
        for t in ts:
            lines.append(f"      - targets: ['{bind}:{t.local_port}']")
            lines.append(f"        labels: {{host: {t.host}, run: '{run_name}'}}")
    return "\n".join(lines) + "\n"


def _pump_in(conn: socket.socket, proc: subprocess.Popen) -> None:
    try:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            proc.stdin.write(b)
            proc.stdin.flush()
    except (OSError, ValueError):
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _serve_conn(conn: socket.socket, t: Target) -> None:
    proc = subprocess.Popen(["mnexec", "-a", str(t.pid), sys.executable, "-c", RELAY, t.ip, str(t.port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    threading.Thread(target=_pump_in, args=(conn, proc), daemon=True).start()
    try:
        while True:
            b = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
            if not b:
                break
            conn.sendall(b)
    except OSError:
        pass
    finally:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
        proc.kill()
        proc.wait(5)


class Forwarder:
    """Listens on bind:local_port for every target; relays connections until stop()."""

    def __init__(self, targets: list[Target], bind: str = "127.0.0.1"):
        self.targets, self.bind = targets, bind
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        try:
            for t in targets:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind, t.local_port))
                s.listen(64)
                s.settimeout(0.2)
                self.socks.append(s)
        except OSError as exc:
            self.stop()
            raise ConfigError(f"coel forward: cannot listen on {bind}:{t.local_port}: {exc} "
                              f"(choose another --base-port)") from None
        for s, t in zip(self.socks, targets):
            threading.Thread(target=self._accept, args=(s, t), daemon=True, name=f"forward-{t.host}").start()

    def _accept(self, s: socket.socket, t: Target) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=_serve_conn, args=(conn, t), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for s in self.socks:
            s.close()


def host_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def forward_run(run_dir: Path, base_port: int = 8000, bind: str = "127.0.0.1", stream: Any = None) -> int:
    """`coel forward`: relay until Ctrl-C or until the run's hosts are gone."""
    stream = stream or sys.stdout
    run_dir = Path(run_dir)
    targets = run_targets(run_dir, base_port)
    dead = [t.host for t in targets if not host_alive(t.pid)]
    if dead:
        raise InfeasibleError(f"{run_dir}: host(s) {', '.join(dead)} are not running (the run has ended)")
    fwd = Forwarder(targets, bind)
    cfg = run_dir / "prometheus.yml"
    cfg.write_text(prometheus_config(run_dir.name, targets, bind))
    for t in targets:
        api = f"   API http://{bind}:{t.local_port}/v1" if t.role == "entry" else ""
        print(f"{t.host:<6} {t.role:<10} http://{bind}:{t.local_port}/metrics{api}   (-> {t.ip}:{t.port})",
              file=stream)
    print(f"Prometheus scrape config: {cfg}  (Ctrl-C stops)", file=stream, flush=True)
    try:
        while all(host_alive(t.pid) for t in targets):
            time.sleep(0.5)
        print("the run has ended", file=stream)
    except KeyboardInterrupt:
        pass
    finally:
        fwd.stop()
    return 0

"""Reaching other machines over SSH: one target's address, user and key; the ssh command lines;
a pre-flight check that says exactly what is wrong (unreachable, wrong key, no checkout, no venv);
and the clock offset of a machine against ours.

Used by `coel run --cluster` (testbed/cluster.py) and `coel deploy` (testbed/deploy.py). Every
ssh runs non-interactively (BatchMode: a wrong key fails instead of prompting), with the run's own
known_hosts file (no user-global state is read or written) and one multiplexed connection per
target (ControlMaster) so that starting a dozen processes does not pay a dozen handshakes.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coel_model.errors import InfeasibleError

SSH_CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class SshTarget:
    """One machine as ssh sees it."""
    address: str          # IP address or DNS name
    user: str = "root"
    key: str | None = None  # private key file; None = the user's ssh defaults
    port: int = 22

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.address}"

    def describe(self) -> str:
        return f"{self.dest}:{self.port}" + (f" (key {self.key})" if self.key else "")


def parse_target(f: Any, defaults: dict[str, Any] | None = None) -> SshTarget:
    """The address/user/key/port fields of one mapping (a topologies.loader.Fields)."""
    d = defaults or {}
    address = f.str("address")
    if not address or any(c.isspace() for c in address):
        raise f.doc.err(f.path + ("address",), f"not an address: {address!r}")
    key = f.str("key", d.get("key"))
    if key is not None:
        key = str(Path(os.path.expanduser(key)))
    return SshTarget(address=address, user=f.str("user", d.get("user", "root")), key=key,
                     port=int(f.num("port", d.get("port", 22), ge=1, le=65535, integer=True)))


class Ssh:
    """ssh command lines for one target within one run (known_hosts and control socket in
    `state_dir`, which must be short: unix socket paths hold 108 bytes)."""

    def __init__(self, target: SshTarget, state_dir: str | Path):
        self.target = target
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def options(self, multiplex: bool = True) -> list[str]:
        t = self.target
        opts = ["-p", str(t.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.state_dir / 'known_hosts'}",
                "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", "-o", "ServerAliveInterval=2",
                "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if t.key:
            opts += ["-i", t.key, "-o", "IdentitiesOnly=yes"]
        if multiplex:
            opts += ["-o", "ControlMaster=auto", "-o", "ControlPersist=30",
                     "-o", f"ControlPath={self.state_dir / ('cm-%C')}"]
        return opts

    def argv(self, remote_cmd: str, multiplex: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
        """ssh ... user@address REMOTE_CMD (a shell command line, run by the remote login shell)."""
        return ["ssh", *self.options(multiplex), *extra, self.target.dest, remote_cmd]

    def run(self, remote_cmd: str, timeout_s: float = 30.0, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        try:
            r = subprocess.run(self.argv(remote_cmd), capture_output=True, text=True,
                               timeout=timeout_s, input=input)
        except subprocess.TimeoutExpired:
            raise InfeasibleError(f"{self.target.describe()}: `{remote_cmd[:120]}` did not finish "
                                  f"within {timeout_s:g} s (machine dead or network cut?)") from None
        if check and r.returncode != 0:
            raise InfeasibleError(f"{self.target.describe()}: `{remote_cmd[:160]}` failed (exit "
                                  f"{r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        return r

    def popen(self, remote_cmd: str, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.argv(remote_cmd), stdin=subprocess.DEVNULL, **kwargs)

    def put(self, data: bytes, remote_path: str, mode: str = "600") -> None:
        """Write bytes to a remote file (parents created) through the ssh connection."""
        q = shlex.quote(remote_path)
        cmd = f"mkdir -p $(dirname {q}) && umask 077 && cat > {q} && chmod {mode} {q}"
        r = subprocess.run(self.argv(cmd), input=data, capture_output=True, timeout=30)
        if r.returncode != 0:
            raise InfeasibleError(f"{self.target.describe()}: cannot write {remote_path}: "
                                  f"{r.stderr.decode(errors='replace').strip()[-300:]}")

    def get_tree(self, remote_dir: str, local_dir: Path, timeout_s: float = 60.0) -> None:
        """Copy a remote folder's content into local_dir (tar over the ssh connection)."""
        local_dir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(self.argv(f"tar -C {shlex.quote(remote_dir)} -cf - ."),
                           capture_output=True, timeout=timeout_s)
        if r.returncode != 0:
            raise InfeasibleError(f"{self.target.describe()}: cannot fetch {remote_dir}: "
                                  f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        subprocess.run(["tar", "-C", str(local_dir), "-xf", "-"], input=r.stdout, check=True,
                       capture_output=True)

    def close(self) -> None:
        """End the multiplexed master connection (if one is up)."""
        subprocess.run(["ssh", *self.options(), "-O", "exit", self.target.dest],
                       capture_output=True, timeout=10)


def preflight(ssh: Ssh, project_dir: str, python: str, what: str,
              need_root: bool = False) -> dict[str, Any]:
    """Check that the machine answers, takes our key, has the checkout and its venv; say which of
    these fails. Returns {"uid": int, "hostname": str}."""
    t = ssh.target
    key_note = f" with key {t.key}" if t.key else ""
    try:
        r = subprocess.run(ssh.argv("echo coel-ok $(id -u) $(hostname)", multiplex=False),
                           capture_output=True, text=True, timeout=SSH_CONNECT_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        raise InfeasibleError(f"{what}: {t.describe()} does not answer (ssh timed out)") from None
    err = r.stderr.strip()
    if r.returncode != 0 or "coel-ok" not in r.stdout:
        low = err.lower()
        if "permission denied" in low or "publickey" in low:
            raise InfeasibleError(f"{what}: {t.dest}:{t.port} refused our key{key_note} "
                                  f"(wrong key, or its public half is not in the user's "
                                  f"authorized_keys): {err[-300:]}")
        if any(s in low for s in ("timed out", "no route", "unreachable", "refused",
                                  "could not resolve", "name or service")):
            raise InfeasibleError(f"{what}: cannot reach {t.dest}:{t.port}: {err[-300:]}")
        raise InfeasibleError(f"{what}: ssh to {t.describe()} failed (exit {r.returncode}): "
                              f"{err[-300:] or r.stdout.strip()[-300:]}")
    _, uid, host = (r.stdout.split() + ["?", "?"])[:3]
    q = shlex.quote(project_dir)
    py = python if python.startswith("/") else f"{project_dir.rstrip('/')}/{python}"
    r = ssh.run(f"test -d {q}/nodes && test -f {q}/pyproject.toml && echo checkout; "
                f"test -x {shlex.quote(py)} && echo venv; "
                f"{shlex.quote(py)} -c 'import zmq, torch' 2>/dev/null && echo imports", check=False)
    found = set(r.stdout.split())
    if "checkout" not in found:
        raise InfeasibleError(f"{what}: {t.dest} has no CoEL checkout at {project_dir} (no "
                              "nodes/ or pyproject.toml there): clone it and run install.sh, or "
                              "set project_dir")
    if "venv" not in found:
        raise InfeasibleError(f"{what}: {t.dest}: no Python at {py} (run `bash install.sh` in "
                              f"{project_dir}, or set python)")
    if "imports" not in found:
        raise InfeasibleError(f"{what}: {t.dest}: {py} cannot import zmq and torch (run "
                              f"`bash install.sh` in {project_dir})")
    if need_root and uid != "0":
        raise InfeasibleError(f"{what}: {t.dest} is not root (uid {uid}) but root is required")
    return {"uid": int(uid) if uid.isdigit() else None, "hostname": host}


# ---- clocks ------------------------------------------------------------------------------------
_CLOCK_LOOP = ("import sys,time\n"
               "for _ in sys.stdin:\n"
               "    print(time.monotonic_ns(), flush=True)\n")


@dataclass(frozen=True)
class ClockOffset:
    """remote CLOCK_MONOTONIC - ours, in ns, known to +- uncertainty_ns (half the best RTT)."""
    offset_ns: int
    uncertainty_ns: int
    samples: int

    def to_dict(self) -> dict[str, int]:
        return {"offset_ns": self.offset_ns, "uncertainty_ns": self.uncertainty_ns,
                "samples": self.samples}


def offset_from_samples(samples: list[tuple[int, int, int]]) -> ClockOffset:
    """Cristian's method: for (t_send, t_remote, t_recv) triples take the one with the shortest
    round trip; the remote read happened somewhere inside it, so offset = t_remote - midpoint,
    uncertain by half that round trip."""
    if not samples:
        raise ValueError("no clock samples")
    t0, tr, t1 = min(samples, key=lambda s: s[2] - s[0])
    return ClockOffset(offset_ns=tr - (t0 + t1) // 2, uncertainty_ns=(t1 - t0 + 1) // 2,
                       samples=len(samples))


def measure_clock_offset(ssh: Ssh, python: str, rounds: int = 15) -> ClockOffset:
    """Ask one long-lived remote Python for its monotonic clock `rounds` times over ssh."""
    p = subprocess.Popen(ssh.argv(f"{shlex.quote(python)} -u -c {shlex.quote(_CLOCK_LOOP)}"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, bufsize=1)
    samples = []
    try:
        for _ in range(rounds):
            t0 = time.monotonic_ns()
            p.stdin.write("\n")
            p.stdin.flush()
            line = p.stdout.readline()
            t1 = time.monotonic_ns()
            if not line.strip().isdigit():
                raise InfeasibleError(f"{ssh.target.describe()}: clock probe failed: "
                                      f"{line.strip() or p.stderr.read()[-300:]}")
            samples.append((t0, int(line), t1))
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
    return offset_from_samples(samples[1:] or samples)  # the first pays for the interpreter


def shift_trace_file(src: Path, dst: Path, offset_ns: int) -> None:
    """Append src's records to dst with their times moved from the remote clock onto ours."""
    with open(src) as fin, open(dst, "a") as fout:
        for line in fin:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            for k in ("t_ns", "t0_ns", "t1_ns"):
                if k in rec:
                    rec[k] = int(rec[k]) - offset_ns
            fout.write(json.dumps(rec, separators=(",", ":")) + "\n")

"""Stand-in "machines" for multi-machine tests: network namespaces on one bridge, each with its
own sshd listening only on its own address, key-only (a key made for the test), PermitTunnel and
UseDNS no as docs/running.md asks of real machines. They share this machine's kernel and files,
so the checkout and venv are "present on each machine" at the same path.

    with SshHosts(3, tmp_path) as hosts:
        hosts.address(0)  # 10.231.X.1 ; hosts.key = the private key accepted by every sshd

stop() (also from __exit__ and on any start failure) kills every process in the namespaces (the
sshds and whatever was started through them), deletes the namespaces, veths and bridge.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def have_sshd() -> bool:
    return os.geteuid() == 0 and Path(SSHD).exists() and shutil.which("ip") is not None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class SshHosts:
    def __init__(self, n: int, workdir: str | Path):
        self.n = n
        self.tag = secrets.token_hex(2)
        self.dir = Path(workdir) / f"sshns-{self.tag}"
        self.net = f"10.231.{random.randint(1, 250)}"
        self.bridge = f"csb{self.tag}"
        self.ns = [f"csn{self.tag}{i}" for i in range(n)]
        self.veth = [f"csv{self.tag}{i}" for i in range(n)]
        self.key = str(self.dir / "id_test")
        self.sshd: list[subprocess.Popen] = []

    def address(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    @property
    def gateway(self) -> str:
        return f"{self.net}.254"

    def __enter__(self) -> "SshHosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SshHosts":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.dir.mkdir(parents=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "coel-test",
                        "-f", self.key], check=True, capture_output=True)
        (self.dir / "authorized_keys").write_text(Path(self.key + ".pub").read_text())
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.ns):
            _ip("netns", "add", ns)
            peer = f"csp{self.tag}{i}"
            _ip("link", "add", self.veth[i], "type", "veth", "peer", "name", peer)
            _ip("link", "set", self.veth[i], "master", self.bridge, "up")
            _ip("link", "set", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway)
            hostkey = self.dir / f"host{i}_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                           check=True, capture_output=True)
            cfg = self.dir / f"sshd{i}.conf"
            cfg.write_text("\n".join([
                f"ListenAddress {self.address(i)}", "Port 22", f"HostKey {hostkey}",
                f"PidFile {self.dir}/sshd{i}.pid", f"AuthorizedKeysFile {self.dir}/authorized_keys",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "UsePAM no",
                "StrictModes no", "UseDNS no", "PermitTunnel yes", "AllowTcpForwarding yes",
                "AllowStreamLocalForwarding yes", "StreamLocalBindUnlink yes",
                "MaxSessions 64", "MaxStartups 64", "LogLevel ERROR", ""]))
            log = open(self.dir / f"sshd{i}.log", "w")
            # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup mounts
            self.sshd.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", SSHD, "-D", "-e", "-f", str(cfg)],
                                              stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + 10
        for i, ns in enumerate(self.ns):  # wait until each sshd listens
            while True:
                r = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnH", f"src {self.address(i)}:22"],
                                   capture_output=True, text=True)
                if r.stdout.strip():
                    break
                if self.sshd[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd in {ns} did not start: "
                                       f"{(self.dir / f'sshd{i}.log').read_text()[-500:]}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """Every process in our namespaces (sshds, sessions, what they started)."""
        out = []
        for ns in self.ns:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            out += [int(x) for x in r.stdout.split() if x.isdigit()]
        return out

    def stop(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for sig in (15, 9):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(0.3)
        for p in self.sshd:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.ns:
            _ip("netns", "del", ns, check=False)
        for v in self.veth:
            _ip("link", "del", v, check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Anything of ours still there (for tests asserting a clean teardown)."""
        left = [f"pid {p}" for p in self.pids()]
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [n for n in self.ns if n in ns]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        left += [x for x in [self.bridge, *self.veth] if f" {x}:" in links or f" {x}@" in links]
        return left

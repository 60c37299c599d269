"""Cleanup of testbed networks: the normal stop path and `coel clean` for the day it didn't run.

Every network the builder starts gets a short random prefix ("co" + 3 chars); all its Mininet
node names, switch bridges, interfaces and cgroups start with it, and a state file
/run/coel/nets/<prefix>.json records the owner pid and the host shell pids. Cleaning a prefix:
kill every process in its hosts' network namespaces and cgroups (namespaces vanish with their
last process), delete its interfaces and bridges in the root namespace, remove its cgroups and
state file. iptables rules live inside the host namespaces and go with them.
`coel clean` cleans prefixes whose owner is dead (or all with --all), plus orphans that match
the naming pattern but have no live state file; `--mn` also runs Mininet's own `mn -c`, which
would also tear down other people's live Mininet networks (so it is off by default).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = Path(os.environ.get("COEL_NET_STATE_DIR", "/run/coel/nets"))
PREFIX_RE = re.compile(r"^co[0-9a-z]{3}$")
NODE_RE = re.compile(r"^(co[0-9a-z]{3})[hs]\d+")  # Mininet node names we create
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CleanReport:
    prefixes: list[str] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)
    deleted_intfs: list[str] = field(default_factory=list)
    deleted_cgroups: list[str] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"cleaned {len(self.prefixes)} network(s) {' '.join(self.prefixes) or '-'}: "
                f"killed {len(self.killed_pids)} process(es), deleted {len(self.deleted_intfs)} "
                f"interface(s), {len(self.deleted_cgroups)} cgroup(s)"
                + (f"; left live network(s) {' '.join(self.skipped_live)} (use --all)"
                   if self.skipped_live else ""))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def processes_of(prefix: str, shell_pids: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Pids in the namespaces of the given host shells, in our cgroups, or named mininet:<prefix>..."""
    protected = _ancestors()
    # our own namespace is the root one (pid 1's may be unreadable in a sandbox): never sweep it
    root_ns = _netns_inode(os.getpid())
    inodes = {i for i in (_netns_inode(p) for p in shell_pids) if i is not None and i != root_ns}
    pids = set()
    for pid in _all_pids():
        if pid in protected:
            continue
        if inodes and _netns_inode(pid) in inodes:
            pids.add(pid)
        elif f"mininet:{prefix}" in _cmdline(pid):
            pids.add(pid)
    for cg in cgroups_of(prefix):
        try:
            pids.update(int(x) for x in (cg / "tasks").read_text().split()
                        if int(x) not in protected)
        except OSError:
            pass
    return sorted(pids)


def _ancestors() -> set[int]:
    """This process and its parents: never ours to kill."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def kill_pids(pids: list[int], grace_s: float = 1.0) -> list[int]:
    """SIGTERM, wait up to grace_s, then SIGKILL whatever is left."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            sent.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in sent):
        time.sleep(0.05)
    for pid in sent:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_not_zombie_alive(p) for p in sent):
        time.sleep(0.02)
    return sent


def _not_zombie_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def root_intfs() -> list[str]:
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.append(parts[1].strip().split("@")[0])
    return out


def intfs_of(prefix: str) -> list[str]:
    return [i for i in root_intfs() if i.startswith(prefix) and NODE_RE.match(i)]


def delete_intfs(names: list[str]) -> list[str]:
    done = []
    for n in sorted(names, key=lambda x: ("-" not in x, x)):  # ports first, then bridges
        r = subprocess.run(["ip", "link", "del", n], capture_output=True, text=True)
        if r.returncode == 0:
            done.append(n)
    return done


def cgroups_of(prefix: str) -> list[Path]:
    out = []
    try:
        controllers = sorted(CGROUP_ROOT.iterdir())
    except OSError:
        return out
    for ctrl in controllers:
        try:
            out += [d for d in ctrl.iterdir() if d.is_dir() and d.name.startswith(prefix)
                    and NODE_RE.match(d.name)]
        except OSError:
            continue
    return out


def delete_cgroups(prefix: str) -> list[str]:
    done = []
    for d in cgroups_of(prefix):
        for _ in range(20):  # rmdir fails with EBUSY while the last task is exiting
            try:
                d.rmdir()
                done.append(str(d))
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
    return done


def read_state(prefix: str) -> dict:
    try:
        return json.loads((STATE_DIR / f"{prefix}.json").read_text())
    except (OSError, ValueError):
        return {}


def write_state(prefix: str, state: dict) -> Path:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = STATE_DIR / f"{prefix}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
    return path


def clean_prefix(prefix: str, report: CleanReport | None = None) -> CleanReport:
    """Remove everything a network with this prefix left: processes, interfaces, cgroups, state."""
    report = report or CleanReport()
    state = read_state(prefix)
    shells = [int(p) for p in state.get("shell_pids", {}).values()]
    for _ in range(3):  # processes may fork while we kill; a few rounds settle it
        pids = processes_of(prefix, shells)
        if not pids:
            break
        report.killed_pids += kill_pids(pids)
    report.deleted_intfs += delete_intfs(intfs_of(prefix))
    report.deleted_cgroups += delete_cgroups(prefix)
    try:
        (STATE_DIR / f"{prefix}.json").unlink()
    except FileNotFoundError:
        pass
    report.prefixes.append(prefix)
    return report


def known_prefixes() -> set[str]:
    """Prefixes seen in state files, interfaces, cgroups and mininet shells."""
    found = set()
    if STATE_DIR.is_dir():
        found |= {p.stem for p in STATE_DIR.glob("*.json") if PREFIX_RE.match(p.stem)}
    for name in root_intfs():
        m = NODE_RE.match(name)
        if m:
            found.add(m.group(1))
    for ctrl in (CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []):
        try:
            for d in ctrl.iterdir():
                m = NODE_RE.match(d.name)
                if m and d.is_dir():
                    found.add(m.group(1))
        except OSError:
            continue
    for pid in _all_pids():
        m = re.search(r"mininet:(co[0-9a-z]{3})[hs]\d+", _cmdline(pid))
        if m:
            found.add(m.group(1))
    return found


def is_live(prefix: str) -> bool:
    owner = read_state(prefix).get("owner_pid")
    return bool(owner) and pid_alive(int(owner))


def clean(all_networks: bool = False, prefixes: list[str] | None = None,
          mininet_too: bool = False) -> CleanReport:
    """`coel clean`: clean dead (or, with all_networks, every) testbed network."""
    report = CleanReport()
    targets = sorted(prefixes) if prefixes else sorted(known_prefixes())
    for p in targets:
        if not all_networks and not prefixes and is_live(p):
            report.skipped_live.append(p)
            continue
        clean_prefix(p, report)
    if mininet_too:
        from mininet.clean import cleanup as mn_cleanup
        mn_cleanup()
    return report

"""This process's cgroup limits (v1 and v2), reported in agent heartbeats so the controller can
see a CPU or memory squeeze by observation (the testbed changes the host's cgroup; nobody tells
the controller). Pure apart from reading /proc and /sys; the roots can be injected for tests."""
from __future__ import annotations

import os
from pathlib import Path

UNLIMITED_BYTES = 1 << 60  # v1 reports "no limit" as a huge number near 2**63


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """/proc/self/cgroup text -> controller -> path ('' key for the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctl in parts[1].split(",") if parts[1] else [""]:
            out[ctl] = parts[2]
    return out


def cgroup_root(candidates: list[Path] | None = None) -> Path | None:
    """Where the cgroup hierarchies are mounted as seen from here. A Mininet host remounts /sys
    for its network namespace, which hides /sys/fs/cgroup; the parent process (the launcher,
    in the root mount namespace) still sees it through /proc/<ppid>/root."""
    for root in candidates or [Path("/sys/fs/cgroup"), Path(f"/proc/{os.getppid()}/root/sys/fs/cgroup")]:
        try:
            if (root / "memory").is_dir() or (root / "cpu").is_dir() or (root / "cgroup.controllers").exists():
                return root
        except OSError:
            continue
    return None


_ROOT: list[Path | None] = []


def cgroup_limits(proc: Path = Path("/proc/self/cgroup"), sysfs: Path | None = None) -> dict[str, float]:
    """{"cgroup_memory_limit_bytes", "cgroup_cpu_cores"} for the limits that are set (keys absent
    when unlimited or unreadable). The mount point is found once per process."""
    if sysfs is None:
        if not _ROOT:
            _ROOT.append(cgroup_root())
        sysfs = _ROOT[0]
        if sysfs is None:
            return {}
    text = _read(proc)
    if text is None:
        return {}
    paths = cgroup_paths(text)
    out: dict[str, float] = {}
    if "memory" in paths:  # v1
        v = _read(sysfs / "memory" / paths["memory"].lstrip("/") / "memory.limit_in_bytes")
        if v and v.isdigit() and int(v) < UNLIMITED_BYTES:
            out["cgroup_memory_limit_bytes"] = int(v)
    elif "" in paths:  # v2
        v = _read(sysfs / paths[""].lstrip("/") / "memory.max")
        if v and v.isdigit():
            out["cgroup_memory_limit_bytes"] = int(v)
    if "cpu" in paths:
        base = sysfs / "cpu" / paths["cpu"].lstrip("/")
        q, per = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
        if q and per and q.lstrip("-").isdigit() and per.isdigit() and int(q) > 0 and int(per) > 0:
            out["cgroup_cpu_cores"] = int(q) / int(per)
    elif "" in paths:
        v = _read(sysfs / paths[""].lstrip("/") / "cpu.max")
        if v:
            q, _, per = v.partition(" ")
            if q.isdigit() and per.isdigit() and int(per) > 0:
                out["cgroup_cpu_cores"] = int(q) / int(per)
    return out

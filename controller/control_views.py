"""What the control API answers and accepts, as pure functions of the controller's state:
the per-peer STATUS view and the SET_SLO change of the request classes."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from coel_model.errors import ConfigError


def apply_slo(reqs: Any, by_client: dict[str, str], args: dict) -> tuple[Any, list[str], str]:
    """SET_SLO: (new Requirements, names of the classes changed, reason for the trigger). slo_class
    matches a class name, a client's workload slo_class, or '*'; raises ConfigError naming what is
    wrong (nothing changes then)."""
    from controller.plan import Requirements
    cls = args.get("slo_class")
    if not isinstance(cls, str) or not cls:
        raise ConfigError("SET_SLO needs slo_class (a client name, its workload slo_class, or '*')")
    ttft, tpot = args.get("slo_ttft_ms"), args.get("slo_tpot_ms")
    for v, n in ((ttft, "slo_ttft_ms"), (tpot, "slo_tpot_ms")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ConfigError(f"SET_SLO: {n} must be a number > 0 (got {v!r})")
    hit, out = [], []
    for c in reqs.classes:
        if cls in ("*", c.name, by_client.get(c.name)):
            ch = {}
            if ttft is not None:
                ch["ttft_slo_ms"] = float(ttft)
            if tpot is not None:
                ch["token_slo_ms"] = float(tpot)
            c = replace(c, **ch)
            hit.append(c.name)
        out.append(c)
    if not hit:
        raise ConfigError(f"SET_SLO: no request class {cls!r}; classes: "
                          f"{[(c.name, by_client.get(c.name)) for c in reqs.classes]}")
    return Requirements(tuple(out)), hit, f"SLO of {hit}: ttft {ttft} ms, tpot {tpot} ms"


def peer_status(peers: dict, probe_state: dict, deployed: dict, overloaded: set[str], now_ns: int) -> dict:
    """{"agents": {...}, "entries": {...}} of STATUS from a registry snapshot and the probe state."""
    agents, entries = {}, {}
    for (role, name), p in sorted(peers.items()):
        st = probe_state.get(name)
        d = {"alive": p.alive, "endpoint": p.endpoint, "pid": p.pid,
             "last_seen_s": round((now_ns - p.last_seen_ns) / 1e9, 3), "registers": p.registers,
             "liveness": p.live.state, "heartbeat_s": p.live.period_s, "lost_count": p.live.lost_count,
             "rejoin_count": p.live.rejoin_count}
        if role == "agent":
            d.update(rtt_ms=round(st.rtt_ms[-1], 3) if st and st.rtt_ms else None,
                     goodput_mbit=round(st.goodput_mbit[-1], 2) if st and st.goodput_mbit else None,
                     baseline_rtt_ms=st.base_rtt_ms if st else None,
                     baseline_goodput_mbit=st.base_goodput_mbit if st else None,
                     memory_used_bytes=p.stats.get("memory_used_bytes"),
                     memory_budget_bytes=p.stats.get("memory_budget_bytes"),
                     cpu_percent=p.stats.get("cpu_percent"), shards=len(deployed.get(name, ())),
                     cgroup_memory_limit_bytes=p.stats.get("cgroup_memory_limit_bytes"),
                     cgroup_cpu_cores=p.stats.get("cgroup_cpu_cores"), overloaded=name in overloaded)
            agents[name] = d
        else:
            d.update({k: p.stats.get(k) for k in ("served", "failed", "active", "queued", "placement_version",
                                                  "failovers", "expert_rtt_ms")})
            entries[name] = d
    return {"agents": agents, "entries": entries}

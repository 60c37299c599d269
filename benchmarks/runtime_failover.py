"""Adaptive vs static deployment under a server crash, on loopback (no Mininet), in one run.

Starts the real processes (controller, 3 agents, an entry; CURVE on) with a tiny random model,
drives Poisson traffic from the workload client, SIGKILLs the agent holding the most experts
(never the entry's own) mid-run, and measures from the traces: time to detect, to re-plan, to
migrate, bytes migrated, recovery (kill -> first request started after the kill that completes
with per-token latency within 20% of the pre-kill p50) and lost requests. The same schedule is
run with --static. The Mininet version (real link failures, bandwidth drops, edge-star-5) is the
testbed's `coel run`; this isolates the controller/entry mechanics.

    .venv/bin/python benchmarks/runtime_failover.py [--duration-s 8] [--json-out FILE | --json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the loopback launcher shared with tests/controller/test_service.py
from tests.runtime_fixtures import Procs, make_setup, read_events, start_cluster, wait_serving  # noqa: E402


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _spans(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("span") == "request":
                out.append(r)
    return out


def _p50(xs):
    return round(statistics.median(xs), 2) if xs else None


def run_case(static: bool, duration_s: float, kill_at_s: float, rate_rps: float) -> dict:
    from controller.api import ControlClient
    from nodes.client import ClientConfig, run_client
    with tempfile.TemporaryDirectory(prefix="coel-bench-failover-") as d:
        tmp = Path(d)
        setup = make_setup(tmp)
        procs = Procs()
        try:
            info = start_cluster(procs, setup, static=static)
            wait_serving(info["control"], procs, timeout_s=120)
            with ControlClient(info["control"]) as cc:
                per = cc.call("STATUS")["plan_summary"]["experts_per_server"]
            victim = max((s for s in per if s != "a1"), key=lambda s: (per[s], s))
            trace = info["raw"] / "u1-client.jsonl"
            ccfg = ClientConfig(name="u1", entry=info["entry"], rate_rps=rate_rps, prompt_tokens=8, max_new_tokens=24,
                                duration_s=duration_s, drain_s=30.0, seed=11, keys_dir=setup["keys"],
                                trace_path=str(trace), request_timeout_s=30.0)
            summary: dict = {}
            th = threading.Thread(target=lambda: summary.update(run_client(ccfg, tokenizer=ByteTokenizer())))
            th.start()
            time.sleep(kill_at_s)
            t_kill = time.monotonic_ns()
            procs.kill(f"agent-{victim}")
            th.join(120)
            time.sleep(0.5)
            events = read_events(info["raw"] / "ctl-controller.jsonl")
            spans = _spans(trace)
        finally:
            procs.stop_all()
    lost_ev = [e for e in events if e["event"] == "agent_lost" and e["attrs"]["name"] == victim]
    red = [e for e in events if e["event"] == "redeployment" and e["attrs"]["trigger"] == "agent_lost"]
    pre = [s["attrs"]["tpot_ms"] for s in spans if s["t1_ns"] < t_kill and s["attrs"].get("tpot_ms")]
    post = sorted((s for s in spans if s["t0_ns"] >= t_kill), key=lambda s: s["t1_ns"])
    base = _p50(pre)
    rec = next((s for s in post if s["attrs"]["ok"] and base and s["attrs"].get("tpot_ms", 1e9) <= 1.2 * base), None)
    a = red[0]["attrs"] if red else {}
    return {
        "mode": "static" if static else "adaptive", "victim": victim, "experts_on_victim": per[victim],
        "requests": len(spans), "ok": sum(1 for s in spans if s["attrs"]["ok"]),
        "lost": sum(1 for s in spans if not s["attrs"]["ok"]),
        "detect_s": round(a.get("detect_s") or (lost_ev[0]["attrs"]["silent_s"] if lost_ev else float("nan")), 3),
        "detected_after_kill_s": round((lost_ev[0]["t_ns"] - t_kill) / 1e9, 3) if lost_ev else None,
        "replan_s": round(a["replan_s"], 4) if a else None, "migrate_s": round(a["migrate_s"], 4) if a else None,
        "bytes_moved": a.get("bytes_moved", 0), "actions": a.get("actions", 0),
        "recovery_s": round((rec["t1_ns"] - t_kill) / 1e9, 3) if rec else None,
        "tpot_ms_p50_pre": base, "tpot_ms_p50_post": _p50([s["attrs"]["tpot_ms"] for s in post
                                                           if s["attrs"].get("tpot_ms")]),
        "ttft_ms_p50_pre": _p50([s["attrs"]["ttft_ms"] for s in spans if s["t1_ns"] < t_kill and "ttft_ms" in s["attrs"]]),
        "ttft_ms_p50_post": _p50([s["attrs"]["ttft_ms"] for s in post if "ttft_ms" in s["attrs"]]),
        "client_summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=8.0)
    ap.add_argument("--kill-at-s", type=float, default=3.0)
    ap.add_argument("--rate-rps", type=float, default=3.0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [run_case(static, args.duration_s, args.kill_at_s, args.rate_rps) for static in (False, True)]
    cols = ["mode", "victim", "experts_on_victim", "requests", "ok", "lost", "detect_s", "replan_s", "migrate_s",
            "bytes_moved", "recovery_s", "tpot_ms_p50_pre", "tpot_ms_p50_post", "ttft_ms_p50_pre", "ttft_ms_p50_post"]
    doc = {"benchmark": "runtime_failover", "rows": rows,
           "setup": {"model": "random 2 layers x 8 experts, d=64, top-2", "agents": 3, "transport": "loopback + CURVE",
                     "duration_s": args.duration_s, "kill_at_s": args.kill_at_s, "rate_rps": args.rate_rps}}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(" | ".join(cols))
        print(" | ".join("---" for _ in cols))
        for r in rows:
            print(" | ".join(str(r.get(c)) for c in cols))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

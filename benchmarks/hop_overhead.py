"""Per-hop overhead: one expert call carrying one token vs a raw pyzmq REQ/REP of the same bytes.

All in one run, two processes each, interleaved rounds (so load from other processes hits every
variant alike), medians reported:
  raw      REQ/REP echo server (no protocol, no decode), request and reply of d*2 bytes (fp16 token)
  probe    our agent, PROBE carrying the same fp16 token back (header + validation, no compute)
  call     our agent, EXPERT_CALL on a small fp16 expert (hidden=--hidden), fp16 token in and out
Each is measured plain and with CURVE (raw REQ/REP gets CURVE too). The ratio call/raw is the
number the goal (<= 1.5x) is about; call - compute isolates what the protocol adds.

    .venv/bin/python benchmarks/hop_overhead.py [--d 4096] [--n 400] [--rounds 5] [--json-out F]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zmq  # noqa: E402

from nodes import protocol as P  # noqa: E402
from nodes.local import LocalCluster, free_port  # noqa: E402
from nodes.security import load_keys, make_keys, secure_client, secure_server, start_authenticator  # noqa: E402
from nodes.transport import AgentClient  # noqa: E402


def raw_echo_server(endpoint: str, keys_dir: str | None, ready) -> None:
    ctx = zmq.Context()
    auth = None
    keys = load_keys(keys_dir) if keys_dir else None
    if keys:
        auth = start_authenticator(ctx, keys)
    s = ctx.socket(zmq.REP)
    secure_server(s, keys)
    s.bind(endpoint)
    ready.set()
    try:
        while True:
            msg = s.recv(copy=False)
            if len(msg) == 0:
                s.send(b"")
                break
            s.send(msg, copy=False)
    finally:
        s.close(0)
        if auth:
            auth.stop()
        ctx.term()


def time_raw(sock: zmq.Socket, payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sock.send(payload, copy=False)
        sock.recv(copy=False)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def time_agent(c: AgentClient, mtype: P.MsgType, body: dict, x: torch.Tensor, n: int,
               stamps: dict | None = None) -> tuple[list[float], list[float]]:
    rtts, computes = [], []
    for i in range(n):
        trace = f"h{len(stamps)}" if stamps is not None else None
        t0 = time.perf_counter_ns()
        m0 = time.monotonic_ns()
        r = c.call(mtype, body, {"x": x}, timeout_s=10, trace=trace)
        m1 = time.monotonic_ns()
        rtts.append((time.perf_counter_ns() - t0) / 1e3)
        computes.append(r.body.get("compute_ns", 0) / 1e3)
        if stamps is not None:
            stamps[trace] = (m0, m1)
    return rtts, computes


def decompose(stamps: dict, trace_file: Path) -> dict:
    """Medians of where an EXPERT_CALL's time goes, from the agent's spans (shared monotonic clock)."""
    spans: dict[str, dict] = {}
    for line in trace_file.read_text().splitlines():
        rec = json.loads(line)
        spans.setdefault(rec["trace_id"], {})[rec["span"]] = (rec["t0_ns"], rec["t1_ns"])
    parts: dict[str, list[float]] = {k: [] for k in ("client_send_to_agent_recv", "agent_decode_dispatch",
                                                       "agent_compute", "agent_encode_send",
                                                       "agent_send_to_client_return")}
    for tid, (m0, m1) in stamps.items():
        sp = spans.get(tid)
        if not sp or "remote_reply" not in sp:
            continue
        q0, q1 = sp["remote_queue"]
        c0, c1 = sp["remote_compute"]
        r0, r1 = sp["remote_reply"]
        parts["client_send_to_agent_recv"].append((q0 - m0) / 1e3)
        parts["agent_decode_dispatch"].append((q1 - q0) / 1e3)
        parts["agent_compute"].append((c1 - c0) / 1e3)
        parts["agent_encode_send"].append((r1 - r0) / 1e3)
        parts["agent_send_to_client_return"].append((m1 - r1) / 1e3)
    return {k: statistics.median(v) for k, v in parts.items() if v}


def run(d: int, hidden: int, n: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    x = torch.randn(1, d).half()
    payload = bytes(P.tensor_frame(x))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = str(make_keys(Path(tmp) / "keys"))
        for secure in (False, True):
            kd = keys_dir if secure else None
            keys = load_keys(kd) if kd else None
            ep = f"tcp://127.0.0.1:{free_port()}"
            ready = mp.get_context("spawn").Event()
            srv = mp.get_context("spawn").Process(target=raw_echo_server, args=(ep, kd, ready), daemon=True)
            srv.start()
            ready.wait(30)
            ctx = zmq.Context()
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            secure_client(req, keys)
            req.connect(ep)
            mem_mb = 3 * d * hidden * 2 / 2**20 + 1
            trace_dir = Path(tmp) / f"trace-{int(secure)}"
            trace_dir.mkdir()
            stamps: dict = {}
            with LocalCluster(1, mem_mb, kd, extra_args=["--fp16-kernel", "fast"], trace_dir=str(trace_dir)) as lc:
                c = lc.clients[0]
                w = {"0/w_gate": torch.randn(hidden, d).half() * 0.02, "0/w_up": torch.randn(hidden, d).half() * 0.02,
                     "0/w_down": torch.randn(d, hidden).half() * 0.02}
                c.call(P.MsgType.LOAD_SHARD, {"shards": [{"layer": 0, "expert": 0, "bits": 16, "d_model": d,
                                                          "hidden": hidden}]}, w)
                raw, probe, call, comp = [], [], [], []
                time_raw(req, payload, 50)  # warm-up
                time_agent(c, P.MsgType.EXPERT_CALL, {"layer": 0, "expert": 0}, x, 50)
                time_agent(c, P.MsgType.PROBE, {}, x, 50)
                for _ in range(rounds):
                    raw += time_raw(req, payload, n)
                    probe += time_agent(c, P.MsgType.PROBE, {}, x, n)[0]
                    r, cc = time_agent(c, P.MsgType.EXPERT_CALL, {"layer": 0, "expert": 0}, x, n, stamps)
                    call += r
                    comp += cc
                req_frames = P.encode(P.MsgType.EXPERT_CALL, 1, {"layer": 0, "expert": 0}, {"x": x})
            req.send(b"")
            req.recv()
            req.close(0)
            ctx.term()
            srv.join(5)
            med = statistics.median
            tag = "curve" if secure else "plain"
            results[tag] = {
                "raw_us": med(raw), "probe_us": med(probe), "call_us": med(call), "compute_us": med(comp),
                "call_minus_compute_us": med([a - b for a, b in zip(call, comp)]),
                "ratio_call_vs_raw": med(call) / med(raw), "ratio_probe_vs_raw": med(probe) / med(raw),
                "ratio_call_minus_compute_vs_raw": med([a - b for a, b in zip(call, comp)]) / med(raw),
                "p10_raw_us": statistics.quantiles(raw, n=10)[0],
                "p10_probe_us": statistics.quantiles(probe, n=10)[0],
                "p10_call_us": statistics.quantiles(call, n=10)[0],
                "p10_compute_us": statistics.quantiles(comp, n=10)[0],
                "ratio_p10_call_vs_raw": statistics.quantiles(call, n=10)[0] / statistics.quantiles(raw, n=10)[0],
                "ratio_p10_probe_vs_raw": statistics.quantiles(probe, n=10)[0] / statistics.quantiles(raw, n=10)[0],
                "p90_raw_us": statistics.quantiles(raw, n=10)[-1],
                "p90_call_us": statistics.quantiles(call, n=10)[-1],
                "payload_bytes": len(payload), "call_request_bytes": P.frames_nbytes(req_frames),
                "samples": len(raw), "call_decomposition_us": decompose(stamps, trace_dir / "agent0.jsonl")}
    return {"benchmark": "hop_overhead", "d_model": d, "expert_hidden": hidden, "dtype": "float16",
            "n_per_round": n, "rounds": rounds, "cpu_count": os.cpu_count(),
            "load1_at_end": os.getloadavg()[0], "results": results}


def table(res: dict) -> str:
    lines = [f"per-hop overhead, one token d={res['d_model']} fp16 ({res['results']['plain']['payload_bytes']} B), "
             f"expert hidden={res['expert_hidden']}, medians of {res['results']['plain']['samples']} calls",
             f"{'mode':6} {'raw REQ/REP us':>15} {'PROBE us':>9} {'EXPERT_CALL us':>15} {'compute us':>11} "
             f"{'call/raw':>9} {'(call-compute)/raw':>19} {'probe/raw':>10}"]
    for tag, r in res["results"].items():
        lines.append(f"{tag:6} {r['raw_us']:15.1f} {r['probe_us']:9.1f} {r['call_us']:15.1f} {r['compute_us']:11.1f} "
                     f"{r['ratio_call_vs_raw']:9.2f} {r['ratio_call_minus_compute_vs_raw']:19.2f} "
                     f"{r['ratio_probe_vs_raw']:10.2f}")
    for tag, r in res["results"].items():
        lines.append(f"{tag} EXPERT_CALL decomposition (medians, us): " + ", ".join(
            f"{k} {v:.1f}" for k, v in r["call_decomposition_us"].items()))
    lines.append("10th percentiles (least disturbed by other processes on the 2 shared cores):")
    for tag, r in res["results"].items():
        lines.append(f"{tag:6} {r['p10_raw_us']:15.1f} {r['p10_probe_us']:9.1f} {r['p10_call_us']:15.1f} "
                     f"{r['p10_compute_us']:11.1f} {r['ratio_p10_call_vs_raw']:9.2f} {'':19} "
                     f"{r['ratio_p10_probe_vs_raw']:10.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64, help="expert hidden width (small: isolate overhead)")
    ap.add_argument("--n", type=int, default=300, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    res = run(args.d, args.hidden, args.n, args.rounds)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

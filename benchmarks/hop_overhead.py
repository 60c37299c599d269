"""Per-hop overhead: one expert call carrying one token vs a raw pyzmq REQ/REP of the same bytes.

Same process layout for every variant: the benchmark process is the client; each server is a
child started the same way (multiprocessing spawn), all unpinned, or all servers pinned to one
CPU and the client to another with --pin. After a warm-up, R rounds run the variants back to
back, interleaved (so load from other processes hits every variant alike):
  raw       REQ/REP echo server (no protocol, no decode): request and reply of d*2 bytes
  probe     our agent, PROBE carrying the same fp16 token back (header + validation, no compute)
  identity  our agent, EXPERT_CALL on an identity shard: the whole expert-call path (decode,
            batching, activation decode/encode, reply) without expert compute
  call      our agent, EXPERT_CALL on a small fp16 expert (hidden=--hidden)
Each is measured plain and with CURVE (raw REQ/REP gets CURVE too). Per round: ratio of medians
and ratio of 10th percentiles against raw; the table gives the median of those per-round ratios
(and their range) plus absolute microseconds over all rounds. Tracing is off in the timed rounds;
a separate traced pass splits an EXPERT_CALL into its steps from the agent's spans.

    .venv/bin/python benchmarks/hop_overhead.py [--d 4096] [--n 150] [--rounds 8] [--pin] [--json-out F]
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
from nodes.local import free_port  # noqa: E402
from nodes.security import load_keys, make_keys, secure_client, secure_server, start_authenticator  # noqa: E402
from nodes.transport import AgentClient  # noqa: E402

VARIANTS = ("raw", "probe", "identity", "call")
IDENTITY_KEY = (0, 1)  # (layer, expert) of the identity shard
EXPERT_KEY = (0, 0)


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def raw_echo_server(endpoint: str, keys_dir: str | None, cpu: int | None, ready) -> None:
    _pin(cpu)
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


class _Identity(torch.nn.Module):
    nbytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def agent_server(endpoint: str, keys_dir: str | None, cpu: int | None, mem_bytes: int, d: int,
                 trace_path: str, ready) -> None:
    """The real Agent (same code as `coel agent`), plus an identity shard put straight into its store
    (there is no wire format for 'no compute'); the fp16 expert arrives by LOAD_SHARD as usual."""
    _pin(cpu)
    from nodes.agent import Agent, AgentConfig, Shard
    torch.set_num_threads(1)
    cfg = AgentConfig(endpoint=endpoint, memory_budget_bytes=mem_bytes, keys_dir=keys_dir, name="agent0",
                      fp16_kernel="fast", trace_path=trace_path)
    agent = Agent(cfg)
    agent.store.shards[IDENTITY_KEY] = Shard(IDENTITY_KEY[0], IDENTITY_KEY[1], 16, _Identity(), 0, d)
    ready.set()
    agent.run()


def _spawn(target, args) -> mp.Process:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=target, args=args + (ready,), daemon=True)
    p.start()
    if not ready.wait(60):
        p.kill()
        raise RuntimeError(f"{target.__name__} did not start within 60 s")
    return p


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
    for _ in range(n):
        trace = f"h{len(stamps)}" if stamps is not None else None
        t0 = time.perf_counter_ns()
        m0 = time.monotonic_ns()
        r = c.call(mtype, body, {"x": x}, timeout_s=10, trace=trace)
        r.tensors  # a real caller uses the reply tensor: count making its torch view
        m1 = time.monotonic_ns()
        rtts.append((time.perf_counter_ns() - t0) / 1e3)
        computes.append(r.body.get("compute_ns", 0) / 1e3)
        if stamps is not None:
            stamps[trace] = (m0, m1)
    return rtts, computes


def decompose(stamps: dict, trace_file: Path) -> dict:
    """Medians of where an EXPERT_CALL's time goes, from the agent's spans (shared monotonic clock)."""
    spans: dict[str, dict] = {}
    if trace_file.exists():
        for line in trace_file.read_text().splitlines():
            rec = json.loads(line)
            if "trace_id" in rec:
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


def p10(v: list[float]) -> float:
    return statistics.quantiles(v, n=10)[0]


def summarize(per_round: list[dict[str, list[float]]], computes: dict[str, list[float]]) -> dict:
    """Absolute us over all rounds, and per-round ratios vs raw (median and range over rounds)."""
    out: dict = {}
    for v in VARIANTS:
        allv = [x for r in per_round for x in r[v]]
        out[v] = {"median_us": statistics.median(allv), "p10_us": p10(allv), "p90_us": statistics.quantiles(allv, n=10)[-1],
                  "samples": len(allv)}
        if v in computes:
            out[v]["agent_compute_median_us"] = statistics.median(computes[v])
        if v != "raw":
            rm = [statistics.median(r[v]) / statistics.median(r["raw"]) for r in per_round]
            rp = [p10(r[v]) / p10(r["raw"]) for r in per_round]
            out[v].update({"ratio_median": statistics.median(rm), "ratio_median_range": [min(rm), max(rm)],
                           "ratio_p10": statistics.median(rp), "ratio_p10_range": [min(rp), max(rp)]})
    return out


def run(d: int, hidden: int, n: int, rounds: int, pin: bool, modes: tuple[str, ...] = ("plain", "curve")) -> dict:
    torch.set_num_threads(1)
    client_cpu, server_cpu = (0, 1) if pin else (None, None)
    _pin(client_cpu)
    x = torch.randn(1, d).half()
    payload = bytes(P.tensor_frame(x))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = str(make_keys(Path(tmp) / "keys"))
        for tag in modes:
            kd = keys_dir if tag == "curve" else None
            keys = load_keys(kd) if kd else None
            raw_ep, agent_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            trace_path = Path(tmp) / f"agent-{tag}.jsonl"
            mem = 3 * d * hidden * 2 + (1 << 20)
            procs = [_spawn(raw_echo_server, (raw_ep, kd, server_cpu)),
                     _spawn(agent_server, (agent_ep, kd, server_cpu, mem, d, str(trace_path)))]
            ctx = zmq.Context()
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            secure_client(req, keys)
            req.connect(raw_ep)
            c = AgentClient(agent_ep, keys, ctx=ctx, name="bench")
            try:
                g = torch.Generator().manual_seed(0)
                w = {f"0/{k}": (torch.randn(*s, generator=g) * 0.02).half()
                     for k, s in (("w_gate", (hidden, d)), ("w_up", (hidden, d)), ("w_down", (d, hidden)))}
                c.call(P.MsgType.LOAD_SHARD, {"shards": [{"layer": EXPERT_KEY[0], "expert": EXPERT_KEY[1], "bits": 16,
                                                          "d_model": d, "hidden": hidden}]}, w)
                bodies = {"identity": {"layer": IDENTITY_KEY[0], "expert": IDENTITY_KEY[1]},
                          "call": {"layer": EXPERT_KEY[0], "expert": EXPERT_KEY[1]}}
                # the identity shard must really be the identity: the reply equals the request
                y = c.call(P.MsgType.EXPERT_CALL, bodies["identity"], {"x": x}).tensors["y"]
                assert torch.equal(y, x), "identity shard changed the token"

                def one_round(k: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
                    r, comp = {"raw": time_raw(req, payload, k)}, {}
                    r["probe"] = time_agent(c, P.MsgType.PROBE, {}, x, k)[0]
                    for v in ("identity", "call"):
                        r[v], comp[v] = time_agent(c, P.MsgType.EXPERT_CALL, bodies[v], x, k)
                    return r, comp

                one_round(100)  # warm-up: connections, allocator, caches
                per_round, computes = [], {"identity": [], "call": []}
                for _ in range(rounds):
                    r, comp = one_round(n)
                    per_round.append(r)
                    for v in comp:
                        computes[v] += comp[v]
                stamps: dict = {}
                time_agent(c, P.MsgType.EXPERT_CALL, bodies["identity"], x, n, stamps)
                time.sleep(0.2)  # the agent writes its spans after each reply
                res = summarize(per_round, computes)
                res["identity_decomposition_us"] = decompose(stamps, trace_path)
                req_frames = P.encode(P.MsgType.EXPERT_CALL, 1, bodies["call"], {"x": x})
                res["payload_bytes"] = len(payload)
                res["call_request_bytes"] = P.frames_nbytes(req_frames)
                results[tag] = res
                c.call(P.MsgType.SHUTDOWN, {})
                req.send(b"")
                req.recv()
            finally:
                c.close()
                req.close(0)
                ctx.term()
                for p in procs:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
    return {"benchmark": "hop_overhead", "d_model": d, "expert_hidden": hidden, "dtype": "float16",
            "n_per_round": n, "rounds": rounds, "pinned": pin, "cpu_count": os.cpu_count(),
            "load1_at_start_end": [None, os.getloadavg()[0]], "results": results}


def table(res: dict) -> str:
    any_r = next(iter(res["results"].values()))
    lines = [f"per-hop overhead, one token d={res['d_model']} fp16 ({any_r['payload_bytes']} B; EXPERT_CALL request "
             f"{any_r['call_request_bytes']} B), expert hidden={res['expert_hidden']}, {res['rounds']} interleaved "
             f"rounds x {res['n_per_round']} calls, pinned={res['pinned']}, load1 {res['load1_at_start_end']}",
             f"{'mode':6} {'variant':9} {'median us':>10} {'p10 us':>8} {'p90 us':>8} {'compute us':>11} "
             f"{'ratio med':>10} {'(range)':>13} {'ratio p10':>10} {'(range)':>13}"]
    for tag, r in res["results"].items():
        for v in VARIANTS:
            s = r[v]
            comp = f"{s['agent_compute_median_us']:11.1f}" if "agent_compute_median_us" in s else f"{'':11}"
            if v == "raw":
                rat = f"{'1.00':>10} {'':13} {'1.00':>10} {'':13}"
            else:
                a, b = s["ratio_median_range"]
                c, e = s["ratio_p10_range"]
                rat = (f"{s['ratio_median']:10.2f} {f'({a:.2f}-{b:.2f})':>13} {s['ratio_p10']:10.2f} "
                       f"{f'({c:.2f}-{e:.2f})':>13}")
            lines.append(f"{tag:6} {v:9} {s['median_us']:10.1f} {s['p10_us']:8.1f} {s['p90_us']:8.1f} {comp} {rat}")
    for tag, r in res["results"].items():
        lines.append(f"{tag} identity EXPERT_CALL decomposition (medians, us): " + ", ".join(
            f"{k} {v:.1f}" for k, v in r["identity_decomposition_us"].items()))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64, help="expert hidden width (small: isolate overhead)")
    ap.add_argument("--n", type=int, default=150, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pin", action="store_true", help="servers on CPU 1, client on CPU 0 (default: unpinned)")
    ap.add_argument("--modes", default="plain,curve", help="comma list of plain,curve")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    res = run(args.d, args.hidden, args.n, args.rounds, args.pin, tuple(args.modes.split(",")))
    res["load1_at_start_end"][0] = load0
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

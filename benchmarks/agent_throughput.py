"""Agent throughput (tokens/s) at batch 1..64 against the same expert run in-process.

Three numbers per batch size B, measured in one run (medians over --n repetitions):
  local     the expert module called in this process on a (B, d) batch (no messaging at all)
  one-call  one client sends the (B, d) batch as one EXPERT_CALL to an agent process
  B-callers B separate DEALER clients each send one token at the same moment; the agent merges
            concurrent calls for the same expert into one batch (reported: mean merged batch)
tokens/s = B / median wall time of the round. Agent and client each get one torch thread.

    .venv/bin/python benchmarks/agent_throughput.py [--d 512 --hidden 1408 --bits 16] [--json-out F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zmq  # noqa: E402

from coel_model.model import SwiGLUExpert  # noqa: E402
from nodes import protocol as P  # noqa: E402
from nodes.shards import build_shard, expert_tensors  # noqa: E402
from nodes.local import LocalCluster  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def make_expert(d: int, hidden: int, bits: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    ex = SwiGLUExpert(d, hidden)
    module = ex
    if bits not in (16, 32):
        from coel_model import quant
        module = quant.quantize_expert(ex, quant.QuantSpec(bits=bits))
    desc = {"layer": 0, "expert": 0, "bits": bits, "d_model": d, "hidden": hidden}
    return desc, expert_tensors(module, bits)


def run(d: int, hidden: int, bits: int, n: int, kernel: str) -> dict:
    torch.set_num_threads(1)
    desc, tensors = make_expert(d, hidden, bits)
    local = build_shard(desc, {k: v.clone() for k, v in tensors.items()}, kernel)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rows = []
    with LocalCluster(1, nbytes / 2**20 + 1, extra_args=["--fp16-kernel", kernel]) as lc:
        c = lc.clients[0]
        c.call(P.MsgType.LOAD_SHARD, {"shards": [desc]}, {f"0/{k}": v for k, v in tensors.items()}, timeout_s=30)
        ctx = zmq.Context()
        dealers = []
        for _ in range(max(BATCHES)):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(lc.endpoints[0])
            dealers.append(s)
        body = {"layer": 0, "expert": 0}
        try:
            for B in BATCHES:
                x = torch.randn(B, d)
                with torch.inference_mode():
                    for _ in range(5):
                        local(x)
                    lt = []
                    for _ in range(n):
                        t0 = time.perf_counter_ns()
                        local(x)
                        lt.append(time.perf_counter_ns() - t0)
                one, comp = [], []
                for _ in range(3):
                    c.call(P.MsgType.EXPERT_CALL, body, {"x": x})
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    r = c.call(P.MsgType.EXPERT_CALL, body, {"x": x})
                    one.append(time.perf_counter_ns() - t0)
                    comp.append(r.body["compute_ns"])
                conc, merged = [], []
                frames = [P.encode(P.MsgType.EXPERT_CALL, i + 1, body, {"x": x[i:i + 1]}) for i in range(B)]
                for rep in range(n + 2):
                    t0 = time.perf_counter_ns()
                    for i in range(B):
                        dealers[i].send_multipart(frames[i])
                    batches = []
                    for i in range(B):
                        dealers[i].poll(10000)
                        m = P.decode(dealers[i].recv_multipart())
                        batches.append(m.body.get("batch", 1))
                    if rep >= 2:
                        conc.append(time.perf_counter_ns() - t0)
                        merged.append(statistics.mean(batches))
                med = statistics.median
                rows.append({"batch": B, "local_us": med(lt) / 1e3, "one_call_us": med(one) / 1e3,
                             "agent_compute_us": med(comp) / 1e3, "concurrent_us": med(conc) / 1e3,
                             "local_tok_s": B / (med(lt) / 1e9), "one_call_tok_s": B / (med(one) / 1e9),
                             "concurrent_tok_s": B / (med(conc) / 1e9),
                             "one_call_vs_local": (B / (med(one) / 1e9)) / (B / (med(lt) / 1e9)),
                             "mean_merged_batch": statistics.mean(merged)})
        finally:
            for s in dealers:
                s.close(0)
            ctx.term()
    return {"benchmark": "agent_throughput", "d_model": d, "expert_hidden": hidden, "bits": bits,
            "fp16_kernel": kernel, "expert_bytes": nbytes, "n": n, "load1_at_end": os.getloadavg()[0],
            "rows": rows}


def table(res: dict) -> str:
    out = [f"agent throughput, expert d={res['d_model']} hidden={res['expert_hidden']} bits={res['bits']} "
           f"({res['expert_bytes'] / 2**20:.2f} MiB, fp16 kernel {res['fp16_kernel']}), medians of {res['n']}",
           f"{'batch':>5} {'local tok/s':>12} {'1-call tok/s':>13} {'ratio':>6} {'B-callers tok/s':>16} "
           f"{'merged batch':>13} {'local us':>9} {'1-call us':>10} {'agent compute us':>17}"]
    for r in res["rows"]:
        out.append(f"{r['batch']:5d} {r['local_tok_s']:12.0f} {r['one_call_tok_s']:13.0f} "
                   f"{r['one_call_vs_local']:6.2f} {r['concurrent_tok_s']:16.0f} {r['mean_merged_batch']:13.1f} "
                   f"{r['local_us']:9.1f} {r['one_call_us']:10.1f} {r['agent_compute_us']:17.1f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1408)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--kernel", choices=("exact", "fast"), default="fast", help="fp16 shard kernel")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    res = run(args.d, args.hidden, args.bits, args.n, args.kernel)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

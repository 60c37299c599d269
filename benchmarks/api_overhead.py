"""What the OpenAI-compatible HTTP API adds per streamed token over the native ZeroMQ client.

One entry process (`python -m nodes.entry --http`, the testbed's) on loopback, its experts on
--agents agent processes (round-robin placement pushed as a PLACEMENT, as the controller would),
and this process as the client. R rounds; each round sends the same greedy request (same prompt
ids, --tokens new tokens, EOS ignored) once through each client, in alternating order:
  native  a DEALER socket speaking GENERATE / TOKEN / DONE (what nodes.client does, CURVE on)
  http    the official `openai` package, a streamed /v1/completions (SSE), as nodes.http_client
Token times are when the client sees each token (a TOKEN message, or an SSE chunk parsed by the
openai client). Per round we take the difference http - native of the mean time per output
token (TPOT, first to last token) and of TTFT; the table gives the median and mean of those
paired differences over the rounds, and each client's absolute medians. Both clients must get
the same token ids (checked every round).

    .venv/bin/python benchmarks/api_overhead.py [--agents 2] [--rounds 30] [--tokens 64] [--json-out F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zmq  # noqa: E402

from nodes import protocol as P  # noqa: E402
from nodes.local import LocalCluster, deploy_experts, free_port, round_robin_placement, shard_message  # noqa: E402
from nodes.security import load_keys, make_keys, secure_client  # noqa: E402
from nodes.transport import AgentClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def native_request(sock: zmq.Socket, rid: int, ids: list[int], n: int) -> tuple[list[int], list[int], int]:
    t0 = time.monotonic_ns()
    sock.send_multipart(P.encode(P.MsgType.GENERATE, rid, {"max_new_tokens": n, "temperature": 0.0,
                                                           "stop_at_eos": False},
                                 {"prompt": torch.tensor(ids, dtype=torch.int64)}, src="bench"), copy=False)
    toks, times = [], []
    while True:
        if not sock.poll(30_000):
            raise RuntimeError("native: no answer in 30 s")
        msg = P.decode(sock.recv_multipart(copy=False))
        if msg.req_id != rid:
            continue
        if msg.type == P.MsgType.TOKEN:
            times.append(time.monotonic_ns())
            toks.append(msg.body["token"])
        elif msg.type == P.MsgType.DONE:
            return toks, times, t0
        else:
            raise RuntimeError(f"native: {msg.type.name} {msg.body}")


def http_request(client, model: str, ids: list[int], n: int) -> tuple[list[int], list[int], int]:
    t0 = time.monotonic_ns()
    stream = client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    toks, times = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason is None:
            times.append(time.monotonic_ns())
            toks.extend(chunk.choices[0].model_extra.get("token_ids") or [])
    return toks, times, t0


def stats_of(times: list[int], t0: int) -> tuple[float, float]:
    ttft = (times[0] - t0) / 1e6
    tpot = (times[-1] - times[0]) / 1e6 / (len(times) - 1)
    return ttft, tpot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-moe"))
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    import openai

    from coel_model.checkpoint import load_model
    from coel_model.tokenizer import Tokenizer
    from nodes.workload import PromptSource
    model = load_model(args.model)
    mc = model.cfg
    ids = PromptSource(None, 1, Tokenizer.load(args.model)).ids(args.prompt_tokens)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="coel-bench-api-") as tmp:
        keys_dir = str(make_keys(Path(tmp) / "keys"))
        names = [f"tcp://placeholder:{i}" for i in range(args.agents)]
        placement0 = round_robin_placement(mc.n_layers, mc.n_experts, names)
        need = {n: 0 for n in names}
        for key, eps in placement0.items():
            _, ts = shard_message(model, [key], 16)
            for ep in eps:
                need[ep] += sum(t.numel() * t.element_size() for t in ts.values())
        with LocalCluster(args.agents, [need[n] / 2**20 + 1 for n in names], keys_dir) as cluster:
            rename = dict(zip(names, cluster.endpoints))
            placement = {k: [rename[e] for e in eps] for k, eps in placement0.items()}
            deploy_experts(model, cluster, placement, 16)
            entry_ep, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            entry = subprocess.Popen([sys.executable, "-m", "nodes.entry", "--name", "bench", "--listen", entry_ep,
                                      "--model", args.model, "--keys", keys_dir, "--workers", "1",
                                      "--http", f"127.0.0.1:{http_port}"], env=env, cwd=str(ROOT))
            ctl = AgentClient(entry_ep, load_keys(keys_dir), name="bench")
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            secure_client(sock, load_keys(keys_dir))
            sock.connect(entry_ep)
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        ctl.call(P.MsgType.PLACEMENT, {"version": 1, "holders": [[l, e, eps] for (l, e), eps
                                                                                  in placement.items()]},
                                 timeout_s=2.0)
                        break
                    except Exception:
                        if entry.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError("the entry did not start") from None
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="bench", max_retries=0,
                                       timeout=60)
                served = client.models.list().data[0].id
                for _ in range(3):  # warm-up: both paths, connections open, caches warm
                    native_request(sock, 1, ids, args.tokens)
                    http_request(client, served, ids, args.tokens)
                rows = []
                for r in range(args.rounds):
                    res = {}
                    for variant in (("native", "http") if r % 2 == 0 else ("http", "native")):
                        if variant == "native":
                            toks, times, t0 = native_request(sock, 100 + r, ids, args.tokens)
                        else:
                            toks, times, t0 = http_request(client, served, ids, args.tokens)
                        res[variant] = (toks, *stats_of(times, t0))
                    if res["native"][0] != res["http"][0]:
                        raise RuntimeError(f"round {r}: the two clients got different tokens")
                    rows.append({"round": r, "native_ttft_ms": res["native"][1], "native_tpot_ms": res["native"][2],
                                 "http_ttft_ms": res["http"][1], "http_tpot_ms": res["http"][2]})
            finally:
                sock.close(0)
                ctx.term()
                ctl.close()
                entry.terminate()
                try:
                    entry.wait(10)
                except subprocess.TimeoutExpired:
                    entry.kill()
    d_tpot = [r["http_tpot_ms"] - r["native_tpot_ms"] for r in rows]
    d_ttft = [r["http_ttft_ms"] - r["native_ttft_ms"] for r in rows]
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    out = {"agents": args.agents, "rounds": args.rounds, "tokens": args.tokens, "prompt_tokens": len(ids),
           "native_tpot_ms_median": med("native_tpot_ms"), "http_tpot_ms_median": med("http_tpot_ms"),
           "native_ttft_ms_median": med("native_ttft_ms"), "http_ttft_ms_median": med("http_ttft_ms"),
           "added_tpot_ms_median": statistics.median(d_tpot), "added_tpot_ms_mean": statistics.fmean(d_tpot),
           "added_tpot_ms_stdev": statistics.stdev(d_tpot) if len(d_tpot) > 1 else 0.0,
           "added_ttft_ms_median": statistics.median(d_ttft), "added_ttft_ms_mean": statistics.fmean(d_ttft),
           "load_average": os.getloadavg(), "rows": rows}
    print(f"{args.rounds} rounds x {args.tokens} tokens, prompt {len(ids)} tokens, {args.agents} agents "
          f"(load average {out['load_average'][0]:.2f})")
    print(f"{'':<22} {'native':>9} {'http':>9} {'added (median of paired diffs)':>32} {'mean':>8}")
    print(f"{'TPOT (ms per token)':<22} {out['native_tpot_ms_median']:>9.3f} {out['http_tpot_ms_median']:>9.3f} "
          f"{out['added_tpot_ms_median']:>32.3f} {out['added_tpot_ms_mean']:>8.3f}")
    print(f"{'TTFT (ms)':<22} {out['native_ttft_ms_median']:>9.3f} {out['http_ttft_ms_median']:>9.3f} "
          f"{out['added_ttft_ms_median']:>32.3f} {out['added_ttft_ms_mean']:>8.3f}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

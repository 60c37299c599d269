"""The workload client (`coel client`): Poisson arrivals of real prompts to one entry service.

Prompts are cut from the held-out text split (data/heldout.txt): a seeded random document and
offset. With --model the client tokenizes them itself and sends exactly --prompt-tokens ids;
without it, it sends the text and the entry tokenizes and cuts it to --prompt-tokens.
One DEALER socket carries every outstanding request (replies are matched by request id), so
slow requests never delay the next arrival. Each request becomes one "request" span
(attrs: ok, ttft_ms, tpot_ms, prompt_tokens, new_tokens, class, entry, error?). A request that
fails is recorded as lost (ok=false), never retried. The client stops sending after
--duration-s and exits at most --drain-s later.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from coel_model.errors import ConfigError
from nodes import protocol as P
from nodes.background import stop_on_signals
from nodes.security import load_keys, secure_client
from nodes.transport import HeldInbox, endpoint_host, peer_address, recv_decoded
from nodes.workload import Arrival, PromptSource, percentile as _pct, poisson_arrivals, read_trace_csv


@dataclass(frozen=True)
class ClientConfig:
    name: str
    entry: str  # entry service endpoint
    rate_rps: float
    prompt_tokens: int
    max_new_tokens: int
    duration_s: float
    drain_s: float = 30.0
    slo_class: str = "default"
    seed: int = 0
    prompts_path: str | None = None  # default: the repository's data/heldout.txt
    keys_dir: str | None = None
    trace_path: str | None = None
    model_dir: str | None = None  # tokenizer source; None = the entry tokenizes
    temperature: float = 0.0
    request_timeout_s: float = 60.0  # silence on one request this long = lost
    trace_csv: str | None = None  # replay this request trace (nodes.workload) instead of Poisson arrivals

    def __post_init__(self) -> None:
        if self.rate_rps <= 0 or not math.isfinite(self.rate_rps):
            raise ConfigError(f"client {self.name}: --rate-rps must be > 0 (got {self.rate_rps})")
        if self.prompt_tokens < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"client {self.name}: --prompt-tokens and --max-new-tokens must be >= 1")
        if self.duration_s <= 0 or self.drain_s < 0:
            raise ConfigError(f"client {self.name}: need --duration-s > 0 and --drain-s >= 0")


@dataclass
class Outstanding:
    req_id: int
    trace_id: str
    t0_ns: int
    prompt_tokens: int
    token_ns: list[int] = field(default_factory=list)
    last_ns: int = 0
    entry: str = ""


def run_client(cfg: ClientConfig, delay=None, stop: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Drive the workload; returns a summary. `stop` (threading.Event-like) ends it early;
    `tokenizer` (anything with encode(text) -> ids) overrides --model's."""
    tok = tokenizer
    if tok is None and cfg.model_dir:
        from coel_model.evaluate import base_model_dir, find_tokenizer
        tok = find_tokenizer(cfg.model_dir, base_model_dir(cfg.model_dir))
    prompts = PromptSource(cfg.prompts_path, cfg.seed, tok)
    arrivals = client_arrivals(cfg)
    tracer = None
    if cfg.trace_path:
        from common.tracing import TraceWriter
        tracer = TraceWriter(cfg.trace_path, cfg.name)
    keys = load_keys(cfg.keys_dir) if cfg.keys_dir else None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    secure_client(sock, keys)
    sock.connect(cfg.entry)
    inbox = HeldInbox(delay)
    host = endpoint_host(cfg.entry)
    outstanding: dict[int, Outstanding] = {}
    results = {"sent": 0, "ok": 0, "lost": 0, "ttft_ms": [], "tpot_ms": []}
    next_id = 1
    t_start = time.monotonic()
    end_send = t_start + cfg.duration_s
    hard_end = end_send + cfg.drain_s

    def finish(o: Outstanding, ok: bool, error: str | None, new_tokens: int | None = None,
               prompt_tokens: int | None = None) -> None:
        t1 = time.monotonic_ns()
        attrs: dict[str, Any] = {"ok": ok, "prompt_tokens": prompt_tokens or o.prompt_tokens,
                                 "new_tokens": len(o.token_ns) if new_tokens is None else new_tokens,
                                 "class": cfg.slo_class, "entry": o.entry or cfg.entry, "client": cfg.name}
        if o.token_ns:
            attrs["ttft_ms"] = round((o.token_ns[0] - o.t0_ns) / 1e6, 3)
            results["ttft_ms"].append(attrs["ttft_ms"])
        if len(o.token_ns) > 1:
            attrs["tpot_ms"] = round((o.token_ns[-1] - o.token_ns[0]) / 1e6 / (len(o.token_ns) - 1), 3)
            results["tpot_ms"].append(attrs["tpot_ms"])
        if error:
            attrs["error"] = error[:300]
        results["ok" if ok else "lost"] += 1
        if tracer is not None:
            tracer.span(o.trace_id, "request", o.t0_ns, t1, **attrs)

    try:
        i = 0
        while True:
            now = time.monotonic()
            if stop is not None and stop.is_set():
                break
            while i < len(arrivals) and now >= t_start + arrivals[i].t_s:
                a = arrivals[i]
                rid = next_id
                next_id += 1
                trace_id = f"{cfg.name}-{uuid.uuid4().hex[:12]}"
                body: dict[str, Any] = {"max_new_tokens": a.max_new_tokens, "class": cfg.slo_class,
                                        "temperature": cfg.temperature}
                tensors = None
                if tok is not None:
                    ids = prompts.ids(a.prompt_tokens)
                    tensors = {"prompt": torch.tensor(ids, dtype=torch.int64)}
                    n_prompt = len(ids)
                else:
                    body["prompt_text"] = prompts.text(a.prompt_tokens)
                    body["max_prompt_tokens"] = a.prompt_tokens
                    n_prompt = a.prompt_tokens
                t0 = time.monotonic_ns()
                sock.send_multipart(P.encode(P.MsgType.GENERATE, rid, body, tensors, trace=trace_id, src=cfg.name),
                                    copy=False)
                outstanding[rid] = Outstanding(rid, trace_id, t0, n_prompt, last_ns=t0)
                results["sent"] += 1
                i += 1
            if i >= len(arrivals) and not outstanding:
                break
            if now >= hard_end:
                break
            wake = t_start + arrivals[i].t_s if i < len(arrivals) else hard_end
            timeout_ms = max(0.0, min(100.0, (wake - now) * 1e3))
            if sock.poll(inbox.timeout_ms(timeout_ms)):
                for frames, msg in recv_decoded(sock):
                    if inbox.admit(msg, lambda: peer_address(frames[0], host), msg.sent_ns, msg.nbytes):
                        _on_message(msg, outstanding, finish)
            for msg in inbox.pop_ready():
                _on_message(msg, outstanding, finish)
            now_ns = time.monotonic_ns()
            for rid, o in list(outstanding.items()):
                if now_ns - o.last_ns > cfg.request_timeout_s * 1e9:
                    del outstanding[rid]
                    finish(o, False, f"no answer from {cfg.entry} for {cfg.request_timeout_s:.0f} s")
        for o in list(outstanding.values()):
            finish(o, False, f"not finished within the drain time ({cfg.drain_s:.0f} s after the last arrival "
                             f"window)")
        outstanding.clear()
    finally:
        sock.close(linger=0)
        ctx.term()
        if tracer is not None:
            tracer.close()
    return {"client": cfg.name, "sent": results["sent"], "ok": results["ok"], "lost": results["lost"],
            "ttft_ms_p50": _pct(results["ttft_ms"], 50), "ttft_ms_p95": _pct(results["ttft_ms"], 95),
            "tpot_ms_p50": _pct(results["tpot_ms"], 50), "tpot_ms_p95": _pct(results["tpot_ms"], 95)}


def client_arrivals(cfg: ClientConfig, max_seq_len: int | None = None) -> list[Arrival]:
    """The workload's requests: the replayed trace when one is given, else Poisson arrivals."""
    if cfg.trace_csv:
        if max_seq_len is None and cfg.model_dir:
            from coel_model.config import read_json
            max_seq_len = int(read_json(Path(cfg.model_dir) / "config.json", "model config not found")
                              .get("max_seq_len", 0)) or None
        return read_trace_csv(cfg.trace_csv, cfg.duration_s, max_seq_len)
    return poisson_arrivals(cfg.rate_rps, cfg.duration_s, cfg.seed, cfg.prompt_tokens, cfg.max_new_tokens)


def _on_message(msg: P.Message, outstanding: dict[int, Outstanding], finish) -> None:
    o = outstanding.get(msg.req_id)
    if o is None:
        return  # a late message of a request already given up
    now = time.monotonic_ns()
    o.last_ns = now
    o.entry = msg.src or o.entry
    if msg.type == P.MsgType.TOKEN:
        o.token_ns.append(now)
    elif msg.type == P.MsgType.DONE:
        del outstanding[msg.req_id]
        finish(o, True, None, msg.body["new_tokens"], msg.body["prompt_tokens"])
    elif msg.type == P.MsgType.ERROR:
        del outstanding[msg.req_id]
        finish(o, False, f"{msg.body['code']}: {msg.body['reason']}")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The options both load generators (ZeroMQ here, HTTP in nodes.http_client) take."""
    p.add_argument("--name", required=True, help="client host name (traces)")
    p.add_argument("--rate-rps", type=float, required=True, help="mean Poisson arrival rate (requests/s)")
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--slo-class", default="default")
    p.add_argument("--duration-s", type=float, required=True, help="send requests for this long")
    p.add_argument("--drain-s", type=float, default=30.0, help="then wait at most this long for answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="held-out text file (default: data/heldout.txt)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="silence on one request this long = lost")
    p.add_argument("--trace", default=None, help="append one 'request' span per request (JSONL)")
    p.add_argument("--delay-file", default=None, help="emulated path delays (default $COEL_DELAY_FILE)")
    p.add_argument("--trace-csv", default=None,
                   help="replay this request trace (CSV: arrival time, prompt tokens, output tokens; nodes/workload.py) "
                        "instead of Poisson arrivals; --rate-rps, --prompt-tokens, --max-new-tokens are then unused")


def add_client_args(p: argparse.ArgumentParser) -> None:
    add_workload_args(p)
    p.add_argument("--entry", required=True, help="entry service endpoint, e.g. tcp://10.0.0.4:7200")
    p.add_argument("--keys", default=None, help="CURVE key directory (default: plain text)")
    p.add_argument("--model", default=None, help="tokenize here with this checkpoint's tokenizer "
                                                 "(default: the entry tokenizes the prompt text)")


def config_from_args(args: argparse.Namespace, entry: str, keys_dir: str | None = None) -> ClientConfig:
    """The ClientConfig of the options both load generators (ZeroMQ here, HTTP in nodes.http_client) share."""
    return ClientConfig(name=args.name, entry=entry, rate_rps=args.rate_rps, prompt_tokens=args.prompt_tokens,
                        max_new_tokens=args.max_new_tokens, duration_s=args.duration_s, drain_s=args.drain_s,
                        slo_class=args.slo_class, seed=args.seed, prompts_path=args.prompts, keys_dir=keys_dir,
                        trace_path=args.trace, model_dir=args.model, temperature=args.temperature,
                        request_timeout_s=args.request_timeout_s, trace_csv=args.trace_csv)


def run_until_signalled(run: Any) -> int:
    """Run `run(stop)` with SIGTERM/SIGINT setting `stop`, then print its summary as one JSON line."""
    import threading
    stop = threading.Event()
    stop_on_signals(stop.set)
    print(json.dumps(run(stop)))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from nodes.delayqueue import delay_hook_from_env
    cfg = config_from_args(args, args.entry, args.keys)
    return run_until_signalled(lambda stop: run_client(cfg, delay_hook_from_env(args.delay_file), stop))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nodes.client")
    add_client_args(ap)
    return cmd_client(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

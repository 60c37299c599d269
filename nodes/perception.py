"""Perception: a server measures itself under its real limits (cgroup CPU share, memory) before it
reports ready, so that the planner's cost model uses measured figures, not nominal constants.

What is measured: CPU time of this thread (time.thread_time_ns), the fastest of repeated runs, in
ms. CPU time, not wall time: start-up is busy and a server with a small CPU share is throttled
while it measures; the planner applies the share afterwards (controller/perception.py).
  expert calls   per bit width and batch size, on a reference-shaped expert built exactly as the
                 agent builds shards (packed tensors -> nodes.shards.build_shard); the planner
                 scales them by bytes to the model's experts
  message        one expert-call round trip through a ZeroMQ socket on loopback, encoded and
                 decoded with nodes.protocol at both ends (the software cost of every call and
                 hop, without the link)
  storage        loading an on-demand shard from local storage: a fixed part and a part per MB
  backbone       (entries, which hold the model) one decoder layer's attention + norms + router
                 in decode, per prefill token, and the head, with the expert work left out

The report is a plain dict (msgpack-able) sent with REGISTER (body "perception") and again in a
HEARTBEAT body after a resource change; controller/perception.py turns it into Server fields.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

import torch

PERCEPTION_VERSION = 1
REF_D_MODEL = 256  # reference expert shape for the agents (they measure before any shard arrives)
REF_HIDDEN = 512
BITS = (2, 3, 4, 8, 16)
BATCHES = (1, 8)


def _fastest_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time_ns()
        fn()
        ts.append((time.thread_time_ns() - t0) / 1e6)
    # the fastest repeat: start-up is busy (every process of a run measures at once, other work
    # shares the cores), and the server's CPU share is applied by the planner afterwards
    return float(min(ts))


def _ref_shard(bits: int, d_model: int, hidden: int, seed: int = 0):
    """(desc, tensors, module) of one expert as LOAD_SHARD carries it and the agent builds it."""
    from coel_model.model import SwiGLUExpert
    from nodes.shards import build_shard, expert_tensors
    torch.manual_seed(seed)
    ex = SwiGLUExpert(d_model, hidden)
    desc = {"layer": 0, "expert": 0, "bits": bits, "d_model": d_model, "hidden": hidden}
    if bits < 16:
        from coel_model import quant
        ex = quant.quantize_expert(ex, quant.QuantSpec(bits=bits, group_size=64, method="rtn"))
        desc.update(group_size=64, method="rtn")
    tensors = expert_tensors(ex, bits)
    return desc, tensors, build_shard(desc, tensors)


def measure_expert_calls(d_model: int = REF_D_MODEL, hidden: int = REF_HIDDEN, bits: tuple[int, ...] = BITS,
                         batches: tuple[int, ...] = BATCHES, reps: int = 15) -> list[dict[str, Any]]:
    from nodes.shards import module_nbytes
    rows = []
    with torch.inference_mode():
        for b in bits:
            _, _, m = _ref_shard(b, d_model, hidden)
            nb = module_nbytes(m)
            for n in batches:
                x = torch.randn(n, d_model)
                rows.append({"bits": b, "batch": n, "nbytes": int(nb), "ms": round(_fastest_ms(lambda: m(x), reps), 4)})
    return rows


def measure_storage(d_model: int = REF_D_MODEL, hidden: int = REF_HIDDEN, reps: int = 5) -> dict[str, float]:
    """On-demand load (read + build, as nodes.agent.ShardStore.get does) at two sizes: fixed ms
    and ms per MB from the line through them."""
    from nodes.shards import build_shard, module_nbytes
    pts = []
    with tempfile.TemporaryDirectory(prefix="coel-perception-") as tmp:
        for bits in (4, 16):
            desc, tensors, m = _ref_shard(bits, d_model, hidden)
            path = os.path.join(tmp, f"b{bits}.pt")
            torch.save({"desc": desc, "tensors": tensors}, path)

            def load() -> None:
                doc = torch.load(path, weights_only=True)
                build_shard(doc["desc"], doc["tensors"])

            pts.append((module_nbytes(m) / 1e6, _fastest_ms(load, reps, warmup=1)))
    (x0, y0), (x1, y1) = pts
    per_mb = max((y1 - y0) / (x1 - x0), 0.0) if x1 > x0 else 0.0
    return {"ms_fixed": round(max(y0 - per_mb * x0, 0.0), 4), "ms_per_mb": round(per_mb, 4)}


def _echo_server(port_w: int, reps: int) -> None:
    """Child process: ROUTER on a random loopback port (written to the pipe), echoes expert calls."""
    import zmq
    from nodes import protocol as P
    ctx = zmq.Context()
    srv = ctx.socket(zmq.ROUTER)
    srv.linger = 0
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    os.write(port_w, f"{port}\n".encode())
    for _ in range(reps):
        if not srv.poll(2000):  # idle: the measuring side is done
            break
        frames = srv.recv_multipart()
        head = frames[:2] if frames[1] == b"" else frames[:1]  # answer in the caller's envelope
        msg = P.decode(frames[len(head):])
        srv.send_multipart(head + P.encode(P.MsgType.EXPERT_REPLY, msg.req_id,
                                           {"queue_ns": 0, "compute_ns": 0}, {"y": msg.tensors["x"]}))
    srv.close(0)
    ctx.term()


class EchoProcess:
    """A forked child (same cgroup, so the same CPU limit) that answers expert calls with their
    input: the other end of a real cross-process socket round trip. Use as a context manager."""

    def __init__(self, max_messages: int = 100_000):
        self.max_messages = max_messages
        self.pid = 0
        self.endpoint = ""

    def __enter__(self) -> "EchoProcess":
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: no torch work, only sockets
            code = 0
            try:
                os.close(r)
                _echo_server(w, self.max_messages)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r) as fh:
            self.endpoint = f"tcp://127.0.0.1:{int(fh.readline().strip() or 0)}"
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal
        try:
            os.kill(self.pid, signal.SIGKILL)  # done measuring (it would leave after 2 s idle)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def measure_message_rtt(d_model: int = REF_D_MODEL, reps: int = 60) -> float:
    """CPU cost of one batch-1 expert call and its reply between two processes of this server (a
    forked echo: same cgroup) over tcp loopback, encoded and decoded with the wire protocol at both
    ends: twice the caller's CPU time per round trip (the echo does the same work), the software
    cost of every call and hop without the link."""
    import zmq
    from nodes import protocol as P
    warmup = 5
    with EchoProcess(reps + warmup) as echo:
        ctx = zmq.Context()
        cli = ctx.socket(zmq.DEALER)
        cli.linger = 0
        cli.connect(echo.endpoint)
        x = torch.randn(1, d_model)
        try:
            def call() -> None:
                cli.send_multipart([b""] + P.encode(P.MsgType.EXPERT_CALL, 1, {"layer": 0, "expert": 0}, {"x": x}))
                if not cli.poll(5000):
                    raise TimeoutError("perception: the echo process did not answer")
                frames = cli.recv_multipart()
                P.decode(frames[1:] if frames[0] == b"" else frames)

            return round(2 * _fastest_ms(call, reps, warmup=warmup), 4)
        finally:
            cli.close(0)
            ctx.term()


def measure_backbone(model, prompt_tokens: int = 32, decode_steps: int = 12, with_calls: bool = True
                     ) -> dict[str, float]:
    """Per decoder layer: decode ms (one token with a KV cache) and prefill ms per token; the head
    (final norm + lm_head). Experts are skipped (a zero executor): their cost is measured on the
    servers that run them. With `with_calls`, also the coordinator's own CPU per layer when every
    routed expert goes through the real Coordinator to another process of this server that echoes
    it (`layer_scatter_ms`: route, encode, send, poll, decode, combine; the round trip itself is
    the message cost)."""
    from coel_model.model import KVCache, expert_inputs
    L = model.cfg.n_layers

    def no_experts(layer, routing, h):
        return {e: torch.zeros_like(x) for e, x in expert_inputs(routing, h).items()}

    with torch.inference_mode():
        toks = torch.randint(0, model.cfg.vocab_size, (1, prompt_tokens))
        x = model.embed(toks[:, :1])
        head_ms = _fastest_ms(lambda: model.lm_head(model.norm(x)), 20)

        def prefill() -> None:
            model(toks, KVCache(model.cfg, 1), executor=no_experts)

        pre_ms = _fastest_ms(prefill, 5, warmup=1)
        steps = []
        for _ in range(5):
            cache = KVCache(model.cfg, 1)
            model(toks, cache, executor=no_experts)
            one = toks[:, :1]
            t0 = time.thread_time_ns()
            for _ in range(decode_steps):
                model(one, cache, executor=no_experts)
            steps.append((time.thread_time_ns() - t0) / 1e6 / decode_steps)
        step_ms = min(steps)  # the least disturbed repeat: start-up is busy; the CPU share is applied later
    out = {"layer_decode_ms": round(max(step_ms - head_ms, 0.0) / L, 4),
           "prefill_token_layer_ms": round(max(pre_ms - head_ms, 0.0) / (L * prompt_tokens), 5),
           "head_ms": round(head_ms, 4), "n_layers": L}
    if with_calls:
        from nodes.coordinator import Coordinator
        with EchoProcess() as echo:
            import zmq
            ctx = zmq.Context()
            holders = {(l, e): [echo.endpoint] for l in range(L) for e in range(model.cfg.n_experts)}
            coord = Coordinator(model, holders, ctx=ctx)
            try:
                with torch.inference_mode():
                    calls = []
                    for _ in range(5):
                        cache = KVCache(model.cfg, 1)
                        model(toks[:, :4], cache, executor=coord)
                        t0 = time.thread_time_ns()
                        for _ in range(decode_steps):
                            model(toks[:, :1], cache, executor=coord)
                        calls.append((time.thread_time_ns() - t0) / 1e6 / decode_steps)
                out["layer_scatter_ms"] = round(max(min(calls) - step_ms, 0.0) / L, 4)
            finally:
                coord.close()
                ctx.term()
    return out


def perceive(model=None, expert_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """The whole report; `model` (entries) adds the backbone part; `expert_shape` (d_model,
    hidden) measures experts of that shape instead of the reference one."""
    t0 = time.perf_counter()
    d, h = expert_shape or (REF_D_MODEL, REF_HIDDEN)
    torch_threads = torch.get_num_threads()
    out: dict[str, Any] = {"version": PERCEPTION_VERSION, "pid": os.getpid(), "torch_threads": torch_threads,
                           "expert": {"d_model": d, "hidden": h, "rows": measure_expert_calls(d, h)},
                           "msg_rtt_ms": measure_message_rtt(d), "storage": measure_storage(d, h)}
    if model is not None:
        out["backbone"] = measure_backbone(model)
    try:
        from nodes.cgroups import cgroup_limits
        out["limits"] = {k: v for k, v in cgroup_limits().items() if v is not None}
    except Exception:  # limits are context for the report, not needed by the planner
        pass
    out["measure_s"] = round(time.perf_counter() - t0, 3)
    return out

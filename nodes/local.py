"""Loopback deployment without Mininet: N agent processes + a coordinator on 127.0.0.1.

`LocalCluster` starts and always stops the agent processes (SHUTDOWN, then SIGTERM, then
SIGKILL; also on errors and Ctrl-C). `deploy_experts` sends every expert's tensors over the
wire with LOAD_SHARD (so load time is real transfer time). `serve_local` is `coel serve-local`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from coel_model.errors import ConfigError
from coel_model.generate import check_prompt
from coel_model.model import MoEModel
from nodes import protocol as P
from nodes.agent import MB
from nodes.shards import expert_tensors
from nodes.coordinator import Coordinator, CoordinatorConfig
from nodes.security import KeyDir, load_keys, make_keys
from nodes.transport import AgentClient, NodeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """N agent processes on loopback; use as a context manager so they are always stopped."""

    def __init__(self, n_agents: int, memory_mb: float | list[float], keys_dir: str | None = None,
                 threads: int = 1, trace_dir: str | None = None, start_timeout_s: float = 30.0,
                 extra_args: list[str] | None = None):
        if n_agents < 1:
            raise ConfigError(f"need at least one agent (got {n_agents})")
        mems = memory_mb if isinstance(memory_mb, list) else [memory_mb] * n_agents
        self.keys_dir = keys_dir
        self.keys: KeyDir | None = load_keys(keys_dir) if keys_dir else None
        self.endpoints: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.clients: list[AgentClient] = []
        try:
            for i in range(n_agents):
                ep = f"tcp://127.0.0.1:{free_port()}"
                cmd = [sys.executable, "-m", "nodes.agent", "--endpoint", ep, "--memory-mb", str(mems[i]),
                       "--threads", str(threads), "--name", f"agent{i}"]
                if keys_dir:
                    cmd += ["--keys", keys_dir]
                if trace_dir:
                    cmd += ["--trace-out", str(Path(trace_dir) / f"agent{i}.jsonl")]
                cmd += extra_args or []
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1])))
                self.endpoints.append(ep)
            for i, ep in enumerate(self.endpoints):
                self.clients.append(AgentClient(ep, self.keys, name="serve-local"))
                self._wait_ready(i, start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, i: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.procs[i].poll() is not None:
                raise NodeError(f"agent{i} ({self.endpoints[i]}) exited with code {self.procs[i].returncode} "
                                f"during start-up")
            try:
                self.clients[i].call(P.MsgType.STATUS, timeout_s=0.5)
                return
            except NodeError:
                if time.monotonic() > deadline:
                    raise NodeError(f"agent{i} ({self.endpoints[i]}) not answering after {timeout_s:.0f} s")

    def stop(self, grace_s: float = 3.0) -> None:
        """SHUTDOWN to all at once, then SIGTERM, then SIGKILL whatever is still running."""
        for c in self.clients:
            try:
                c.send(P.encode(P.MsgType.SHUTDOWN, 0, src="serve-local"))
            except Exception:
                pass
        deadline = time.monotonic() + grace_s
        for sig in ("none", "terminate", "kill"):
            for p in self.procs:
                if p.poll() is None and sig != "none":
                    getattr(p, sig)()
            for p in self.procs:
                try:
                    p.wait(max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in self.procs):
                break
            deadline = time.monotonic() + 2.0
        for c in self.clients:
            c.close()
        self.clients, self.procs = [], []

    def kill(self, i: int) -> None:
        """SIGKILL agent i (fault tests)."""
        self.procs[i].kill()
        self.procs[i].wait(5)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def round_robin_placement(n_layers: int, n_experts: int, endpoints: list[str],
                          replicas: int = 1) -> dict[tuple[int, int], list[str]]:
    """(layer, expert) i-th in layer-major order -> endpoints i, i+1, ... (replicas of them)."""
    if not 1 <= replicas <= len(endpoints):
        raise ConfigError(f"replicas must be in 1..{len(endpoints)} (got {replicas})")
    out = {}
    for i, (l, e) in enumerate((l, e) for l in range(n_layers) for e in range(n_experts)):
        out[(l, e)] = [endpoints[(i + r) % len(endpoints)] for r in range(replicas)]
    return out


def load_plan_placement(path: str | Path, endpoints: list[str]) -> tuple[dict, dict]:
    """Plan file -> (placement {(l, e): [endpoint...]}, bits {(l, e): b}).

    Accepts the controller's Plan JSON (`placement[l][e]` = server names, `bits[l][e]`; servers
    are mapped to agents in sorted name order) or a plain
    {"placement": [{"layer", "expert", "agents": [index...], "bits"?}]}.
    """
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
        rows = plan["placement"]
        placement, bits = {}, {}
        if rows and isinstance(rows[0], list):  # controller Plan: placement[l][e] = [server, ...]
            servers = _plan_servers(plan)
            if len(servers) > len(endpoints):
                raise ConfigError(f"{path}: the plan places experts on {len(servers)} servers {servers}, "
                                  f"but only {len(endpoints)} agents run (use --agents {len(servers)})")
            ep_of = dict(zip(servers, endpoints))
            for l, row in enumerate(rows):
                for e, reps in enumerate(row):
                    placement[(l, e)] = [ep_of[srv] for srv in reps]
                    if "bits" in plan:
                        bits[(l, e)] = int(plan["bits"][l][e])
            return placement, bits
        for i, r in enumerate(rows):
            key = (int(r["layer"]), int(r["expert"]))
            idx = r["agents"]
            bad = [a for a in idx if not (isinstance(a, int) and 0 <= a < len(endpoints))]
            if bad:
                raise ConfigError(f"{path}: placement[{i}] names agent(s) {bad}; there are {len(endpoints)}")
            placement[key] = [endpoints[a] for a in idx]
            if "bits" in r:
                bits[key] = int(r["bits"])
        return placement, bits
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: not a usable plan ({type(exc).__name__}: {exc})") from None


def _plan_servers(plan: dict) -> list[str]:
    """A controller Plan's servers (expert holders and stage servers), in the sorted order that
    maps them to agents 0, 1, ..."""
    names = {srv for row in plan["placement"] for reps in row for srv in reps}
    names |= {st["server"] for stages in (plan.get("backbone") or {}).values() for st in stages}
    return sorted(names)


def load_plan_stages(path: str | Path, endpoints: list[str]) -> list[tuple[str, int, int]]:
    """A controller Plan's pipeline as [(endpoint, l0, l1), ...] (the first entry's stages, agents
    mapped as in load_plan_placement); [] when it has no pipeline (one stage or none)."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
        backbone = plan.get("backbone") or {}
        if not backbone or not plan["placement"] or not isinstance(plan["placement"][0], list):
            return []
        stages = backbone[sorted(backbone)[0]]
        if len(stages) < 2:
            return []
        ep_of = dict(zip(_plan_servers(plan), endpoints))
        out = [(ep_of[st["server"]], int(st["layers"][0]), int(st["layers"][1])) for st in stages]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{path}: not a usable plan backbone ({type(exc).__name__}: {exc})") from None
    n_layers = len(plan["placement"])
    bounds = [(l0, l1) for _, l0, l1 in out]
    if bounds[0][0] != 0 or bounds[-1][1] != n_layers or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"{path}: backbone stages {bounds} do not cover layers [0, {n_layers}) in order")
    return out


def stage_message(model: MoEModel, l0: int, l1: int, placement: dict, kv_cache_bytes: int,
                  compression: dict | None = None, ends: bool = False) -> tuple[dict, dict]:
    """LOAD_STAGE body + tensors: the backbone slice [l0, l1) (with the embedding and lm_head on
    the first stage, `ends`) and the holders of its experts; fp16 when that loses nothing."""
    from nodes.pipeline import stage_tensors
    holders = [[l, e, list(placement[(l, e)])] for l in range(l0, l1) for e in range(model.cfg.n_experts)]
    body = {"l0": l0, "l1": l1, "config": model.cfg.to_dict(), "holders": holders, "kv_cache_bytes": kv_cache_bytes,
            "ends": ends}
    if compression:
        body["compression"] = compression
    return body, stage_tensors(model, l0, l1, ends)


def kv_cache_bound(model: MoEModel, l0: int, l1: int, requests: int = 8) -> int:
    """A stage's KV-cache bound: `requests` caches of max_seq_len tokens for its layers."""
    c = model.cfg
    return requests * 2 * (l1 - l0) * c.n_kv_heads * c.max_seq_len * c.hd * 4


def shard_message(model: MoEModel, keys: list[tuple[int, int]], bits: dict | int) -> tuple[dict, dict]:
    """LOAD_SHARD body + tensors for the given experts of `model`."""
    cfg = model.cfg
    descs, tensors = [], {}
    for i, (l, e) in enumerate(keys):
        b = bits if isinstance(bits, int) else bits.get((l, e), 16)
        module = model.expert(l, e)
        if b not in (16, 32):
            from coel_model import quant
            module = quant.quantize_expert(module, quant.QuantSpec(bits=b))
        descs.append({"layer": l, "expert": e, "bits": b, "d_model": cfg.d_model, "hidden": cfg.expert_hidden})
        for name, t in expert_tensors(module, b).items():
            tensors[f"{i}/{name}"] = t
    return {"shards": descs}, tensors


def deploy_experts(model: MoEModel, cluster: LocalCluster, placement: dict, bits: dict | int = 16,
                   timeout_s: float = 30.0) -> dict[str, int]:
    """LOAD_SHARD every placed expert to its holders (one message per agent); bytes sent per agent."""
    per_agent: dict[str, list[tuple[int, int]]] = {ep: [] for ep in cluster.endpoints}
    for key, eps in sorted(placement.items()):
        for ep in eps:
            per_agent[ep].append(key)
    sent = {}
    for client in cluster.clients:
        keys = per_agent[client.endpoint]
        if not keys:
            continue
        body, tensors = shard_message(model, keys, bits)
        sent[client.endpoint] = sum(t.numel() * t.element_size() for t in tensors.values())
        client.call(P.MsgType.LOAD_SHARD, body, tensors, timeout_s=timeout_s)
    return sent


def parse_compression(spec: str | None) -> dict | None:
    """'--compression' text (see CompressionSettings.parse) -> header settings; None when off."""
    if not spec:
        return None
    from nodes.compression.settings import CompressionSettings
    try:
        settings = CompressionSettings.parse(spec)
    except ValueError as exc:
        raise ConfigError(f"--compression: {exc}") from None
    return settings.to_header() or None


@dataclass(frozen=True)
class ServeLocalConfig:
    model_dir: str
    prompt: str
    max_new_tokens: int = 16
    n_agents: int = 3
    plan_path: str | None = None
    bits: int = 16  # expert bits when no plan gives them (16 = fp16 passthrough)
    compression: str | None = None
    secure: bool = True  # CURVE with temporary keys
    memory_mb: float = 0.0  # per-agent budget; 0 = exactly what its shards need (+1 MiB)
    trace_out: str | None = None
    call_timeout_s: float = 5.0
    replicas: int = 1
    prompt_ids: tuple[int, ...] | None = None  # bypass the tokenizer (tests)
    threads: int = 1  # torch threads per agent process


def _tokenizer(model_dir: str):
    try:
        from coel_model.evaluate import base_model_dir, find_tokenizer
        return find_tokenizer(model_dir, base_model_dir(model_dir))
    except ModuleNotFoundError:
        from coel_model.tokenizer import Tokenizer
        return Tokenizer.load(model_dir)


def _local_layout(cfg: ServeLocalConfig, model: MoEModel, names: list[str]) -> tuple[dict, dict, list, list[float]]:
    """Placement and stages on placeholder agent names, expert bits, and each agent's budget (MiB):
    sizes first, so each agent's budget can default to what it will hold."""
    mc = model.cfg
    if cfg.plan_path:
        placement0, bits = load_plan_placement(cfg.plan_path, names)
    else:
        placement0, bits = round_robin_placement(mc.n_layers, mc.n_experts, names, cfg.replicas), {}
    bits_of = {k: bits.get(k, cfg.bits) for k in placement0}
    stages0 = load_plan_stages(cfg.plan_path, names) if cfg.plan_path else []
    need = {n: 0 for n in names}
    for key, eps in placement0.items():
        _, ts = shard_message(model, [key], bits_of[key])
        nb = sum(t.numel() * t.element_size() for t in ts.values())
        for ep in eps:
            need[ep] += nb
    for ep, l0, l1 in stages0:  # each stage's backbone counts against its agent's budget
        need[ep] += sum(t.numel() * t.element_size() for t in stage_message(model, l0, l1, placement0, 0,
                                                                             ends=l0 == 0)[1].values())
    return placement0, bits_of, stages0, [cfg.memory_mb or (need[n] / MB + 1.0) for n in names]


def serve_local(cfg: ServeLocalConfig) -> dict[str, Any]:
    from coel_model.checkpoint import load_model
    model = load_model(cfg.model_dir)
    mc = model.cfg
    tok = None
    if cfg.prompt_ids is not None:
        prompt = list(cfg.prompt_ids)
    else:
        tok = _tokenizer(cfg.model_dir)
        prompt = tok.encode(cfg.prompt)
    check_prompt(mc, prompt, cfg.max_new_tokens)  # before any agent starts
    compression = parse_compression(cfg.compression)
    with tempfile.TemporaryDirectory(prefix="coel-serve-local-") as tmp:
        keys_dir = str(make_keys(Path(tmp) / "keys")) if cfg.secure else None
        names = [f"tcp://placeholder:{i}" for i in range(cfg.n_agents)]
        placement0, bits_of, stages0, mems = _local_layout(cfg, model, names)
        with LocalCluster(cfg.n_agents, mems, keys_dir, threads=cfg.threads) as cluster:
            rename = dict(zip(names, cluster.endpoints))
            placement = {k: [rename[e] for e in eps] for k, eps in placement0.items()}
            t0 = time.perf_counter()
            deployed = deploy_experts(model, cluster, placement, bits_of)
            if stages0:
                stages = [(rename[ep], l0, l1) for ep, l0, l1 in stages0]
                deployed.update(deploy_stages(model, cluster, stages, placement, compression))
            deploy_s = time.perf_counter() - t0
            if stages0:
                return _serve_pipeline(cfg, model, cluster, stages, prompt, tok, deployed, deploy_s, compression)
            coord = Coordinator(model, placement, cluster.keys,
                                CoordinatorConfig(call_timeout_s=cfg.call_timeout_s, trace_path=cfg.trace_out,
                                                  name="serve-local"),
                                compression={ep: compression for ep in cluster.endpoints} if compression else None)
            coord.strip_remote_experts()
            threads_before = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)  # more would spin against the agents on shared cores
            try:
                stamps: list[int] = []
                t_start = time.perf_counter_ns()
                out = coord.generate(prompt, cfg.max_new_tokens,
                                     on_token=lambda s, t: stamps.append(time.perf_counter_ns()))
            finally:
                coord.close()
                torch.set_num_threads(threads_before)
    prefill_ms = (stamps[0] - t_start) / 1e6 if stamps else 0.0
    decode_ms = (stamps[-1] - stamps[0]) / 1e6 / (len(stamps) - 1) if len(stamps) > 1 else prefill_ms
    return {"tokens": out, "text": tok.decode(out) if tok is not None else None, "prompt_tokens": prompt,
            "ms_per_token": round(decode_ms, 3), "prefill_ms": round(prefill_ms, 3),
            "bytes_on_wire": coord.bytes_sent + coord.bytes_received,
            "bytes_sent": coord.bytes_sent, "bytes_received": coord.bytes_received,
            "expert_calls": coord.calls, "failovers": coord.failovers,
            "deploy_bytes": sum(deployed.values()), "deploy_s": round(deploy_s, 3),
            "agents": cfg.n_agents, "secure": cfg.secure, "compression": compression}


def deploy_stages(model: MoEModel, cluster: LocalCluster, stages: list[tuple[str, int, int]], placement: dict,
                  compression: dict | None = None, timeout_s: float = 30.0) -> dict[str, int]:
    """LOAD_STAGE each backbone slice to its agent; bytes sent per stage endpoint."""
    by_ep = {c.endpoint: c for c in cluster.clients}
    sent = {}
    for ep, l0, l1 in stages:
        body, tensors = stage_message(model, l0, l1, placement, kv_cache_bound(model, l0, l1),
                                      {e: compression for e in cluster.endpoints} if compression else None,
                                      ends=l0 == 0)
        by_ep[ep].call(P.MsgType.LOAD_STAGE, body, tensors, timeout_s=timeout_s)
        sent[f"stage {ep}[{l0}:{l1}]"] = sum(t.numel() * t.element_size() for t in tensors.values())
    return sent


def _serve_pipeline(cfg: ServeLocalConfig, model: MoEModel, cluster: LocalCluster, stages: list[tuple[str, int, int]],
                    prompt: list[int], tok: Any, deployed: dict, deploy_s: float, compression: dict | None) -> dict:
    """serve-local for a plan whose backbone runs in stages: this process keeps the request and
    sampling state and sends each step to the first stage (nodes.pipeline)."""
    import zmq

    from coel_model.generate import generate
    from nodes.pipeline import StageClient
    from nodes.security import start_authenticator
    from nodes.stage import Pipeline
    ctx = zmq.Context()
    auth = start_authenticator(ctx, cluster.keys) if cluster.keys is not None else None
    tracer = None
    if cfg.trace_out:
        from common.tracing import TraceWriter
        tracer = TraceWriter(cfg.trace_out, "serve-local")
    client = StageClient(stages, cluster.keys, ctx, "127.0.0.1", timeout_s=max(cfg.call_timeout_s, 10.0),
                         name="serve-local", tracer=tracer)
    client.trace_id = "serve-local"
    pipe = Pipeline(model.cfg, client.send)
    del model  # this process holds no backbone: the stages do
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        stamps: list[int] = []
        t_start = time.perf_counter_ns()
        out = generate(pipe, prompt, cfg.max_new_tokens, on_token=lambda s, t: stamps.append(time.perf_counter_ns()))
        client.release(pipe.finished())
        status = [c.call(P.MsgType.STATUS, timeout_s=5.0).body for c in cluster.clients]
    finally:
        client.close()
        if tracer is not None:
            tracer.close()
        if auth is not None:
            auth.stop()
        ctx.term()
        torch.set_num_threads(threads_before)
    prefill_ms = (stamps[0] - t_start) / 1e6 if stamps else 0.0
    decode_ms = (stamps[-1] - stamps[0]) / 1e6 / (len(stamps) - 1) if len(stamps) > 1 else prefill_ms
    stage_stats = {st["endpoint"]: st["stats"].get("stage") for st in status if st["stats"].get("stage")}
    return {"tokens": out, "text": tok.decode(out) if tok is not None else None, "prompt_tokens": prompt,
            "ms_per_token": round(decode_ms, 3), "prefill_ms": round(prefill_ms, 3),
            "stages": [f"{ep}[{l0}:{l1}]" for ep, l0, l1 in stages], "stage_steps": client.steps,
            "replays": pipe.replays, "stage_stats": stage_stats, "bytes_sent": client.bytes_sent,
            "expert_calls": sum(st["counters"].get("expert_calls", 0) for st in status), "failovers": 0,
            "deploy_bytes": sum(deployed.values()), "deploy_s": round(deploy_s, 3),
            "memory_used_bytes": {st["endpoint"]: st["memory_used_bytes"] for st in status},
            "agents": cfg.n_agents, "secure": cfg.secure, "compression": compression}


def serve_local_http(cfg: ServeLocalConfig, listen: str, stop: Any = None,
                     on_ready: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`coel serve-local --http HOST:PORT`: the agents as above plus an in-process entry service
    (the one the testbed runs, with its worker pool, fail-over and metrics) serving the
    OpenAI-compatible HTTP API until `stop` is set (or Ctrl-C / SIGTERM). Returns the entry's counters."""
    import threading

    from nodes.entry import EntryConfig, serve_in_thread
    from coel_model.checkpoint import load_model
    model = load_model(cfg.model_dir)
    compression = parse_compression(cfg.compression)
    stop = stop or threading.Event()
    with tempfile.TemporaryDirectory(prefix="coel-serve-local-") as tmp:
        keys_dir = str(make_keys(Path(tmp) / "keys")) if cfg.secure else None
        names = [f"tcp://placeholder:{i}" for i in range(cfg.n_agents)]
        placement0, bits_of, stages0, mems = _local_layout(cfg, model, names)
        if stages0:
            raise ConfigError(f"{cfg.plan_path}: a plan with backbone stages cannot be served over --http yet "
                              "(the entry runs every layer itself); drop --http or use a plan without stages")
        with LocalCluster(cfg.n_agents, mems, keys_dir, threads=cfg.threads) as cluster:
            rename = dict(zip(names, cluster.endpoints))
            placement = {k: [rename[e] for e in eps] for k, eps in placement0.items()}
            deploy_experts(model, cluster, placement, bits_of)
            del model
            ecfg = EntryConfig(name="serve-local", listen=f"tcp://127.0.0.1:{free_port()}", model_dir=cfg.model_dir,
                               keys_dir=keys_dir, threads=cfg.threads, call_timeout_s=cfg.call_timeout_s,
                               http=listen, trace_path=cfg.trace_out)
            svc, th = serve_in_thread(ecfg)
            try:
                if svc.http_front is None or svc.http_front.address is None:
                    raise ConfigError(f"--http {listen}: the HTTP front did not start (see the error above)")
                svc.apply_placement({"version": 1, "holders": [[l, e, eps] for (l, e), eps in placement.items()],
                                     "compression": {ep: compression for ep in cluster.endpoints}
                                     if compression else {}})
                host, port = svc.http_front.address
                url = f"http://{host}:{port}/v1"
                if on_ready is not None:
                    on_ready(url)
                while not stop.is_set() and th.is_alive():
                    stop.wait(0.2)
            finally:
                svc.stop()
                th.join(10)
            return dict(svc.counters)

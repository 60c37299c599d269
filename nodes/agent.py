"""The node agent: one per edge server. Holds expert shards within a memory budget and serves them.

Division of labour: `ShardStore` owns the shards and the byte accounting (pure, no sockets);
`Agent` owns the sockets: a ROUTER that serves every request (expert calls, shard loads, status,
probes) in one poll loop and, when a controller is given, the controller link (nodes.ctrllink: register,
heartbeat and reconnect from its own thread, so compute and shard loads never delay a heartbeat),
started only after a warm-up (kernels loaded, a first expert call made). Concurrent EXPERT_CALLs for the same (layer, expert) that arrive together are run as one batch.
Bad input is answered with ERROR and never stops the loop.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import psutil
import torch
import torch.nn as nn
import zmq

from nodes.background import start_in_thread, stop_on_signals

from coel_model.errors import ConfigError
from nodes import protocol as P
from nodes.cgroups import cgroup_limits
from nodes.delayqueue import delay_hook_from_env
from nodes.ctrllink import ControllerLink, LinkConfig
from nodes.security import KeyDir, load_keys, start_authenticator
from nodes.shards import HalfExpert, ShardError, build_shard, module_nbytes
from nodes.compression.codec import (PLAIN_NP_DTYPES, decode_activations, decode_plain, encode_activations,
                                     encode_plain)
from nodes.transport import DelayHook, HeldInbox, bind_router, peer_address, split_envelope

MB = 1 << 20  # memory_mb is MiB: memory_bytes = memory_mb * 2**20


@dataclass
class Shard:
    layer: int
    expert: int
    bits: int
    module: nn.Module
    nbytes: int
    d_model: int
    calls: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class StoredShard:
    """An on-demand shard: its packed tensors on local storage, loaded into memory when called."""
    desc: dict
    path: str
    nbytes: int


class ShardStore:
    """The agent's shards and their byte accounting against the budget.

    Resident shards live in memory. On-demand shards (LOAD_SHARD desc "resident": false, what
    offload plans send) are written to local storage and cost no memory until called: a call
    loads one into an LRU buffer of `buffer_slots` shards (desc "buffer_slots", default 2 =
    top_k), whose worst case (slots x the largest on-demand shard) is charged to the budget."""

    def __init__(self, budget_bytes: int, fp16_kernel: str = "exact", storage_dir: str | None = None):
        self.budget_bytes = budget_bytes
        self.fp16_kernel = fp16_kernel
        self.shards: dict[tuple[int, int], Shard] = {}
        self.backbone_bytes = 0  # a pipeline stage's backbone slice (nodes.pipeline.StageServer)
        self.stored: dict[tuple[int, int], StoredShard] = {}
        self.buffer: "OrderedDict[tuple[int, int], Shard]" = OrderedDict()
        self.buffer_slots = 2
        self._storage_dir = storage_dir
        self.ondemand_loads = 0

    @property
    def resident_bytes(self) -> int:
        return self.backbone_bytes + sum(s.nbytes for s in self.shards.values())

    def _reserve(self, stored: dict[tuple[int, int], StoredShard], slots: int) -> int:
        return slots * max((x.nbytes for x in stored.values()), default=0)

    @property
    def used_bytes(self) -> int:
        """Backbone slice + resident shards + the on-demand buffer's worst case (what the budget is
        checked against)."""
        return self.resident_bytes + self._reserve(self.stored, self.buffer_slots)

    def storage_dir(self) -> str:
        if self._storage_dir is None:
            import tempfile
            self._storage_dir = tempfile.mkdtemp(prefix="coel-agent-storage-")
        os.makedirs(self._storage_dir, exist_ok=True)
        return self._storage_dir

    def load(self, descs: list[dict], tensors: dict[str, torch.Tensor],
             replace: bool = True) -> list[tuple[int, int]]:
        """All-or-nothing: build every shard first, check the budget, then swap them in.

        replace=True swaps a loaded (layer, expert) for the new one (e.g. other bits); False
        refuses the whole load if any of them is already here."""
        per: list[dict[str, torch.Tensor]] = [{} for _ in descs]
        for name, t in tensors.items():
            idx, _, tname = name.partition("/")
            if not idx.isdigit() or int(idx) >= len(descs) or not tname:
                raise ShardError(P.ErrorCode.BAD_SHARD, f"tensor {name!r} is not '<shard index>/<name>' "
                                 f"for {len(descs)} shard(s)")
            per[int(idx)][tname] = t
        keys = [(d["layer"], d["expert"]) for d in descs]
        if len(set(keys)) != len(keys):
            raise ShardError(P.ErrorCode.BAD_SHARD, f"duplicate (layer, expert) in one load: {keys}")
        present = [k for k in keys if k in self.shards or k in self.stored]
        if present and not replace:
            raise ShardError(P.ErrorCode.BAD_SHARD, f"shard(s) {present[:4]} already loaded and replace=false; "
                                                    f"nothing was loaded")
        resident = [d.get("resident", True) is not False for d in descs]
        slots = max([int(d.get("buffer_slots", self.buffer_slots)) for d, r in zip(descs, resident) if not r]
                    + [self.buffer_slots])
        incoming = sum(t.numel() * t.element_size() for i, ts in enumerate(per) if resident[i] for t in ts.values())
        self._check_budget(keys, resident, incoming, slots, per)
        built = [build_shard(d, ts, self.fp16_kernel) for d, ts in zip(descs, per)]
        sizes = [module_nbytes(m) for m in built]
        self._check_budget(keys, resident, sum(nb for nb, r in zip(sizes, resident) if r), slots, per, sizes)
        for d, m, nb, res, ts in zip(descs, built, sizes, resident, per):
            k = (d["layer"], d["expert"])
            self._forget(k)
            if res:
                self.shards[k] = Shard(d["layer"], d["expert"], d["bits"], m, nb, d["d_model"])
            else:
                path = os.path.join(self.storage_dir(), f"l{k[0]}-e{k[1]}-b{d['bits']}.pt")
                torch.save({"desc": dict(d), "tensors": ts}, path)
                self.stored[k] = StoredShard(dict(d), path, nb)
        self.buffer_slots = slots
        return keys

    def _check_budget(self, keys: list, resident: list[bool], new_bytes: int, slots: int,
                      per: list[dict[str, torch.Tensor]], sizes: list[int] | None = None) -> None:
        replaced = sum(self.shards[k].nbytes for k in keys if k in self.shards)
        stored = {k: v for k, v in self.stored.items() if k not in keys}
        for i, (k, r) in enumerate(zip(keys, resident)):
            if not r:
                nb = sizes[i] if sizes else sum(t.numel() * t.element_size() for t in per[i].values())
                stored[k] = StoredShard({}, "", nb)
        after = self.resident_bytes - replaced + new_bytes + self._reserve(stored, slots)
        if after > self.budget_bytes:
            raise ShardError(P.ErrorCode.OVER_BUDGET,
                             f"loading {len(keys)} shard(s) {keys[:4]}{'...' if len(keys) > 4 else ''} "
                             f"of {new_bytes} resident bytes needs {after} bytes in total (with the on-demand "
                             f"buffer), budget is {self.budget_bytes} ({self.budget_bytes / MB:.1f} MiB), "
                             f"{self.used_bytes} already used; nothing was loaded")

    def _forget(self, k: tuple[int, int]) -> None:
        self.shards.pop(k, None)
        self.buffer.pop(k, None)
        st = self.stored.pop(k, None)
        if st is not None and st.path:
            try:
                os.unlink(st.path)
            except OSError:
                pass

    def get(self, k: tuple[int, int]) -> tuple[Shard | None, int]:
        """The shard to run and the ns spent loading it from storage (0 when it was in memory)."""
        sh = self.shards.get(k)
        if sh is not None:
            return sh, 0
        sh = self.buffer.get(k)
        if sh is not None:
            self.buffer.move_to_end(k)
            return sh, 0
        st = self.stored.get(k)
        if st is None:
            return None, 0
        t0 = time.monotonic_ns()
        doc = torch.load(st.path, weights_only=True)
        m = build_shard(doc["desc"], doc["tensors"], self.fp16_kernel)
        sh = Shard(k[0], k[1], int(st.desc["bits"]), m, st.nbytes, int(st.desc["d_model"]))
        self.buffer[k] = sh
        while len(self.buffer) > self.buffer_slots:
            self.buffer.popitem(last=False)
        self.ondemand_loads += 1
        return sh, time.monotonic_ns() - t0

    def close(self) -> None:
        """Remove the on-demand shards' storage (a killed agent leaves it in /tmp)."""
        if self._storage_dir is not None:
            import shutil
            shutil.rmtree(self._storage_dir, ignore_errors=True)

    def held(self) -> list[tuple[int, int]]:
        return sorted(set(self.shards) | set(self.stored))

    def unload(self, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
        gone = [k for k in keys if k in self.shards or k in self.stored]
        for k in gone:
            self._forget(k)
        return gone

    def describe(self) -> list[dict[str, int]]:
        out = [{"layer": s.layer, "expert": s.expert, "bits": s.bits, "nbytes": s.nbytes,
                "calls": s.calls, "tokens": s.tokens} for s in self.shards.values()]
        out += [{"layer": k[0], "expert": k[1], "bits": int(st.desc["bits"]), "nbytes": st.nbytes, "resident": False}
                for k, st in self.stored.items()]
        return sorted(out, key=lambda d: (d["layer"], d["expert"]))


@dataclass(frozen=True)
class AgentConfig:
    endpoint: str  # where the ROUTER binds, e.g. tcp://10.0.0.2:5555
    memory_budget_bytes: int  # model-shard budget (topology memory_mb * 2**20)
    threads: int = 1  # torch intra-op threads
    controller: str | None = None  # controller ROUTER endpoint for REGISTER/HEARTBEAT
    keys_dir: str | None = None  # CURVE key directory (see nodes.security); None = plain text
    name: str = ""
    trace_path: str | None = None  # JSONL spans (remote_queue, remote_compute)
    max_batch_tokens: int = 4096  # largest merged batch of one expert
    heartbeat_interval_s: float = P.HEARTBEAT_INTERVAL_S
    fp16_kernel: str = "exact"  # fp16 shards: "exact" (bit-identical upcast) | "fast" (fused kernel)
    perceive: bool = False  # measure itself (nodes/perception.py) before registering; the CLI turns it on

    def __post_init__(self) -> None:
        if self.fp16_kernel not in ("exact", "fast"):
            raise ConfigError(f"fp16_kernel must be exact|fast (got {self.fp16_kernel!r})")
        if self.memory_budget_bytes < 0:
            raise ConfigError(f"memory budget must be >= 0 bytes (got {self.memory_budget_bytes})")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (got {self.threads})")
        if "://" not in self.endpoint:
            raise ConfigError(f"endpoint {self.endpoint!r} must look like tcp://IP:PORT")


@dataclass
class _Pending:
    reply: Callable[[list[Any]], None]
    msg: P.Message
    t_recv_ns: int


class Agent:
    """Serves one ROUTER endpoint until `stop()` or a SHUTDOWN message."""

    def __init__(self, cfg: AgentConfig, delay: DelayHook | None = None, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.name = cfg.name or cfg.endpoint
        self.store = ShardStore(cfg.memory_budget_bytes, cfg.fp16_kernel)
        self.delay = delay
        self.inbox = HeldInbox(delay)
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.keys: KeyDir | None = load_keys(cfg.keys_dir) if cfg.keys_dir else None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.counters = defaultdict(int)
        self.proc = psutil.Process()
        self.proc.cpu_percent()
        self.tracer = None
        if cfg.trace_path:
            from common.tracing import TraceWriter
            self.tracer = TraceWriter(cfg.trace_path, self.name)
        self.auth = None
        self.router: zmq.Socket | None = None
        self.link: ControllerLink | None = None
        self.warmup_ms = 0.0
        self.stage = None  # nodes.pipeline.StageServer once a LOAD_STAGE or STAGE_STEP arrives
        self.perception: dict | None = None  # nodes/perception.py report, sent with REGISTER
        self._perceived_limits: dict | None = None
        self._next_limits_check = 0.0

    # ---------------- sockets ----------------
    def _bind(self) -> None:
        if self.keys is not None:
            self.auth = start_authenticator(self.ctx, self.keys)
        self.router = bind_router(self.ctx, self.cfg.endpoint, self.keys, f"agent {self.name}")

    def _register_body(self) -> dict[str, Any]:
        """What REGISTER carries (read from the link thread)."""
        return {"endpoint": self.cfg.endpoint, "memory_budget_bytes": self.cfg.memory_budget_bytes,
                "threads": self.cfg.threads, "shards": self.store.describe(), "pid": os.getpid(),
                "warmup_ms": self.warmup_ms, **({"perception": self.perception} if self.perception else {})}

    def _warm_up(self) -> None:
        """Load the kernels and make a first expert call of each kind before registering, so the
        first real call (and the controller's first probe) does not pay for lazy loading."""
        t0 = time.monotonic_ns()
        from coel_model import kernels, quant
        kernels.status()  # loads the built library (never compiles: see coel_model.kernels)
        g = torch.Generator().manual_seed(0)
        d, hid = 64, 128
        w = [torch.randn(hid, d, generator=g), torch.randn(hid, d, generator=g), torch.randn(d, hid, generator=g)]
        x = torch.randn(2, d, generator=g)
        with torch.inference_mode():
            HalfExpert(*(t.half() for t in w), self.cfg.fp16_kernel)(x)
            spec = quant.QuantSpec(bits=4, group_size=64)
            quant.QuantizedExpert(spec, d, hid, *(quant.QuantizedLinear.from_float(t, spec) for t in w))(x)
        self.warmup_ms = round((time.monotonic_ns() - t0) / 1e6, 1)

    def _perceive(self) -> None:
        """Measure expert calls, messages and storage under this process's real limits."""
        from nodes.perception import perceive
        with torch.inference_mode():
            self.perception = perceive()
        self._perceived_limits = cgroup_limits()
        if self.tracer is not None:
            self.tracer.event("perception", **{k: v for k, v in self.perception.items() if k != "expert"})

    def _perceive_again_on_change(self) -> None:
        """After a resource change (the cgroup limits moved), measure again and send the report
        with the next heartbeat."""
        now = time.monotonic()
        if self.perception is None or now < self._next_limits_check:
            return
        self._next_limits_check = now + 1.0
        if cgroup_limits() != self._perceived_limits:
            self._perceive()
            if self.link is not None:
                self.link.send_once("perception", self.perception)

    # ---------------- main loop ----------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._bind()
            if self.cfg.perceive:
                self._perceive()
            # everything alive now (torch, modules, shards) lives for the whole run: keep it out of
            # the cyclic collector, whose full passes over it stalled random expert calls for ms
            self._warm_up()
            gc.freeze()
            if self.cfg.controller:  # registered only once warm: the controller plans with ready agents only
                self.link = ControllerLink(LinkConfig(self.cfg.controller, self.name, self.cfg.heartbeat_interval_s),
                                           self.keys, self.ctx, self._register_body, self.stats,
                                           lambda: self.delay).start()
            self.ready.set()
            with torch.inference_mode():  # once for the loop: a context per call costs ~5 us
                self._loop()
        finally:
            if self.stage is not None:
                self.stage.stop()
            if self.link is not None:
                self.link.stop()
                self.counters.update({k: v for k, v in self.link.counters.items()
                                      if k in ("registers", "heartbeats", "reconnects")})
            if self.router is not None:
                self.router.close(linger=0)
            if self.auth is not None:
                self.auth.stop()
            if self.tracer is not None:
                self.tracer.close()
            self.store.close()
            if self._own_ctx:
                self.ctx.term()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            batch: list[_Pending] = []
            for sock, _ in poller.poll(self.inbox.timeout_ms(100.0)):
                if sock is self.router:
                    self._drain_router(batch)
            if len(self.inbox):
                batch.extend(self.inbox.pop_ready())
            if batch:
                self._process(batch)
            self._perceive_again_on_change()

    def _drain_router(self, batch: list[_Pending], max_msgs: int = 256) -> None:
        r = self.router
        for i in range(max_msgs):
            # the poll said the first one is there; after it, asking EVENTS is cheaper than zmq.Again
            if i and not r.get(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                frames = r.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            t_recv = time.monotonic_ns()
            envelope, rest = split_envelope(frames)
            reply = self._router_reply(envelope)
            self._admit(rest, reply, t_recv, lambda: peer_address(frames[0]), batch)

    def _router_reply(self, envelope: list[bytes]) -> Callable[[list[Any]], None]:
        send = self.router.send_multipart

        def reply(frames: list[Any]) -> None:
            try:
                send(envelope + frames, copy=False, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["reply_dropped"] += 1
        return reply

    def _admit(self, frames: list[Any], reply, t_recv: int, peer, batch: list[_Pending],
               from_controller: bool = False) -> None:
        self.counters["received"] += 1
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            self.counters["malformed"] += 1
            reply(P.error_frames(exc.req_id, P.ErrorCode.MALFORMED, exc.reason, self.name))
            return
        except Exception as exc:  # a decoder bug must not take the agent down
            self.counters["malformed"] += 1
            reply(P.error_frames(0, P.ErrorCode.MALFORMED, f"undecodable: {type(exc).__name__}: {exc}", self.name))
            return
        if from_controller and msg.type in (P.MsgType.HEARTBEAT, P.MsgType.OK):
            return  # liveness only
        item = _Pending(reply, msg, t_recv)
        if self.inbox.hook is None or self.inbox.admit(item, lambda: peer() or msg.src, msg.sent_ns, msg.nbytes):
            batch.append(item)

    # ---------------- handlers ----------------
    def _process(self, batch: list[_Pending]) -> None:
        calls: dict[tuple, list[_Pending]] = {}
        for it in batch:
            m = it.msg
            if m.type is P.MsgType.EXPERT_CALL:
                comp = m.body.get("compression")
                # callers batch together only with the same dtype and compression settings
                key = (m.body["layer"], m.body["expert"], m.arrays["x"][1],
                       repr(sorted(comp.items())) if comp else None)
                group = calls.get(key)
                if group is None:
                    calls[key] = [it]
                else:
                    group.append(it)
            else:
                self._guarded(it, self._handle_control)
        for key, items in calls.items():
            self._run_calls(key, items)

    def _guarded(self, it: _Pending, fn) -> None:
        try:
            fn(it)
        except ShardError as exc:
            it.reply(P.error_frames(it.msg.req_id, exc.code, str(exc), self.name))
        except Exception as exc:  # the agent must outlive any bad request
            self.counters["internal_errors"] += 1
            tb = traceback.format_exc(limit=3)
            it.reply(P.error_frames(it.msg.req_id, P.ErrorCode.INTERNAL,
                                    f"{type(exc).__name__}: {exc} | {tb[-600:]}", self.name))

    def _ok(self, it: _Pending, body: dict | None = None, mtype: P.MsgType = P.MsgType.OK,
            tensors: dict | None = None) -> None:
        it.reply(P.encode(mtype, it.msg.req_id, body or {}, tensors, trace=it.msg.trace, src=self.name))

    def _handle_control(self, it: _Pending) -> None:
        m, T = it.msg, P.MsgType
        if m.type == T.LOAD_SHARD:
            t0 = time.monotonic_ns()
            keys = self.store.load(m.body["shards"], m.tensors, m.body.get("replace", True))
            self.counters["loads"] += len(keys)
            self._ok(it, {"loaded": [list(k) for k in keys], "memory_used_bytes": self.store.used_bytes,
                          "memory_budget_bytes": self.store.budget_bytes,
                          "load_ns": time.monotonic_ns() - t0})
        elif m.type == T.UNLOAD_SHARD:
            gone = self.store.unload([tuple(s) for s in m.body["shards"]])
            self._ok(it, {"unloaded": [list(k) for k in gone], "memory_used_bytes": self.store.used_bytes})
        elif m.type == T.STATUS:
            self._ok(it, self.status(), T.STATUS)
        elif m.type == T.PROBE:
            self._ok(it, {"echo": m.body.get("echo"), "recv_ns": it.t_recv_ns}, T.PROBE, dict(m.tensors))
        elif m.type == T.SET_PATH_DELAYS:
            self._set_delays({k: float(v) for k, v in m.body["delays_ms"].items()})
            self._ok(it)
        elif m.type == T.SHUTDOWN:
            self._ok(it)
            self._stop.set()
        elif m.type in (T.LOAD_STAGE, T.STAGE_STEP, T.STAGE_RELEASE):
            self._handle_stage(it)
        else:
            raise ShardError(P.ErrorCode.UNSUPPORTED, f"{m.type.name} is not a request an agent serves")

    def _handle_stage(self, it: _Pending) -> None:
        """The stage role (nodes.pipeline): steps run in the stage's thread, not in this loop."""
        m, T = it.msg, P.MsgType
        if self.stage is None:
            from nodes.pipeline import StageServer
            self.stage = StageServer(self.name, self.cfg.endpoint, self.store, self.keys, self.ctx,
                                     lambda: self.delay, self.tracer)
        if m.type == T.STAGE_STEP:
            self.stage.submit(m, it.t_recv_ns)  # no reply: the last stage answers the entry
        elif m.type == T.STAGE_RELEASE:
            self.stage.release(list(m.body["requests"]))
            if m.body.get("unload"):
                self.stage.unload()
                self._ok(it, {"memory_used_bytes": self.store.used_bytes})
        else:
            t0 = time.monotonic_ns()
            try:
                info = self.stage.load(m.body, m.tensors)
            except OverflowError as exc:
                raise ShardError(P.ErrorCode.OVER_BUDGET, str(exc)) from None
            except (ConfigError, ValueError, KeyError, TypeError) as exc:
                raise ShardError(P.ErrorCode.BAD_SHARD, f"LOAD_STAGE: {exc}") from None
            self.counters["stage_loads"] += 1
            self._ok(it, {**info, "memory_budget_bytes": self.store.budget_bytes,
                          "load_ns": time.monotonic_ns() - t0})

    def _set_delays(self, delays_ms: dict[str, float]) -> None:
        """In-band path delays (peer IP -> one-way ms); a later change of the delay file wins."""
        from nodes.delayqueue import DelayTable, PeerDelay
        if self.delay is None:
            self.delay = DelayTable(None)
            self.inbox.hook = self.delay
        if not isinstance(self.delay, DelayTable):
            raise ShardError(P.ErrorCode.UNSUPPORTED, f"delay hook {type(self.delay).__name__} cannot be set")
        self.delay.peers = {ip: PeerDelay(ms) for ip, ms in delays_ms.items()}
        self.delay.mode = "emulated"

    def _run_calls(self, key: tuple, items: list[_Pending]) -> None:
        layer, expert = key[0], key[1]
        t_load = time.monotonic_ns()
        shard, load_ns = self.store.get((layer, expert))
        if shard is None:
            for it in items:
                it.reply(P.error_frames(it.msg.req_id, P.ErrorCode.NOT_LOADED,
                                        f"agent {self.name} holds no shard (layer {layer}, expert {expert}); "
                                        f"it holds {self.store.held()[:8]}", self.name))
            return
        if load_ns:  # an on-demand shard read from storage: the caller pays it, the trace shows it
            self.counters["ondemand_loads"] += 1
            if self.tracer is not None:
                for it in items:
                    if it.msg.trace:
                        self.tracer.span(it.msg.trace, "ondemand_load", t_load, t_load + load_ns, layer=layer,
                                         expert=expert)
        # split into batches of at most max_batch_tokens
        groups, cur, n = [], [], 0
        for it in items:
            k = it.msg.arrays["x"][0].shape[0]
            if cur and n + k > self.cfg.max_batch_tokens:
                groups.append(cur)
                cur, n = [], 0
            cur.append(it)
            n += k
        if cur:
            groups.append(cur)
        for g in groups:
            try:
                self._run_batch(shard, g)
            except Exception as exc:
                for it in g:
                    it.reply(P.error_frames(it.msg.req_id, P.ErrorCode.INTERNAL,
                                            f"expert (layer {layer}, expert {expert}) failed: "
                                            f"{type(exc).__name__}: {exc}", self.name))

    def _run_batch(self, shard: Shard, items: list[_Pending]) -> None:
        t0 = time.monotonic_ns()
        xs, metas, good = [], [], []
        for it in items:  # one caller's bad rows must not fail the others in the batch
            try:
                comp = it.msg.body.get("compression")
                a, dt = it.msg.arrays["x"]
                if not comp and dt in PLAIN_NP_DTYPES:  # fast path: from the numpy view, fewest torch calls
                    if a.ndim != 2 or a.shape[1] != shard.d_model:
                        raise ValueError(f"x has shape {tuple(a.shape)}, expert (layer {shard.layer}, expert "
                                         f"{shard.expert}) takes (n, {shard.d_model})")
                    x, meta = decode_plain(a, dt)
                    xs.append(x)
                    metas.append(meta)
                    good.append(it)
                    continue
                x, meta = decode_activations(it.msg.tensors, comp, "x")
                if x.dim() != 2 or x.shape[1] != shard.d_model:
                    raise ValueError(f"x has shape {tuple(x.shape)}, expert (layer {shard.layer}, expert "
                                     f"{shard.expert}) takes (n, {shard.d_model})")
            except (ValueError, KeyError, TypeError) as exc:
                self.counters["malformed"] += 1
                it.reply(P.error_frames(it.msg.req_id, P.ErrorCode.MALFORMED, str(exc), self.name))
                continue
            xs.append(x)
            metas.append(meta)
            good.append(it)
        if not good:
            return
        items = good
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = shard.module(x)
        t1 = time.monotonic_ns()
        shard.calls += 1
        shard.tokens += x.shape[0]
        self.counters["expert_calls"] += len(items)
        pos = 0
        for it, xi, meta in zip(items, xs, metas):
            n = xi.shape[0]
            yi = y if len(items) == 1 else y[pos:pos + n]
            pos += n
            comp = it.msg.body.get("compression")
            if isinstance(meta, np.dtype):  # fast path: reply in the request's dtype, sent from numpy
                tensors = encode_plain(yi, meta, "y")
            else:
                tensors = encode_activations(yi, comp, "y", meta)
            body = {"queue_ns": t0 - it.t_recv_ns, "compute_ns": t1 - t0, "batch": len(items)}
            if comp:
                body["compression"] = comp
            t2 = time.monotonic_ns()
            it.reply(P.encode(P.MsgType.EXPERT_REPLY, it.msg.req_id, body, tensors, trace=it.msg.trace,
                              src=self.name))
            if self.tracer is not None and it.msg.trace:
                attrs = {"layer": shard.layer, "expert": shard.expert, "tokens": int(xi.shape[0]),
                         "batch": len(items), "req_id": it.msg.req_id}
                self.tracer.span(it.msg.trace, "remote_queue", it.t_recv_ns, t0, **attrs)
                self.tracer.span(it.msg.trace, "remote_compute", t0, t1, **attrs)
                self.tracer.span(it.msg.trace, "remote_reply", t2, time.monotonic_ns(), **attrs)

    # ---------------- reporting ----------------
    def stats(self) -> dict[str, Any]:
        mem = self.proc.memory_info()
        return {"cpu_percent": self.proc.cpu_percent(), "rss_bytes": mem.rss,
                "available_bytes": psutil.virtual_memory().available, "load1": os.getloadavg()[0],
                "memory_used_bytes": self.store.used_bytes, "memory_budget_bytes": self.store.budget_bytes,
                "shards": len(self.store.shards) + len(self.store.stored),
                "expert_calls": self.counters["expert_calls"],
                "backbone_bytes": self.store.backbone_bytes, **({"stage": self.stage.stats()} if self.stage else {}),
                "t_ns": time.monotonic_ns(), **cgroup_limits()}  # cgroup: the controller sees squeezes

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.cfg.endpoint, "protocol": P.PROTOCOL_VERSION,
                "pid": os.getpid(), "threads": self.cfg.threads,
                "memory_budget_bytes": self.store.budget_bytes, "memory_used_bytes": self.store.used_bytes,
                "shards": self.store.describe(), "stats": self.stats(),
                "counters": {**self.counters, **(self.link.counters if self.link is not None else {})},
                "held_messages": len(self.inbox)}


def serve_in_thread(cfg: AgentConfig, delay: DelayHook | None = None) -> tuple[Agent, threading.Thread]:
    """Start an agent in a daemon thread (in-process transport for tests); waits until bound."""
    agent = Agent(cfg, delay)
    return agent, start_in_thread(agent.run, agent.ready, f"agent-{agent.name}", timeout_s=10)


def run_agent_process(cfg: AgentConfig, delay: DelayHook | None = None) -> int:
    """Process entry (`coel agent`): set thread count, stop cleanly on SIGTERM/SIGINT."""
    torch.set_num_threads(cfg.threads)
    agent = Agent(cfg, delay)
    stop_on_signals(agent.stop)
    agent.run()
    return 0


def add_agent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, help="ROUTER endpoint to bind, e.g. tcp://10.0.0.2:5555")
    p.add_argument("--memory-mb", type=float, required=True,
                   help="model-shard memory budget in MiB (the topology's memory_mb)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for expert compute")
    p.add_argument("--controller", default=None, help="controller endpoint to register and heartbeat with")
    p.add_argument("--keys", default=None, help="CURVE key directory from `coel keys` (default: plain text)")
    p.add_argument("--name", default="", help="agent name in traces and registration")
    p.add_argument("--trace-out", default=None, help="append remote_queue/remote_compute spans (JSONL)")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--heartbeat-s", type=float, default=None, help="heartbeat interval (s)")
    p.add_argument("--fp16-kernel", choices=("exact", "fast"), default="exact",
                   help="fp16 shards: exact = bit-identical fp32 upcast; fast = fused fp16 GEMV kernel")
    p.add_argument("--delay-file", default=None,
                   help="emulated path delays (nodes.delayqueue JSON; default $COEL_DELAY_FILE)")
    p.add_argument("--no-perceive", dest="perceive", action="store_false",
                   help="do not measure expert calls, messages and storage before registering (nodes/perception.py)")


def agent_config_from_args(args: argparse.Namespace) -> AgentConfig:
    if args.memory_mb < 0:
        raise ConfigError(f"--memory-mb must be >= 0 (got {args.memory_mb})")
    return AgentConfig(endpoint=args.endpoint, memory_budget_bytes=int(args.memory_mb * MB),
                       threads=args.threads, controller=args.controller, keys_dir=args.keys,
                       name=args.name, trace_path=args.trace_out, max_batch_tokens=args.max_batch_tokens,
                       heartbeat_interval_s=args.heartbeat_s or P.HEARTBEAT_INTERVAL_S,
                       fp16_kernel=args.fp16_kernel, perceive=getattr(args, "perceive", True))


def cmd_agent(args: argparse.Namespace) -> int:
    """`coel agent` and `python -m nodes.agent`."""
    return run_agent_process(agent_config_from_args(args), delay_hook_from_env(args.delay_file))


def main(argv: list[str] | None = None) -> int:
    """`python -m nodes.agent ...`: the same as `coel agent` (used by serve-local and tests)."""
    ap = argparse.ArgumentParser(prog="nodes.agent")
    add_agent_args(ap)
    args = ap.parse_args(argv)
    from coel_model.errors import CoelError
    try:
        return cmd_agent(args)
    except CoelError as exc:  # one clear line, as `coel agent` prints it
        print(f"nodes.agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

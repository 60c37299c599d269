"""Measurement: the quality/bytes table the planner negotiates with (controller/negotiation.py).

`measure_compression_cost` runs one forward per setting through a swappable transport:
  "simulated"  `CompressingExecutor` strings pruning, fusion and the codec together in-process
               behind the model's expert seam, on a simulated wire that counts payload bytes
               (the default, what the committed cost tables were measured with)
  "inproc" / "tcp"  the real dispatch path: the coordinator (nodes/coordinator.py) as the
               executor, an agent holding the remote experts, the wire protocol over ZeroMQ's
               in-process transport or loopback TCP; bytes are whole frames, headers included
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from coel_model.model import MoEModel, Routing
from nodes.compression.fusion import compress_group, compress_reply, decompress_group, decompress_reply, raw_bytes
from nodes.compression.codec import WireTensor
from nodes.compression.pruning import prune_in_place
from nodes.compression.settings import NONE, CompressionSettings


@dataclass
class CompressionStats:
    """Counters of what went over the (simulated) wire; ratios are relative to raw fp32 rows."""
    calls: int = 0  # layer calls seen
    messages: int = 0  # remote expert requests (one reply each)
    assignments: int = 0  # remote (token, expert) assignments before pruning
    pruned: int = 0  # of which removed by prune_routing
    rows_sent: int = 0  # rows in requests after merging
    rows_merged: int = 0  # rows merged away by fusion
    raw_bytes: int = 0  # request + reply bytes with no compression at all
    request_bytes: int = 0  # payload bytes sender -> expert
    reply_bytes: int = 0  # payload bytes expert -> sender
    header_bytes: int = 0  # header bytes compression adds (settings map, scale spec), both ways

    @property
    def wire_bytes(self) -> int:
        return self.request_bytes + self.reply_bytes

    @property
    def reduction(self) -> float:
        """raw / wire payload bytes (4.0 = four times fewer bytes); inf when nothing was sent."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wire_bytes"] = self.wire_bytes
        d["reduction"] = self.reduction
        return d


class CompressingExecutor:
    """Expert executor that runs remote experts through compress -> wire -> decompress in-process.

    Usable as `model(tokens, executor=ex)` and `generate(..., executor=ex)`. `remote` is a set of
    (layer, expert) pairs treated as on another server (None = every routed expert); local experts
    run as usual. With `through_bytes` every message is turned into raw frames and parsed back
    (WireTensor.from_wire), as the real transport will. It prunes by rewriting the routing the model
    hands it (weights and groups), which is what the seam's combine step then uses.
    """

    def __init__(self, model: MoEModel, settings: CompressionSettings = NONE,
                 remote: set[tuple[int, int]] | None = None, through_bytes: bool = True):
        self.model = model
        self.settings = settings
        self.remote = None if remote is None else {(int(l), int(e)) for l, e in remote}
        self.through_bytes = through_bytes
        self.stats = CompressionStats()
        self._header_len = _header_bytes(settings)

    def reset(self) -> CompressionStats:
        """Return the counters so far and start new ones (e.g. between prefill and decode)."""
        old, self.stats = self.stats, CompressionStats()
        return old

    def _remote_ids(self, layer: int) -> set[int] | None:
        if self.remote is None:
            return None
        return {e for (l, e) in self.remote if l == layer}

    def __call__(self, layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
        s, st = self.settings, self.stats
        st.calls += 1
        remote = self._remote_ids(layer)
        is_remote = (lambda e: True) if remote is None else (lambda e: e in remote)
        n_before = sum(int(tok.numel()) for e, (tok, _) in routing.groups.items() if is_remote(e))
        prot = prune_in_place(routing, h, s, remote)
        n_after = sum(int(tok.numel()) for e, (tok, _) in routing.groups.items() if is_remote(e))
        st.assignments += n_before
        st.pruned += n_before - n_after
        d = h.shape[1]
        st.raw_bytes += 2 * raw_bytes(n_before, d, torch.float32)
        experts = self.model.layers[layer].moe.experts
        out: dict[int, torch.Tensor] = {}
        for e, (tok, _slot) in routing.groups.items():
            x = h.index_select(0, tok)
            if not is_remote(e):
                out[e] = experts[e](x)
                continue
            group = compress_group(x, s, None if prot is None else prot[tok])
            wire = group.wire
            if self.through_bytes:
                wire = WireTensor.from_wire(wire.meta(), [bytes(f) for f in wire.frames()])
            y = experts[e](decompress_group(wire))  # remote side
            reply = compress_reply(y, s)
            if self.through_bytes:
                reply = WireTensor.from_wire(reply.meta(), [bytes(f) for f in reply.frames()])
            out[e] = decompress_reply(reply, group)
            st.messages += 1
            st.rows_sent += group.wire.shape[0]
            st.rows_merged += group.n_merged
            st.request_bytes += group.wire_bytes
            st.reply_bytes += reply.nbytes
            st.header_bytes += 2 * self._header_len
        return out


def _header_bytes(settings: CompressionSettings) -> int:
    """Header bytes compression adds to one message: its settings map and, for int8, the scale
    tensor's [name, dtype, shape] entry (the layout nodes.protocol uses)."""
    import msgpack
    extra = len(msgpack.packb({"compression": settings.to_header()})) - len(msgpack.packb({}))
    if settings.is_identity:
        return 0
    if settings.act_dtype == "int8":
        extra += len(msgpack.packb(["x_scale", "float16", [1024]]))
    return extra


TRANSPORTS = ("simulated", "inproc", "tcp")


@torch.inference_mode()
def measure_compression_cost(model: MoEModel, tokens: torch.Tensor | Sequence[Sequence[int]],
                             settings_list: Sequence[CompressionSettings],
                             remote: set[tuple[int, int]] | None = None,
                             transport: str = "simulated") -> list[dict[str, Any]]:
    """Quality and bytes of each setting on one forward (prefill) over `tokens` (B, T).

    Returns one dict per setting: settings (every field), label (= name), bytes_ratio (all wire
    payload bytes / raw fp32 bytes, both directions, pruning and merging included; 0.25 = 4x
    fewer), vector_bytes_ratio (bytes per row actually sent / fp32 row: the activation format
    alone), reduction (raw / wire), top1_agreement (fraction of positions whose
    argmax equals the uncompressed model's), nll / nll_ref (mean next-token cross-entropy,
    nats/token), loss_increase (nats/token), ppl_increase (relative: ppl / ppl_ref - 1), pruned_frac,
    merged_frac and the raw stats. Both perplexities use the same tokens, so the difference is
    only the compression.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {list(TRANSPORTS)}")
    if transport != "simulated":
        return _measure_through_dispatch(model, tokens, settings_list, remote, transport)
    toks = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.long)
    if toks.dim() != 2 or toks.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, time>=2), got shape {tuple(toks.shape)}")
    if toks.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"{toks.shape[1]} tokens exceed the model's max_seq_len ({model.cfg.max_seq_len})")
    ref = model(toks).float()  # (B, T, V)
    ref_top1 = ref.argmax(-1)
    V = ref.shape[-1]
    targets = toks[:, 1:].reshape(-1)

    def nll(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, V), targets))

    nll_ref = nll(ref)
    rows = []
    for s in settings_list:
        ex = CompressingExecutor(model, s, remote=remote)
        logits = model(toks, executor=ex).float()
        st = ex.stats
        val = nll(logits)
        d = model.cfg.d_model
        rows.append({
            "settings": s.full_dict(),
            "label": s.label(),
            "name": s.label(),
            "bytes_ratio": st.wire_bytes / st.raw_bytes if st.raw_bytes else 1.0,
            "vector_bytes_ratio": (st.wire_bytes / (2 * st.rows_sent * d * 4)) if st.rows_sent else 1.0,
            "reduction": st.reduction,
            "top1_agreement": float((logits.argmax(-1) == ref_top1).float().mean()),
            "nll": val,
            "nll_ref": nll_ref,
            "loss_increase": val - nll_ref,
            "ppl_increase": math.exp(val - nll_ref) - 1.0,
            "pruned_frac": st.pruned / st.assignments if st.assignments else 0.0,
            "merged_frac": st.rows_merged / max(st.assignments - st.pruned, 1),
            "stats": st.to_dict(),
        })
    return rows


@torch.inference_mode()
def _measure_through_dispatch(model: MoEModel, tokens: torch.Tensor | Sequence[Sequence[int]],
                              settings_list: Sequence[CompressionSettings], remote: set[tuple[int, int]] | None,
                              transport: str) -> list[dict[str, Any]]:
    """The same rows through the coordinator and one agent (fp32 shards of the remote experts).
    stats: calls (expert calls sent), request_bytes / reply_bytes (frames), raw_bytes (fp32 rows
    both ways), pruned (assignments pruned), assignments (remote assignments before pruning)."""
    import zmq

    from coel_model.model import RoutingRecorder
    from nodes import protocol as P
    from nodes.agent import Agent, AgentConfig
    from nodes.background import start_in_thread
    from nodes.coordinator import LOCAL, Coordinator, CoordinatorConfig
    from nodes.local import free_port
    from nodes.shards import expert_tensors
    from nodes.transport import AgentClient

    toks = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.long)
    if toks.dim() != 2 or toks.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, time>=2), got shape {tuple(toks.shape)}")
    cfg = model.cfg
    far = {(l, e) for l in range(cfg.n_layers) for e in range(cfg.n_experts)} if remote is None else set(remote)
    rec = RoutingRecorder()
    ref = model(toks, observer=rec).float()
    assignments = sum(int((r.expert_ids == e).sum()) for l, r in enumerate(rec.routings) for e in range(cfg.n_experts)
                      if (l, e) in far)
    ref_top1, V = ref.argmax(-1), ref.shape[-1]
    targets = toks[:, 1:].reshape(-1)

    def nll(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, V), targets))

    nll_ref = nll(ref)
    ctx = zmq.Context()
    endpoint = "inproc://coel-measure" if transport == "inproc" else f"tcp://127.0.0.1:{free_port()}"
    agent = Agent(AgentConfig(endpoint, memory_budget_bytes=1 << 40, name="measure"), ctx=ctx)
    thread = start_in_thread(agent.run, agent.ready, "agent-measure", timeout_s=10)
    client = AgentClient(endpoint, name="measure", ctx=ctx)
    rows = []
    try:
        descs, tensors = [], {}
        for i, (l, e) in enumerate(sorted(far)):
            descs.append({"layer": l, "expert": e, "bits": 32, "d_model": cfg.d_model, "hidden": cfg.expert_hidden})
            tensors.update({f"{i}/{n}": t for n, t in expert_tensors(model.expert(l, e), 32).items()})
        client.call(P.MsgType.LOAD_SHARD, {"shards": descs}, tensors, timeout_s=60)
        placement = {(l, e): [endpoint] if (l, e) in far else [LOCAL]
                     for l in range(cfg.n_layers) for e in range(cfg.n_experts)}
        for s in settings_list:
            coord = Coordinator(model, placement, cfg=CoordinatorConfig(call_timeout_s=30.0, layer_deadline_s=60.0),
                                compression={endpoint: s.to_header()}, ctx=ctx)
            try:
                logits = model(toks, executor=coord).float()
            finally:
                coord.close()
            val = nll(logits)
            wire = coord.bytes_sent + coord.bytes_received
            rows.append({
                "settings": s.full_dict(), "label": s.label(), "name": s.label(), "transport": transport,
                "bytes_ratio": wire / coord.raw_bytes if coord.raw_bytes else 1.0,
                "reduction": coord.raw_bytes / wire if wire else float("inf"),
                "top1_agreement": float((logits.argmax(-1) == ref_top1).float().mean()),
                "nll": val, "nll_ref": nll_ref, "loss_increase": val - nll_ref,
                "ppl_increase": math.exp(val - nll_ref) - 1.0,
                "pruned_frac": coord.pruned_assignments / assignments if assignments else 0.0,
                "stats": {"calls": coord.calls, "request_bytes": coord.bytes_sent, "reply_bytes": coord.bytes_received,
                          "raw_bytes": coord.raw_bytes, "pruned": coord.pruned_assignments,
                          "assignments": assignments},
            })
    finally:
        client.close()
        agent.stop()
        thread.join(5)
        ctx.term()
    return rows

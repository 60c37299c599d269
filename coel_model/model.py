"""A Mixture-of-Experts decoder (Mixtral / Qwen-MoE / OLMoE family) split at the expert seam.

Every MoE layer's forward is three steps, and every later piece of CoEL hooks into them:

    routing = route(router, h, top_k, norm_topk)      # who goes where (full precision)
    outputs = {e: run_expert(expert_e, x_e) ...}      # any expert, anywhere (local, quantized, remote)
    y = combine(routing, outputs, ...)                # weighted scatter-add back to token order

The single-process forward goes through the same seam via an `ExpertExecutor`; the coordinator
on an edge server swaps in an executor that sends the per-expert token groups to other servers.
Tensor shapes are in comments: B batch, T time, N = B*T tokens, E experts, k top-k, d d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from coel_model.config import MoEConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in the rotate-half layout HF checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos/sin (T, hd)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Pre-allocated keys and values per layer: (B, Hkv, max_len, hd) each.

    `layers` limits the cache to the layers one pipeline stage runs (the others stay None).
    """

    def __init__(self, cfg: MoEConfig, batch: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, layers: range | None = None):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch, cfg.n_kv_heads, self.max_len, cfg.hd)
        held = range(cfg.n_layers) if layers is None else layers
        self.k = [torch.zeros(shape, dtype=dtype) if l in held else None for l in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) if l in held else None for l in range(cfg.n_layers)]
        self.length = 0  # tokens already cached

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
        self.q_proj = nn.Linear(cfg.d_model, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.d_model, bias=False)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(nh * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(nkv * hd, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layer: int, cache: KVCache | None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*hd)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv:
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, nh, hd)
        k = k.view(B, T, nkv, hd)
        v = v.view(B, T, nkv, hd)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache ({cache.max_len})")
            cache.k[layer][:B, :, start:start + T] = k
            cache.v[layer][:B, :, start:start + T] = v
            k = cache.k[layer][:B, :, :start + T].to(q.dtype)  # cache may be fp32 under an fp16 model
            v = cache.v[layer][:B, :, :start + T].to(q.dtype)
        S = k.shape[2]
        if T == 1:
            mask = None
            causal = False
        elif start == 0:
            mask, causal = None, True
        else:  # chunked prefill after cached tokens: query i sees keys <= start + i
            qpos = torch.arange(start, start + T).unsqueeze(1)
            mask = torch.arange(S).unsqueeze(0) <= qpos  # (T, S)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=nkv != nh)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y)


class SwiGLUExpert(nn.Module):
    """One feed-forward expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (n, d) -> (n, d)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    @property
    def nbytes(self) -> int:
        """Bytes of this expert's weights as held in memory."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


@dataclass
class Routing:
    """Which experts each token goes to, with what weight, grouped per expert."""
    expert_ids: torch.Tensor  # (N, k) int64
    weights: torch.Tensor  # (N, k) float32; 0 where an assignment was pruned
    probs: torch.Tensor  # (N, E) float32 softmax over all experts (for stats and aux loss)
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]]  # e -> (token index (n,), slot in k (n,))

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[0]


def route(router: nn.Linear, h: torch.Tensor, top_k: int, norm_topk: bool) -> Routing:
    """Softmax top-k routing in float32, renormalised as Mixtral does when norm_topk."""
    logits = F.linear(h.float(), router.weight.float())  # (N, E)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (N, k)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights, probs, group_by_expert(ids))


def group_by_expert(ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Token and slot indices per expert, experts in ascending id order (deterministic)."""
    N, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pos = 0
    for e, c in enumerate(counts):
        if c:
            idx = order[pos:pos + c]
            groups[e] = (idx // k, idx % k)
            pos += c
    return groups


def expert_inputs(routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
    """The token vectors each expert must process: e -> (n_e, d)."""
    return {e: h.index_select(0, tok) for e, (tok, _slot) in routing.groups.items()}


def run_expert(expert: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run one expert (fp, quantized or a remote stub) on a batch of token vectors (n, d)."""
    return expert(x)


def combine(routing: Routing, outputs: dict[int, torch.Tensor], n_tokens: int, d: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weighted sum of expert outputs back in token order; missing experts contribute nothing."""
    out = torch.zeros(n_tokens, d, dtype=dtype)
    for e, y in outputs.items():
        tok, slot = routing.groups[e]
        w = routing.weights[tok, slot].to(y.dtype).unsqueeze(-1)  # (n, 1)
        out.index_add_(0, tok, (y * w).to(dtype))
    return out


class ExpertExecutor(Protocol):
    """Runs the routed experts of one layer: returns e -> output (n_e, d) for routing.groups."""

    def __call__(self, layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]: ...


class ForwardObserver:
    """The seams of one forward pass, for timing spans and routing statistics (all no-ops here).

    The model keeps no per-call state: whatever a caller wants to know about a pass (routing
    probabilities, when each step ended) it collects in its own observer, one per thread.
    """

    def begin(self, n_tokens: int) -> None:
        """Before the embedding (or before a stage's first layer)."""

    def moe_input(self, layer: int, h: torch.Tensor) -> None:
        """The MoE's input of `layer` (N, d), normed, before routing (profiling replays from it)."""

    def routed(self, layer: int, routing: Routing) -> None:
        """After attention and routing of `layer`, before its experts run."""

    def experts_done(self, layer: int) -> None:
        """After the executor returned every routed expert's output of `layer`."""

    def layer_done(self, layer: int) -> None:
        """After combine, shared expert and the residual add of `layer`."""

    def end(self) -> None:
        """After the final norm and lm_head."""


class RoutingTap(ForwardObserver):
    """A plain `fn(layer, routing)` callback as an observer (statistics, profiling)."""

    def __init__(self, fn: Callable[[int, Routing], None]):
        self.fn = fn

    def routed(self, layer: int, routing: Routing) -> None:
        self.fn(layer, routing)


class RoutingRecorder(ForwardObserver):
    """Keeps every layer's routing of the passes it observes (training's load-balance loss)."""

    def __init__(self) -> None:
        self.routings: list[Routing] = []

    def routed(self, layer: int, routing: Routing) -> None:
        self.routings.append(routing)


Observer = ForwardObserver | Callable[[int, Routing], None]


def as_observer(observer: Observer | None) -> ForwardObserver | None:
    """Accept a ForwardObserver or a bare routing callback."""
    if observer is None or isinstance(observer, ForwardObserver):
        return observer
    return RoutingTap(observer)


def load_balance_loss(routings: list[Routing], n_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss: E * sum_e f_e * P_e per layer's routing, averaged."""
    total = 0.0
    for r in routings:
        frac = torch.bincount(r.expert_ids.reshape(-1), minlength=n_experts).float() / r.expert_ids.numel()
        total = total + n_experts * (frac * r.probs.mean(0)).sum()
    return total / len(routings)


class MoEBlock(nn.Module):
    def __init__(self, cfg: MoEConfig, routed_experts: bool = True):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        # without routed experts (a pipeline stage's backbone) the executor must supply them
        self.experts = nn.ModuleList(SwiGLUExpert(cfg.d_model, cfg.expert_hidden)
                                     for _ in range(cfg.n_experts if routed_experts else 0))
        self.shared_expert = SwiGLUExpert(cfg.d_model, cfg.shared_hidden) if cfg.shared_hidden else None
        self.shared_expert_gate = (nn.Linear(cfg.d_model, 1, bias=False)
                                   if cfg.shared_hidden and cfg.shared_expert_gate else None)

    def local_executor(self, layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
        xs = expert_inputs(routing, h)
        return {e: run_expert(self.experts[e], x) for e, x in xs.items()}

    def forward(self, x: torch.Tensor, layer: int, executor: ExpertExecutor | None = None,
                observer: Observer | None = None) -> torch.Tensor:
        obs = as_observer(observer)
        B, T, d = x.shape
        h = x.reshape(B * T, d)  # (N, d)
        if obs is not None:
            obs.moe_input(layer, h)
        routing = route(self.router, h, self.cfg.top_k, self.cfg.norm_topk_prob)
        if obs is not None:
            obs.routed(layer, routing)
        outputs = (executor or self.local_executor)(layer, routing, h)
        if obs is not None:
            obs.experts_done(layer)
        y = combine(routing, outputs, B * T, d, dtype=x.dtype)
        if self.shared_expert is not None:
            s = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(h)) * s
            y = y + s
        return y.view(B, T, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, routed_experts: bool = True):
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoEBlock(cfg, routed_experts)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, cache: KVCache | None,
                executor: ExpertExecutor | None, obs: ForwardObserver | None) -> torch.Tensor:
        """One pre-norm block on hidden states (B, T, d): attention, then the MoE, each residual."""
        x = x + self.attn(self.input_norm(x), cos, sin, layer, cache)
        x = x + self.moe(self.post_attn_norm(x), layer, executor, obs)
        if obs is not None:
            obs.layer_done(layer)
        return x


class MoEModel(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.hd, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def expert(self, layer: int, e: int) -> nn.Module:
        """The (layer, expert) unit: the addressable thing CoEL quantizes and places."""
        return self.layers[layer].moe.experts[e]

    def set_expert(self, layer: int, e: int, module: nn.Module) -> None:
        self.layers[layer].moe.experts[e] = module

    def new_cache(self, max_len: int) -> KVCache:
        """A KV cache for one sequence of up to max_len tokens (what the decode loop asks for)."""
        return KVCache(self.cfg, batch=1, max_len=max_len)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                executor: ExpertExecutor | None = None, observer: Observer | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab); appends to `cache` when given.

        The only transformer forward (the whole model is one slice): the executor decides where
        experts run (in place by default, on other servers for the coordinator), the observer
        sees each seam.
        """
        return self.forward_slice(tokens, 0, self.cfg.n_layers, cache, executor, observer)

    def forward_slice(self, x: torch.Tensor, l0: int, l1: int, cache: KVCache | None = None,
                      executor: ExpertExecutor | None = None, observer: Observer | None = None,
                      embed: bool | None = None, head: bool | None = None) -> torch.Tensor:
        """Layers [l0, l1) as one pipeline stage; advances `cache` when given.

        x: token ids (B, T) when embedding here (default: l0 == 0), else hidden states (B, T, d).
        Returns logits (B, T, vocab) when the head runs here (default: l1 == n_layers), else
        hidden states (B, T, d).
        """
        obs = as_observer(observer)
        if obs is not None:
            obs.begin(x.shape[0] * x.shape[1])
        if l0 == 0 if embed is None else embed:
            x = self.embed(x)  # (B, T, d)
        x = self.run_layers(x, l0, l1, cache, executor, obs)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(x, obs) if (l1 == self.cfg.n_layers if head is None else head) else x

    def run_layers(self, x: torch.Tensor, l0: int, l1: int, cache: KVCache | None = None,
                   executor: ExpertExecutor | None = None, observer: Observer | None = None) -> torch.Tensor:
        """Hidden states (B, T, d) through layers [l0, l1) at positions cache.length.. (0 without
        a cache). Does not advance the cache."""
        obs = as_observer(observer)
        T = x.shape[1]
        start = cache.length if cache is not None else 0
        cos = self.rope_cos[start:start + T]
        sin = self.rope_sin[start:start + T]
        for i in range(l0, l1):
            x = self.layers[i](x, cos, sin, i, cache, executor, obs)
        return x

    def head(self, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        """Final norm and lm_head: hidden states (B, T, d) -> logits (B, T, vocab)."""
        logits = self.lm_head(self.norm(x))
        obs = as_observer(observer)
        if obs is not None:
            obs.end()
        return logits

    def expert_bytes(self) -> int:
        """Bytes held by all routed experts, as stored in memory (packed if quantized)."""
        return sum(int(getattr(self.expert(l, e), "nbytes"))
                   for l in range(self.cfg.n_layers) for e in range(self.cfg.n_experts))


class _LayerSlice(nn.ModuleDict):
    """Some of a model's decoder layers, indexed by their layer number (state-dict names unchanged)."""

    def __getitem__(self, i: int | str) -> nn.Module:
        return super().__getitem__(str(i))


class BackboneSlice(MoEModel):
    """The backbone of layers [l0, l1) as one pipeline stage holds it: attention (its KV cache is
    the caller's), norms, routers and shared experts; no routed experts (the executor supplies
    them). With `ends` it also holds the embedding and the final norm + lm_head: the pipeline's
    coordinator (its first stage) embeds the ids and, after the last stage's hop back, computes
    the logits, as the cost model (controller/costmodel.py) places them. Parameter names are the
    full model's, so a slice loads from `slice_state(model, l0, l1, ends)`."""

    def __init__(self, cfg: MoEConfig, l0: int, l1: int, ends: bool = False):
        if not 0 <= l0 < l1 <= cfg.n_layers:
            raise ValueError(f"stage layers [{l0}, {l1}) are not a slice of {cfg.n_layers} layers")
        nn.Module.__init__(self)
        self.cfg, self.l0, self.l1, self.ends = cfg, l0, l1, ends
        self.layers = _LayerSlice({str(i): DecoderLayer(cfg, routed_experts=False) for i in range(l0, l1)})
        if ends:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.hd, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, executor: ExpertExecutor | None = None,
                observer: Observer | None = None) -> torch.Tensor:
        """This stage's layers: ids (embedded here, `ends` only) or hidden states -> hidden states."""
        return self.forward_slice(x, self.l0, self.l1, cache, executor, observer,
                                  embed=not x.is_floating_point(), head=False)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch=1, max_len=max_len, layers=range(self.l0, self.l1))

    def nbytes(self) -> int:
        """Bytes of the weights this slice holds (tied weights once)."""
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.parameters()}.values())


class _HalfLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())


class _HalfEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def hold_half(module: nn.Module) -> nn.Module:
    """Keep `module`'s weights in fp16 and compute in fp32 (each weight upcast per call): half the
    memory, and the same results as fp32 weights that hold fp16 values (an fp16 checkpoint)."""
    for p in module.parameters():
        p.data = p.data.half()
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = _HalfLinear
        elif type(m) is nn.Embedding:
            m.__class__ = _HalfEmbedding
    return module


def slice_state(model: MoEModel, l0: int, l1: int, ends: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `model` a BackboneSlice(l0, l1, ends) loads (no routed experts), by name."""
    out = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            if not l0 <= i < l1 or (parts[2] == "moe" and parts[3] == "experts"):
                continue
        elif parts[0] in ("embed", "norm", "lm_head") and not ends:
            continue
        out[name] = t
    return out


def init_weights(model: MoEModel, seed: int = 0) -> None:
    """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 1:
            continue
        s = std / math.sqrt(2 * model.cfg.n_layers) if name.endswith(("o_proj.weight", "w_down.weight")) else std
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * s)

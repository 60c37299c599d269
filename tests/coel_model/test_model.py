"""The MoE model core: the split-at-expert forward against a dense reference written here from
scratch, KV-cached decoding against full recomputation, GQA, shared experts, the executor and
observer hooks, and generation determinism."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from coel_model.generate import generate
from coel_model.model import (KVCache, MoEModel, Routing, combine, expert_inputs, init_weights,
                              run_expert)

torch.set_num_threads(1)

BASE = dict(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=6, top_k=2,
            expert_hidden=24, max_seq_len=64)

VARIANTS = {
    "mixtral_gqa": dict(BASE),
    "mha_no_norm_topk": dict(BASE, n_kv_heads=4, norm_topk_prob=False, top_k=3),
    "qwen2_shared_gate_bias": dict(BASE, n_shared_experts=1, shared_expert_hidden=40,
                                   shared_expert_gate=True, attention_bias=True, norm_topk_prob=False),
    "qwen3_headnorm_headdim": dict(BASE, qk_norm="head", head_dim=16, n_kv_heads=1, tie_embeddings=True),
    "olmoe_fullnorm_clip": dict(BASE, qk_norm="full", clip_qkv=0.8, norm_topk_prob=False),
    "two_shared_no_gate": dict(BASE, n_shared_experts=2),
}


def make(variant: str, seed: int = 0) -> MoEModel:
    model = MoEModel(MoEConfig(**VARIANTS[variant])).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights so routing, norms and attention all matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1])))
    return model


# ------------------------------------------------------------------- independent dense reference

def ref_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def ref_rope(x, pos, theta):
    """Rotate-half RoPE: pair dim i with i + hd/2. x (B, H, T, hd), pos (T,)."""
    hd = x.shape[-1]
    half = hd // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    ang = pos.double()[:, None] * freq[None, :]  # (T, hd/2)
    c, s = torch.cos(ang).float(), torch.sin(ang).float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def ref_swiglu(ex, x):
    return (F.silu(x @ ex.w_gate.weight.T) * (x @ ex.w_up.weight.T)) @ ex.w_down.weight.T


def ref_forward(model: MoEModel, tokens: torch.Tensor, drop: set[tuple[int, int]] = frozenset()):
    """Whole-sequence forward, every expert computed densely on every token times a gate mask."""
    cfg = model.cfg
    B, T = tokens.shape
    hd, nh, nkv = cfg.hd, cfg.n_heads, cfg.n_kv_heads
    x = model.embed.weight[tokens]  # (B, T, d)
    pos = torch.arange(T)
    for li, L in enumerate(model.layers):
        a = L.attn
        h = ref_rmsnorm(x, L.input_norm.weight, cfg.norm_eps)
        q, k, v = (h @ p.weight.T + (p.bias if p.bias is not None else 0) for p in (a.q_proj, a.k_proj, a.v_proj))
        if cfg.qk_norm == "full":
            q, k = ref_rmsnorm(q, a.q_norm.weight, cfg.norm_eps), ref_rmsnorm(k, a.k_norm.weight, cfg.norm_eps)
        if cfg.clip_qkv:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if cfg.qk_norm == "head":
            q, k = ref_rmsnorm(q, a.q_norm.weight, cfg.norm_eps), ref_rmsnorm(k, a.k_norm.weight, cfg.norm_eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = ref_rope(q, pos, cfg.rope_theta), ref_rope(k, pos, cfg.rope_theta)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # query head j uses kv head j // rep
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + y @ a.o_proj.weight.T
        h = ref_rmsnorm(x, L.post_attn_norm.weight, cfg.norm_eps)
        m = L.moe
        probs = (h @ m.router.weight.T).softmax(-1)  # (B, T, E)
        top = probs.topk(cfg.top_k, -1)
        w = top.values / top.values.sum(-1, keepdim=True) if cfg.norm_topk_prob else top.values
        gate = torch.zeros_like(probs).scatter(-1, top.indices, w)  # (B, T, E), zero off the top-k
        out = torch.zeros_like(h)
        for e in range(cfg.n_experts):
            if (li, e) not in drop:
                out = out + gate[..., e:e + 1] * ref_swiglu(m.experts[e], h)
        if m.shared_expert is not None:
            s = ref_swiglu(m.shared_expert, h)
            if m.shared_expert_gate is not None:
                s = torch.sigmoid(h @ m.shared_expert_gate.weight.T) * s
            out = out + s
        x = x + out
    return ref_rmsnorm(x, model.norm.weight, cfg.norm_eps) @ model.lm_head.weight.T


TOKENS = torch.tensor([[5, 9, 33, 2, 71, 40, 12, 12, 60, 1, 18, 77],
                       [44, 3, 3, 29, 56, 7, 0, 65, 23, 50, 31, 8]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_forward_matches_dense_reference(variant):
    model = make(variant)
    with torch.no_grad():
        got, want = model(TOKENS), ref_forward(model, TOKENS)
    assert want.std() > 0.5
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{variant}: max |logit diff| {err:.2e}"


def test_custom_executor_through_the_seam_and_pruning():
    """An executor that runs experts itself gives identical logits; leaving experts out drops them."""
    model = make("qwen2_shared_gate_bias", seed=3)
    calls: list[tuple[int, tuple[int, ...]]] = []

    def executor(layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
        calls.append((layer, tuple(sorted(routing.groups))))
        xs = expert_inputs(routing, h)
        return {e: run_expert(model.expert(layer, e), x) for e, x in xs.items()}

    with torch.no_grad():
        base = model(TOKENS)
        assert torch.equal(model(TOKENS, executor=executor), base)
    assert [layer for layer, _ in calls] == [0, 1]
    drop = {(0, 1), (1, 4)}

    def pruning(layer, routing, h):
        xs = expert_inputs(routing, h)
        return {e: model.expert(layer, e)(x) for e, x in xs.items() if (layer, e) not in drop}

    with torch.no_grad():
        pruned = model(TOKENS, executor=pruning)
        want = ref_forward(model, TOKENS, drop=drop)
    assert (pruned - want).abs().max().item() < 1e-4
    assert (pruned - base).abs().max().item() > 1e-2


def test_observer_sees_consistent_routing():
    model = make("mixtral_gqa", seed=4)
    seen: list[tuple[int, Routing]] = []
    with torch.no_grad():
        model(TOKENS, observer=lambda layer, r: seen.append((layer, r)))
    assert [layer for layer, _ in seen] == list(range(model.cfg.n_layers))
    N, k = TOKENS.numel(), model.cfg.top_k
    for _, r in seen:
        assert r.n_tokens == N and r.expert_ids.shape == (N, k)
        assert torch.allclose(r.probs.sum(-1), torch.ones(N))
        assert torch.allclose(r.weights.sum(-1), torch.ones(N), atol=1e-6)  # norm_topk_prob
        pairs = sorted((int(t), int(s)) for e, (tok, slot) in r.groups.items() for t, s in zip(tok, slot))
        assert pairs == [(t, s) for t in range(N) for s in range(k)]  # each assignment exactly once
        for e, (tok, slot) in r.groups.items():
            assert torch.all(r.expert_ids[tok, slot] == e)


def test_combine_ignores_missing_experts_and_weights():
    ids = torch.tensor([[0, 2], [2, 1], [0, 1]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    from coel_model.model import group_by_expert
    r = Routing(ids, w, torch.zeros(3, 3), group_by_expert(ids))
    outs = {e: torch.full((len(r.groups[e][0]), 2), float(e + 1)) for e in (0, 2)}  # expert 1 absent
    y = combine(r, outs, 3, 2)
    assert torch.allclose(y, torch.tensor([[0.75 * 1 + 0.25 * 3] * 2, [0.5 * 3] * 2, [1.0] * 2]))


# ------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("variant", ["mixtral_gqa", "qwen3_headnorm_headdim", "olmoe_fullnorm_clip"])
@pytest.mark.parametrize("chunks", [(12,), (5, 1, 1, 1, 4), (3, 4, 5), (1,) * 12], ids=["full", "prefill+decode", "chunked", "stepwise"])
def test_cached_decode_equals_recompute(variant, chunks):
    model = make(variant, seed=5)
    with torch.no_grad():
        want = model(TOKENS)
        cache = KVCache(model.cfg, batch=2, max_len=TOKENS.shape[1])
        got, t0 = [], 0
        for n in chunks:
            got.append(model(TOKENS[:, t0:t0 + n], cache=cache))
            t0 += n
    assert cache.length == TOKENS.shape[1]
    err = (torch.cat(got, 1) - want).abs().max().item()
    assert err < 1e-4, f"{variant} chunks {chunks}: {err:.2e}"


def test_cache_overflow_is_an_error():
    model = make("mixtral_gqa")
    cache = KVCache(model.cfg, batch=1, max_len=4)
    with torch.no_grad():
        model(TOKENS[:1, :3], cache=cache)
        with pytest.raises(ValueError, match="exceeds the KV cache"):
            model(TOKENS[:1, 3:5], cache=cache)


def test_fp16_model_with_fp32_cache_decodes_like_recompute():
    """generate() allocates an fp32 KVCache; an fp16 model must still decode through it."""
    half = make("mixtral_gqa", seed=6).half()
    with torch.no_grad():
        want = half(TOKENS[:1]).float()
        cache = KVCache(half.cfg, batch=1, max_len=12)  # fp32 by default
        got = torch.cat([half(TOKENS[:1, :6], cache=cache)] +
                        [half(TOKENS[:1, t:t + 1], cache=cache) for t in range(6, 12)], 1).float()
    assert (got - want).abs().max().item() < 2e-2
    assert len(generate(half, TOKENS[0, :6].tolist(), 6, stop_at_eos=False)) == 6


# ----------------------------------------------------------------------------------- GQA

def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head j of a GQA model uses kv head j // (n_heads / n_kv_heads)."""
    gqa = make("mixtral_gqa", seed=7)
    mha = MoEModel(MoEConfig(**dict(VARIANTS["mixtral_gqa"], n_kv_heads=4))).eval()
    sd = {k: v.clone() for k, v in gqa.state_dict().items()}
    hd, rep = gqa.cfg.hd, gqa.cfg.n_heads // gqa.cfg.n_kv_heads
    for i in range(gqa.cfg.n_layers):
        for p in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.attn.{p}.weight"].view(gqa.cfg.n_kv_heads, hd, -1)
            sd[f"layers.{i}.attn.{p}.weight"] = w.repeat_interleave(rep, 0).reshape(-1, w.shape[-1])
    mha.load_state_dict(sd)
    with torch.no_grad():
        assert (gqa(TOKENS) - mha(TOKENS)).abs().max().item() < 1e-5
        cache_g = KVCache(gqa.cfg, 2, 12)
        assert cache_g.k[0].shape == (2, 2, 12, hd)  # the cache holds only the kv heads


# --------------------------------------------------------------------------- shared experts

def test_shared_expert_sizes_and_contribution():
    m2 = make("two_shared_no_gate", seed=8)
    assert m2.cfg.shared_hidden == 2 * m2.cfg.expert_hidden
    assert m2.layers[0].moe.shared_expert.w_up.weight.shape == (48, 32)
    assert m2.layers[0].moe.shared_expert_gate is None
    q = make("qwen2_shared_gate_bias", seed=8)
    assert q.layers[0].moe.shared_expert.w_up.weight.shape == (40, 32)
    with torch.no_grad():
        base = q(TOKENS)
        for L in q.layers:
            L.moe.shared_expert.w_down.weight.zero_()
        assert (q(TOKENS) - base).abs().max().item() > 1e-2  # the shared expert was contributing
    counts = q.cfg.param_counts()
    n_params = sum(p.numel() for p in q.parameters())
    assert counts["total"] == n_params
    assert counts["experts"] == sum(q.expert(l, e).w_up.weight.numel() * 3
                                    for l in range(2) for e in range(q.cfg.n_experts))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_counts_match_modules(variant):
    model = make(variant)
    n = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert model.cfg.param_counts()["total"] == n


# ------------------------------------------------------------------------------- generation

def test_greedy_generation_is_argmax_of_recompute():
    model = make("olmoe_fullnorm_clip", seed=9)
    prompt = [4, 8, 15, 16]
    out = generate(model, prompt, 10)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    assert generate(model, prompt, 10) == out


def test_sampled_generation_is_seeded():
    model = make("qwen2_shared_gate_bias", seed=10)
    prompt = [1, 2, 3]
    a = generate(model, prompt, 16, temperature=1.5, seed=123)
    b = generate(model, prompt, 16, temperature=1.5, seed=123)
    c = generate(model, prompt, 16, temperature=1.5, seed=124)
    assert a == b
    assert a != c
    assert generate(model, prompt, 16, temperature=1.0, top_k=1, seed=5) == generate(model, prompt, 16)
    tp = generate(model, prompt, 16, temperature=1.0, top_p=0.3, seed=7)
    assert tp == generate(model, prompt, 16, temperature=1.0, top_p=0.3, seed=7)
    assert all(0 <= t < model.cfg.vocab_size for t in a + c + tp)


def test_generation_stops_at_eos_and_reports_tokens():
    model = make("mixtral_gqa", seed=11)
    first = generate(model, [7, 7], 1)[0]
    eos_model = MoEModel(MoEConfig(**dict(VARIANTS["mixtral_gqa"], eos_token_id=first))).eval()
    eos_model.load_state_dict(model.state_dict())
    seen = []
    out = generate(eos_model, [7, 7], 8, on_token=lambda step, tok: seen.append((step, tok)))
    assert out == [first] and seen == [(0, first)]
    with pytest.raises(ConfigError, match="max_seq_len"):
        generate(model, [1] * 60, 10)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        generate(model, [model.cfg.vocab_size], 1)


def test_init_weights_is_seeded():
    cfg = MoEConfig(**BASE)
    a, b, c = MoEModel(cfg), MoEModel(cfg), MoEModel(cfg)
    init_weights(a, 1), init_weights(b, 1), init_weights(c, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].moe.experts[0].w_up.weight, c.layers[0].moe.experts[0].w_up.weight)


def test_config_validation_names_fields():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        MoEConfig(**dict(BASE, n_kv_heads=3))
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(**dict(BASE, top_k=7))
    with pytest.raises(ConfigError, match="qk_norm"):
        MoEConfig(**dict(BASE, qk_norm="rms"))
    with pytest.raises(ConfigError, match="unknown config keys"):
        MoEConfig.from_dict(dict(BASE, n_expert=3))

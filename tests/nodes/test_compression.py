"""Token compression: settings, wire round trips and their error bounds, fusion, pruning, the
in-process executor (bit-exact when off, bytes counted) and the measured cost table."""
from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from coel_model.config import MoEConfig
from coel_model.generate import generate
from coel_model.model import MoEModel, Routing, combine, group_by_expert, init_weights, route
from nodes.compression import (NONE, CompressingExecutor, CompressionSettings, WireTensor,
                               compress_group, compress_reply, decode_rows,
                               decompress_group, decompress_reply, encode_rows, fuse_rows,
                               measure_compression_cost, protected_mask, prune_routing,
                               token_importance, unmerge, encode_activations, decode_activations)

torch.set_num_threads(1)

CFG = MoEConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8,
                top_k=2, expert_hidden=96, max_seq_len=128)


@pytest.fixture(scope="module")
def model() -> MoEModel:
    m = MoEModel(CFG)
    init_weights(m, seed=3)
    with torch.no_grad():  # a sharper router than random init gives, so the beta rule has work
        for layer in m.layers:
            layer.moe.router.weight.mul_(60.0)
    return m.eval()


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def make_routing(ids: list[list[int]], weights: list[list[float]], n_experts: int = 4) -> Routing:
    ids_t = torch.tensor(ids, dtype=torch.long)
    w = torch.tensor(weights, dtype=torch.float32)
    probs = torch.full((len(ids), n_experts), 1.0 / n_experts)
    return Routing(ids_t, w, probs, group_by_expert(ids_t))


# ----------------------------------------------------------------------------- settings

def test_settings_header_round_trip_through_msgpack():
    s = CompressionSettings(prune_beta=0.5, protect_top_frac=0.05, drop_tokens_frac=0.1,
                            fuse_threshold=0.9, fuse_max_frac=0.25, act_dtype="int8",
                            prune_renorm=True)
    wire = msgpack.unpackb(msgpack.packb(s.to_header()))
    assert CompressionSettings.from_header(wire) == s
    assert NONE.to_header() == {} and CompressionSettings.from_header({}) == NONE
    assert CompressionSettings.from_header(None) == NONE
    assert CompressionSettings(act_dtype="int8").to_header() == {"act_dtype": "int8"}
    assert NONE.is_identity and not s.is_identity


def test_settings_parse_command_line_forms():
    s = CompressionSettings.parse("act=int8, beta=0.5, fuse=0.9, renorm=true, protect=0.05")
    assert s == CompressionSettings(act_dtype="int8", prune_beta=0.5, fuse_threshold=0.9,
                                    prune_renorm=True, protect_top_frac=0.05)
    assert CompressionSettings.parse('{"act_dtype": "fp16"}') == CompressionSettings(act_dtype="fp16")
    assert CompressionSettings.parse("none") == NONE and CompressionSettings.parse(None) == NONE
    assert CompressionSettings.from_dict({"act": "fp16", "beta": 0.5}).to_dict() == \
        {"act_dtype": "fp16", "prune_beta": 0.5}
    with pytest.raises(ValueError, match="repeated"):
        CompressionSettings.from_header({"act": "fp16", "act_dtype": "int8"})
    with pytest.raises(ValueError, match="bad item"):
        CompressionSettings.parse("act=int8,bogus=1")
    with pytest.raises(ValueError, match="beta must be a number"):
        CompressionSettings.parse("beta=half")
    with pytest.raises(ValueError, match="act_dtype"):
        CompressionSettings.parse("act=int4")


@pytest.mark.parametrize("bad, word", [
    ({"prune_beta": 1.5}, "prune_beta"),
    ({"act_dtype": "int4"}, "act_dtype"),
    ({"fuse_threshold": -0.2}, "fuse_threshold"),
    ({"fuse_max_frac": 0.7}, "fuse_max_frac"),
    ({"drop_tokens_frac": 1.0}, "drop_tokens_frac"),
    ({"prune_beta": float("nan")}, "prune_beta"),
    ({"prune_beta": "0.5"}, "prune_beta"),
    ({"betta": 0.5}, "unknown or repeated compression setting"),
])
def test_settings_reject_bad_values_naming_the_field(bad, word):
    with pytest.raises(ValueError, match=word):
        CompressionSettings.from_header({**NONE.to_header(), **bad})


# ----------------------------------------------------------------------------- activations

finite_rows = st.integers(1, 6).flatmap(lambda m: st.integers(1, 40).flatmap(
    lambda d: st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=m * d,
                       max_size=m * d).map(lambda v: torch.tensor(v, dtype=torch.float32).view(m, d))))


@hsettings(max_examples=60, deadline=None)
@given(finite_rows)
def test_int8_round_trip_error_within_half_a_scale_step(x):
    w = encode_rows(x, "int8")
    assert w.act_dtype == "int8" and w.scales is not None and w.scales.dtype == torch.float16
    back = decode_rows(w)
    s = w.scales.float().unsqueeze(1)
    assert torch.all((back - x).abs() <= s / 2 + 1e-6 * x.abs())
    absmax = x.abs().amax(dim=1)
    # the scale is the per-row absmax / 127 to fp16 precision (or the fp16 floor for tiny rows)
    assert torch.all(w.scales.float() <= torch.clamp(absmax / 127, min=6.2e-5) * (1 + 2 ** -10))
    assert w.nbytes == x.numel() + 2 * x.shape[0]


@hsettings(max_examples=40, deadline=None)
@given(finite_rows)
def test_fp16_round_trip_relative_error(x):
    w = encode_rows(x, "fp16")
    back = decode_rows(w)
    assert back.dtype == torch.float32
    assert torch.all((back - x).abs() <= x.abs() * 2 ** -11 + 2 ** -24)
    assert w.nbytes == 2 * x.numel()


def test_fp16_overflow_falls_back_to_fp32_and_zero_rows_are_fine():
    x = torch.tensor([[1e6, -3.0]])
    w = encode_rows(x, "fp16")
    assert w.act_dtype == "fp32" and torch.equal(decode_rows(w), x)
    z = torch.zeros(3, 8)
    assert torch.equal(decode_rows(encode_rows(z, "int8")), z)
    e = torch.zeros(0, 8)
    assert decode_rows(encode_rows(e, "int8")).shape == (0, 8)
    bad = torch.ones(3, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inf/nan \(rows \[2\] of 3\)"):
        encode_rows(bad, "int8")


@pytest.mark.parametrize("act", ["fp32", "fp16", "int8"])
def test_wire_frames_round_trip_and_keep_the_original_dtype(act):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w = encode_rows(x, act)
    frames = [bytes(f) for f in w.frames()]
    assert sum(len(f) for f in frames) == w.nbytes
    meta = msgpack.unpackb(msgpack.packb(w.meta()))
    w2 = WireTensor.from_wire(meta, frames)
    assert torch.equal(decode_rows(w2), decode_rows(w))
    assert decode_rows(w2).dtype == torch.bfloat16


def test_named_tensor_adapters_for_the_transport():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    comp = CompressionSettings(act_dtype="int8", prune_beta=0.5).to_header()
    t = encode_rows(x, "int8").to_tensors("x")
    assert set(t) == {"x", "x_scale"} and t["x"].dtype == torch.int8
    got, meta = decode_activations(t, comp, "x")
    assert got.dtype == torch.float32 and torch.equal(got, decode_rows(encode_rows(x, "int8")))
    reply = encode_activations(got * 2, comp, "y", meta)
    assert set(reply) == {"y", "y_scale"}
    with pytest.raises(ValueError, match="without its scales"):
        decode_activations({"x": t["x"]}, comp, "x")
    with pytest.raises(ValueError, match="float16 of shape"):
        decode_activations({"x": t["x"], "x_scale": t["x_scale"][:3]}, comp, "x")
    with pytest.raises(ValueError, match="unknown or repeated"):
        decode_activations(t, {"act_type": "int8"}, "x")


def test_round_trip_through_the_real_wire_protocol():
    P = pytest.importorskip("nodes.protocol")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 32, generator=g)
    x[1] = x[0]  # one duplicate pair to merge
    s = CompressionSettings(act_dtype="int8", fuse_threshold=0.99)
    group = compress_group(x, s)
    assert group.n_merged == 1
    frames = P.encode(P.MsgType.EXPERT_CALL, 7, {"layer": 0, "expert": 3,
                                                  "compression": s.to_header()},
                      group.wire.to_tensors("x"))
    call = P.decode([bytes(f) for f in frames])
    rows, meta = decode_activations(call.tensors, call.body["compression"], "x")
    back = P.decode([bytes(f) for f in P.encode(
        P.MsgType.EXPERT_REPLY, 7, {"queue_ns": 0, "compute_ns": 0,
                                    "compression": call.body["compression"]},
        encode_activations(rows * 0.5, call.body["compression"], "y", meta))])
    y, _ = decode_activations(back.tensors, back.body["compression"], "y")
    out = unmerge(y, group)
    assert out.shape == x.shape
    assert torch.allclose(out, 0.5 * x, atol=0.5 * 2 * float(x.abs().max()) / 127)
    assert torch.equal(out[0], out[1])


def test_wire_rejects_malformed_messages_with_the_reason():
    w = encode_rows(torch.randn(4, 8), "int8")
    meta, frames = w.meta(), [bytes(f) for f in w.frames()]
    with pytest.raises(ValueError, match="data frame has 31 bytes"):
        WireTensor.from_wire(meta, [frames[0][:-1], frames[1]])
    with pytest.raises(ValueError, match="needs 2 frame"):
        WireTensor.from_wire(meta, frames[:1])
    with pytest.raises(ValueError, match="act_dtype"):
        WireTensor.from_wire({**meta, "act_dtype": "int3"}, frames)
    with pytest.raises(ValueError, match="shape"):
        WireTensor.from_wire({**meta, "shape": [4, -8]}, frames)
    with pytest.raises(ValueError, match="map"):
        WireTensor.from_wire([1, 2], frames)
    nan = torch.full((1, 4), float("nan")).numpy().tobytes()
    with pytest.raises(ValueError, match="inf/nan"):
        WireTensor.from_wire({"act_dtype": "fp32", "shape": [1, 4], "orig_dtype": "fp32"}, [nan])


# ----------------------------------------------------------------------------- fusion

def test_fusion_merges_identical_vectors_and_unmerge_is_exact():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 32, generator=g)
    # rows: a0 b0 a1 b1 ... with a_i identical to b_i for i < 3, the last pair unrelated
    x = torch.stack([base[0], base[0], base[1], base[1], base[2], base[2], base[3],
                     torch.randn(32, generator=g)])
    merged, mm = fuse_rows(x, threshold=0.999, max_frac=0.5)
    assert mm is not None and merged.shape[0] == 5
    assert torch.equal(merged[mm][:6], x[:6])  # identical rows survive merging bit for bit
    assert torch.equal(merged[mm][6:], x[6:])  # the dissimilar pair is untouched
    s = CompressionSettings(fuse_threshold=0.999)
    group = compress_group(x, s)
    assert group.n_merged == 3 and group.wire.shape == (5, 32) and group.wire_bytes == 5 * 32 * 4
    y_remote = decompress_group(group.wire) * 3.0 + 1.0  # any per-row function on the remote side
    back = decompress_reply(compress_reply(y_remote, s), group)
    assert torch.equal(back, x * 3.0 + 1.0)


def test_fusion_merges_near_duplicates_as_their_mean_within_caps():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 64, generator=g)
    x = torch.empty(16, 64)
    x[0::2] = base
    x[1::2] = base + 0.01 * torch.randn(8, 64, generator=g)
    merged, mm = fuse_rows(x, threshold=0.99, max_frac=0.25)  # cap: 4 of 16 rows may go
    assert merged.shape[0] == 12
    for a in range(0, 16, 2):
        if mm[a] == mm[a + 1]:
            assert torch.allclose(merged[mm[a]], (x[a] + x[a + 1]) / 2, atol=1e-6)
    none, mm0 = fuse_rows(x, threshold=0.99, max_frac=0.5,
                          protected=torch.ones(16, dtype=torch.bool))
    assert mm0 is None and torch.equal(none, x)
    far = torch.eye(6)
    assert fuse_rows(far, threshold=0.5, max_frac=0.5)[1] is None  # orthogonal rows never merge


# ----------------------------------------------------------------------------- pruning

def test_beta_rule_prunes_weak_second_experts_except_protected_tokens():
    r = make_routing([[0, 1], [1, 2], [2, 3], [3, 0]],
                     [[0.7, 0.3], [0.55, 0.45], [0.9, 0.1], [0.8, 0.2]])
    s = CompressionSettings(prune_beta=0.5, prune_renorm=True)
    prot = torch.tensor([False, False, False, True])
    p = prune_routing(r, s, protected=prot)
    # token 0: 0.3 < 0.35 pruned; token 1: 0.45 >= 0.275 kept; token 2 pruned; token 3 protected
    assert torch.allclose(p.weights, torch.tensor([[1.0, 0.0], [0.55, 0.45], [1.0, 0.0], [0.8, 0.2]]))
    sent = {e: sorted(zip(t.tolist(), sl.tolist())) for e, (t, sl) in p.groups.items()}
    assert sent == {0: [(0, 0), (3, 1)], 1: [(1, 0)], 2: [(1, 1), (2, 0)], 3: [(3, 0)]}
    assert torch.equal(r.weights[0], torch.tensor([0.7, 0.3]))  # input untouched
    z = prune_routing(r, CompressionSettings(prune_beta=0.5), protected=prot)  # default: zeroed
    assert torch.allclose(z.weights, torch.tensor([[0.7, 0.0], [0.55, 0.45], [0.9, 0.0], [0.8, 0.2]]))


def test_pruning_touches_only_remote_experts_and_keeps_unnormalised_mass():
    r = make_routing([[0, 1], [2, 3]], [[0.5, 0.1], [0.4, 0.1]])  # norm_topk off: sums < 1
    p = prune_routing(r, CompressionSettings(prune_beta=0.5, prune_renorm=True), remote={3})
    assert torch.allclose(p.weights, torch.tensor([[0.5, 0.1], [0.5, 0.0]]))  # expert 1 is local
    assert 3 not in p.groups and 1 in p.groups


def test_top1_is_never_pruned_and_nothing_to_prune_returns_the_same_routing():
    r = make_routing([[0, 1], [1, 0]], [[0.5, 0.5], [0.6, 0.4]])
    p = prune_routing(r, CompressionSettings(prune_beta=1.0))
    assert torch.allclose(p.weights, torch.tensor([[0.5, 0.5], [0.6, 0.0]]))  # slot 0 always kept
    assert prune_routing(r, NONE) is r
    assert prune_routing(r, CompressionSettings(prune_beta=0.1)) is r


def test_drop_tokens_removes_the_lowest_weight_non_top1_rows_per_expert():
    # expert 1 receives 4 rows: token 0 as top-1, tokens 1,2,3 as second with weights .3 .1 .2
    r = make_routing([[1, 0], [0, 1], [2, 1], [3, 1]],
                     [[0.9, 0.1], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    p = prune_routing(r, CompressionSettings(drop_tokens_frac=0.5))
    tok1 = sorted(p.groups[1][0].tolist())
    assert tok1 == [0, 1]  # floor(0.5 * 4) = 2 dropped: the 0.1 and 0.2 rows, never token 0's top-1
    assert 0 in p.groups and p.groups[0][0].tolist() == [1]  # token 0's weak slot: 1 row, floor(.5)=0


def test_protection_picks_the_most_unusual_tokens():
    h = torch.ones(50, 8)
    h[17] = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])
    imp = token_importance(h)
    assert int(imp.argmax()) == 17
    assert protected_mask(imp, 0.02).nonzero().flatten().tolist() == [17]
    assert not protected_mask(imp[:1], 0.02).any()  # a single decode token is never protected


# ----------------------------------------------------------------------------- executor

def test_compression_off_is_bit_exact_for_forward_and_generate(model):
    t = tokens(40)
    with torch.no_grad():
        ref = model(t)
        ex = CompressingExecutor(model, NONE)
        assert torch.equal(model(t, executor=ex), ref)
    assert ex.stats.reduction == 1.0 and ex.stats.pruned == 0
    prompt = t[0, :12].tolist()
    plain = generate(model, prompt, 8)
    assert generate(model, prompt, 8, executor=CompressingExecutor(model, NONE)) == plain


def test_bytes_are_counted_per_message_both_ways(model):
    t = tokens(32, seed=1)
    remote = {(0, 1), (0, 5), (1, 2)}
    ex = CompressingExecutor(model, CompressionSettings(act_dtype="int8"), remote=remote)
    seen = {}

    def observe(layer, routing):
        for e, (tok, _) in routing.groups.items():
            if (layer, e) in remote:
                seen[(layer, e)] = int(tok.numel())

    with torch.no_grad():
        model(t, executor=ex, observer=observe)
    rows = sum(seen.values())
    d = CFG.d_model
    st = ex.stats
    assert st.messages == len(seen) and st.assignments == rows and st.rows_sent == rows
    assert st.raw_bytes == 2 * rows * d * 4
    assert st.request_bytes == st.reply_bytes == rows * (d + 2)
    assert st.header_bytes > 0
    assert math.isclose(st.reduction, 4 * d / (d + 2))


def test_pruning_executor_equals_combine_of_the_pruned_routing(model):
    block = model.layers[0].moe
    s = CompressionSettings(prune_beta=0.6, protect_top_frac=0.1)
    h = torch.randn(30, CFG.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ex = CompressingExecutor(model, s)
        got = block(h.view(1, 30, -1), 0, executor=ex).view(30, -1)
        r = route(block.router, h, CFG.top_k, CFG.norm_topk_prob)
        p = prune_routing(r, s, protected=protected_mask(token_importance(h), 0.1))
        want = combine(p, {e: block.experts[e](h[tok]) for e, (tok, _) in p.groups.items()},
                       30, CFG.d_model)
    assert ex.stats.pruned > 0, "test needs a router sharp enough for the beta rule to prune"
    assert ex.stats.rows_sent == ex.stats.assignments - ex.stats.pruned
    assert torch.allclose(got, want, atol=1e-6)


def test_cost_table_reports_identity_and_int8_rows(model):
    t = tokens(64, seed=2)
    rows = measure_compression_cost(model, t, [NONE, CompressionSettings(act_dtype="int8"),
                                               CompressionSettings(prune_beta=0.6, act_dtype="int8")])
    off, int8, pruned = rows
    assert off["top1_agreement"] == 1.0 and off["loss_increase"] == 0.0 and off["reduction"] == 1.0
    assert math.isclose(int8["reduction"], 4 * CFG.d_model / (CFG.d_model + 2))
    assert int8["top1_agreement"] >= 0.9 and abs(int8["loss_increase"]) < 0.05
    assert pruned["pruned_frac"] > 0 and pruned["reduction"] > int8["reduction"]
    assert CompressionSettings.from_header(pruned["settings"]).prune_beta == 0.6
    assert off["settings"]["act_dtype"] == "fp32"  # every field, so readers' own defaults never apply
    assert math.isclose(int8["vector_bytes_ratio"], (CFG.d_model + 2) / (4 * CFG.d_model))
    with pytest.raises(ValueError, match="max_seq_len"):
        measure_compression_cost(model, tokens(CFG.max_seq_len + 1), [NONE])


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_measurement_through_the_real_dispatch_path_agrees_with_the_simulated_wire(transport):
    from nodes.compression import measure_compression_cost
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                    expert_hidden=48, max_seq_len=64)
    model = MoEModel(cfg)
    init_weights(model, 1)
    model.eval()
    toks = torch.randint(0, 97, (2, 24))
    settings = [NONE, CompressionSettings(act_dtype="fp16"), CompressionSettings(act_dtype="int8", prune_beta=0.9)]
    remote = {(l, e) for l in range(2) for e in (1, 3)}
    sim = measure_compression_cost(model, toks, settings, remote=remote)
    real = measure_compression_cost(model, toks, settings, remote=remote, transport=transport)
    for a, b in zip(sim, real):
        assert b["transport"] == transport and a["label"] == b["label"]
        assert b["top1_agreement"] == a["top1_agreement"]
        assert b["loss_increase"] == pytest.approx(a["loss_increase"], abs=1e-5)
        assert b["pruned_frac"] == pytest.approx(a["pruned_frac"])
        assert b["bytes_ratio"] >= a["bytes_ratio"]  # whole frames: the message headers come on top
    assert real[0]["top1_agreement"] == 1.0 and real[2]["pruned_frac"] > 0
    assert real[2]["bytes_ratio"] < real[1]["bytes_ratio"] < real[0]["bytes_ratio"]
    with pytest.raises(ValueError, match="unknown transport"):
        measure_compression_cost(model, toks, settings, transport="carrier pigeon")

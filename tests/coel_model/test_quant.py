"""Packed expert formats: round trips, error bounds, exact sizes, kernels vs reference, checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from coel_model import checkpoint, kernels, packing, quant
from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError
from coel_model.model import MoEModel, SwiGLUExpert, init_weights
from coel_model.quant import QuantSpec

torch.set_num_threads(1)
INT_BITS = (2, 3, 4, 8)
REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(**kw) -> MoEConfig:
    base = dict(vocab_size=300, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                top_k=2, expert_hidden=160, max_seq_len=64)
    base.update(kw)
    return MoEConfig(**base)


def tiny_model(seed: int = 0, **kw) -> MoEModel:
    m = MoEModel(tiny_cfg(**kw))
    init_weights(m, seed)
    return m.eval()


# ---------------------------------------------------------------- spec validation

@pytest.mark.parametrize("kw", [dict(bits=5), dict(bits=1), dict(bits=True), dict(bits=4, group_size=12),
                                dict(bits=4, group_size=0), dict(bits=4, method="gptqq"),
                                dict(bits=16, float_dtype="float8")])
def test_spec_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        QuantSpec(**kw)


def test_bad_weights_are_named():
    exp = SwiGLUExpert(64, 64)
    with torch.no_grad():
        exp.w_up.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"w_up: .*\(64, 64\) weight has 1 NaN"):
        quant.quantize_expert(exp, QuantSpec(4))
    with pytest.raises(ValueError, match="too large for fp16"):
        quant.quantize_weight(torch.full((2, 64), 1e9) * torch.arange(64.0), QuantSpec(2))


def test_spec_dict_round_trip_and_unknown_key():
    s = QuantSpec(3, 32, "hqq")
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 64})


# ---------------------------------------------------------------- packing

@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(INT_BITS), rows=st.integers(1, 9), blocks=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_pack_unpack_exact(bits, rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, 64 * blocks), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = packing.pack_codes(codes, bits)
    assert sum(t.numel() * t.element_size() for t in packed.values()) * 8 == codes.numel() * bits
    assert torch.equal(packing.unpack_codes(packed, bits), codes)


def test_pack_layout_is_lane_interleaved():
    """Code j*8+i of a 64-block sits in lane i at bit offset j*bits (what the kernel assumes)."""
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 3 * 8 + 5] = 0xF
    w = packing.pack_codes(codes, 4)["qweight"]
    assert w.dtype == torch.int32 and w.shape == (1, 8)
    assert int(w[0, 5]) == 0xF << 12 and int(w.abs().sum()) == 0xF << 12


# ---------------------------------------------------------------- quantize / dequantize

@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from(INT_BITS), out=st.integers(1, 40), inp=st.integers(1, 200),
       group=st.sampled_from([8, 16, 24, 32, 64, 128]), scale=st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
       seed=st.integers(0, 2 ** 16))
def test_rtn_error_within_half_step(bits, out, inp, group, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * scale
    w[0, 0] += 3 * scale  # an outlier
    spec = QuantSpec(bits, group)
    t = quant.quantize_weight(w, spec)
    kp = packing.padded_in_features(inp, group)
    assert kp % group == 0 and kp % 64 == 0 and kp >= inp
    deq = packing.dequantize_weight(t, spec, inp)
    assert deq.shape == w.shape
    s = t["scales"].float().repeat_interleave(group, dim=1)[:, :inp]  # per-element step
    err = (deq - w).abs()
    assert (err <= s / 2 * (1 + 1e-3) + 1e-6 * w.abs() + 1e-12).all(), float((err / s).max())
    codes = packing.unpack_codes(t, bits)
    assert int(codes.max()) < (1 << bits)


def test_zero_and_constant_groups():
    """All-zero groups (e.g. padding) come back exactly; constant groups within the step bound."""
    w = torch.zeros(3, 64)
    w[1] = 0.5
    w[2, :32] = -2.0
    for bits in INT_BITS:
        t = quant.quantize_weight(w, QuantSpec(bits))
        deq = packing.dequantize_weight(t, QuantSpec(bits), 64)
        assert torch.equal(deq[0], w[0])
        step = t["scales"].float()[1:]
        assert ((deq[1:] - w[1:]).abs() <= step / 2 * (1 + 1e-3)).all()


def test_16_bit_passthrough():
    w = torch.randn(10, 70)
    for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        ql = quant.QuantizedLinear.from_float(w, QuantSpec(16, float_dtype=name))
        assert ql.weight.dtype == dt
        assert torch.equal(ql.dequantize(), w.to(dt).float())
        x = torch.randn(3, 70)
        assert torch.allclose(ql(x), x @ w.to(dt).float().T, atol=1e-4)


@pytest.mark.parametrize("bits", packing.BITS)
@pytest.mark.parametrize("d,h,group", [(96, 160, 64), (192, 512, 64), (100, 70, 24), (256, 704, 128)])
def test_packed_bytes_exact(bits, d, h, group):
    exp = SwiGLUExpert(d, h)
    spec = QuantSpec(bits, group)
    q = quant.quantize_expert(exp, spec)
    stored = sum(t.numel() * t.element_size() for t in q.to_tensors().values())
    assert q.nbytes == stored == packing.packed_expert_bytes(d, h, spec)
    kp_d, kp_h = packing.padded_in_features(d, group), packing.padded_in_features(h, group)
    if bits < 16:
        codes = (2 * h * kp_d + d * kp_h) * bits // 8
        assert stored == codes + 4 * (2 * h * kp_d // group + d * kp_h // group)


def test_hqq_beats_rtn_at_low_bits():
    """Error compensation must measurably help at 2-3 bits (weight and output error)."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((256, 384)) * 0.02  # heavy-tailed, like real weights
    x = torch.randn(128, 384, generator=g)
    ref = x @ w.T
    for bits, min_gain in ((2, 0.15), (3, 0.05)):
        errs = {}
        for m in ("rtn", "hqq"):
            deq = quant.QuantizedLinear.from_float(w, QuantSpec(bits, 64, m)).dequantize()
            errs[m] = (float((deq - w).norm() / w.norm()), float((x @ deq.T - ref).norm() / ref.norm()))
        assert errs["hqq"][0] < (1 - min_gain) * errs["rtn"][0], errs
        assert errs["hqq"][1] < (1 - min_gain) * errs["rtn"][1], errs


# ---------------------------------------------------------------- kernels vs reference

def _ref(x, ql):
    return x @ ql.dequantize().T


@pytest.mark.parametrize("force", ["native", "torch"])
@pytest.mark.parametrize("bits", INT_BITS)
def test_qmatmul_matches_reference(bits, force):
    if force == "native" and not kernels.native_available():
        pytest.skip(f"native kernels unavailable: {kernels.status()}")
    g = torch.Generator().manual_seed(bits)
    for group in (8, 24, 64, 128):
        for out, inp in ((72, 100), (136, 192), (40, 320), (24, 1100)):  # 1100: several K-blocks
            w = torch.randn(out, inp, generator=g)
            ql = quant.QuantizedLinear.from_float(w, QuantSpec(bits, group))
            for n in (1, 2, 3, 4, 5, 7, 8, 13, 70):  # 70: tile-dequantize + GEMM path
                x = torch.randn(n, inp, generator=g)
                y = kernels.qmatmul(x, ql.tensors(), bits, group, inp, out, force=force)
                ref = _ref(x, ql)
                tol = 1e-4 * float(ref.abs().max()) + 1e-4
                assert y.shape == (n, out)
                assert float((y - ref).abs().max()) <= tol, (bits, group, out, inp, n)


@pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_matmul_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    for out, inp in ((33, 7), (64, 200), (300, 257)):
        w = torch.randn(out, inp, generator=g).to(dtype)
        for n in (1, 3, 20, 70):  # 20, 70: fp32 row tiles + GEMM
            x = torch.randn(n, inp, generator=g)
            for force in ("native", "torch"):
                y = kernels.float_matmul(x, w, force=force)
                assert torch.allclose(y, x @ w.float().T, atol=1e-4, rtol=1e-4), (force, n)


@pytest.mark.integration
def test_fallback_selected_when_disabled():
    """COEL_KERNELS=off (or no compiler/AVX2) must give the pure-torch path, same numbers."""
    code = ("import torch; from coel_model import kernels, quant;"
            "w=torch.randn(16,64); ql=quant.QuantizedLinear.from_float(w, quant.QuantSpec(3));"
            "x=torch.randn(2,64); y=ql(x); r=x@ql.dequantize().T;"
            "print(kernels.status()); assert torch.allclose(y,r,atol=1e-4)")
    env = dict(os.environ, COEL_KERNELS="off")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fallback: disabled"), r.stdout


@pytest.mark.parametrize("bits", packing.BITS)
def test_quantized_expert_forward_and_tensor_round_trip(bits):
    torch.manual_seed(bits)
    for d, h in ((96, 160), (100, 70)):
        exp = SwiGLUExpert(d, h)
        q = quant.quantize_expert(exp, QuantSpec(bits))
        wg, wu, wd = (getattr(q, p).dequantize() for p in quant.PROJ_NAMES)
        for n in (1, 5, 20, 70):  # 1, 5: one native call; 20: dequantize + GEMMs; 70: per-matmul path
            x = torch.randn(n, d)
            y = q(x)
            ref = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T) @ wd.T
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-3), (d, h, n)
        with torch.no_grad():
            rel = float((y - exp(x)).norm() / exp(x).norm())
        assert rel < {2: 0.8, 3: 0.35, 4: 0.15, 8: 0.01, 16: 0.002}[bits]
        q2 = quant.QuantizedExpert.from_tensors(QuantSpec(bits), d, h, q.to_tensors())
        assert torch.equal(q2(x), y) and q2.nbytes == q.nbytes


def test_bf16_expert_forward():
    exp = SwiGLUExpert(96, 160)
    q = quant.quantize_expert(exp, QuantSpec(16, float_dtype="bfloat16"))
    assert q.w_down.weight.dtype == torch.bfloat16 and q.nbytes == exp.nbytes // 2
    wg, wu, wd = (getattr(q, p).weight.float() for p in quant.PROJ_NAMES)
    for n in (1, 70):
        x = torch.randn(n, 96)
        ref = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T) @ wd.T
        assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-3)


def test_native_expert_cache_follows_moved_buffers():
    import copy
    q = quant.quantize_expert(SwiGLUExpert(96, 160), QuantSpec(3))
    x = torch.randn(2, 96)
    y = q(x)
    q2 = copy.deepcopy(q)  # copies the cached pointer block too; it must be rebuilt, not reused
    del q
    import gc
    gc.collect()
    assert torch.equal(q2(x), y)


def test_from_tensors_names_the_problem():
    q = quant.quantize_expert(SwiGLUExpert(96, 160), QuantSpec(4))
    t = q.to_tensors()
    with pytest.raises(CheckpointError, match="missing.*w_up.scales"):
        quant.QuantizedExpert.from_tensors(QuantSpec(4), 96, 160, {k: v for k, v in t.items() if k != "w_up.scales"})
    with pytest.raises(CheckpointError, match="w_gate.qweight"):
        quant.QuantizedExpert.from_tensors(QuantSpec(2), 96, 160, t)  # wrong bits: wrong dtype/shape
    with pytest.raises(CheckpointError, match="unexpected.*qweight_hi"):
        quant.QuantizedExpert.from_tensors(QuantSpec(4), 96, 160, {**t, "w_up.qweight_hi": t["w_up.scales"]})
    with pytest.raises(CheckpointError, match=r"w_gate.qweight.*\(160, 16\).*hidden=200 needs torch.int32 \(200, 16\)"):
        quant.QuantizedExpert.from_tensors(QuantSpec(4), 96, 200, t)


# ---------------------------------------------------------------- checkpoints

def _mixed_specs(cfg):
    bits = [2, 3, 4, 8, 16]
    return {(l, e): QuantSpec(bits[(l + e) % 5], 64, "hqq" if e == 0 else "rtn")
            for l in range(cfg.n_layers) for e in range(cfg.n_experts)}


def test_save_load_quantized_checkpoint(tmp_path):
    model = tiny_model()
    specs = _mixed_specs(model.cfg)
    out = checkpoint.save_quantized(model, specs, tmp_path / "q", base_model="tiny-test")
    meta = json.loads((out / "quant.json").read_text())
    assert meta["format"] == "coel-quant" and meta["version"] == 1 and meta["base_model"] == "tiny-test"
    assert len(meta["experts"]) == 8
    expect = sum(packing.packed_expert_bytes(96, 160, s) for s in specs.values())
    assert meta["expert_bytes"] == expect
    loaded = checkpoint.load_model(out)
    assert loaded.expert_bytes() == expect
    for (l, e), s in specs.items():
        assert isinstance(loaded.expert(l, e), quant.QuantizedExpert) and loaded.expert(l, e).spec == s
    # the in-memory quantized model gives the same logits (backbone stored fp16)
    ref = tiny_model()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".moe.experts." not in name:
                p.copy_(p.half().float())
    for (l, e), s in specs.items():
        ref.set_expert(l, e, quant.quantize_expert(ref.expert(l, e), s))
    tok = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(tok), ref(tok), atol=1e-4)
    # base_model relative to the output folder: its tokenizer is copied along
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    out3 = checkpoint.save_quantized(model, {(0, 0): QuantSpec(4)}, tmp_path / "q3", base_model="../base")
    assert (out3 / "tokenizer.json").read_text() == "{}"
    assert json.loads((out3 / "quant.json").read_text())["base_model"] == "../base"
    # re-saving an already quantized model keeps the packed tensors as they are
    out2 = checkpoint.save_quantized(loaded, specs, tmp_path / "q2")
    assert checkpoint.read_safetensors(out2 / "model.safetensors").keys() == \
        checkpoint.read_safetensors(out / "model.safetensors").keys()


def test_load_rejects_inconsistent_checkpoints(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model()
    specs = {k: QuantSpec(4) for k in _mixed_specs(model.cfg)}
    out = checkpoint.save_quantized(model, specs, tmp_path / "q")
    qj = out / "quant.json"
    good = qj.read_text()
    state = checkpoint.read_safetensors(out / "model.safetensors")

    meta = json.loads(good)
    meta["experts"][3]["bits"] = 3  # wrong bits for the stored tensors
    qj.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model.safetensors \[layers.0.moe.experts.3.\*\]"):
        checkpoint.load_model(out)

    meta = json.loads(good)
    meta["experts"][0]["bits"] = 5
    qj.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"quant.json: experts\[0\] is invalid"):
        checkpoint.load_model(out)

    meta = json.loads(good)
    meta["version"] = 7
    qj.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 7"):
        checkpoint.load_model(out)

    meta = json.loads(good)
    del meta["experts"][5]
    qj.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \[\(1, 1\)\]"):
        checkpoint.load_model(out)

    qj.write_text(good)
    bad = dict(state)
    del bad["layers.1.moe.experts.2.w_down.zeros"]
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['w_down.zeros'\]"):
        checkpoint.load_model(out)

    bad = dict(state)
    bad["layers.0.moe.experts.1.w_up.scales"] = bad["layers.0.moe.experts.1.w_up.scales"][:, :1].contiguous()
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'w_up.scales'.*\(160, 1\)"):
        checkpoint.load_model(out)

    bad = dict(state)
    del bad["layers.0.attn.q_proj.weight"]
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj"):
        checkpoint.load_model(out)


def test_save_rejects_specs_outside_model(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(2, 0\)"):
        checkpoint.save_quantized(model, {(2, 0): QuantSpec(4)}, tmp_path / "x")


def _llm_like_acts(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Correlated activations with per-channel scales spread over ~e^+-2 (outlier channels)."""
    chan = torch.exp(torch.randn(k, generator=g))
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5
    return (torch.randn(n, k, generator=g) @ mix) * chan


def test_gptq_lowers_output_error_on_held_out_inputs():
    """Single layer, 2 bits: GPTQ beats RTN on held-out inputs (measured 0.76-0.91x of RTN's error
    over seeds 0-5; at 3 bits a single layer is at parity, the expert-level test covers 3 bits)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((192, 128)) * 0.02
    acts = _llm_like_acts(768, 128, g)
    calib, held_out = acts[:384], acts[384:]
    ref = held_out @ w.T
    out_err = {}
    for m in ("rtn", "gptq"):
        spec = QuantSpec(2, 64, m)
        deq = packing.dequantize_weight(quant.quantize_weight(w, spec, calib_x=calib), spec, 128)
        out_err[m] = float((held_out @ deq.T - ref).norm() / ref.norm())
    assert out_err["gptq"] < 0.95 * out_err["rtn"], out_err


def test_gptq_expert_and_errors():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    exp = SwiGLUExpert(96, 160)
    x = _llm_like_acts(200, 96, g)
    spec = QuantSpec(3, 32, "gptq")
    with pytest.raises(ValueError, match="calib_x"):
        quant.quantize_expert(exp, spec)
    with pytest.raises(ValueError, match=r"calib_x of shape \(n, 96\)"):
        quant.quantize_weight(exp.w_gate.weight, spec, calib_x=torch.randn(4, 95))
    q = quant.quantize_expert(exp, spec, calib_x=x)
    assert q.nbytes == packing.packed_expert_bytes(96, 160, spec)
    with torch.no_grad():
        ref = exp(x)
        r_rtn = quant.quantize_expert(exp, QuantSpec(3, 32))(x)
    assert float((q(x) - ref).norm()) < float((r_rtn - ref).norm())

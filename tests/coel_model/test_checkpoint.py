"""Our own checkpoint format (config.json with "format": "coel-moe" + model.safetensors):
round trips in fp32 and fp16, tied embeddings, and errors that name the file and the tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coel_model.checkpoint import is_own_format, load_config, load_model, save_model
from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError, ConfigError
from coel_model.model import MoEModel, init_weights

torch.set_num_threads(1)

CFG = dict(vocab_size=72, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
           expert_hidden=24, max_seq_len=32)
TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])


def model_for(seed: int = 0, **over) -> MoEModel:
    m = MoEModel(MoEConfig(**dict(CFG, **over))).eval()
    init_weights(m, seed)
    with torch.no_grad():  # non-trivial norms too, so every tensor's value matters
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(name) % 1000)))
    return m


@pytest.mark.parametrize("over", [{}, {"n_shared_experts": 1, "shared_expert_gate": True, "attention_bias": True},
                                  {"qk_norm": "head", "head_dim": 16}, {"qk_norm": "full", "clip_qkv": 2.0}],
                         ids=["mixtral", "qwen2", "qwen3", "olmoe"])
def test_fp32_round_trip_is_exact(tmp_path, over):
    src = model_for(1, **over)
    out = save_model(src, tmp_path / "m")
    assert is_own_format(out)
    assert load_config(out) == src.cfg
    m = load_model(out)
    assert not m.training
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(m(TOKENS), src(TOKENS))


def test_fp16_save_halves_the_file_and_stays_close(tmp_path):
    src = model_for(2)
    save_model(src, tmp_path / "f32")
    save_model(src, tmp_path / "f16", dtype=torch.float16)
    stored = load_file(str(tmp_path / "f16" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    s32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    s16 = (tmp_path / "f16" / "model.safetensors").stat().st_size
    assert 0.45 < s16 / s32 < 0.55
    m32 = load_model(tmp_path / "f16")  # default dtype: fp32 compute
    assert m32.embed.weight.dtype == torch.float32
    assert torch.equal(m32.expert(1, 3).w_down.weight, src.expert(1, 3).w_down.weight.half().float())
    m16 = load_model(tmp_path / "f16", dtype=torch.float16)
    assert m16.expert(0, 0).w_gate.weight.dtype == torch.float16
    with torch.no_grad():
        ref = src(TOKENS)
        assert (m32(TOKENS) - ref).abs().max().item() < 1e-2
        assert (m16(TOKENS).float() - ref).abs().max().item() < 5e-2


def test_tied_embeddings_stored_once_and_tied_after_load(tmp_path):
    src = model_for(3, tie_embeddings=True)
    out = save_model(src, tmp_path / "tied")
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored and "embed.weight" in stored
    m = load_model(out)
    assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
    assert torch.equal(m.lm_head.weight, src.embed.weight)
    with torch.no_grad():
        assert torch.equal(m(TOKENS), src(TOKENS))
    m16 = load_model(out, dtype=torch.float16)
    assert m16.lm_head.weight.data_ptr() == m16.embed.weight.data_ptr()


def test_config_json_records_format_and_fields(tmp_path):
    out = save_model(model_for(4), tmp_path / "m")
    raw = json.loads((out / "config.json").read_text())
    assert raw["format"] == "coel-moe" and raw["version"] == 1
    assert {k: raw[k] for k in CFG} == CFG


# ------------------------------------------------------------------------------------- errors

def test_truncated_file_names_the_file(tmp_path):
    out = save_model(model_for(5), tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(CheckpointError) as ei:
        load_model(out)
    assert str(f) in str(ei.value) and "safetensors" in str(ei.value)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    out = save_model(model_for(6), tmp_path / "m")
    f = out / "model.safetensors"
    state = load_file(str(f))
    del state["layers.1.moe.experts.2.w_up.weight"]
    save_file(state, str(f))
    with pytest.raises(CheckpointError) as ei:
        load_model(out)
    assert str(f) in str(ei.value) and "layers.1.moe.experts.2.w_up.weight" in str(ei.value)


def test_config_weights_shape_mismatch_names_tensor_and_shapes(tmp_path):
    out = save_model(model_for(7), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["expert_hidden"] = 20
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as ei:
        load_model(out)
    msg = str(ei.value)
    assert "model.safetensors" in msg and "layers.0.moe.experts.0.w_" in msg, msg
    assert "(24, 32)" in msg or "(32, 24)" in msg, msg


def test_extra_layer_in_weights_is_unexpected(tmp_path):
    out = save_model(model_for(8), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.1\."):
        load_model(out)


def test_bad_config_files(tmp_path):
    out = save_model(model_for(9), tmp_path / "m")
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(raw, expert_hiden=3)))
    with pytest.raises(ConfigError, match="expert_hiden"):
        load_model(out)
    cfg_path.write_text(json.dumps(dict(raw, n_kv_heads=3)))
    with pytest.raises(ConfigError, match=r"config\.json.*n_kv_heads"):
        load_model(out)
    cfg_path.write_text('{\n "format": "coel-moe",\n "vocab_size": 72,,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json:3"):
        load_model(out)
    cfg_path.write_text(json.dumps(dict(raw, version=99)))
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(out)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    out = save_model(model_for(10), tmp_path / "m")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        load_model(out)

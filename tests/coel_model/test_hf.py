"""Hugging Face-format MoE checkpoints: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Two independent checks per family:
- hand-written checkpoints with the HF tensor names spelled out here (classic per-expert layout
  and the fused transformers-5 layout), so loading is tested even without `transformers`;
- where `transformers` is installed, tiny random models saved with `save_pretrained` (single file
  and sharded) must give the same logits as transformers' own implementation within 1e-4.
Plus the errors: truncated file, missing tensor, wrong shape, missing shard, unsupported keys.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coel_model.checkpoint import load_config, load_model
from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError
from coel_model.hf import config_from_hf, tensor_index
from coel_model.model import MoEModel

torch.set_num_threads(1)

# --------------------------------------------------------------------------- HF configs, tiny sizes

BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, hidden_act="silu")

HF_CONFIGS = {
    "mixtral": dict(BASE, model_type="mixtral", architectures=["MixtralForCausalLM"],
                    num_local_experts=4, intermediate_size=24, rope_theta=1e6,
                    tie_word_embeddings=True, sliding_window=None),
    "qwen2_moe": dict(BASE, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                      num_experts=4, moe_intermediate_size=24, intermediate_size=48,
                      shared_expert_intermediate_size=40, norm_topk_prob=False, rope_theta=1e4,
                      decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                      tie_word_embeddings=False),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                      num_experts=4, moe_intermediate_size=24, intermediate_size=48, head_dim=16,
                      norm_topk_prob=True, rope_theta=1e4, attention_bias=False,
                      decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                      tie_word_embeddings=False),
    "olmoe": dict(BASE, model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=4,
                  intermediate_size=24, norm_topk_prob=False, clip_qkv=1.5, rope_theta=1e4,
                  attention_bias=False, tie_word_embeddings=False),
}

EXPECTED_OURS = {  # what our config must say, written out by hand
    "mixtral": dict(n_experts=4, expert_hidden=24, norm_topk_prob=True, qk_norm="none",
                    attention_bias=False, n_shared_experts=0, tie_embeddings=True, hd=8),
    "qwen2_moe": dict(n_experts=4, expert_hidden=24, norm_topk_prob=False, qk_norm="none",
                      attention_bias=True, n_shared_experts=1, shared_hidden=40,
                      shared_expert_gate=True, tie_embeddings=False, hd=8),
    "qwen3_moe": dict(n_experts=4, expert_hidden=24, norm_topk_prob=True, qk_norm="head",
                      attention_bias=False, n_shared_experts=0, tie_embeddings=False, hd=16),
    "olmoe": dict(n_experts=4, expert_hidden=24, norm_topk_prob=False, qk_norm="full",
                  clip_qkv=1.5, attention_bias=False, n_shared_experts=0, hd=8),
}


def hf_names(family: str, cfg: MoEConfig, fused: bool = False) -> dict[str, str]:
    """Our parameter name -> HF tensor name, written independently of coel_model.hf."""
    m = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    moe = "block_sparse_moe" if family == "mixtral" and not fused else "mlp"
    g, u, d = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.n_layers):
        L = f"model.layers.{i}"
        m[f"layers.{i}.input_norm.weight"] = f"{L}.input_layernorm.weight"
        m[f"layers.{i}.post_attn_norm.weight"] = f"{L}.post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[f"layers.{i}.attn.{p}.weight"] = f"{L}.self_attn.{p}.weight"
        if family == "qwen2_moe":
            for p in ("q_proj", "k_proj", "v_proj"):
                m[f"layers.{i}.attn.{p}.bias"] = f"{L}.self_attn.{p}.bias"
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                m[f"layers.{i}.moe.shared_expert.{ours}.weight"] = f"{L}.mlp.shared_expert.{theirs}.weight"
            m[f"layers.{i}.moe.shared_expert_gate.weight"] = f"{L}.mlp.shared_expert_gate.weight"
        if family in ("qwen3_moe", "olmoe"):
            m[f"layers.{i}.attn.q_norm.weight"] = f"{L}.self_attn.q_norm.weight"
            m[f"layers.{i}.attn.k_norm.weight"] = f"{L}.self_attn.k_norm.weight"
        m[f"layers.{i}.moe.router.weight"] = f"{L}.{moe}.gate.weight"
        if not fused:
            for e in range(cfg.n_experts):
                m[f"layers.{i}.moe.experts.{e}.w_gate.weight"] = f"{L}.{moe}.experts.{e}.{g}.weight"
                m[f"layers.{i}.moe.experts.{e}.w_up.weight"] = f"{L}.{moe}.experts.{e}.{u}.weight"
                m[f"layers.{i}.moe.experts.{e}.w_down.weight"] = f"{L}.{moe}.experts.{e}.{d}.weight"
    return m


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that routing, attention and norms all matter in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))


def write_hf_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def handwritten(tmp_path: Path, family: str, fused: bool = False, shards: int = 1,
                seed: int = 0) -> tuple[Path, MoEModel]:
    """A HF-layout checkpoint written from one of our models; returns (dir, the source model)."""
    cfg = config_from_hf_dict_for_test(family)
    src = MoEModel(cfg).eval()
    randomize(src, seed)
    state = src.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in hf_names(family, cfg, fused).items()}
    if fused:
        moe = "mlp"
        for i in range(cfg.n_layers):
            ex = [src.expert(i, e) for e in range(cfg.n_experts)]
            tensors[f"model.layers.{i}.{moe}.experts.gate_up_proj"] = torch.stack(
                [torch.cat([x.w_gate.weight, x.w_up.weight], 0) for x in ex]).detach()  # (E, 2I, d)
            tensors[f"model.layers.{i}.{moe}.experts.down_proj"] = torch.stack(
                [x.w_down.weight for x in ex]).detach()  # (E, d, I)
    d = write_hf_dir(tmp_path / f"{family}{'-fused' if fused else ''}-{shards}", HF_CONFIGS[family], tensors, shards)
    return d, src


def config_from_hf_dict_for_test(family: str) -> MoEConfig:
    from coel_model.hf import config_from_hf_dict
    return config_from_hf_dict(HF_CONFIGS[family], f"<{family}>")


TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 23, 9, 31], [70, 2, 2, 54, 11, 95, 40, 7, 66, 12]])

FAMILIES = list(HF_CONFIGS)


# --------------------------------------------------------------------------------- config mapping

@pytest.mark.parametrize("family", FAMILIES)
def test_config_mapping(tmp_path, family):
    d = tmp_path / family
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CONFIGS[family]))
    cfg = config_from_hf(d)
    assert load_config(d) == cfg
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.top_k) == (96, 32, 2, 4, 2, 2)
    for key, want in EXPECTED_OURS[family].items():
        got = getattr(cfg, key)
        assert got == want, f"{family}: {key} = {got!r}, expected {want!r}"


def test_config_transformers5_rope_parameters_and_capped_length(tmp_path):
    raw = dict(HF_CONFIGS["mixtral"], max_position_embeddings=131072)
    raw.pop("rope_theta")
    raw["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    cfg = config_from_hf(d)
    assert cfg.rope_theta == 5e5
    assert cfg.max_seq_len == 32768
    assert config_from_hf(d, max_seq_len_cap=1 << 20).max_seq_len == 131072


@pytest.mark.parametrize("family,key,value,needle", [
    ("qwen2_moe", "decoder_sparse_step", 2, "decoder_sparse_step"),
    ("qwen3_moe", "mlp_only_layers", [1], "mlp_only_layers"),
    ("qwen2_moe", "use_sliding_window", True, "sliding_window"),
    ("mixtral", "sliding_window", 4096, "sliding_window"),
    ("qwen2_moe", "layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ("mixtral", "hidden_act", "gelu", "hidden_act"),
    ("mixtral", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("qwen3_moe", "attention_bias", True, "attention_bias"),
    ("olmoe", "attention_bias", True, "attention_bias"),
    ("mixtral", "model_type", "llama", "model_type"),
    ("mixtral", "num_local_experts", None, "num_local_experts"),
])
def test_unsupported_config_is_named(tmp_path, family, key, value, needle):
    raw = dict(HF_CONFIGS[family])
    raw[key] = value
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as ei:
        config_from_hf(d)
    msg = str(ei.value)
    assert needle in msg and "config.json" in msg, msg


# ------------------------------------------------------------------ hand-written checkpoints (no HF)

@pytest.mark.parametrize("fused", [False, True], ids=["classic", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_handwritten_checkpoint_loads_exactly(tmp_path, family, fused):
    d, src = handwritten(tmp_path, family, fused=fused)
    model = load_model(d)
    ours, ref = model.state_dict(), src.state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), f"{family}: {k} differs after loading"
    with torch.no_grad():
        a, b = model(TOKENS), src(TOKENS)
    assert torch.equal(a, b)
    assert a.std() > 0.5  # the weights are not trivially small: the comparison means something


def test_handwritten_sharded_and_transposed_fused(tmp_path):
    d, src = handwritten(tmp_path, "qwen3_moe", fused=True, shards=3)
    assert len(set(tensor_index(d).values())) == 3
    # Some exporters store fused experts as (E, in, out): accept the transposed orientation too.
    from safetensors.torch import load_file
    for shard in sorted(d.glob("model-*.safetensors")):
        t = load_file(str(shard))
        t = {k: (v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) and v.dim() == 3
                 else v) for k, v in t.items()}
        save_file(t, str(shard))
    model = load_model(d)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), src(TOKENS))


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_handwritten_half_weights_and_dtype(tmp_path, stored):
    d, src = handwritten(tmp_path, "mixtral")
    state = {k: v.to(stored) for k, v in _load_all(d).items()}
    save_file(state, str(d / "model.safetensors"))
    model = load_model(d, dtype=torch.float32)
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.layers[1].moe.experts[3].w_up.weight,
                       src.layers[1].moe.experts[3].w_up.weight.to(stored).float())
    half = load_model(d, dtype=torch.float16)
    assert half.lm_head.weight.dtype == torch.float16
    assert half.lm_head.weight.data_ptr() == half.embed.weight.data_ptr()  # still tied
    assert half.rope_cos.dtype == torch.float16
    with torch.no_grad():
        err = (half(TOKENS).float() - model(TOKENS)).abs().max().item()
    assert err < 0.1, err


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _edit_config(d: Path, **changes) -> None:
    """Overwrite keys of d/config.json (to make the config disagree with the weights)."""
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------------------- errors

def test_truncated_file_is_named(tmp_path):
    d, _ = handwritten(tmp_path, "olmoe")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    assert str(f) in str(ei.value) and "safetensors" in str(ei.value)


def test_truncated_shard_is_named(tmp_path):
    d, _ = handwritten(tmp_path, "mixtral", shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(d)


def test_missing_shard_named_in_index(tmp_path):
    d, _ = handwritten(tmp_path, "qwen2_moe", shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "model-00002-of-00003.safetensors" in msg and "model.safetensors.index.json" in msg, msg
    assert "does not exist" in msg


def test_index_lists_tensor_absent_from_shard(tmp_path):
    d, _ = handwritten(tmp_path, "qwen2_moe", shards=2)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.experts.9.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "model-00001-of-00002.safetensors" in msg and "experts.9.up_proj.weight" in msg, msg


def test_missing_tensor_is_named(tmp_path):
    d, _ = handwritten(tmp_path, "qwen3_moe")
    state = _load_all(d)
    del state["model.layers.1.mlp.experts.2.down_proj.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in msg and "model.safetensors" in msg, msg
    assert "layers.1.moe.experts.2.w_down.weight" in msg  # and our name for it


def test_wrong_shape_is_named_with_numbers(tmp_path):
    d, _ = handwritten(tmp_path, "mixtral")
    _edit_config(d, intermediate_size=20)  # config now disagrees with the weights (24)
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "model.safetensors" in msg and "block_sparse_moe.experts.0.w1.weight" in msg, msg
    assert "(24, 32)" in msg and "(20, 32)" in msg, msg


def test_wrong_fused_shape_is_named(tmp_path):
    d, _ = handwritten(tmp_path, "olmoe", fused=True)
    _edit_config(d, intermediate_size=16)
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "experts.gate_up_proj" in msg and "(4, 48, 32)" in msg and "(4, 32, 32)" in msg, msg


def test_fused_with_more_experts_than_config(tmp_path):
    d, _ = handwritten(tmp_path, "qwen3_moe", fused=True)
    _edit_config(d, num_experts=3)  # the fused expert weights hold 4 ...
    state = _load_all(d)
    for i in range(2):  # ... while the routers agree with the config
        state[f"model.layers.{i}.mlp.gate.weight"] = state[f"model.layers.{i}.mlp.gate.weight"][:3].clone()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "gate_up_proj" in msg and "(4, 48, 32)" in msg and "n_experts=3" in msg, msg


def test_unused_tensor_means_mismatch(tmp_path):
    d, _ = handwritten(tmp_path, "qwen3_moe")
    state = _load_all(d)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.bias"):
        load_model(d)


def test_too_few_layers_in_weights(tmp_path):
    d, _ = handwritten(tmp_path, "olmoe")
    _edit_config(d, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        load_model(d)


def test_base_model_without_prefix_is_reported_missing(tmp_path):
    d, _ = handwritten(tmp_path, "qwen2_moe")
    state = {k.removeprefix("model."): v for k, v in _load_all(d).items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "'model.embed_tokens.weight'" in msg and "is missing with" in msg and "model.safetensors" in msg, msg


def test_config_json_not_an_object(tmp_path):
    d = tmp_path / "list"
    d.mkdir()
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_model(d)


def test_no_weights_and_pytorch_bin_only(tmp_path):
    d = tmp_path / "binonly"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CONFIGS["mixtral"]))
    (d / "pytorch_model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(d)


def test_broken_config_json_names_line(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text('{\n "model_type": "olmoe",\n "vocab_size": 96,,\n}')
    with pytest.raises(CheckpointError, match=r"config\.json:3"):
        load_model(d)


# ------------------------------------------------------------- reference: transformers itself

HF_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


def _hf_model(family: str, seed: int):
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
    kwargs = {k: v for k, v in HF_CONFIGS[family].items() if k not in ("model_type", "architectures")}
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(tmp_path, family):
    ref = _hf_model(family, seed=1)
    single, sharded, fused = tmp_path / "single", tmp_path / "sharded", tmp_path / "fused"
    ref.save_pretrained(single)
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(set(tensor_index(sharded).values())) > 1
    # The in-memory state dict of transformers 5 holds experts fused: write that layout as well.
    fused.mkdir()
    (fused / "config.json").write_text((single / "config.json").read_text())
    state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(fused / "model.safetensors"))
    with torch.no_grad():
        want = ref(TOKENS).logits
        assert want.std() > 0.5
        for d in (single, sharded, fused):
            got = load_model(d)(TOKENS)
            err = (got - want).abs().max().item()
            assert err < 1e-4, f"{family} from {d.name}: max |logit diff| = {err:.2e}"


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_cached_decode_matches_transformers(tmp_path, family):
    """Our prefill + cached decode against transformers' full forward on the same sequence."""
    from coel_model.model import KVCache
    ref = _hf_model(family, seed=2)
    ref.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    seq = TOKENS[:1]
    with torch.no_grad():
        want = ref(seq).logits[0]
        cache = KVCache(model.cfg, batch=1, max_len=seq.shape[1])
        rows = [model(seq[:, :4], cache=cache)[0]]
        for t in range(4, seq.shape[1]):
            rows.append(model(seq[:, t:t + 1], cache=cache)[0])
    got = torch.cat(rows, 0)
    assert (got - want).abs().max().item() < 1e-4


# -------------------------------------------------- published configs: the mapping gives their sizes

REAL_CONFIGS = {  # config.json of the published checkpoints (the keys that matter), nothing downloaded
    "Mixtral-8x7B-v0.1": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False, hidden_act="silu"),
    "Qwen1.5-MoE-A2.7B": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6, norm_topk_prob=False,
        decoder_sparse_step=1, sliding_window=32768, use_sliding_window=False, max_window_layers=21,
        tie_word_embeddings=False, hidden_act="silu"),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, max_position_embeddings=40960,
        rope_theta=1e6, rms_norm_eps=1e-6, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], sliding_window=None, use_sliding_window=False, rope_scaling=None,
        attention_bias=False, tie_word_embeddings=False, hidden_act="silu"),
    "OLMoE-1B-7B-0924": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, max_position_embeddings=4096, rope_theta=10000.0, clip_qkv=None,
        norm_topk_prob=False, rope_scaling=None, attention_bias=False, tie_word_embeddings=False,
        rms_norm_eps=1e-5, eos_token_id=50279, pad_token_id=1, hidden_act="silu"),
}
PUBLISHED_BILLIONS = {  # (total, active per token) as the model cards state them
    "Mixtral-8x7B-v0.1": (46.7, 12.9), "Qwen1.5-MoE-A2.7B": (14.3, 2.7),
    "Qwen3-30B-A3B": (30.5, 3.3), "OLMoE-1B-7B-0924": (6.9, 1.3),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_published_configs_map_to_published_sizes(name):
    from coel_model.hf import config_from_hf_dict
    counts = config_from_hf_dict(REAL_CONFIGS[name], name).param_counts()
    total, active = PUBLISHED_BILLIONS[name]
    assert abs(counts["total"] / 1e9 - total) < 0.06, counts  # cards round to 0.1 B
    assert abs(counts["active_per_token"] / 1e9 - active) < 0.06, counts

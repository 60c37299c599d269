"""Loading Hugging Face-format MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) from a
local directory into our `MoEModel`, without importing `transformers`.

Three steps, each separate so it can be tested and reported on its own:

    config_from_hf_dict(raw, source)   HF config.json -> MoEConfig (pure; unsupported keys rejected)
    tensor_index(dir)                  HF tensor name -> shard file (single file or sharded + index)
    weight_plan(cfg, family, names)    our parameter name -> where its values live in the HF tensors

Expert weights may be stored in the classic per-expert layout
(`mlp.experts.<e>.gate_proj.weight`, Mixtral `block_sparse_moe.experts.<e>.w1.weight`) or fused
as transformers 5.x holds them in memory (`mlp.experts.gate_up_proj` (E, 2I, d) and
`mlp.experts.down_proj` (E, d, I); the transposed (E, d, 2I)/(E, I, d) variant is accepted too).
Every problem is a CheckpointError naming the file, the config key or the tensor, with the numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError, ConfigError
from coel_model.model import MoEModel, rope_tables

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SEQ_LEN_CAP = 32768  # RoPE tables are (max_seq_len, head_dim); HF configs often say 128k+


@dataclass(frozen=True)
class Family:
    """How one HF model family names things and which of our options it uses."""
    model_type: str
    moe_prefixes: tuple[str, ...]  # the MoE block's module name, classic first
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) projection names
    experts_key: tuple[str, ...]  # config keys for the number of routed experts
    expert_hidden_key: str
    norm_topk_default: bool  # used when config.json lacks norm_topk_prob
    rope_theta_default: float
    qk_norm: str


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", ("block_sparse_moe", "mlp"), ("w1", "w3", "w2"),
                      ("num_local_experts",), "intermediate_size", True, 1e6, "none"),
    "qwen2_moe": Family("qwen2_moe", ("mlp",), ("gate_proj", "up_proj", "down_proj"),
                        ("num_experts", "num_local_experts"), "moe_intermediate_size", False, 1e4, "none"),
    "qwen3_moe": Family("qwen3_moe", ("mlp",), ("gate_proj", "up_proj", "down_proj"),
                        ("num_experts", "num_local_experts"), "moe_intermediate_size", False, 1e4, "head"),
    "olmoe": Family("olmoe", ("mlp",), ("gate_proj", "up_proj", "down_proj"),
                    ("num_experts", "num_local_experts"), "intermediate_size", False, 1e4, "full"),
}

# Tensors some checkpoints carry that hold nothing we need (recomputed from the config).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------- config

def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: file not found (a Hugging Face checkpoint folder needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def family_of(raw: dict[str, Any], source: str) -> Family:
    mt = raw.get("model_type")
    if mt is None:
        raise CheckpointError(f"{source}: neither our format (\"format\": \"coel-moe\") nor a Hugging Face "
                              f"config (no \"model_type\" key)")
    if mt not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[mt]


def _get(raw: dict[str, Any], source: str, *keys: str, default: Any = KeyError) -> Any:
    for k in keys:
        if raw.get(k) is not None:
            return raw[k]
    if default is KeyError:
        raise CheckpointError(f"{source}: required key {' or '.join(repr(k) for k in keys)} is missing")
    return default


def _rope_theta(raw: dict[str, Any], fam: Family, source: str) -> float:
    """rope_theta from transformers 5 `rope_parameters` or the classic top-level keys; only plain RoPE."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{source}: rope_parameters.rope_type={kind!r} is not supported "
                                  f"(only plain RoPE, 'default')")
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    scaling = raw.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise CheckpointError(f"{source}: rope_scaling={scaling!r} is not supported (only plain RoPE)")
    return float(raw.get("rope_theta") or fam.rope_theta_default)


def _token_id(value: Any, vocab: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and 0 <= value < vocab:
        return value
    return -1


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json",
                        max_seq_len_cap: int = DEFAULT_MAX_SEQ_LEN_CAP) -> MoEConfig:
    """Translate a HF MoE config dict into MoEConfig; reject what our model cannot reproduce."""
    fam = family_of(raw, source)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act={act!r} is not supported (experts are SwiGLU: 'silu')")
    if raw.get("sliding_window") and (fam.model_type == "mixtral" or raw.get("use_sliding_window")):
        raise CheckpointError(f"{source}: sliding_window={raw['sliding_window']} is not supported "
                              f"(full causal attention only)")
    if fam.model_type != "mixtral" and raw.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported (full causal attention only)")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        bad = sorted({t for t in layer_types if t != "full_attention"})
        raise CheckpointError(f"{source}: layer_types contains {bad}; only 'full_attention' is supported")
    if fam.model_type in ("qwen2_moe", "qwen3_moe"):
        step = raw.get("decoder_sparse_step", 1)
        if step != 1:
            raise CheckpointError(f"{source}: decoder_sparse_step={step} makes some layers dense; every "
                                  f"layer must be MoE (decoder_sparse_step=1)")
        if raw.get("mlp_only_layers"):
            raise CheckpointError(f"{source}: mlp_only_layers={raw['mlp_only_layers']} makes those layers "
                                  f"dense; every layer must be MoE")
    if fam.model_type in ("qwen3_moe", "olmoe") and raw.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias=true puts a bias on o_proj too, which our "
                              f"attention does not have")
    n_experts = _get(raw, source, *fam.experts_key)
    if fam.model_type == "qwen2_moe" and n_experts == 0:
        raise CheckpointError(f"{source}: num_experts=0 (a dense model) is not an MoE checkpoint")
    vocab = int(_get(raw, source, "vocab_size"))
    d_model = int(_get(raw, source, "hidden_size"))
    n_heads = int(_get(raw, source, "num_attention_heads"))
    head_dim = raw.get("head_dim") or 0
    if head_dim and fam.model_type == "olmoe":
        head_dim = 0 if head_dim * n_heads == d_model else head_dim
    if head_dim == d_model // n_heads and d_model % n_heads == 0:
        head_dim = 0
    if fam.model_type == "olmoe" and d_model % n_heads:
        raise CheckpointError(f"{source}: hidden_size ({d_model}) not divisible by num_attention_heads ({n_heads})")
    shared_hidden = 0
    if fam.model_type == "qwen2_moe":
        shared_hidden = int(raw.get("shared_expert_intermediate_size") or 0)
    max_pos = int(raw.get("max_position_embeddings") or 4096)
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(_get(raw, source, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        n_experts=int(n_experts),
        top_k=int(_get(raw, source, "num_experts_per_tok")),
        expert_hidden=int(_get(raw, source, fam.expert_hidden_key)),
        n_shared_experts=1 if shared_hidden else 0,
        shared_expert_hidden=shared_hidden,
        shared_expert_gate=bool(shared_hidden),
        norm_topk_prob=(True if fam.model_type == "mixtral"
                        else bool(raw.get("norm_topk_prob", fam.norm_topk_default))),
        head_dim=int(head_dim),
        qk_norm=fam.qk_norm,
        attention_bias=(bool(raw.get("qkv_bias", True)) if fam.model_type == "qwen2_moe" else False),
        clip_qkv=float(raw.get("clip_qkv") or 0.0),
        rope_theta=_rope_theta(raw, fam, source),
        norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        max_seq_len=min(max_pos, max_seq_len_cap),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_token_id(raw.get("bos_token_id"), vocab),
        eos_token_id=_token_id(raw.get("eos_token_id"), vocab),
    )
    try:
        return MoEConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def config_from_hf(model_dir: str | Path, max_seq_len_cap: int = DEFAULT_MAX_SEQ_LEN_CAP) -> MoEConfig:
    """MoEConfig of a local HF MoE checkpoint folder (reads only config.json)."""
    raw = read_hf_config(model_dir)
    return config_from_hf_dict(raw, str(Path(model_dir) / "config.json"), max_seq_len_cap)


# ------------------------------------------------------------------------------------ tensor files

def tensor_index(model_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (sharded via the index, or one file).

    Every shard the index names must exist; a tensor the index places in a shard must be in it.
    """
    root = Path(model_dir)
    index = root / INDEX_FILE
    single = root / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{index}: no \"weight_map\" object") from None
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        out: dict[str, Path] = {}
        for shard, names in sorted(by_shard.items()):
            path = root / shard
            if not path.exists():
                more = f" and {len(names) - 1} more" if len(names) > 1 else ""
                raise CheckpointError(f"{index} names shard {shard!r} (holding {sorted(names)[0]!r}{more}) "
                                      f"but {path} does not exist")
            present = set(_file_keys(path))
            absent = sorted(set(names) - present)
            if absent:
                raise CheckpointError(f"{path}: tensor {absent[0]!r} is not in this shard although {index.name} "
                                      f"places it there ({len(absent)} such tensors)")
            for name in names:
                out[name] = path
        return out
    if single.exists():
        return {name: single for name in _file_keys(single)}
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f"; found {others} (only safetensors is supported)" if others else ""
    raise CheckpointError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path}: unreadable safetensors file ({size} bytes): {exc}") from None


def _file_keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


# ------------------------------------------------------------------------------------ name mapping

@dataclass(frozen=True)
class Source:
    """Where one of our tensors comes from: an HF tensor, optionally one expert's slice of a fused one.

    part: "" = the whole tensor; "gate"/"up" = half of a fused gate_up_proj[expert];
    "down" = down_proj[expert]. transposed: the fused tensor is stored (E, in, out).
    """
    hf_name: str
    expert: int = -1
    part: str = ""
    transposed: bool = False


def _attn_plan(cfg: MoEConfig, i: int) -> dict[str, str]:
    ours, hf = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    plan = {f"{ours}.{p}.weight": f"{hf}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if cfg.attention_bias:
        plan.update({f"{ours}.{p}.bias": f"{hf}.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")})
    if cfg.qk_norm != "none":
        plan.update({f"{ours}.{p}.weight": f"{hf}.{p}.weight" for p in ("q_norm", "k_norm")})
    return plan


def weight_plan(cfg: MoEConfig, fam: Family, names: set[str]) -> dict[str, Source]:
    """Our parameter name -> Source, choosing per layer between the classic and the fused layout.

    Pure: looks only at the set of tensor names present, not at their values.
    """
    plan: dict[str, Source] = {"embed.weight": Source("model.embed_tokens.weight"),
                               "norm.weight": Source("model.norm.weight")}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = Source("lm_head.weight")
    g, u, d = fam.expert_names
    for i in range(cfg.n_layers):
        plan[f"layers.{i}.input_norm.weight"] = Source(f"model.layers.{i}.input_layernorm.weight")
        plan[f"layers.{i}.post_attn_norm.weight"] = Source(f"model.layers.{i}.post_attention_layernorm.weight")
        plan.update({k: Source(v) for k, v in _attn_plan(cfg, i).items()})
        # The MoE block's module name: the first prefix any tensor of this layer uses.
        prefix = next((p for p in fam.moe_prefixes
                       if f"model.layers.{i}.{p}.gate.weight" in names
                       or f"model.layers.{i}.{p}.experts.gate_up_proj" in names
                       or f"model.layers.{i}.{p}.experts.0.{g}.weight" in names), fam.moe_prefixes[0])
        moe = f"model.layers.{i}.{prefix}"
        ours = f"layers.{i}.moe"
        plan[f"{ours}.router.weight"] = Source(f"{moe}.gate.weight")
        fused = f"{moe}.experts.gate_up_proj" in names
        for e in range(cfg.n_experts):
            if fused:
                plan[f"{ours}.experts.{e}.w_gate.weight"] = Source(f"{moe}.experts.gate_up_proj", e, "gate")
                plan[f"{ours}.experts.{e}.w_up.weight"] = Source(f"{moe}.experts.gate_up_proj", e, "up")
                plan[f"{ours}.experts.{e}.w_down.weight"] = Source(f"{moe}.experts.down_proj", e, "down")
            else:
                plan[f"{ours}.experts.{e}.w_gate.weight"] = Source(f"{moe}.experts.{e}.{g}.weight")
                plan[f"{ours}.experts.{e}.w_up.weight"] = Source(f"{moe}.experts.{e}.{u}.weight")
                plan[f"{ours}.experts.{e}.w_down.weight"] = Source(f"{moe}.experts.{e}.{d}.weight")
        if cfg.shared_hidden:
            for ours_p, hf_p in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                plan[f"{ours}.shared_expert.{ours_p}.weight"] = Source(f"{moe}.shared_expert.{hf_p}.weight")
            if cfg.shared_expert_gate:
                plan[f"{ours}.shared_expert_gate.weight"] = Source(f"{moe}.shared_expert_gate.weight")
    return plan


# ----------------------------------------------------------------------------------------- loading

class _Reader:
    """Reads HF tensors (or one expert's slice of a fused tensor) with errors naming file and tensor."""

    def __init__(self, index: dict[str, Path], model_dir: Path, cfg: MoEConfig):
        self.index = index
        self.model_dir = model_dir
        self.n_experts = cfg.n_experts
        self.hint = f"d_model={cfg.d_model}, expert_hidden={cfg.expert_hidden}"
        self.handles: dict[Path, Any] = {}

    def _handle(self, path: Path):
        if path not in self.handles:
            self.handles[path] = _open(path).__enter__()
        return self.handles[path]

    def close(self) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.index[name]).get_slice(name).get_shape())

    def read(self, src: Source, ours: str, want: tuple[int, ...], cfg_hint: str) -> torch.Tensor:
        if src.hf_name not in self.index:
            where = INDEX_FILE if (self.model_dir / INDEX_FILE).exists() else SINGLE_FILE
            raise CheckpointError(f"{self.model_dir / where}: tensor {src.hf_name!r} (for our {ours!r}) is "
                                  f"missing (config/weights mismatch?)")
        path = self.index[src.hf_name]
        f = self._handle(path)
        try:
            if src.expert < 0:
                t = f.get_tensor(src.hf_name)
                got = tuple(t.shape)
            else:
                t = self._expert_slice(f, src, want, path)
                got = tuple(t.shape)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {src.hf_name!r}: {exc}") from None
        if got != want:
            raise CheckpointError(f"{path}: tensor {src.hf_name!r} has shape {got}, config.json implies {want} "
                                  f"for our {ours!r} ({cfg_hint})")
        return t

    def _expert_slice(self, f, src: Source, want: tuple[int, ...], path: Path) -> torch.Tensor:
        """One expert's (out, in) matrix from a fused 3-D tensor, in either storage orientation."""
        sl = f.get_slice(src.hf_name)
        shape = tuple(sl.get_shape())
        out_dim, in_dim = want
        rows = 2 * out_dim if src.part in ("gate", "up") else out_dim  # gate_up stacks gate then up
        E = self.n_experts
        if len(shape) != 3 or shape[0] != E or shape[1:] not in ((rows, in_dim), (in_dim, rows)):
            alt = f" or {(E, in_dim, rows)}" if rows != in_dim else ""
            raise CheckpointError(f"{path}: fused tensor {src.hf_name!r} has shape {shape}; config.json "
                                  f"implies {(E, rows, in_dim)}{alt} (n_experts={E}, {self.hint})")
        m = sl[src.expert] if shape[1:] == (rows, in_dim) else sl[src.expert].t()
        if src.part == "gate":
            m = m[:out_dim]
        elif src.part == "up":
            m = m[out_dim:]
        return m.contiguous()


def _shape_hint(ours: str, cfg: MoEConfig) -> str:
    if ".experts." in ours:
        return f"d_model={cfg.d_model}, expert_hidden={cfg.expert_hidden}"
    if "shared_expert" in ours:
        return f"d_model={cfg.d_model}, shared_expert_hidden={cfg.shared_hidden}"
    if ".attn." in ours:
        return f"d_model={cfg.d_model}, heads={cfg.n_heads}, kv_heads={cfg.n_kv_heads}, head_dim={cfg.hd}"
    return f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_experts={cfg.n_experts}"


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                  max_seq_len_cap: int = DEFAULT_MAX_SEQ_LEN_CAP) -> MoEModel:
    """Build our MoEModel from a local HF MoE checkpoint folder; strict: every tensor accounted for."""
    root = Path(model_dir)
    raw = read_hf_config(root)
    source = str(root / "config.json")
    cfg = config_from_hf_dict(raw, source, max_seq_len_cap)
    fam = family_of(raw, source)
    index = tensor_index(root)
    plan = weight_plan(cfg, fam, set(index))
    model = empty_model(cfg, dtype)
    params = model.state_dict()
    unplanned = sorted(k for k in params if k not in plan and not (cfg.tie_embeddings and k == "lm_head.weight"))
    assert not unplanned, f"weight_plan misses {unplanned}"  # internal invariant, not user input
    missing = [(ours, s.hf_name) for ours, s in plan.items() if s.hf_name not in index]
    if missing:  # checked before unused tensors: a wrong prefix shows up as missing, not as extra
        where = root / (INDEX_FILE if (root / INDEX_FILE).exists() else SINGLE_FILE)
        names = sorted({h for _, h in missing})
        raise CheckpointError(f"{where}: tensor {missing[0][1]!r} (for our {missing[0][0]!r}) is missing"
                              f"{f' with {len(names) - 1} more' if len(names) > 1 else ''} "
                              f"(config/weights mismatch?)")
    used = {s.hf_name for s in plan.values()}
    ignorable = {n for n in index if n.endswith(IGNORABLE_SUFFIXES)}
    if cfg.tie_embeddings:
        ignorable.add("lm_head.weight")  # some exporters write the tied copy too; HF ignores it
    unused = sorted(set(index) - used - ignorable)
    if unused:
        path = index[unused[0]]
        raise CheckpointError(f"{path}: tensor {unused[0]!r} ({len(unused)} unused in all) has no place in "
                              f"the model that {source} describes (config/weights mismatch?)")
    reader = _Reader(index, root, cfg)
    try:
        with torch.no_grad():
            for ours, src in plan.items():
                p = params[ours]
                t = reader.read(src, ours, tuple(p.shape), _shape_hint(ours, cfg))
                p.copy_(t.to(p.dtype))
    finally:
        reader.close()
    model.eval()
    return model


def empty_model(cfg: MoEConfig, dtype: torch.dtype) -> MoEModel:
    """An uninitialised MoEModel allocated directly in `dtype`.

    Built on the meta device, so a large checkpoint costs one copy of its weights in `dtype`
    (not an fp32 random init first); every parameter is then overwritten by the loader.
    """
    with torch.device("meta"):
        model = MoEModel(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gives each module its own storage: tie again
        model.lm_head.weight = model.embed.weight
    cos, sin = rope_tables(cfg.hd, cfg.max_seq_len, cfg.rope_theta)  # non-persistent buffers
    model.rope_cos, model.rope_sin = cos.to(dtype), sin.to(dtype)
    return model


def hf_state_dict_names(cfg: MoEConfig, model_type: str) -> dict[str, str]:
    """Our name -> classic per-expert HF name (for docs and tools that write HF-layout files)."""
    fam = FAMILIES[model_type]
    names: set[str] = set()
    return {k: s.hf_name for k, s in weight_plan(cfg, fam, names).items()}

"""Checkpoints: our own format (config.json + model.safetensors [+ quant.json]) and the entry
point that also recognises Hugging Face MoE directories (see coel_model.hf).

Own format, version 1:
    config.json        {"format": "coel-moe", "version": 1, <MoEConfig fields>}
    model.safetensors  state dict with our parameter names (fp32/fp16/bf16)
    tokenizer.json     optional, a `tokenizers` tokenizer
    quant.json         optional: present in quantized checkpoints (written by save_quantized below;
                       the packed tensors are coel_model.packing's format)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError
from coel_model.model import MoEModel
from coel_model.packing import QuantSpec
from coel_model.quant import QuantizedExpert, quantize_expert

QUANT_FORMAT = "coel-quant"
QUANT_VERSION = 1

FORMAT_NAME = "coel-moe"
FORMAT_VERSION = 1


def save_model(model: MoEModel, out_dir: str | Path, dtype: torch.dtype | None = None,
               extra_config: dict | None = None) -> Path:
    """Write our own format; `dtype` (e.g. torch.float16) converts floating tensors on save."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t
    write_own_format(out, state, model.cfg, extra_config)
    return out


def write_own_format(out: Path, state: dict[str, torch.Tensor], cfg: MoEConfig,
                     extra_config: dict | None = None) -> None:
    """model.safetensors + config.json of the own format (also used by save_quantized)."""
    save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT_NAME})
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **cfg.to_dict(), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(doc, indent=2) + "\n")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning low-level failures into an error that names the file."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = path.stat().st_size
        raise CheckpointError(f"{path}: unreadable safetensors file ({size} bytes): {exc}") from None


def load_state_into(model: MoEModel, state: dict[str, torch.Tensor], source: str,
                    skip: set[str] | None = None) -> None:
    """Copy tensors into the model; every missing, unexpected or mis-shaped tensor is named."""
    expected = model.state_dict()
    skip = skip or set()
    if model.cfg.tie_embeddings:
        skip = skip | {"lm_head.weight"}
    missing = sorted(k for k in expected if k not in state and k not in skip)
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}"
                              f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]} (config/weights mismatch?)")
    for k, v in state.items():
        if k in skip:
            continue
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the config "
                                  f"implies {tuple(expected[k].shape)} (config/weights mismatch)")
    with torch.no_grad():
        for k, p in expected.items():
            if k in state and k not in skip:
                p.copy_(state[k].to(p.dtype))


def is_own_format(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.exists():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def _own_config(path: Path) -> MoEConfig:
    """The config of an own-format checkpoint; refuses files written by a newer format than this
    code understands."""
    cfg_path = path / "config.json"
    data = json.loads(cfg_path.read_text())
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: {FORMAT_NAME} format version {version} is not "
                              f"supported (this code reads version {FORMAT_VERSION})")
    return MoEConfig.from_dict(data, source=str(cfg_path))


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MoEModel:
    """Load any supported checkpoint directory: own format (plain or quantized) or HF MoE."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json in the checkpoint folder")
    if not is_own_format(path):
        from coel_model import hf
        return hf.load_hf_model(path, dtype=dtype)
    cfg = _own_config(path)
    model = MoEModel(cfg)
    quantized = (path / "quant.json").exists()
    weights = path / "model.safetensors"
    state = read_safetensors(weights)
    if quantized:
        load_quantized_checkpoint(model, path, state)
    else:
        load_state_into(model, state, str(weights))
    if not quantized:
        model.to(dtype)
    model.eval()
    return model


def load_config(model_dir: str | Path) -> MoEConfig:
    path = Path(model_dir)
    if is_own_format(path):
        return MoEConfig.load(path / "config.json")
    from coel_model import hf
    return hf.config_from_hf(path)


# --------------------------------------------------------------------------- quantized checkpoints

def _expert_prefix(layer: int, e: int) -> str:
    return f"layers.{layer}.moe.experts.{e}."


def save_quantized(model, specs: dict[tuple[int, int], QuantSpec], out_dir: str | Path,
                   base_model: str | None = None, backbone_dtype: torch.dtype = torch.float16) -> Path:
    """Write a quantized checkpoint: config.json, model.safetensors (backbone in backbone_dtype +
    packed experts), quant.json. Experts missing from `specs` are stored as 16-bit float.
    Experts that are already QuantizedExpert are written as they are when their spec matches."""
    cfg = model.cfg
    bad = sorted(k for k in specs if not (0 <= k[0] < cfg.n_layers and 0 <= k[1] < cfg.n_experts))
    if bad:
        raise ValueError(f"save_quantized: specs name experts {bad[:5]} outside the model "
                         f"({cfg.n_layers} layers x {cfg.n_experts} experts)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".moe.experts." in name or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        t = t.detach().contiguous()
        state[name] = t.to(backbone_dtype) if t.is_floating_point() else t
    entries = []
    for l in range(cfg.n_layers):
        for e in range(cfg.n_experts):
            spec = specs.get((l, e), QuantSpec(16))
            mod = model.expert(l, e)
            if isinstance(mod, QuantizedExpert):
                if mod.spec != spec:
                    raise ValueError(f"save_quantized: expert (layer {l}, expert {e}) is already "
                                     f"quantized as {mod.spec}, cannot re-quantize to {spec}")
                q = mod
            else:
                q = quantize_expert(mod, spec)
            for n, t in q.to_tensors().items():
                state[_expert_prefix(l, e) + n] = t.contiguous()
            entries.append({"layer": l, "expert": e, **spec.to_dict(), "bytes": q.nbytes})
    write_own_format(out, state, cfg)
    total = sum(x["bytes"] for x in entries)
    meta = {"format": QUANT_FORMAT, "version": QUANT_VERSION, "base_model": base_model,
            "backbone_dtype": str(backbone_dtype).removeprefix("torch."),
            "expert_bytes": total, "experts": entries}
    (out / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")
    if base_model is not None:  # a relative base_model may be relative to out_dir or to the cwd
        for cand in (out / base_model, Path(base_model)):
            if (cand / "tokenizer.json").is_file():
                shutil.copyfile(cand / "tokenizer.json", out / "tokenizer.json")
                break
    return out


def read_quant_json(path: str | Path) -> dict:
    """Parse and validate quant.json; returns {(layer, expert): QuantSpec} under 'specs'."""
    qpath = Path(path) / "quant.json"
    try:
        meta = json.loads(qpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{qpath}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{qpath}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if meta.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{qpath}: format is {meta.get('format')!r}, expected {QUANT_FORMAT!r}")
    if meta.get("version") != QUANT_VERSION:
        raise CheckpointError(f"{qpath}: version {meta.get('version')!r} is not supported "
                              f"(this code reads version {QUANT_VERSION})")
    specs = {}
    for i, ent in enumerate(meta.get("experts", [])):
        try:
            key = (int(ent["layer"]), int(ent["expert"]))
            spec = QuantSpec.from_dict({k: ent[k] for k in ("bits", "group_size", "method", "float_dtype")
                                        if k in ent})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{qpath}: experts[{i}] is invalid: {exc}") from None
        if key in specs:
            raise CheckpointError(f"{qpath}: experts[{i}] repeats (layer {key[0]}, expert {key[1]})")
        specs[key] = spec
    meta["specs"] = specs
    return meta


def load_quantized_checkpoint(model, path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Swap QuantizedExpert modules into `model` from a quantized checkpoint's tensors and load
    the backbone; any inconsistency raises CheckpointError naming the file and tensor."""
    path = Path(path)
    cfg = model.cfg
    meta = read_quant_json(path)
    specs = meta["specs"]
    source = str(path / "model.safetensors")
    need = {(l, e) for l in range(cfg.n_layers) for e in range(cfg.n_experts)}
    missing = sorted(need - set(specs))
    extra = sorted(set(specs) - need)
    if missing or extra:
        raise CheckpointError(f"{path / 'quant.json'}: lists {len(specs)} experts, the config has "
                              f"{cfg.n_layers} layers x {cfg.n_experts}; missing {missing[:5]}, "
                              f"outside the model {extra[:5]}")
    backbone = {k: v for k, v in state.items() if ".moe.experts." not in k}
    by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if ".moe.experts." in k:
            head, _, rest = k.partition(".moe.experts.")
            try:
                l = int(head.removeprefix("layers."))
                e_str, _, name = rest.partition(".")
                key = (l, int(e_str))
            except ValueError:
                raise CheckpointError(f"{source}: tensor {k!r} is not a valid expert tensor name") from None
            if key not in need:
                raise CheckpointError(f"{source}: tensor {k!r} names an expert outside the model")
            by_expert.setdefault(key, {})[name] = v
    for (l, e) in sorted(need):
        q = QuantizedExpert.from_tensors(specs[(l, e)], cfg.d_model, cfg.expert_hidden,
                                         by_expert.get((l, e), {}),
                                         source=f"{source} [{_expert_prefix(l, e)}*]")
        model.set_expert(l, e, q)
    expert_keys = {k for k in model.state_dict() if ".moe.experts." in k}
    load_state_into(model, backbone, source, skip=expert_keys)

"""Checkpoints: our own format (config.json + model.safetensors [+ quant.json]) and the entry
point that also recognises Hugging Face MoE directories (see coel_model.hf).

Own format, version 1:
    config.json        {"format": "coel-moe", "version": 1, <MoEConfig fields>}
    model.safetensors  state dict with our parameter names (fp32/fp16/bf16)
    tokenizer.json     optional, a `tokenizers` tokenizer
    quant.json         optional: present in quantized checkpoints (see coel_model.quant)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coel_model.config import MoEConfig
from coel_model.errors import CheckpointError
from coel_model.model import MoEModel

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
    """model.safetensors + config.json of the own format (also used by quant.save_quantized)."""
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
        from coel_model import quant
        quant.load_quantized_checkpoint(model, path, state)
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

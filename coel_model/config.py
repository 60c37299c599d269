"""The MoE decoder's configuration: one frozen dataclass, validated where it is loaded."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError


def read_json(path: str | Path, missing: str) -> Any:
    """Parse a JSON file; a missing file raises ConfigError "<path>: <missing>", bad JSON names the line."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def read_text_file(path: str | Path, what: str) -> str:
    """A text file's content; an unreadable file raises ConfigError "<path>: cannot read <what>: ..."."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int  # tokens in the vocabulary
    d_model: int  # residual stream width
    n_layers: int  # decoder blocks; every block has an MoE feed-forward
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention); divides n_heads
    n_experts: int  # routed experts per layer
    top_k: int  # routed experts per token
    expert_hidden: int  # SwiGLU hidden width of one routed expert
    n_shared_experts: int = 0  # always-on experts (DeepSeek/Qwen style); 0 = none
    shared_expert_hidden: int = 0  # hidden width of the (fused) shared expert; 0 = n_shared * expert_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(d,1)) scales the shared expert
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral)
    head_dim: int = 0  # per-head width; 0 = d_model // n_heads
    qk_norm: str = "none"  # "none" | "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over all heads)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2-MoE)
    clip_qkv: float = 0.0  # clamp q/k/v to +-clip_qkv (OLMoE option); 0 = off
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    max_seq_len: int = 2048  # longest sequence the KV cache holds
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    bos_token_id: int = -1  # -1 = none
    eos_token_id: int = -1  # -1 = none

    def __post_init__(self) -> None:
        problems = []
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "n_experts",
                  "top_k", "expert_hidden", "max_seq_len"):
            if getattr(self, f) <= 0:
                problems.append(f"{f} must be > 0 (got {getattr(self, f)})")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            problems.append(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.head_dim == 0 and self.d_model % max(self.n_heads, 1):
            problems.append(f"d_model ({self.d_model}) not divisible by n_heads ({self.n_heads}); set head_dim")
        if self.qk_norm not in ("none", "head", "full"):
            problems.append(f"qk_norm must be none|head|full (got {self.qk_norm!r})")
        if self.n_shared_experts < 0:
            problems.append("n_shared_experts must be >= 0")
        if problems:
            raise ConfigError("invalid MoEConfig: " + "; ".join(problems))

    @property
    def hd(self) -> int:
        """Per-head width."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def shared_hidden(self) -> int:
        if self.n_shared_experts == 0:
            return 0
        return self.shared_expert_hidden or self.n_shared_experts * self.expert_hidden

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.d_model * self.expert_hidden

    def param_counts(self) -> dict[str, int]:
        """Parameter counts split into routed experts and everything else (the backbone)."""
        d, hd = self.d_model, self.hd
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm == "head":
            attn += 2 * hd
        elif self.qk_norm == "full":
            attn += hd * (self.n_heads + self.n_kv_heads)
        router = d * self.n_experts
        shared = 3 * d * self.shared_hidden + (d if self.shared_expert_gate else 0)
        norms = 2 * d
        per_layer = attn + router + shared + norms
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        experts = self.n_layers * self.n_experts * self.expert_params()
        backbone = self.n_layers * per_layer + emb
        return {"experts": experts, "backbone": backbone, "total": experts + backbone,
                "active_per_token": backbone + self.n_layers * self.top_k * self.expert_params()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version", "architecture"})
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "MoEConfig":
        path = Path(path)
        return cls.from_dict(read_json(path, "config file not found"), source=str(path))

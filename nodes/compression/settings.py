"""What one link does to the activations it carries (`CompressionSettings`): prune, drop, fuse and
the activation dtype; all knobs off (`NONE`) is a bit-exact passthrough. The settings travel in
the message header (`to_header`/`from_header`) so both ends agree."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

ACT_DTYPES = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class CompressionSettings:
    """What one link does to the activations it carries; all knobs off = bit-exact passthrough."""
    prune_beta: float = 0.0  # drop slot j>0 when weight_j < beta * weight_0 (MC-MoE); 0 = off
    prune_renorm: bool = False  # True: rescale kept weights to the token's old weight sum; False: zero
    protect_top_frac: float = 0.02  # most important tokens (per layer call) are never pruned/fused
    drop_tokens_frac: float = 0.0  # per remote expert, drop this fraction of lowest-weight non-top-1 rows
    fuse_threshold: float = 0.0  # merge rows with cosine similarity >= this (ToMe); 0 = off
    fuse_max_frac: float = 0.5  # at most this fraction of a group's rows merged away (<= 0.5)
    act_dtype: str = "fp32"  # activations on the wire both ways: fp32 | fp16 | int8 (per-row scales)

    def __post_init__(self) -> None:
        problems = []
        for name in ("prune_beta", "protect_top_frac", "drop_tokens_frac", "fuse_threshold",
                     "fuse_max_frac"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"{name} must be a finite number (got {v!r})")
        if not problems:
            if not 0.0 <= self.prune_beta <= 1.0:
                problems.append(f"prune_beta must be in [0, 1] (got {self.prune_beta})")
            if not 0.0 <= self.protect_top_frac <= 1.0:
                problems.append(f"protect_top_frac must be in [0, 1] (got {self.protect_top_frac})")
            if not 0.0 <= self.drop_tokens_frac < 1.0:
                problems.append(f"drop_tokens_frac must be in [0, 1) (got {self.drop_tokens_frac})")
            if not (self.fuse_threshold == 0.0 or 0.0 < self.fuse_threshold <= 1.0):
                problems.append(f"fuse_threshold must be 0 (off) or in (0, 1] (got {self.fuse_threshold})")
            if not 0.0 <= self.fuse_max_frac <= 0.5:
                problems.append(f"fuse_max_frac must be in [0, 0.5] (one bipartite round merges at "
                                f"most half the rows; got {self.fuse_max_frac})")
        if not isinstance(self.prune_renorm, bool):
            problems.append(f"prune_renorm must be true/false (got {self.prune_renorm!r})")
        if self.act_dtype not in ACT_DTYPES:
            problems.append(f"act_dtype must be one of {list(ACT_DTYPES)} (got {self.act_dtype!r})")
        if problems:
            raise ValueError("invalid CompressionSettings: " + "; ".join(problems))

    @property
    def prunes(self) -> bool:
        return self.prune_beta > 0.0 or self.drop_tokens_frac > 0.0

    @property
    def fuses(self) -> bool:
        return self.fuse_threshold > 0.0 and self.fuse_max_frac > 0.0

    @property
    def is_identity(self) -> bool:
        """True when the link carries exactly what the expert would see locally."""
        return not self.prunes and not self.fuses and self.act_dtype == "fp32"

    def to_header(self) -> dict[str, Any]:
        """msgpack-friendly dict of the knobs that differ from the defaults ({} = no compression).

        Compact on purpose: in batch-1 decode a message carries one token (~0.4-1 KB), so a
        200-byte settings map would cost more than int8 saves. Both ends run the same protocol
        version, hence the same defaults.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        return out

    @classmethod
    def from_header(cls, data: Any) -> "CompressionSettings":
        """Inverse of to_header (missing keys = defaults; parse()'s short keys accepted too);
        unknown keys and bad values are rejected with the reason."""
        if data is None:
            return NONE
        if not isinstance(data, dict):
            raise ValueError(f"compression settings must be a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        full = {_SHORT_KEYS.get(k, k) if isinstance(k, str) else k: v for k, v in data.items()}
        unknown = sorted(str(k) for k in full if k not in known)
        if unknown or len(full) != len(data):
            raise ValueError(f"unknown or repeated compression setting(s) {unknown or sorted(map(str, data))}; "
                             f"known: {sorted(known)} (short: {sorted(_SHORT_KEYS)})")
        return cls(**full)

    # the names nodes.local uses
    def to_dict(self) -> dict[str, Any]:
        return self.to_header()

    def full_dict(self) -> dict[str, Any]:
        """Every field, defaults included: for tables read by code with its own defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "CompressionSettings":
        return cls.from_header(data)

    @classmethod
    def parse(cls, text: str | None) -> "CompressionSettings":
        """Command-line form: 'none', a JSON object, or 'act=int8,beta=0.5,fuse=0.9,...'.

        Short keys: act, beta, renorm, protect, drop, fuse, fuse_max; full field names work too.
        """
        if text is None or not text.strip() or text.strip().lower() in ("none", "off"):
            return NONE
        text = text.strip()
        if text.startswith("{"):
            import json
            try:
                return cls.from_header(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"compression {text!r}: not valid JSON ({exc.msg})") from None
        types = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, val = item.partition("=")
            key, val = key.strip(), val.strip()
            name = _SHORT_KEYS.get(key, key)
            if not sep or name not in types:
                raise ValueError(f"compression {text!r}: bad item {item!r}; use key=value with keys "
                                 f"{sorted(_SHORT_KEYS)} (or full names)")
            if name == "act_dtype":
                out[name] = val
            elif name == "prune_renorm":
                if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"compression {text!r}: renorm must be true/false, got {val!r}")
                out[name] = val.lower() in ("1", "true", "yes")
            else:
                try:
                    out[name] = float(val)
                except ValueError:
                    raise ValueError(f"compression {text!r}: {key} must be a number, got {val!r}") from None
        return cls(**out)

    def label(self) -> str:
        """Short human-readable name for tables, e.g. 'beta0.5+fuse0.9+int8'."""
        parts = []
        if self.prune_beta > 0:
            parts.append(f"beta{self.prune_beta:g}" + ("(renorm)" if self.prune_renorm else ""))
        if self.drop_tokens_frac > 0:
            parts.append(f"drop{self.drop_tokens_frac:g}")
        if self.fuses:
            parts.append(f"fuse{self.fuse_threshold:g}")
        if (self.prunes or self.fuses) and self.protect_top_frac != 0.02:
            parts.append(f"protect{self.protect_top_frac:g}")
        if self.act_dtype != "fp32" or not parts:
            parts.append(self.act_dtype)
        return "+".join(parts)


NONE = CompressionSettings()
_SHORT_KEYS = {"act": "act_dtype", "beta": "prune_beta", "renorm": "prune_renorm",
               "protect": "protect_top_frac", "drop": "drop_tokens_frac", "fuse": "fuse_threshold",
               "fuse_max": "fuse_max_frac"}

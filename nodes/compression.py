"""Token compression on cross-server expert transfers: prune, drop, fuse, and compact activations.

Division of labour: the *routing* step decides which (token, expert) assignments still travel
(`prune_routing`: MC-MoE's beta rule and optional dropping of unimportant tokens, both sparing the
most important tokens); the *group* step shrinks what one remote expert receives (`compress_group`:
ToMe-style bipartite merging of near-duplicate vectors, then fp16 or int8 with per-token absmax
scales); the *reply* step shrinks what comes back (`compress_reply`) and the sender unmerges it
(`decompress_reply`). The merge map never leaves the sender: the remote side only sees rows.

Everything here is pure (tensors in, tensors out). `CompressingExecutor` strings the steps together
in-process behind the model's expert seam (a simulated wire that counts bytes), and
`measure_compression_cost` turns that into the quality/bytes table the planner negotiates with.
The settings travel in the message header (`to_header`/`from_header`) so both ends agree.

Shapes: N tokens in the layer call, k top-k, d model width, n rows bound for one expert, m rows
after merging (m <= n).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from coel_model.model import MoEModel, Routing

ACT_DTYPES = ("fp32", "fp16", "int8")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "int8": torch.int8}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
_FP16_MAX = 65504.0
_FP16_TINY = 6.104e-05  # smallest normal fp16; int8 scales are kept at or above it


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


# ----------------------------------------------------------------------------- importance, pruning

def token_importance(h: torch.Tensor) -> torch.Tensor:
    """Attention-free importance proxy (N,): 1 - cosine(h_i, mean of h over the call).

    Why: at the expert seam we have no attention scores. Tokens unlike the rest of the batch
    (attention sinks such as BOS, rare tokens, delimiters) are the ones whose loss of a secondary
    expert or merge into a neighbour cannot be compensated by similar tokens; the router-weight
    margin is already what the beta rule thresholds, so it would add nothing.
    """
    hf = h.float()
    if hf.shape[0] <= 1:
        return torch.zeros(hf.shape[0])
    mean = hf.mean(dim=0, keepdim=True)
    return 1.0 - F.cosine_similarity(hf, mean.expand_as(hf), dim=-1, eps=1e-12)


def protected_mask(importance: torch.Tensor, frac: float) -> torch.Tensor:
    """bool (N,): the floor(frac * N) most important tokens (ties: lower index first).

    floor, not ceil: in batch-1 decode (N = 1) nothing is protected, so pruning can still save a hop.
    """
    n = importance.shape[0]
    count = int(math.floor(frac * n + 1e-9))
    mask = torch.zeros(n, dtype=torch.bool)
    if count > 0:
        order = torch.sort(-importance.float(), stable=True).indices[:count]
        mask[order] = True
    return mask


def prune_routing(routing: Routing, settings: CompressionSettings, *,
                  protected: torch.Tensor | None = None,
                  remote: Iterable[int] | None = None) -> Routing:
    """New Routing with low-value remote assignments removed (weights 0, gone from groups).

    Rules, applied to assignments whose expert is remote (`remote` = expert ids of this layer,
    None = all) and whose token is not `protected`:
      * beta: slot j >= 1 goes when weight_j < prune_beta * weight_0 (MC-MoE online pruning);
      * drop: in each remote expert's group, the floor(drop_tokens_frac * n) lowest-weight rows
        that are not a token's top-1 assignment go too.
    A token's top-1 assignment is never removed. Pruned weight is zeroed by default: with
    y = w1 f1 + w2 f2, zeroing errs by w2 f2 while renormalising (prune_renorm, kept weights
    rescaled to the old sum) errs by w2 (f1 - f2), which is larger when experts specialise
    (uncorrelated outputs). Measured on tiny-moe, zeroing keeps top-1 agreement higher at every
    beta (docs/bench/compression.md). The input is not modified; with nothing to prune it is
    returned as is.
    """
    if not settings.prunes:
        return routing
    ids, w = routing.expert_ids, routing.weights  # (N, k)
    N, k = ids.shape
    if k < 2 or N == 0:
        return routing
    prot = torch.zeros(N, dtype=torch.bool) if protected is None else protected.to(torch.bool)
    if prot.shape != (N,):
        raise ValueError(f"protected mask has shape {tuple(prot.shape)}, routing has {N} tokens")
    if remote is None:
        is_remote = torch.ones_like(ids, dtype=torch.bool)
    else:
        rset = torch.tensor(sorted(set(int(e) for e in remote)), dtype=ids.dtype)
        is_remote = torch.isin(ids, rset)
    top1 = torch.zeros_like(ids, dtype=torch.bool)
    top1[:, 0] = True
    candidate = is_remote & ~top1 & ~prot.unsqueeze(1)  # (N, k)
    drop = torch.zeros_like(candidate)
    if settings.prune_beta > 0:
        drop |= candidate & (w < settings.prune_beta * w[:, :1])
    if settings.drop_tokens_frac > 0:
        for e, (tok, slot) in routing.groups.items():
            alive = ~drop[tok, slot]
            n_alive = int(alive.sum())
            count = int(math.floor(settings.drop_tokens_frac * n_alive + 1e-9))
            if count == 0:
                continue
            cand = candidate[tok, slot] & alive
            if not bool(cand.any()):
                continue
            cw = torch.where(cand, w[tok, slot], torch.full_like(w[tok, slot], float("inf")))
            order = torch.sort(cw, stable=True).indices[:min(count, int(cand.sum()))]
            drop[tok[order], slot[order]] = True
    if not bool(drop.any()):
        return routing
    keep = ~drop
    new_w = torch.where(keep, w, torch.zeros_like(w))
    if settings.prune_renorm:
        total = w.sum(dim=1, keepdim=True)
        kept = new_w.sum(dim=1, keepdim=True)
        new_w = new_w * (total / kept.clamp_min(torch.finfo(w.dtype).tiny))
    groups = {}
    for e, (tok, slot) in routing.groups.items():
        m = keep[tok, slot]
        if bool(m.all()):
            groups[e] = (tok, slot)
        elif bool(m.any()):
            groups[e] = (tok[m], slot[m])
    return Routing(ids, new_w, routing.probs, groups)


def prune_in_place(routing: Routing, h: torch.Tensor, settings: CompressionSettings,
                   remote: Iterable[int] | None = None) -> torch.Tensor | None:
    """For an executor: protect, prune, and write the result into the routing the model passed.

    The model combines with the Routing object it handed to the executor, so pruning must update
    that object's weights and groups. Returns the protected-token mask (N,) for compress_group
    (index it with a group's token indices), or None when nothing is protected.
    """
    prot = None
    if (settings.prunes or settings.fuses) and settings.protect_top_frac > 0:
        prot = protected_mask(token_importance(h), settings.protect_top_frac)
    pruned = prune_routing(routing, settings, protected=prot, remote=remote)
    if pruned is not routing:
        routing.weights = pruned.weights
        routing.groups = pruned.groups
    return prot


# ----------------------------------------------------------------------------- activations on the wire

@dataclass
class WireTensor:
    """Rows of activations as they travel: data (+ per-row fp16 scales for int8)."""
    act_dtype: str  # fp32 | fp16 | int8
    data: torch.Tensor  # (m, d) in act_dtype
    scales: torch.Tensor | None  # (m,) fp16 for int8, else None
    orig_dtype: str  # fp32 | fp16 | bf16: what decode_rows returns

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (data + scales); the header is counted separately."""
        n = self.data.numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    def meta(self) -> dict[str, Any]:
        """msgpack-friendly description that, with frames(), rebuilds this tensor."""
        return {"act_dtype": self.act_dtype, "shape": list(self.shape), "orig_dtype": self.orig_dtype}

    def frames(self) -> list[memoryview]:
        """Raw byte frames (zero-copy views): [data] or [data, scales]."""
        out = [memoryview(self.data.contiguous().numpy()).cast("B")]
        if self.scales is not None:
            out.append(memoryview(self.scales.contiguous().numpy()).cast("B"))
        return out

    @classmethod
    def from_wire(cls, meta: Any, frames: Sequence[bytes | memoryview], *,
                  max_rows: int = 1 << 20, max_width: int = 1 << 16) -> "WireTensor":
        """Validated inverse of meta()/frames(); a malformed message raises ValueError saying why."""
        if not isinstance(meta, dict):
            raise ValueError(f"wire tensor meta must be a map, got {type(meta).__name__}")
        act, shape, orig = meta.get("act_dtype"), meta.get("shape"), meta.get("orig_dtype")
        if act not in ACT_DTYPES:
            raise ValueError(f"wire tensor act_dtype {act!r} not one of {list(ACT_DTYPES)}")
        if orig not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"wire tensor orig_dtype {orig!r} not one of fp32|fp16|bf16")
        if (not isinstance(shape, (list, tuple)) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                or not (0 <= shape[0] <= max_rows and 0 < shape[1] <= max_width)):
            raise ValueError(f"wire tensor shape {shape!r} invalid (want [rows<={max_rows}, "
                             f"1..{max_width}])")
        m, d = shape
        want = 2 if act == "int8" else 1
        if len(frames) != want:
            raise ValueError(f"wire tensor {act} needs {want} frame(s), got {len(frames)}")
        itemsize = np.dtype(_NP_DTYPES[act]).itemsize
        if len(frames[0]) != m * d * itemsize:
            raise ValueError(f"wire tensor data frame has {len(frames[0])} bytes, shape {shape} "
                             f"{act} needs {m * d * itemsize}")
        data = torch.from_numpy(np.frombuffer(frames[0], dtype=_NP_DTYPES[act]).reshape(m, d).copy())
        scales = None
        if act == "int8":
            if len(frames[1]) != m * 2:
                raise ValueError(f"wire tensor scales frame has {len(frames[1])} bytes, {m} rows need {m * 2}")
            scales = torch.from_numpy(np.frombuffer(frames[1], dtype=np.float16).copy())
            if not bool(torch.isfinite(scales).all()):
                raise ValueError("wire tensor int8 scales contain inf/nan")
        elif not bool(torch.isfinite(data).all()):
            raise ValueError(f"wire tensor {act} data contains inf/nan")
        return cls(act, data, scales, orig)


    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """As named tensors for nodes.protocol: {name: (m, d) data[, name + '_scale': (m,) fp16]}."""
        out = {name: self.data.contiguous()}
        if self.scales is not None:
            out[name + "_scale"] = self.scales.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str,
                     orig_dtype: str = "fp32") -> "WireTensor":
        """Validated inverse of to_tensors; the wire dtype is read from the data tensor."""
        if name not in tensors:
            raise ValueError(f"message carries no tensor {name!r} (has {sorted(tensors)})")
        data = tensors[name]
        act = {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}.get(data.dtype)
        if act is None:
            raise ValueError(f"tensor {name!r} has dtype {data.dtype}; compressed rows travel as "
                             f"float32, float16 or int8")
        if data.dim() != 2:
            raise ValueError(f"tensor {name!r} must be (rows, d), got shape {tuple(data.shape)}")
        scales = None
        if act == "int8":
            key = name + "_scale"
            scales = tensors.get(key)
            if scales is None:
                raise ValueError(f"int8 tensor {name!r} arrived without its scales {key!r}")
            if scales.dtype != torch.float16 or tuple(scales.shape) != (data.shape[0],):
                raise ValueError(f"{key!r} must be float16 of shape ({data.shape[0]},), got "
                                 f"{scales.dtype} {tuple(scales.shape)}")
            if not bool(torch.isfinite(scales).all()):
                raise ValueError(f"{key!r} contains inf/nan")
        elif not bool(torch.isfinite(data).all()):
            raise ValueError(f"tensor {name!r} contains inf/nan")
        return cls(act, data, scales, orig_dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _TORCH_DTYPES.items():
        if dt == dtype and name != "int8":
            return name
    raise ValueError(f"activations of dtype {dtype} cannot be sent (want float32/float16/bfloat16)")


def encode_rows(x: torch.Tensor, act_dtype: str) -> WireTensor:
    """(m, d) float -> WireTensor. int8: per-row absmax scale s (fp16), q = round(x / s).

    Error bounds: fp16 relative 2^-11 per element; int8 |x - x'| <= s / 2 with
    s = fp16(max(absmax / 127, 6.1e-5)) (rounding s to fp16 never makes |x / s| round past 127).
    fp16 falls back to fp32 when a value would overflow (|x| > 65504) rather than send inf.
    """
    if x.dim() != 2:
        raise ValueError(f"activations must be (rows, d), got shape {tuple(x.shape)}")
    orig = _dtype_name(x.dtype)
    if act_dtype == "fp32":
        return WireTensor("fp32", x if x.dtype == torch.float32 else x.float(), None, orig)
    xf = x.detach().float()
    a = xf.contiguous().numpy()  # numpy: a single-row message costs half the torch op overhead
    absmax = np.abs(a).max(axis=1) if a.size else np.zeros(a.shape[0], np.float32)  # (m,)
    if not np.isfinite(absmax).all():
        bad = np.nonzero(~np.isfinite(absmax))[0][:5].tolist()
        raise ValueError(f"activations to send contain inf/nan (rows {bad} of {a.shape[0]})")
    if act_dtype == "fp16":
        if absmax.size and float(absmax.max()) > _FP16_MAX:
            return WireTensor("fp32", xf, None, orig)
        return WireTensor("fp16", torch.from_numpy(a.astype(np.float16)), None, orig)
    if act_dtype == "int8":
        # nearest fp16 scale: at most 2^-11 below absmax/127, so |x| / s <= 127.07 rounds to <= 127
        s16 = np.maximum(absmax * np.float32(1 / 127), np.float32(_FP16_TINY)).astype(np.float16)
        if np.isinf(s16).any():
            return WireTensor("fp32", xf, None, orig)
        q = np.rint(a / s16.astype(np.float32)[:, None])
        np.clip(q, -127, 127, out=q)
        return WireTensor("int8", torch.from_numpy(q.astype(np.int8)), torch.from_numpy(s16), orig)
    raise ValueError(f"act_dtype must be one of {list(ACT_DTYPES)} (got {act_dtype!r})")


def decode_rows(w: WireTensor) -> torch.Tensor:
    """WireTensor -> (m, d) tensor in the sender's original dtype."""
    if w.act_dtype == "int8":
        assert w.scales is not None
        x = w.data.float() * w.scales.float().unsqueeze(1)
    else:
        x = w.data
    target = _TORCH_DTYPES[w.orig_dtype]
    return x if x.dtype == target else x.to(target)


def decode_activations(tensors: dict[str, torch.Tensor], compression: dict | None,
                       name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Receiver side of nodes.transport: named tensors + header settings -> float32 rows (m, d).

    Returns the meta that `encode_activations` needs to answer in kind (the parsed settings).
    """
    settings = CompressionSettings.from_header(compression)
    x = decode_rows(WireTensor.from_tensors(tensors, name)).float()
    return x, {"settings": settings}


def encode_activations(y: torch.Tensor, compression: dict | None, name: str,
                       meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Reply side of nodes.transport: rows (m, d) -> named tensors in the link's act_dtype."""
    settings = (meta or {}).get("settings") or CompressionSettings.from_header(compression)
    return encode_rows(y, settings.act_dtype).to_tensors(name)


# ----------------------------------------------------------------------------- fusion

def fuse_rows(x: torch.Tensor, threshold: float, max_frac: float,
              protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ToMe bipartite soft matching: (n, d) -> (merged (m, d), merge_map (n,) or None if none merged).

    Rows alternate into sets A (even) and B (odd); each A row picks its most cosine-similar B row;
    the best pairs with similarity >= threshold (at most floor(max_frac * n)) merge into the B row,
    which becomes the mean of its members. merged[merge_map[i]] is what row i is represented by.
    Protected rows neither merge nor absorb. The mean is b + sum(a - b) / count so that identical
    rows merge into bit-identical vectors.
    """
    n = x.shape[0]
    r_max = int(math.floor(max_frac * n + 1e-9))
    if n < 2 or r_max == 0 or threshold <= 0:
        return x, None
    xf = x.float()
    xn = F.normalize(xf, dim=-1, eps=1e-12)
    a_idx = torch.arange(0, n, 2)
    b_idx = torch.arange(1, n, 2)
    sim = xn[a_idx] @ xn[b_idx].T  # (na, nb)
    if protected is not None and bool(protected.any()):
        sim[protected[a_idx]] = -2.0
        sim[:, protected[b_idx]] = -2.0
    best, best_b = sim.max(dim=1)  # (na,)
    order = torch.sort(-best, stable=True).indices
    order = order[best[order] >= threshold - 1e-6][:r_max]
    if order.numel() == 0:
        return x, None
    src = a_idx[order]  # rows merged away
    dst = b_idx[best_b[order]]  # rows they merge into
    gone = torch.zeros(n, dtype=torch.bool)
    gone[src] = True
    kept = torch.nonzero(~gone).squeeze(1)  # (m,) ascending
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[kept] = torch.arange(kept.numel())
    merge_map = pos.clone()
    merge_map[src] = pos[dst]
    merged = xf[kept].clone()
    delta = torch.zeros_like(merged)
    count = torch.ones(kept.numel())
    delta.index_add_(0, pos[dst], xf[src] - xf[dst])
    count.index_add_(0, pos[dst], torch.ones(src.numel()))
    merged = merged + delta / count.unsqueeze(1)
    return merged.to(x.dtype), merge_map


@dataclass
class CompressedGroup:
    """What the sender keeps (merge map) and sends (wire) for one remote expert's rows."""
    wire: WireTensor  # the (m, d) rows that travel
    merge_map: torch.Tensor | None  # (n,) row i -> wire row; None = identity; stays at the sender
    n_rows: int  # n, rows before merging
    n_merged: int = 0  # n - m

    @property
    def wire_bytes(self) -> int:
        return self.wire.nbytes


def compress_group(x: torch.Tensor, settings: CompressionSettings,
                   protected: torch.Tensor | None = None) -> CompressedGroup:
    """(n, d) rows bound for one remote expert -> CompressedGroup (fuse, then encode)."""
    n = x.shape[0]
    merged, merge_map = x, None
    if settings.fuses:
        merged, merge_map = fuse_rows(x, settings.fuse_threshold, settings.fuse_max_frac, protected)
    wire = encode_rows(merged, settings.act_dtype)
    return CompressedGroup(wire, merge_map, n, n - merged.shape[0])


def decompress_group(wire: WireTensor) -> torch.Tensor:
    """Receiver side: the (m, d) rows to run the expert on."""
    return decode_rows(wire)


def compress_reply(y: torch.Tensor, settings: CompressionSettings) -> WireTensor:
    """Receiver side: expert outputs (m, d) -> WireTensor in the link's act_dtype."""
    return encode_rows(y, settings.act_dtype)


def decompress_reply(reply: WireTensor, group: CompressedGroup) -> torch.Tensor:
    """Sender side: decode the reply and unmerge it -> (n, d), one output row per original row."""
    return unmerge(decode_rows(reply), group)


def unmerge(y: torch.Tensor, group: CompressedGroup) -> torch.Tensor:
    """Sender side: (m, d) outputs of the sent rows -> (n, d), copying a merged row to each member."""
    if y.shape[0] != group.wire.shape[0]:
        raise ValueError(f"reply has {y.shape[0]} rows, {group.wire.shape[0]} were sent")
    if group.merge_map is None:
        return y
    return y.index_select(0, group.merge_map)


def raw_bytes(n_rows: int, d: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of n rows sent uncompressed: the baseline every ratio is measured against."""
    return n_rows * d * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- in-process executor

@dataclass
class CompressionStats:
    """Counters of what went over the (simulated) wire; ratios are relative to raw fp32 rows."""
    calls: int = 0  # layer calls seen
    messages: int = 0  # remote expert requests (one reply each)
    assignments: int = 0  # remote (token, expert) assignments before pruning
    pruned: int = 0  # of which removed by prune_routing
    rows_sent: int = 0  # rows in requests after merging
    rows_merged: int = 0  # rows merged away by fusion
    raw_bytes: int = 0  # request + reply bytes with no compression at all
    request_bytes: int = 0  # payload bytes sender -> expert
    reply_bytes: int = 0  # payload bytes expert -> sender
    header_bytes: int = 0  # header bytes compression adds (settings map, scale spec), both ways

    @property
    def wire_bytes(self) -> int:
        return self.request_bytes + self.reply_bytes

    @property
    def reduction(self) -> float:
        """raw / wire payload bytes (4.0 = four times fewer bytes); inf when nothing was sent."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wire_bytes"] = self.wire_bytes
        d["reduction"] = self.reduction
        return d


class CompressingExecutor:
    """Expert executor that runs remote experts through compress -> wire -> decompress in-process.

    Usable as `model(tokens, executor=ex)` and `generate(..., executor=ex)`. `remote` is a set of
    (layer, expert) pairs treated as on another server (None = every routed expert); local experts
    run as usual. With `through_bytes` every message is turned into raw frames and parsed back
    (WireTensor.from_wire), as the real transport will. It prunes by rewriting the routing the model
    hands it (weights and groups), which is what the seam's combine step then uses.
    """

    def __init__(self, model: MoEModel, settings: CompressionSettings = NONE,
                 remote: set[tuple[int, int]] | None = None, through_bytes: bool = True):
        self.model = model
        self.settings = settings
        self.remote = None if remote is None else {(int(l), int(e)) for l, e in remote}
        self.through_bytes = through_bytes
        self.stats = CompressionStats()
        self._header_len = _header_bytes(settings)

    def reset(self) -> CompressionStats:
        """Return the counters so far and start new ones (e.g. between prefill and decode)."""
        old, self.stats = self.stats, CompressionStats()
        return old

    def _remote_ids(self, layer: int) -> set[int] | None:
        if self.remote is None:
            return None
        return {e for (l, e) in self.remote if l == layer}

    def __call__(self, layer: int, routing: Routing, h: torch.Tensor) -> dict[int, torch.Tensor]:
        s, st = self.settings, self.stats
        st.calls += 1
        remote = self._remote_ids(layer)
        is_remote = (lambda e: True) if remote is None else (lambda e: e in remote)
        n_before = sum(int(tok.numel()) for e, (tok, _) in routing.groups.items() if is_remote(e))
        prot = prune_in_place(routing, h, s, remote)
        n_after = sum(int(tok.numel()) for e, (tok, _) in routing.groups.items() if is_remote(e))
        st.assignments += n_before
        st.pruned += n_before - n_after
        d = h.shape[1]
        st.raw_bytes += 2 * raw_bytes(n_before, d, torch.float32)
        experts = self.model.layers[layer].moe.experts
        out: dict[int, torch.Tensor] = {}
        for e, (tok, _slot) in routing.groups.items():
            x = h.index_select(0, tok)
            if not is_remote(e):
                out[e] = experts[e](x)
                continue
            group = compress_group(x, s, None if prot is None else prot[tok])
            wire = group.wire
            if self.through_bytes:
                wire = WireTensor.from_wire(wire.meta(), [bytes(f) for f in wire.frames()])
            y = experts[e](decompress_group(wire))  # remote side
            reply = compress_reply(y, s)
            if self.through_bytes:
                reply = WireTensor.from_wire(reply.meta(), [bytes(f) for f in reply.frames()])
            out[e] = decompress_reply(reply, group)
            st.messages += 1
            st.rows_sent += group.wire.shape[0]
            st.rows_merged += group.n_merged
            st.request_bytes += group.wire_bytes
            st.reply_bytes += reply.nbytes
            st.header_bytes += 2 * self._header_len
        return out


def _header_bytes(settings: CompressionSettings) -> int:
    """Header bytes compression adds to one message: its settings map and, for int8, the scale
    tensor's [name, dtype, shape] entry (the layout nodes.protocol uses)."""
    import msgpack
    extra = len(msgpack.packb({"compression": settings.to_header()})) - len(msgpack.packb({}))
    if settings.is_identity:
        return 0
    if settings.act_dtype == "int8":
        extra += len(msgpack.packb(["x_scale", "float16", [1024]]))
    return extra


# ----------------------------------------------------------------------------- measured cost table

@torch.inference_mode()
def measure_compression_cost(model: MoEModel, tokens: torch.Tensor | Sequence[Sequence[int]],
                             settings_list: Sequence[CompressionSettings],
                             remote: set[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Quality and bytes of each setting on one forward (prefill) over `tokens` (B, T).

    Returns one dict per setting: settings (every field), label (= name), bytes_ratio (all wire
    payload bytes / raw fp32 bytes, both directions, pruning and merging included; 0.25 = 4x
    fewer), vector_bytes_ratio (bytes per row actually sent / fp32 row: the activation format
    alone), reduction (raw / wire), top1_agreement (fraction of positions whose
    argmax equals the uncompressed model's), nll / nll_ref (mean next-token cross-entropy,
    nats/token), loss_increase (nats/token), ppl_increase (relative: ppl / ppl_ref - 1), pruned_frac,
    merged_frac and the raw stats. Both perplexities use the same tokens, so the difference is
    only the compression.
    """
    toks = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, dtype=torch.long)
    if toks.dim() != 2 or toks.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, time>=2), got shape {tuple(toks.shape)}")
    if toks.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"{toks.shape[1]} tokens exceed the model's max_seq_len ({model.cfg.max_seq_len})")
    ref = model(toks).float()  # (B, T, V)
    ref_top1 = ref.argmax(-1)
    V = ref.shape[-1]
    targets = toks[:, 1:].reshape(-1)

    def nll(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, V), targets))

    nll_ref = nll(ref)
    rows = []
    for s in settings_list:
        ex = CompressingExecutor(model, s, remote=remote)
        logits = model(toks, executor=ex).float()
        st = ex.stats
        val = nll(logits)
        d = model.cfg.d_model
        rows.append({
            "settings": s.full_dict(),
            "label": s.label(),
            "name": s.label(),
            "bytes_ratio": st.wire_bytes / st.raw_bytes if st.raw_bytes else 1.0,
            "vector_bytes_ratio": (st.wire_bytes / (2 * st.rows_sent * d * 4)) if st.rows_sent else 1.0,
            "reduction": st.reduction,
            "top1_agreement": float((logits.argmax(-1) == ref_top1).float().mean()),
            "nll": val,
            "nll_ref": nll_ref,
            "loss_increase": val - nll_ref,
            "ppl_increase": math.exp(val - nll_ref) - 1.0,
            "pruned_frac": st.pruned / st.assignments if st.assignments else 0.0,
            "merged_frac": st.rows_merged / max(st.assignments - st.pruned, 1),
            "stats": st.to_dict(),
        })
    return rows

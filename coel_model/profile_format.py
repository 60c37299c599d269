"""The "coel-profile" v1 document (docs/profile-format.md): its one validator and the one type
every reader uses.

`validate_profile` checks a document and names the entry and the numbers that are wrong;
`profile_from_dict` / `load_profile` validate and return a `Profile`, the per-expert statistics
as numpy arrays indexed [layer, expert(, bit index)] so the planner works on 58 x 256 experts
without Python loops over dicts, and `coel quantize` builds its cost table from the same object.
`coel profile` writes these documents (coel_model/profile.py); the controller fabricates
synthetic ones for configs without weights (controller/profile.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coel_model.config import MoEConfig, read_json
from coel_model.errors import ConfigError

PROFILE_FORMAT = "coel-profile"
PROFILE_VERSION = 1
ALL_BITS = (2, 3, 4, 8, 16)
TOP_KEYS = {"format", "version", "model_config", "group_size", "bits", "experts", "coactivation",
            "backbone_bytes", "calibration"}
OPTIONAL_TOP_KEYS = {"coactivation"}  # synthetic profiles (controller) may leave it out
EXPERT_KEYS = {"layer", "expert", "popularity", "mean_weight", "loss_increase", "bytes"}
OPTIONAL_EXPERT_KEYS = {"output_kl"}  # mean KL(fp || quantized) per token, when measured
POPULARITY_SUM_TOL = 1e-3  # relative: popularity over a layer must sum to top_k


@dataclass(frozen=True, eq=False)
class Profile:
    """Per-expert statistics. Arrays: popularity/mean_weight (L, E); loss_nats/nbytes (L, E, B)
    where B indexes `bits`; coact_same (L, E, E) joint firing probability within a layer."""
    cfg: MoEConfig
    group_size: int
    bits: tuple[int, ...]
    popularity: np.ndarray
    mean_weight: np.ndarray
    loss_nats: np.ndarray
    nbytes: np.ndarray
    coact_same: np.ndarray
    backbone_bytes: int  # fp16 backbone (embeddings, attention, norms, routers, shared experts)
    source: str = "<memory>"
    calibration: dict = field(default_factory=dict)
    # loss_nats is the planner's damage per width: max(loss increase, output KL), made monotone in
    # bits and >= 0; measured_loss_nats is the loss increase as the file lists it (None: synthetic,
    # the same as loss_nats); output_kl is there when every expert lists it
    measured_loss_nats: np.ndarray | None = None  # (L, E, B)
    output_kl: np.ndarray | None = None  # (L, E, B)

    @property
    def n_layers(self) -> int:
        return self.popularity.shape[0]

    @property
    def n_experts(self) -> int:
        return self.popularity.shape[1]

    def bit_index(self, bits: int) -> int:
        try:
            return self.bits.index(bits)
        except ValueError:
            raise ConfigError(f"{self.source}: bit width {bits} not profiled (have {list(self.bits)})") from None

    def expert_bytes(self, bits_le: np.ndarray) -> np.ndarray:
        """(L, E) bytes of every expert at the given (L, E) bit widths."""
        idx = np.searchsorted(np.asarray(self.bits), bits_le)
        return np.take_along_axis(self.nbytes, idx[..., None], axis=2)[..., 0]

    def expert_loss(self, bits_le: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(np.asarray(self.bits), bits_le)
        return np.take_along_axis(self.loss_nats, idx[..., None], axis=2)[..., 0]

    def backbone_layer_bytes(self) -> tuple[int, int]:
        """(bytes of one decoder layer's backbone part, bytes of embeddings + final norm + head),
        split in the proportions of the config's parameter counts, summing to backbone_bytes."""
        cfg = self.cfg
        pc = cfg.param_counts()
        emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + cfg.d_model
        per_layer = (pc["backbone"] - emb) / cfg.n_layers
        scale = self.backbone_bytes / pc["backbone"]
        layer_b = int(per_layer * scale)
        return layer_b, self.backbone_bytes - layer_b * cfg.n_layers

    def to_dict(self, include_coactivation: bool = True) -> dict[str, Any]:
        """The "coel-profile" v1 JSON document (next-layer co-activation is not modelled: zeros)."""
        measured = self.loss_nats if self.measured_loss_nats is None else self.measured_loss_nats
        experts = []
        for l in range(self.n_layers):
            for e in range(self.n_experts):
                experts.append({
                    "layer": l, "expert": e,
                    "popularity": float(self.popularity[l, e]),
                    "mean_weight": float(self.mean_weight[l, e]),
                    "loss_increase": {str(b): float(measured[l, e, i]) for i, b in enumerate(self.bits)},
                    "bytes": {str(b): int(self.nbytes[l, e, i]) for i, b in enumerate(self.bits)},
                })
                if self.output_kl is not None:
                    experts[-1]["output_kl"] = {str(b): float(self.output_kl[l, e, i]) for i, b in enumerate(self.bits)}
        doc = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model_config": self.cfg.to_dict(),
               "group_size": self.group_size, "bits": list(self.bits), "experts": experts,
               "backbone_bytes": {"16": int(self.backbone_bytes), "32": int(2 * self.backbone_bytes)},
               "calibration": dict(self.calibration)}
        if include_coactivation:
            doc["coactivation"] = {
                "same_layer": [np.round(m, 6).tolist() for m in self.coact_same],
                "next_layer": [np.zeros((self.n_experts, self.n_experts)).tolist()
                               for _ in range(self.n_layers - 1)],
            }
        return doc


def validate_profile(doc: Any, source: str = "<profile>") -> MoEConfig:
    """Check a "coel-profile" v1 document; raise ConfigError naming the entry and the numbers.

    Returns the model config it describes. Checks: known keys only; every (layer, expert) exactly
    once; popularity in [0, 1] summing to top_k per layer (when any token was seen); loss and
    bytes given for every listed width, finite, bytes strictly growing with bits; co-activation
    matrices of the right shapes, non-negative; backbone bytes positive.
    """
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    if not isinstance(doc, dict):
        raise fail(f"a profile is a JSON object, got {type(doc).__name__}")
    if doc.get("format") != PROFILE_FORMAT:
        raise fail(f'"format" must be "{PROFILE_FORMAT}" (got {doc.get("format")!r})')
    if doc.get("version") != PROFILE_VERSION:
        raise fail(f'"version" {doc.get("version")!r} is not supported (this code reads {PROFILE_VERSION})')
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; known keys: {sorted(TOP_KEYS)}")
    missing = sorted(TOP_KEYS - OPTIONAL_TOP_KEYS - set(doc))
    if missing:
        raise fail(f"missing key(s) {missing}")
    if not isinstance(doc["model_config"], dict):
        raise fail('"model_config" must be an object of MoEConfig fields')
    cfg = MoEConfig.from_dict(doc["model_config"], source=f"{source}: model_config")
    L, E = cfg.n_layers, cfg.n_experts

    gs = doc["group_size"]
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0 or gs % 8:
        raise fail(f'"group_size" must be a positive multiple of 8 (got {gs!r})')
    bits = doc["bits"]
    if (not isinstance(bits, list) or not bits or any(not isinstance(b, int) or isinstance(b, bool) for b in bits)
            or bits != sorted(set(bits)) or any(b not in ALL_BITS for b in bits)):
        raise fail(f'"bits" must be a non-empty ascending list of distinct widths from {list(ALL_BITS)} '
                   f"(got {bits!r})")
    widths = [str(b) for b in bits]

    experts = doc["experts"]
    if not isinstance(experts, list):
        raise fail('"experts" must be a list')
    seen: dict[tuple[int, int], int] = {}
    pop_sum = [0.0] * L
    for i, ent in enumerate(experts):
        where = f"experts[{i}]"
        if not isinstance(ent, dict):
            raise fail(f"{where} must be an object")
        bad = sorted(set(ent) - EXPERT_KEYS - OPTIONAL_EXPERT_KEYS)
        if bad:
            raise fail(f"{where}: unknown key(s) {bad}; known: {sorted(EXPERT_KEYS | OPTIONAL_EXPERT_KEYS)}")
        lack = sorted(EXPERT_KEYS - set(ent))
        if lack:
            raise fail(f"{where}: missing key(s) {lack}")
        l, e = ent["layer"], ent["expert"]
        if not (isinstance(l, int) and isinstance(e, int) and 0 <= l < L and 0 <= e < E):
            raise fail(f"{where}: layer {l!r} / expert {e!r} outside the model ({L} layers x {E} experts)")
        where = f"{where} (layer {l}, expert {e})"
        if (l, e) in seen:
            raise fail(f"{where} repeats experts[{seen[(l, e)]}]")
        seen[(l, e)] = i
        for key, hi in (("popularity", 1.0), ("mean_weight", 1.0)):
            v = ent[key]
            if not _is_num(v) or not (0.0 <= v <= hi + 1e-9):
                raise fail(f"{where}: {key} must be a number in [0, {hi}] (got {v!r})")
        pop_sum[l] += ent["popularity"]
        for key in ("loss_increase", "bytes") + tuple(k for k in OPTIONAL_EXPERT_KEYS if k in ent):
            d = ent[key]
            if not isinstance(d, dict):
                raise fail(f"{where}: {key} must be an object keyed by bit width")
            absent = [w for w in widths if w not in d]
            extra = sorted(set(d) - set(widths))
            if absent or extra:
                raise fail(f"{where}: {key} must have exactly the widths {widths} "
                           f"(missing {absent}, unexpected {extra})")
            for w in widths:
                if not _is_num(d[w]):
                    raise fail(f"{where}: {key}[{w!r}] must be a finite number (got {d[w]!r})")
        nb = [ent["bytes"][w] for w in widths]
        if any(not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in nb):
            raise fail(f"{where}: bytes must be positive integers (got {nb})")
        for a, b, wa, wb in zip(nb, nb[1:], widths, widths[1:]):
            if b <= a:
                raise fail(f"{where}: bytes must grow with bits ({wa} bits: {a} >= {wb} bits: {b})")
    if len(seen) != L * E:
        gone = [(l, e) for l in range(L) for e in range(E) if (l, e) not in seen]
        raise fail(f"no entry for layer {gone[0][0]} expert {gone[0][1]} ({len(gone)} of {L * E} experts "
                   f"have no entry, first {gone[:5]})")
    for l, s in enumerate(pop_sum):
        if s > 0 and abs(s - cfg.top_k) > POPULARITY_SUM_TOL * cfg.top_k:
            raise fail(f"layer {l}: popularity sums to {s:.6f}, expected top_k = {cfg.top_k} "
                       f"(popularity is the fraction of tokens routed to the expert)")

    if "coactivation" in doc:
        co = doc["coactivation"]
        if not isinstance(co, dict) or set(co) != {"same_layer", "next_layer"}:
            raise fail('"coactivation" must be an object with exactly "same_layer" and "next_layer"')
        _check_matrices(co["same_layer"], L, E, "coactivation.same_layer", fail)
        _check_matrices(co["next_layer"], L - 1, E, "coactivation.next_layer", fail)

    bb = doc["backbone_bytes"]
    if not isinstance(bb, dict) or not bb or set(bb) - {"16", "32"}:
        raise fail(f'"backbone_bytes" must be an object with keys "16" and/or "32" (got {bb!r})')
    for k, v in bb.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise fail(f"backbone_bytes[{k!r}] must be a positive integer (got {v!r})")

    cal = doc["calibration"]
    if not isinstance(cal, dict) or "tokens" not in cal or "source" not in cal:
        raise fail('"calibration" must be an object with at least "tokens" and "source"')
    if not isinstance(cal["tokens"], int) or isinstance(cal["tokens"], bool) or cal["tokens"] < 0:
        raise fail(f"calibration.tokens must be a non-negative integer (got {cal['tokens']!r})")
    if not isinstance(cal["source"], str):
        raise fail(f"calibration.source must be a string (got {cal['source']!r})")
    return cfg


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_matrices(mats: Any, n: int, E: int, name: str, fail) -> None:
    if not isinstance(mats, list) or len(mats) != n:
        raise fail(f"{name} must be a list of {n} matrices of {E}x{E} (got "
                   f"{len(mats) if isinstance(mats, list) else type(mats).__name__})")
    for l, m in enumerate(mats):
        if not isinstance(m, list) or len(m) != E or any(not isinstance(r, list) or len(r) != E for r in m):
            raise fail(f"{name}[{l}] must be a {E}x{E} matrix")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if not _is_num(v) or v < 0:
                    raise fail(f"{name}[{l}][{i}][{j}] must be a non-negative number (got {v!r})")


def profile_from_dict(doc: Any, source: str = "<dict>") -> Profile:
    """Validate a "coel-profile" v1 document (`validate_profile`) and turn it into arrays."""
    cfg = validate_profile(doc, source)
    bits = tuple(int(b) for b in doc["bits"])
    L, E, B = cfg.n_layers, cfg.n_experts, len(bits)
    pop = np.zeros((L, E))
    mw = np.zeros((L, E))
    loss = np.zeros((L, E, B))
    nbytes = np.zeros((L, E, B), dtype=np.int64)
    damage = np.zeros((L, E, B))
    with_kl = all("output_kl" in ent for ent in doc["experts"])
    kl = np.zeros((L, E, B)) if with_kl else None
    for ent in doc["experts"]:
        l, e = ent["layer"], ent["expert"]
        pop[l, e] = float(ent["popularity"])
        mw[l, e] = float(ent["mean_weight"])
        for j, b in enumerate(bits):
            loss[l, e, j] = damage[l, e, j] = float(ent["loss_increase"][str(b)])
            nbytes[l, e, j] = int(ent["bytes"][str(b)])
            if "output_kl" in ent:  # the loss increase of one expert is noise-level at >= 3 bits
                # (docs/benchmarks.md, quantization quality); its output KL is measurable and
                # never negative: for the planner a width's damage is the larger of the two
                damage[l, e, j] = max(loss[l, e, j], float(ent["output_kl"][str(b)]))
                if kl is not None:
                    kl[l, e, j] = float(ent["output_kl"][str(b)])
    coact = np.zeros((L, E, E))
    same = (doc.get("coactivation") or {}).get("same_layer")
    if same is not None:
        coact = _normalise_coactivation(np.asarray(same, dtype=float), pop)
    bb = doc["backbone_bytes"]
    backbone = int(bb["16"]) if "16" in bb else int(bb["32"]) // 2
    # measurement noise can make a wider width look worse (or quantization look helpful): the
    # planner reads each damage as the largest at this or any wider width, >= 0
    monotone = np.maximum(np.maximum.accumulate(damage[:, :, ::-1], axis=2)[:, :, ::-1], 0.0)
    return Profile(cfg=cfg, group_size=int(doc["group_size"]), bits=bits, popularity=pop,
                   mean_weight=mw, loss_nats=monotone, nbytes=nbytes, coact_same=coact,
                   backbone_bytes=backbone, source=source, calibration=dict(doc["calibration"]),
                   measured_loss_nats=loss, output_kl=kl)


def _normalise_coactivation(arr: np.ndarray, pop: np.ndarray) -> np.ndarray:
    """Accept counts or probabilities: scale each layer so the diagonal matches popularity when
    the matrix carries counts (diagonal sum >> top_k), then zero the diagonal (joint probability
    of two different experts firing for the same token)."""
    out = arr.copy()
    for l in range(arr.shape[0]):
        diag = np.trace(arr[l])
        if diag > 0 and pop[l].sum() > 0 and diag > 1.5 * pop[l].sum():
            out[l] = arr[l] * (pop[l].sum() / diag)
        elif diag == 0 and arr[l].sum() > 1.5 * pop[l].sum() * max(pop.shape[1], 1):
            out[l] = arr[l] / arr[l].sum() * pop[l].sum()
        np.fill_diagonal(out[l], 0.0)
    return np.clip(out, 0.0, 1.0)


def load_profile(path: str | Path) -> Profile:
    """Read, validate and convert a profile file."""
    return profile_from_dict(read_json(path, "profile not found (make one with `coel profile`)"),
                             source=str(Path(path)))


def write_profile(doc: dict, path: str | Path) -> Path:
    """Validate, then write (so a broken profile never reaches the controller)."""
    validate_profile(doc, source=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path

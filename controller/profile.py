"""The planner's view of a model profile ("coel-profile" v1) and synthetic profiles for real-scale
configs that have no weights here.

A `Profile` holds the per-expert statistics as numpy arrays indexed [layer, expert(, bit index)] so
the planner can work on 58 x 256 experts without Python loops over dicts. `load_profile` validates
a file written by `coel profile`; `synthetic_profile` fabricates one with the same shape from a
`MoEConfig`: Zipf-like popularity, loss increase falling with bits, exact group-wise packed bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coel_model.config import MoEConfig, read_json
from coel_model.errors import ConfigError

PROFILE_FORMAT = "coel-profile"
PROFILE_VERSION = 1
DEFAULT_BITS = (2, 3, 4, 8, 16)

# Mean held-out loss increase (nats/token) when ALL routed experts sit at b bits, used only by
# synthetic profiles. Anchored to llama.cpp k-quants on Mixtral 8x7B (Q2_K +23..82 % ppl,
# Q3_K_M +4.5..7.7 %, Q4_K_M +1.5..3.6 %, Q8_0 ~ lossless): ln(1 + relative ppl increase).
SYNTHETIC_TOTAL_LOSS_NATS = {2: 0.40, 3: 0.06, 4: 0.025, 8: 0.0008, 16: 0.0}


def packed_matrix_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bytes of one (rows x cols) weight matrix packed group-wise along its input dim (cols):
    bits*n/8 for the codes plus one fp16 scale and one fp16 zero per group; 16 bits = plain fp16."""
    if bits == 16:
        return 2 * rows * cols
    groups = rows * math.ceil(cols / group_size)
    return math.ceil(bits * rows * cols / 8) + 4 * groups


def packed_expert_bytes(d_model: int, hidden: int, bits: int, group_size: int = 64) -> int:
    """A SwiGLU expert: w_gate and w_up (hidden x d_model), w_down (d_model x hidden)."""
    return (2 * packed_matrix_bytes(hidden, d_model, bits, group_size)
            + packed_matrix_bytes(d_model, hidden, bits, group_size))


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
        experts = []
        for l in range(self.n_layers):
            for e in range(self.n_experts):
                experts.append({
                    "layer": l, "expert": e,
                    "popularity": float(self.popularity[l, e]),
                    "mean_weight": float(self.mean_weight[l, e]),
                    "loss_increase": {str(b): float(self.loss_nats[l, e, i]) for i, b in enumerate(self.bits)},
                    "bytes": {str(b): int(self.nbytes[l, e, i]) for i, b in enumerate(self.bits)},
                })
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


def _fail(source: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {msg}")


def profile_from_dict(doc: dict[str, Any], source: str = "<dict>") -> Profile:
    """Validate a "coel-profile" v1 document and turn it into arrays; errors name the entry."""
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise _fail(source, f'not a profile: "format" must be "{PROFILE_FORMAT}"')
    if doc.get("version") != PROFILE_VERSION:
        raise _fail(source, f"profile version {doc.get('version')!r} unsupported (want {PROFILE_VERSION})")
    for key in ("model_config", "bits", "experts", "backbone_bytes"):
        if key not in doc:
            raise _fail(source, f'missing key "{key}"')
    cfg = MoEConfig.from_dict(doc["model_config"], source=f"{source}: model_config")
    bits = tuple(int(b) for b in doc["bits"])
    if list(bits) != sorted(set(bits)) or any(b not in DEFAULT_BITS for b in bits):
        raise _fail(source, f"bits must be ascending, distinct, from {list(DEFAULT_BITS)} (got {list(bits)})")
    L, E, B = cfg.n_layers, cfg.n_experts, len(bits)
    pop = np.full((L, E), np.nan)
    mw = np.zeros((L, E))
    loss = np.zeros((L, E, B))
    nbytes = np.zeros((L, E, B), dtype=np.int64)
    for i, ent in enumerate(doc["experts"]):
        where = f"experts[{i}]"
        try:
            l, e = int(ent["layer"]), int(ent["expert"])
            if not (0 <= l < L and 0 <= e < E):
                raise _fail(source, f"{where}: layer {l} / expert {e} outside {L} layers x {E} experts")
            pop[l, e] = float(ent["popularity"])
            mw[l, e] = float(ent.get("mean_weight", 0.0))
            for j, b in enumerate(bits):
                loss[l, e, j] = float(ent["loss_increase"][str(b)]) if b != 16 else float(
                    ent["loss_increase"].get("16", 0.0))
                kl = (ent.get("output_kl") or {}).get(str(b))
                if kl is not None:  # the loss increase of one expert is noise-level at >= 3 bits
                    # (docs/benchmarks.md, quantization quality); its output KL is measurable and
                    # never negative: a width's damage is the larger of the two
                    loss[l, e, j] = max(loss[l, e, j], float(kl))
                nbytes[l, e, j] = int(ent["bytes"][str(b)])
        except KeyError as exc:
            raise _fail(source, f"{where}: missing {exc}") from None
        except (TypeError, ValueError) as exc:
            raise _fail(source, f"{where}: {exc}") from None
    missing = np.argwhere(np.isnan(pop))
    if len(missing):
        l, e = missing[0]
        raise _fail(source, f"no entry for layer {l} expert {e} ({len(missing)} experts missing)")
    if (pop < 0).any() or (nbytes <= 0).any():
        raise _fail(source, "popularity must be >= 0 and bytes > 0")
    bad = np.argwhere(np.diff(nbytes, axis=2) <= 0)
    if len(bad):
        l, e, j = bad[0]
        raise _fail(source, f"layer {l} expert {e}: bytes must grow with bits ({bits[j]} -> {bits[j+1]})")
    coact = np.zeros((L, E, E))
    same = (doc.get("coactivation") or {}).get("same_layer")
    if same is not None:
        arr = np.asarray(same, dtype=float)
        if arr.shape != (L, E, E):
            raise _fail(source, f"coactivation.same_layer has shape {arr.shape}, want {(L, E, E)}")
        coact = _normalise_coactivation(arr, pop)
    bb = doc["backbone_bytes"]
    backbone = int(bb["16"]) if "16" in bb else int(bb["32"]) // 2
    # measurement noise can make a wider width look worse (or quantization look helpful); like
    # coel_model.allocate, read each loss as the largest measured at this or any wider width, >= 0
    loss = np.maximum(np.maximum.accumulate(loss[:, :, ::-1], axis=2)[:, :, ::-1], 0.0)
    return Profile(cfg=cfg, group_size=int(doc.get("group_size", 64)), bits=bits, popularity=pop,
                   mean_weight=mw, loss_nats=loss, nbytes=nbytes, coact_same=coact,
                   backbone_bytes=backbone, source=source, calibration=dict(doc.get("calibration", {})))


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
    return profile_from_dict(read_json(path, "profile not found"), source=str(Path(path)))


def _zipf_popularity(rng: np.random.Generator, n: int, top_k: int, skew: float) -> np.ndarray:
    """Zipf weights 1/rank^skew over a random ranking, scaled to sum to top_k, each capped at 1
    (an expert cannot fire for more than every token): water-filling keeps the sum at top_k."""
    w = 1.0 / np.arange(1, n + 1) ** skew
    w = w[rng.permutation(n)]
    p = w / w.sum() * top_k
    for _ in range(n):
        over = p > 1.0
        if not over.any():
            break
        excess = (p[over] - 1.0).sum()
        p[over] = 1.0
        free = ~over & (p < 1.0)
        p[free] += excess * p[free] / p[free].sum()
    return p


def synthetic_profile(cfg: MoEConfig, seed: int = 0, skew: float = 1.0, group_size: int = 64,
                      bits: tuple[int, ...] = DEFAULT_BITS, backbone_params: int | None = None,
                      clusters_per_layer: int | None = None, importance_sigma: float = 0.5,
                      source: str = "synthetic") -> Profile:
    """A profile with the real shape of `cfg` and made-up statistics, for planning at scale.

    popularity: per layer, Zipf(skew) over a seeded random ranking, summing to top_k.
    loss_increase[b]: SYNTHETIC_TOTAL_LOSS_NATS[b] split over all experts in proportion to an
      importance = popularity * mean_weight^1.5 * lognormal(sigma) noise (importance is related
      to, but not the same as, popularity).
    bytes[b]: exact group-wise packing (`packed_expert_bytes`).
    co-activation: experts belong to seeded latent groups; pairs in the same group fire together
      4x more often than chance; rows sum to popularity * (top_k - 1).
    """
    rng = np.random.default_rng(seed)
    L, E, k = cfg.n_layers, cfg.n_experts, cfg.top_k
    pop = np.stack([_zipf_popularity(rng, E, k, skew) for _ in range(L)])
    rel = pop / (k / E)
    mean_w = np.clip((1.0 / k) * rel ** 0.3, 1e-3, 1.0)
    importance = pop * mean_w ** 1.5 * rng.lognormal(0.0, importance_sigma, size=(L, E))
    importance /= importance.sum()
    for b in bits:
        if b not in SYNTHETIC_TOTAL_LOSS_NATS:
            raise ConfigError(f"synthetic_profile: no loss anchor for {b} bits")
    loss = np.stack([importance * SYNTHETIC_TOTAL_LOSS_NATS[b] for b in bits], axis=2)
    per_bits = np.array([packed_expert_bytes(cfg.d_model, cfg.expert_hidden, b, group_size) for b in bits],
                        dtype=np.int64)
    nbytes = np.broadcast_to(per_bits, (L, E, len(bits))).copy()
    n_groups = clusters_per_layer or max(2, E // 8)
    coact = np.zeros((L, E, E))
    for l in range(L):
        grp = rng.integers(0, n_groups, size=E)
        aff = np.where(grp[:, None] == grp[None, :], 4.0, 1.0)
        m = np.outer(pop[l], pop[l]) * aff
        np.fill_diagonal(m, 0.0)
        rows = m.sum(1, keepdims=True)
        m = m / np.where(rows > 0, rows, 1.0) * (pop[l] * (k - 1))[:, None]
        coact[l] = np.minimum((m + m.T) / 2, np.minimum.outer(pop[l], pop[l]))
    bb_params = backbone_params if backbone_params is not None else cfg.param_counts()["backbone"]
    return Profile(cfg=cfg, group_size=group_size, bits=tuple(bits), popularity=pop, mean_weight=mean_w,
                   loss_nats=loss, nbytes=nbytes, coact_same=coact, backbone_bytes=int(2 * bb_params),
                   source=source, calibration={"tokens": 0, "source": f"synthetic seed={seed} skew={skew}"})


# ---- model configs without weights (controller/configs/*.json) ----

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ModelSpec:
    """A model config without weights plus how to fabricate its profile."""
    name: str
    cfg: MoEConfig
    backbone_params: int | None
    skew: float
    seed: int
    source: str

    def profile(self) -> Profile:
        return synthetic_profile(self.cfg, seed=self.seed, skew=self.skew,
                                 backbone_params=self.backbone_params, source=f"{self.source} (synthetic)")


def bundled_model_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """Read controller/configs/<name>.json (or a path): {"format":"coel-model-config","name",
    "model_config":{MoEConfig},"backbone_params":int|null,"synthetic":{"skew","seed"},"notes"}."""
    p = Path(name_or_path)
    if not p.exists():
        cand = CONFIG_DIR / f"{name_or_path}.json"
        if not cand.exists():
            raise ConfigError(f"model config {str(name_or_path)!r} not found; bundled: {bundled_model_configs()}")
        p = cand
    doc = read_json(p, "model config not found")
    known = {"format", "name", "model_config", "backbone_params", "synthetic", "notes"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown keys {unknown}; known keys: {sorted(known)}")
    if doc.get("format") != "coel-model-config":
        raise ConfigError(f'{p}: "format" must be "coel-model-config"')
    cfg = MoEConfig.from_dict(doc["model_config"], source=f"{p}: model_config")
    syn = doc.get("synthetic", {})
    bad = sorted(set(syn) - {"skew", "seed"})
    if bad:
        raise ConfigError(f"{p}: unknown synthetic keys {bad}; known: ['seed', 'skew']")
    skew = float(syn.get("skew", 1.0))
    if not 0.0 <= skew <= 4.0:
        raise ConfigError(f"{p}: synthetic.skew must be in [0, 4] (got {skew})")
    bbp = doc.get("backbone_params")
    return ModelSpec(name=str(doc.get("name", p.stem)), cfg=cfg,
                     backbone_params=int(bbp) if bbp is not None else None,
                     skew=skew, seed=int(syn.get("seed", 0)), source=str(p))

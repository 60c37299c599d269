"""Synthetic profiles for real-scale configs that have no weights here, and those configs
(controller/configs/*.json).

`synthetic_profile` fabricates a `Profile` (coel_model/profile_format.py, the type every profile
reader uses) with the real shape of a `MoEConfig`: Zipf-like popularity, loss increase falling
with bits, exact group-wise packed bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coel_model.config import MoEConfig, read_json
from coel_model.errors import ConfigError
from coel_model.profile_format import Profile

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

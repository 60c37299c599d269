"""Held-out evaluation: perplexity beside a unigram baseline, agreement with a reference model,
and the routing statistics (per-expert popularity, normalised entropy) the model card reports.

Why the unigram baseline: a perplexity number alone says little for a 2048-token BPE; "how much
better than token frequencies" does. The unigram model is fit on the TRAINING split with add-one
smoothing; `coel train` stores its counts as `unigram_counts.json` so eval gives the same number
on any machine, and they are rebuilt from the local stdlib when the file is missing.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from coel_model import corpus
from coel_model.errors import CheckpointError
from coel_model.model import MoEModel, Routing
from coel_model.tokenizer import TOKENIZER_FILE, Tokenizer

UNIGRAM_FILE = "unigram_counts.json"
DEFAULT_MAX_TOKENS = 16384
MAX_WINDOW = 512


def base_model_dir(model_dir: str | Path) -> Path | None:
    """The `base_model` a quantized checkpoint names in quant.json (relative to it, or absolute)."""
    qj = Path(model_dir) / "quant.json"
    if not qj.exists():
        return None
    try:
        base = json.loads(qj.read_text()).get("base_model")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{qj}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not base:
        return None
    p = Path(base)
    return p if p.is_absolute() else (Path(model_dir) / p).resolve()


def find_tokenizer(*dirs: str | Path | None) -> Tokenizer:
    """The first tokenizer.json among the given checkpoint dirs (quantized dirs may lack one)."""
    tried = []
    for d in dirs:
        if d is None:
            continue
        f = Path(d) / TOKENIZER_FILE
        tried.append(str(f))
        if f.exists():
            return Tokenizer.load(f)
    raise CheckpointError(f"no tokenizer found; looked for {tried}")


def unigram_counts_from_training_split(tok: Tokenizer) -> list[int]:
    counts = [0] * tok.vocab_size
    for t in tok.encode_documents([d.text for d in corpus.training_documents()]):
        counts[t] += 1
    return counts


def write_unigram_counts(model_dir: str | Path, tok: Tokenizer, counts: list[int] | None = None) -> Path:
    counts = counts if counts is not None else unigram_counts_from_training_split(tok)
    f = Path(model_dir) / UNIGRAM_FILE
    f.write_text(json.dumps({"source": "training split, add-one smoothing applied at eval",
                             "tokens": sum(counts), "counts": counts}) + "\n")
    return f


def load_unigram_counts(tok: Tokenizer, *dirs: str | Path | None) -> list[int]:
    for d in dirs:
        if d is not None and (Path(d) / UNIGRAM_FILE).exists():
            counts = json.loads((Path(d) / UNIGRAM_FILE).read_text())["counts"]
            if len(counts) != tok.vocab_size:
                raise CheckpointError(f"{Path(d) / UNIGRAM_FILE}: {len(counts)} counts for a "
                                      f"{tok.vocab_size}-token vocabulary")
            return counts
    return unigram_counts_from_training_split(tok)


def unigram_perplexity(counts: list[int], eval_ids: list[int]) -> float:
    """exp(mean -log p(token)) with p = (count + 1) / (total + V)."""
    V, total = len(counts), sum(counts)
    nll = sum(-math.log((counts[t] + 1) / (total + V)) for t in eval_ids)
    return math.exp(nll / max(1, len(eval_ids)))


def eval_token_ids(tok: Tokenizer, split: str, max_tokens: int) -> list[int]:
    ids = tok.encode_documents(corpus.split_texts(split))
    return ids[:max_tokens] if max_tokens > 0 else ids


def windows(ids: list[int], window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of window+1 tokens (inputs + targets share the boundary token)."""
    out, i = [], 0
    while i + 1 < len(ids):
        out.append(torch.tensor(ids[i:i + window + 1]))
        i += window
    return out


@dataclass
class EvalResult:
    tokens: int  # predicted positions
    loss_nats: float
    perplexity: float
    top1_agreement: float | None


@torch.inference_mode()
def evaluate_model(model: MoEModel, ids: list[int], window: int = MAX_WINDOW,
                   reference: MoEModel | None = None) -> EvalResult:
    """Mean cross-entropy over windows; with a reference, the fraction of equal argmax positions."""
    window = min(window, model.cfg.max_seq_len)
    nll, n, agree = 0.0, 0, 0
    for w in windows(ids, window):
        x, y = w[:-1].unsqueeze(0), w[1:]
        logits = model(x)[0]  # (T, V)
        nll += F.cross_entropy(logits.float(), y, reduction="sum").item()
        n += y.numel()
        if reference is not None:
            agree += int((reference(x)[0].argmax(-1) == logits.argmax(-1)).sum())
    if n == 0:
        raise CheckpointError("evaluation split yielded no tokens")
    loss = nll / n
    return EvalResult(n, loss, math.exp(loss), agree / n if reference is not None else None)


@torch.inference_mode()
def routing_stats(model: MoEModel, ids: list[int], window: int = MAX_WINDOW) -> dict:
    """Per-layer expert popularity (fraction of tokens routed, sums to top_k) and H/log(E),
    where H is the entropy of the popularity normalised to sum to 1 (1.0 = perfectly uniform)."""
    cfg = model.cfg
    counts = torch.zeros(cfg.n_layers, cfg.n_experts, dtype=torch.float64)
    n_tokens = 0

    def observer(layer: int, routing: Routing) -> None:
        counts[layer] += torch.bincount(routing.expert_ids.reshape(-1), minlength=cfg.n_experts).double()

    for w in windows(ids, min(window, cfg.max_seq_len)):
        model(w[:-1].unsqueeze(0), observer=observer)
        n_tokens += w.numel() - 1
    return popularity_summary(counts, n_tokens)


def popularity_summary(counts: torch.Tensor, n_tokens: int) -> dict:
    """counts (L, E) of routed assignments -> per-layer popularity, H/log(E) and max/min share."""
    n_experts = counts.shape[1]
    layers = []
    for l in range(counts.shape[0]):
        share = counts[l].double() / counts[l].sum()
        nz = share[share > 0]
        ent = float(-(nz * nz.log()).sum())
        layers.append({"layer": l, "popularity": [round(float(c) / n_tokens, 4) for c in counts[l]],
                       "normalised_entropy": round(ent / math.log(n_experts), 4),
                       "max_over_min": round(float(share.max() / share.min()), 2) if share.min() > 0 else None})
    return {"tokens": n_tokens, "layers": layers}


def run_eval(model_dir: str | Path, reference_dir: str | Path | None = None, split: str = "heldout",
             max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Everything `coel eval --json` prints."""
    from coel_model.checkpoint import load_model
    t0 = time.monotonic()
    base = base_model_dir(model_dir)
    ref_dir = Path(reference_dir) if reference_dir else base
    if ref_dir is not None and not Path(ref_dir).is_dir():
        raise CheckpointError(f"{ref_dir}: reference/base model directory not found")
    model = load_model(model_dir)
    reference = load_model(ref_dir) if ref_dir is not None else None
    if reference is not None and reference.cfg.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"{ref_dir}: reference vocab {reference.cfg.vocab_size} != model vocab "
                              f"{model.cfg.vocab_size}")
    tok = find_tokenizer(model_dir, base, ref_dir)
    ids = eval_token_ids(tok, split, max_tokens)
    res = evaluate_model(model, ids, MAX_WINDOW, reference)
    counts = load_unigram_counts(tok, model_dir, base, ref_dir)
    # the unigram model predicts the same positions the LM does (every token but each window's first)
    targets = [t for w in windows(ids, min(MAX_WINDOW, model.cfg.max_seq_len)) for t in w[1:].tolist()]
    out = {"model": str(model_dir), "split": split, "tokens": res.tokens,
           "loss_nats": round(res.loss_nats, 5), "perplexity": round(res.perplexity, 4),
           "unigram_perplexity": round(unigram_perplexity(counts, targets), 4),
           "expert_bytes": model.expert_bytes()}
    if reference is not None:
        out["reference"] = str(ref_dir)
        out["top1_agreement"] = round(res.top1_agreement, 5)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out

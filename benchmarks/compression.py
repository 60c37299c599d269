"""Token compression on the wire: bytes and quality per setting, with every routed expert remote.

For each prompt length (64, 256, 1024 by default; clipped to the model's max_seq_len, reported)
it takes non-overlapping windows of the held-out split, runs the uncompressed model and then the
model behind a CompressingExecutor per setting, side by side in one run, and reports:
  prefill reduction  raw fp32 payload bytes / compressed payload bytes (requests + replies)
  top1               fraction of positions whose argmax matches the uncompressed model
  ppl, dppl          perplexity on the window and its relative increase
  pruned, merged     fraction of remote assignments pruned, of sent rows merged away
  decode reduction   the same ratio over greedy decode steps (one token per hop)
  hdr                msgpack header bytes per message vs mean payload bytes (decode-relevant)

    .venv/bin/python benchmarks/compression.py [--model models/tiny-moe] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coel_model.generate import generate  # noqa: E402
from coel_model.model import MoEModel, init_weights  # noqa: E402
from nodes.compression import (NONE, CompressingExecutor, CompressionSettings,  # noqa: E402
                               compress_group, compress_reply, decompress_group, decompress_reply,
                               measure_compression_cost)

SETTINGS = [
    NONE,
    CompressionSettings(act_dtype="fp16"),
    CompressionSettings(act_dtype="int8"),
    CompressionSettings(prune_beta=0.1, act_dtype="int8"),
    CompressionSettings(prune_beta=0.2, act_dtype="int8"),
    CompressionSettings(prune_beta=0.2, protect_top_frac=0.0, act_dtype="int8"),
    CompressionSettings(prune_beta=0.5, act_dtype="int8"),
    CompressionSettings(prune_beta=0.5, prune_renorm=True, act_dtype="int8"),
    CompressionSettings(fuse_threshold=0.97, act_dtype="int8"),
    CompressionSettings(fuse_threshold=0.9, act_dtype="int8"),
    CompressionSettings(prune_beta=0.1, fuse_threshold=0.97, act_dtype="int8"),
    CompressionSettings(prune_beta=0.2, drop_tokens_frac=0.1, act_dtype="int8"),
]


def load(model_dir: Path, data_file: Path, max_tokens: int) -> tuple[MoEModel, list[int], str]:
    """The bundled model and held-out token ids; a random-init stand-in if the model is missing."""
    if (model_dir / "config.json").exists():
        from coel_model.checkpoint import load_model
        from coel_model.evaluate import base_model_dir, find_tokenizer
        model = load_model(model_dir)
        tok = find_tokenizer(model_dir, base_model_dir(model_dir))
        text = data_file.read_text()
        ids = tok.encode(text)[:max_tokens]
        return model, ids, str(model_dir)
    from coel_model.train import default_model_config
    cfg = default_model_config()
    model = MoEModel(cfg)
    init_weights(model, seed=0)
    ids = [b % cfg.vocab_size for b in data_file.read_bytes()[:max_tokens]]
    return model.eval(), ids, f"RANDOM-INIT stand-in ({model_dir} not found; bytes as tokens)"


def prefill_rows(model: MoEModel, ids: list[int], length: int, n_windows: int) -> list[dict]:
    """Aggregate measure_compression_cost over n_windows windows of `length` tokens."""
    wins = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:n_windows]
    if not wins:
        raise SystemExit(f"held-out split too short for one window of {length} tokens")
    acc: list[dict] = []
    for w in wins:
        rows = measure_compression_cost(model, torch.tensor([w]), SETTINGS)
        for i, r in enumerate(rows):
            if len(acc) <= i:
                acc.append({"label": r["label"], "settings": r["settings"], "raw": 0, "wire": 0,
                            "agree": 0.0, "nll": 0.0, "nll_ref": 0.0, "assign": 0, "pruned": 0,
                            "merged": 0, "messages": 0, "header": 0, "rows": 0})
            a, s = acc[i], r["stats"]
            a["raw"] += s["raw_bytes"]
            a["wire"] += s["wire_bytes"]
            a["agree"] += r["top1_agreement"] / len(wins)
            a["nll"] += r["nll"] / len(wins)
            a["nll_ref"] += r["nll_ref"] / len(wins)
            a["assign"] += s["assignments"]
            a["pruned"] += s["pruned"]
            a["merged"] += s["rows_merged"]
            a["messages"] += s["messages"]
            a["header"] += s["header_bytes"]
            a["rows"] += s["rows_sent"]
    out = []
    for a in acc:
        sent = max(a["assign"] - a["pruned"], 1)
        out.append({"label": a["label"], "name": a["label"], "settings": a["settings"],
                    "length": length, "windows": len(wins), "raw_bytes": a["raw"],
                    "wire_bytes": a["wire"], "bytes_ratio": a["wire"] / a["raw"],
                    "vector_bytes_ratio": a["wire"] / max(2 * a["rows"] * model.cfg.d_model * 4, 1),
                    "reduction": a["raw"] / a["wire"], "top1_agreement": a["agree"],
                    "loss_increase": a["nll"] - a["nll_ref"],
                    "ppl": float(torch.tensor(a["nll"]).exp()),
                    "ppl_ref": float(torch.tensor(a["nll_ref"]).exp()),
                    "ppl_increase": float(torch.tensor(a["nll"] - a["nll_ref"]).exp()) - 1.0,
                    "pruned_frac": a["pruned"] / max(a["assign"], 1), "merged_frac": a["merged"] / sent,
                    "header_bytes_per_msg": a["header"] / max(2 * a["messages"], 1),
                    "payload_bytes_per_msg": a["wire"] / max(2 * a["messages"], 1)})
    return out


def decode_rows(model: MoEModel, ids: list[int], prompt_len: int, steps: int) -> list[dict]:
    """Wire bytes of greedy decode steps only (stats reset after prefill) and token agreement."""
    prompt = ids[:prompt_len]
    ref = generate(model, prompt, steps, stop_at_eos=False)
    out = []
    for s in SETTINGS:
        ex = CompressingExecutor(model, s)
        toks = generate(model, prompt, steps, executor=ex, stop_at_eos=False,
                        on_token=lambda step, _t: ex.reset() if step == 0 else None)
        st = ex.stats
        same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref))
        out.append({"label": s.label(), "decode_steps": steps - 1, "raw_bytes": st.raw_bytes,
                    "wire_bytes": st.wire_bytes, "reduction": st.reduction,
                    "header_bytes": st.header_bytes, "messages": st.messages,
                    "tokens_equal_prefix": same})
    return out


def codec_timing(d: int, rows: int, repeats: int) -> list[dict]:
    """Microseconds to compress, decompress and unmerge one message of `rows` rows (both ways)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g)
    out = []
    for s in SETTINGS:
        t0 = time.perf_counter()
        for _ in range(repeats):
            grp = compress_group(x, s)
            y = decompress_group(grp.wire)
            decompress_reply(compress_reply(y, s), grp)
        out.append({"label": s.label(), "rows": rows, "us_per_msg": (time.perf_counter() - t0) / repeats * 1e6})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-moe")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "heldout.txt")
    ap.add_argument("--lengths", default="64,256,1024", help="prompt lengths (comma-separated)")
    ap.add_argument("--tokens-per-length", type=int, default=4096,
                    help="held-out tokens measured per length (windows = this / length, >= 1)")
    ap.add_argument("--decode-steps", type=int, default=17)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--cost-out", type=Path,
                    help="write the planner's cost table (prefill rows at --cost-length) as a JSON list")
    ap.add_argument("--cost-length", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    t_start = time.perf_counter()
    with torch.inference_mode():
        model, ids, source = load(args.model, args.data, max_tokens=max(lengths) * 64)
        max_len = model.cfg.max_seq_len
        result = {"model": source, "data": str(args.data), "d_model": model.cfg.d_model,
                  "n_layers": model.cfg.n_layers, "top_k": model.cfg.top_k,
                  "max_seq_len": max_len, "remote": "all routed experts", "prefill": [], "notes": []}
        for L in lengths:
            use = min(L, max_len)
            if use != L:
                result["notes"].append(f"length {L} exceeds max_seq_len {max_len}: measured {use}")
            n_win = max(1, args.tokens_per_length // use)
            for r in prefill_rows(model, ids, use, n_win):
                r["requested_length"] = L
                result["prefill"].append(r)
        result["decode"] = decode_rows(model, ids, 64, args.decode_steps)
        result["codec"] = codec_timing(model.cfg.d_model, 64, 200)
    result["seconds"] = time.perf_counter() - t_start
    goal = []
    for L in lengths:
        ok = [r for r in result["prefill"] if r["requested_length"] == L and r["top1_agreement"] >= 0.97]
        best = max(ok, key=lambda r: r["reduction"]) if ok else None
        goal.append({"length": L, "best_label": best and best["label"],
                     "reduction": best and best["reduction"],
                     "top1_agreement": best and best["top1_agreement"],
                     "meets_4x_at_97": bool(best and best["reduction"] >= 4.0)})
    result["goal"] = goal
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.cost_out:
        rows = [r for r in result["prefill"] if r["requested_length"] == args.cost_length]
        if not rows:
            raise SystemExit(f"--cost-length {args.cost_length} is not among --lengths {lengths}")
        args.cost_out.parent.mkdir(parents=True, exist_ok=True)
        args.cost_out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"model: {source}; d={model.cfg.d_model}, {model.cfg.n_layers} layers, top-{model.cfg.top_k}; "
          f"all routed experts remote; raw = fp32 rows both ways")
    for n in result["notes"]:
        print("note:", n)
    print(f"\n{'len':>5} {'setting':<28} {'reduct':>7} {'top1':>7} {'ppl':>8} {'dppl%':>7} "
          f"{'pruned%':>8} {'merged%':>8} {'B/msg':>7} {'hdrB':>5}")
    for r in result["prefill"]:
        print(f"{r['length']:>5} {r['label']:<28} {r['reduction']:>6.2f}x {r['top1_agreement']:>7.4f} "
              f"{r['ppl']:>8.3f} {100 * r['ppl_increase']:>7.2f} {100 * r['pruned_frac']:>8.1f} "
              f"{100 * r['merged_frac']:>8.1f} {r['payload_bytes_per_msg']:>7.0f} "
              f"{r['header_bytes_per_msg']:>5.0f}")
    print(f"\ndecode ({args.decode_steps - 1} greedy steps after a 64-token prompt; tokens equal = "
          f"steps before the first token differing from uncompressed)")
    print(f"{'setting':<28} {'reduct':>7} {'B/step':>8} {'hdrB/step':>9} {'tokens equal':>12}")
    for r in result["decode"]:
        steps = max(r["decode_steps"], 1)
        print(f"{r['label']:<28} {r['reduction']:>6.2f}x {r['wire_bytes'] / steps:>8.0f} "
              f"{r['header_bytes'] / steps:>9.0f} {r['tokens_equal_prefix']:>12}")
    print(f"\ncodec cost per 64-row message (compress + decompress + reply + unmerge), 1 thread")
    for r in result["codec"]:
        print(f"{r['label']:<28} {r['us_per_msg']:>8.1f} us")
    print("\ngoal (>= 4x fewer prefill bytes at >= 97% top-1 agreement):")
    for g in goal:
        if g["best_label"] is None:
            print(f"  len {g['length']}: no setting reaches 97% agreement")
        else:
            print(f"  len {g['length']}: best {g['best_label']} {g['reduction']:.2f}x at "
                  f"{g['top1_agreement']:.4f} -> {'MET' if g['meets_4x_at_97'] else 'NOT met'}")
    print(f"\n({result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
